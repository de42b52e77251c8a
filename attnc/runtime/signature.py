"""The ordered, typed parameter list of one generated Triton kernel, as plain data.

One `KernelSignature` per kernel is the single statement of its ABI: the emitter renders the kernel's `def`
from it, the ahead-of-time compile builds Triton's signature from it (`triton_types`), the autotuner's
resource checks compile through it, and the launcher binds arguments to it by name (`bind`). Parameters come
in groups, always in this order:

    io          the tensors the kernel reads and writes (q, k, v, o, ...), and its own ints (split sizes)
    backward    dQ only: the output it reads for the row delta (per block: its type)
    aux_grads   dQ only: the auxiliary-gradient buffers, read only under the `_AUX_GRAD` constexpr (per block)
    aux_grads_kv  dK/dV only: the same for reads of k's feature map
    spec        the spec's auxiliary tensors (each with its strides and extents), runtime scalars and size
                symbols
    uniforms    scalar sub-expressions hoisted to the host (`_ku<k>`)
    strides     q, k, v, o strides (b, h, n, d each)
    extents     H, G, M, N, D, E (M and N: in a varlen or paged launch the longest sequence's lengths, the
                pitch of the per-row buffers; each program then rebinds them to its own sequence's)
    varlen      packed variable-length batches: the int32 offsets cu_seqlens of q and of k/v, read only under
                the `_VARLEN` constexpr (a program then works on one sequence: `_M`, `_N` and the spec's
                length symbols become that sequence's lengths, the q/k/v/o pointers move to its start)
    paged       a paged KV cache (the forward kernels read it): the block table, each sequence's key count,
                the table's row stride and the page size, read only under the `_PAGED` constexpr (k and v
                rows are then looked up through the table; `_N` and the keys' length symbol become the
                sequence's); not in the combine
    shift       context parallelism: the global positions of q's and k's local row 0, read only under the
                `_SHIFT` constexpr (the spec's i and j, and the tile plan's bounds, are then global positions;
                memory is indexed locally)
    summaries   per-tile min/max of data-dependent mask terms (only for specs that have such terms)
    layout      an explicit runtime block layout, read only under the `_LAYOUT` constexpr
    probe       the visit counter of tests, written only under the `_COUNT_VISITS` constexpr
    constexprs  tile sizes, switches and the dot precision

A group that a kernel does not use is absent from its signature (the split-KV combine has no summaries, layout
or probe); a gated group that a launch does not use is bound to None (Triton specialises a None argument as a
constexpr, so the compiled kernel does not carry it) with its gate False (`bind`, and `compile_args` for the
ahead-of-time compile, so the compiled form is the launched one). The attention kernels' signatures differ
per block only in the spec and uniforms groups and the summaries' count (`BlockABI`): the kernels file
carries those as plain literals, from which the launcher rebuilds the emitter's signatures. This module
imports nothing from the compiler: the runtime launcher (and a standalone module's vendored runtime) use it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class Kind(enum.Enum):
    POINTER = "pointer"
    INT32 = "i32"
    INT64 = "i64"
    FLOAT = "fp32"
    CONSTEXPR = "constexpr"


# A pointer's element type, as Triton spells it without the star; INPUT stands for the dtype of q, k and v.
INPUT = "input"


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    dtype: str | None = None  # pointers only: "input", "fp32", "fp16", "bf16", "fp64", "i64", "i32", "i1"

    def triton_type(self, input_dtype: str = INPUT) -> str:
        """Triton's signature type ("*fp16", "i32", "constexpr") with INPUT read as `input_dtype`."""
        if self.kind is Kind.POINTER:
            return "*" + (input_dtype if self.dtype == INPUT else str(self.dtype))
        return self.kind.value

    @classmethod
    def from_triton_type(cls, name: str, ty: str) -> Param:
        """The inverse of `triton_type` (before INPUT is resolved): how a kernels file states a parameter."""
        if ty.startswith("*"):
            return cls(name, Kind.POINTER, ty[1:])
        return cls(name, Kind(ty))


class Group(enum.Enum):
    IO = "io"
    BACKWARD = "backward"  # the dQ kernel's per-block backward group (`BlockABI.backward`)
    AUX_GRADS = "aux_grads"  # the dQ kernel's aux-gradient buffers, under `_AUX_GRAD` (`BlockABI.aux_grads`)
    AUX_GRADS_KV = "aux_grads_kv"  # the dK/dV kernel's (k's feature map), under `_AUX_GRAD` (`aux_grads_kv`)
    SPEC = "spec"
    UNIFORMS = "uniforms"
    STRIDES = "strides"
    EXTENTS = "extents"
    VARLEN = "varlen"
    PAGED = "paged"
    SHIFT = "shift"
    SUMMARIES = "summaries"
    LAYOUT = "layout"
    PROBE = "probe"
    CONSTEXPRS = "constexprs"


@dataclass(frozen=True)
class ParamGroup:
    group: Group
    params: tuple[Param, ...]
    gate: str | None = None  # the constexpr under which the kernel reads the group (None: always)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


def pointer(name: str, dtype: str = INPUT) -> Param:
    return Param(name, Kind.POINTER, dtype)


def i32(name: str) -> Param:
    return Param(name, Kind.INT32)


def f32(name: str) -> Param:
    return Param(name, Kind.FLOAT)


def constexpr(name: str) -> Param:
    return Param(name, Kind.CONSTEXPR)


# ---- the fixed groups ---------------------------------------------------------------------------------------

QKV_STRIDES = tuple(f"_s{t}_{a}" for t in ("q", "k", "v", "o") for a in ("b", "h", "n", "d"))
# _M/_N: the rows of q and k (a varlen or paged launch: the longest sequence's, which is the pitch of the
# per-row buffers; each program then rebinds them to its own sequence's lengths).
EXTENTS = ("_NH", "_NG", "_M", "_N", "_D", "_E")
VARLEN_GATE = "_VARLEN"
PAGED_GATE = "_PAGED"
SHIFT_GATE = "_SHIFT"
AUX_GRAD_GATE = "_AUX_GRAD"  # the dQ kernel reduces auxiliary gradients (its aux_grads group is bound)
# The tile loops read q, k, v and dO through tensor descriptors (TMA on sm_90 and later: `cp.async.bulk.tensor`)
# instead of pointer loads. A launch sets it when every such tensor qualifies (`triton._tma_ok`).
TMA_GATE = "_TMA"
# The key loops are warp-specialised (`tl.range(..., warp_specialize=_WS)`: producer warps issue the TMA
# loads, consumer warp groups the MMAs and the softmax). A schedule's choice (`_KernelConfig`), taken by a
# launch only with `_TMA`: Triton 3.9 cannot partition a loop whose tiles come through pointer loads.
WS_GATE = "_WS"
CONSTEXPRS = (
    "_COUNT_VISITS",
    "_LAYOUT",
    VARLEN_GATE,
    PAGED_GATE,
    SHIFT_GATE,
    TMA_GATE,
    WS_GATE,
    "_BLOCK_M",
    "_BLOCK_N",
    "_BLOCK_D",
    "_BLOCK_E",
    "_DOT_PRECISION",
)
# Per (b, h, query block) a list of key blocks, and its transpose per (b, h, key block) for dK/dV; pointers,
# their strides and the block sizes (see the runtime's BlockLayout).
LAYOUT_POINTERS = ("_LKV_IDX", "_LKV_CNT", "_LQ_IDX", "_LQ_CNT")
LAYOUT_INTS = (
    *(f"_slk_{a}" for a in "bhmk"),
    *(f"_slkc_{a}" for a in "bhm"),
    *(f"_slq_{a}" for a in "bhnk"),
    *(f"_slqc_{a}" for a in "bhn"),
    "_QBLK",
    "_KVBLK",
)

STRIDES_GROUP = ParamGroup(Group.STRIDES, tuple(i32(n) for n in QKV_STRIDES))
EXTENTS_GROUP = ParamGroup(Group.EXTENTS, tuple(i32(n) for n in EXTENTS))
LAYOUT_GROUP = ParamGroup(
    Group.LAYOUT,
    (*(pointer(n, "i32") for n in LAYOUT_POINTERS), *(i32(n) for n in LAYOUT_INTS)),
    gate="_LAYOUT",
)
PROBE_GROUP = ParamGroup(Group.PROBE, (pointer("_VISITS", "i32"),), gate="_COUNT_VISITS")
# A paged KV cache (vLLM's and FlashInfer's layout): k and v are pages [num_pages, page_size, G, D|E] seen as
# rows; the block table [B, max_pages] lists each sequence's pages, `_KV_LEN` [B] its number of keys.
PAGED_GROUP = ParamGroup(
    Group.PAGED,
    (pointer("_BT", "i32"), pointer("_KV_LEN", "i32"), i32("_sbt_b"), i32("_PAGE")),
    gate=PAGED_GATE,
)
# Packed variable-length batches (FlashAttention's varlen convention): [nseq + 1] int32 offsets of each
# sequence's first row in the packed q (and o) and in the packed k and v.
VARLEN_GROUP = ParamGroup(Group.VARLEN, (pointer("_CU_Q", "i32"), pointer("_CU_K", "i32")), gate=VARLEN_GATE)
# Context parallelism (attnc.distributed): the global positions of local row 0 of q and of k. The kernels then
# index the local tensors as always but evaluate the spec (score, mask, tile plan) at global positions.
SHIFT_GROUP = ParamGroup(Group.SHIFT, (i32("_Q_POS"), i32("_K_POS")), gate=SHIFT_GATE)


def summary_group(count: int) -> ParamGroup:
    """Per summarised term n: query-tile min and max, key-tile min and max (int64, one per tile)."""
    names = [f"_S{side}{bound}{n}" for n in range(count) for side in "QK" for bound in ("MIN", "MAX")]
    return ParamGroup(Group.SUMMARIES, tuple(pointer(x, "i64") for x in names))


def constexpr_group(names: Sequence[str] = CONSTEXPRS) -> ParamGroup:
    return ParamGroup(Group.CONSTEXPRS, tuple(constexpr(n) for n in names))


# ---- a kernel's signature ---------------------------------------------------------------------------------------


class BindError(TypeError):
    """Arguments that do not fit a kernel's signature (a missing or unknown group, a wrong count)."""


@dataclass(frozen=True)
class KernelSignature:
    name: str  # the kernel function's name
    groups: tuple[ParamGroup, ...]

    @property
    def params(self) -> tuple[Param, ...]:
        return tuple(p for g in self.groups for p in g.params)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def runtime(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.kind is not Kind.CONSTEXPR)

    @property
    def constexprs(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.kind is Kind.CONSTEXPR)

    def has(self, group: Group) -> bool:
        return any(g.group is group for g in self.groups)

    def group(self, group: Group) -> ParamGroup:
        for g in self.groups:
            if g.group is group:
                return g
        raise KeyError(f"{self.name} has no {group.value} parameters")

    def without(self, *groups: Group) -> tuple[ParamGroup, ...]:
        return tuple(g for g in self.groups if g.group not in groups)

    def triton_types(self, input_dtype: str, absent: Sequence[Group] = ()) -> dict[str, str]:
        """{parameter: Triton type} of the runtime parameters (for `ASTSource`); the parameters of the
        gated groups in `absent` are left out (they are bound to None: constexprs)."""
        skip = {n for g in self.groups if g.group in absent for n in g.names}
        return {p.name: p.triton_type(input_dtype) for p in self.runtime if p.name not in skip}

    def compile_args(
        self, input_dtype: str, constexprs: Mapping[str, object], absent: Sequence[Group] = ()
    ) -> tuple[dict[str, str], dict[str, object]]:
        """What the ahead-of-time compile takes for one launch form, exactly as `bind` would bind it:
        {runtime parameter: Triton type} and {constexpr: value}. The gated groups in `absent` are bound to
        None with their gates False, the kernel's other gates are True; `constexprs` gives the rest of the
        constexprs group by name."""
        ungated = [g.value for g in absent if self.has(g) and self.group(g).gate is None]
        if ungated:
            raise BindError(
                f"{self.name}: the {', '.join(ungated)} parameters are not gated, so never absent"
            )
        gates = {g.gate: g.group not in absent for g in self.groups if g.gate is not None}
        values = self.bind(
            constexprs={**gates, **constexprs},
            **{
                g.group.value: g.names
                for g in self.groups
                if g.group is not Group.CONSTEXPRS and g.group not in absent
            },
        )
        types = self.triton_types(input_dtype, absent)
        return types, {n: v for n, v in values.items() if n not in types}

    def bind(self, **values: Sequence[object] | Mapping[str, object] | None) -> dict[str, object]:
        """Arguments by name, from values per group (keyword: the group's name, e.g. `io=(q, k, v, ...)`):
        a sequence in the group's order or a mapping by parameter name. A gated group given None (or not
        given) binds None to each of its parameters and False to its gate."""
        known = {g.group.value for g in self.groups}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BindError(
                f"{self.name}: no parameter group {', '.join(unknown)} (groups: {', '.join(known)})"
            )
        # A gate follows from whether its group was given, unless the caller sets it.
        gates = {g.gate: values.get(g.group.value) is not None for g in self.groups if g.gate is not None}
        out: dict[str, object] = {}
        for g in self.groups:
            given = values.get(g.group.value)
            if given is None:
                if g.gate is None and g.params:
                    raise BindError(
                        f"{self.name}: missing the {g.group.value} parameters {', '.join(g.names)}"
                    )
                out.update(dict.fromkeys(g.names))
                continue
            if isinstance(given, Mapping):
                given = {**{n: v for n, v in gates.items() if n in g.names}, **given}
                missing = [n for n in g.names if n not in given]
                extra = sorted(set(given) - set(g.names))
                if missing or extra:
                    raise BindError(
                        f"{self.name}: {g.group.value} parameters: missing {missing or 'none'}, "
                        f"unknown {extra or 'none'}"
                    )
                out.update({n: given[n] for n in g.names})
            else:
                seq = tuple(given)
                if len(seq) != len(g.params):
                    raise BindError(
                        f"{self.name}: {len(seq)} values for the {len(g.params)} {g.group.value} parameters "
                        f"({', '.join(g.names)})"
                    )
                out.update(zip(g.names, seq, strict=True))
        return out


# ---- the attention kernels of one block ---------------------------------------------------------------------

# The kernels of one attention block, by kind: `_<block>_<kind>_kernel`.
ATTENTION_KINDS = ("fwd", "bwd_dkdv", "bwd_dq", "fwd_split", "fwd_combine")

_Q, _K, _V = pointer("_Q"), pointer("_K"), pointer("_V")
ATTENTION_IO: dict[str, tuple[Param, ...]] = {
    "fwd": (_Q, _K, _V, pointer("_O"), pointer("_ORAW", "fp32"), pointer("_STAT", "fp32")),
    "bwd_dkdv": (_Q, _K, _V, *(pointer(n, "fp32") for n in ("_DO", "_STAT", "_DELTA", "_DK", "_DV"))),
    # dQ runs first: it computes the row delta (stored to _DELTA for dK/dV), less d lse (_DSTAT) for softmax.
    "bwd_dq": (_Q, _K, _V, *(pointer(n, "fp32") for n in ("_DO", "_STAT", "_DELTA", "_DQ", "_DSTAT"))),
    # Split-KV decoding: partials in float32, then the combine writes o and the row statistic.
    "fwd_split": (_Q, _K, _V, pointer("_OPART", "fp32"), pointer("_LPART", "fp32"), i32("_SPLIT_N")),
    "fwd_combine": (
        pointer("_OPART", "fp32"),
        pointer("_LPART", "fp32"),
        i32("_NSPLIT"),
        pointer("_O"),
        pointer("_ORAW", "fp32"),
        pointer("_STAT", "fp32"),
    ),
}
# The combine reads neither tiles of k nor a layout, and counts no visits: none of those groups, nor their gates.
_COMBINE_CONSTEXPRS = tuple(
    n for n in CONSTEXPRS if n not in (LAYOUT_GROUP.gate, PROBE_GROUP.gate, PAGED_GROUP.gate)
)

# How a kernels file states a block's own parameters (`BlockABI.to_data`): plain literals, so that the file
# needs nothing but triton to import.
_Params = tuple[tuple[str, str], ...]
ABIData = tuple[str, _Params, _Params, int, _Params, _Params, _Params]


@dataclass(frozen=True)
class BlockABI:
    """What is particular to one attention block in its kernels' signatures (the rest is fixed here): the
    spec group, the hoisted uniforms and how many data-dependent mask terms have tile summaries. The
    emitter renders each kernel's `def` from `signature(kind)`; the kernels file carries `to_data()`, from
    which the launcher rebuilds the same signatures (`from_data`)."""

    block: str  # the attention's name
    spec: ParamGroup
    uniforms: ParamGroup
    summaries: int = 0
    # The dQ kernel's backward group: `_OB`, the output it reads for the row delta (o in the input dtype, or
    # the float32 raw output of a spec with an epilogue).
    backward: ParamGroup = ParamGroup(Group.BACKWARD, (pointer("_OB"),))
    # One float32 buffer per auxiliary read whose gradient the dQ kernel reduces (`_GA<n>` per-program
    # partials, `_GD<n>` dense dS tiles), gated: a launch whose learned inputs need no gradient binds None.
    aux_grads: ParamGroup = ParamGroup(Group.AUX_GRADS, (), gate=AUX_GRAD_GATE)
    # The dK/dV kernel's: one float32 buffer per read of k's feature map (`_GK<n>`), gated the same way.
    aux_grads_kv: ParamGroup = ParamGroup(Group.AUX_GRADS_KV, (), gate=AUX_GRAD_GATE)

    def _aux(self, kind: str) -> ParamGroup | None:
        """The kernel's gated aux-gradient group, if it has one."""
        group = {"bwd_dq": self.aux_grads, "bwd_dkdv": self.aux_grads_kv}.get(kind)
        return group if group is not None and group.params else None

    def _io(self, kind: str) -> tuple[Param, ...]:
        """The kernel's tensors. dO is the inputs' dtype, as autograd hands it over (the kernels widen it where
        they need float32): half the bytes of each dO tile's loads and registers, which the dK/dV kernel's
        128 x 64 tiles need on sm_90 (D = 128: 336 spill bytes with a float32 dO, none with fp16). Under an
        output epilogue (`_DOUT`) it is the float32 dO of the raw output that the dQ kernel writes."""
        io = ATTENTION_IO[kind]
        if kind in ("bwd_dq", "bwd_dkdv") and "_DOUT" not in self.backward.names:
            io = tuple(pointer("_DO") if p.name == "_DO" else p for p in io)
        return io

    def signature(self, kind: str) -> KernelSignature:
        if kind not in ATTENTION_IO:
            raise ValueError(f"kernel kind {kind!r}: expected one of {', '.join(ATTENTION_KINDS)}")
        groups = [
            ParamGroup(Group.IO, self._io(kind)),
            *([self.backward] if kind == "bwd_dq" else []),
            *([aux] if (aux := self._aux(kind)) is not None else []),
            self.spec,
            self.uniforms,
            STRIDES_GROUP,
            EXTENTS_GROUP,
            VARLEN_GROUP,
            SHIFT_GROUP,
        ]
        if kind == "fwd_combine":
            groups.append(constexpr_group(_COMBINE_CONSTEXPRS))
        else:
            if self.summaries:
                groups.append(summary_group(self.summaries))
            gate = (AUX_GRAD_GATE,) if self._aux(kind) is not None else ()
            groups += [PAGED_GROUP, LAYOUT_GROUP, PROBE_GROUP, constexpr_group((*CONSTEXPRS, *gate))]
        return KernelSignature(f"_{self.block}_{kind}_kernel", tuple(groups))

    def signatures(self) -> dict[str, KernelSignature]:
        return {kind: self.signature(kind) for kind in ATTENTION_KINDS}

    def to_data(self) -> ABIData:
        def params(g: ParamGroup) -> tuple[tuple[str, str], ...]:
            return tuple((p.name, p.triton_type()) for p in g.params)

        return (
            self.block,
            params(self.spec),
            params(self.uniforms),
            self.summaries,
            params(self.backward),
            params(self.aux_grads),
            params(self.aux_grads_kv),
        )

    @classmethod
    def from_data(cls, data: ABIData) -> BlockABI:
        block, spec, uniforms, summaries, backward, aux_grads, aux_grads_kv = data

        def group(g: Group, params: Sequence[tuple[str, str]]) -> ParamGroup:
            return ParamGroup(g, tuple(Param.from_triton_type(n, t) for n, t in params))

        return cls(
            block,
            group(Group.SPEC, spec),
            group(Group.UNIFORMS, uniforms),
            int(summaries),
            group(Group.BACKWARD, backward),
            ParamGroup(Group.AUX_GRADS, group(Group.AUX_GRADS, aux_grads).params, gate=AUX_GRAD_GATE),
            ParamGroup(
                Group.AUX_GRADS_KV, group(Group.AUX_GRADS_KV, aux_grads_kv).params, gate=AUX_GRAD_GATE
            ),
        )
