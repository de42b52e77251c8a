"""One analysis result per attention block: what the backends need to know beyond the IR itself.

`plan_attention(att)` gathers, once, the facts that used to be recomputed inside the code generators:

- `tiles`: the block-sparsity plan of the mask (`dsl.analysis.tiles.plan_tiles`): key intervals per query
  tile, query intervals per key tile and the full-tile predicate; None when the spec has no mask.
- `summaries`: the data-dependent mask terms `A(i) == B(j)` whose per-tile [min, max] ranges let a kernel skip
  tiles (document ids, segment ids...).
- `heavy`: how much register pressure the spec adds per tile (the default schedules narrow tiles by it).
- `linear`: the linear-attention decision (`dsl.analysis.linear.linear_form`), None outside that family.
- `aux_reads`: every read of a float auxiliary tensor, with the root it sits in and which index variables its
  indices depend on: what decides how the backward reduces that tensor's gradient (`AuxRead`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..ir import Attention, DType, Node, NormKind, Op, TensorParam, Var, uses_var, walk
from ..scope import ROOT_VARS, Root
from .linear import LinearDecision, linear_form
from .ranges import index_status
from .tiles import Interval, TilePlan, plan_tiles

# At most this many summarised terms per mask: each costs four tile lookups per visited tile.
MAX_SUMMARIES = 2


class AuxGrad(enum.Enum):
    """How the backward reduces the gradient of one read of a float auxiliary tensor."""

    NONE = "none"  # the read cannot carry a gradient (inside the mask: booleans have none)
    PROGRAM = "program"  # indices depend on b, h, hk only (`slopes[h]`, `sinks[h]`): a scalar per program
    DENSE_ROW = "dense row"  # an epilogue read indexed by distinct plain variables (`gate[b, h, i]`,
    # `offset[h, e]`): a row or column reduction of dO times ∂out/∂read over the output
    DENSE_PAIR = "dense pair"  # a score (or sigmoid bias) read indexed by distinct plain variables with both
    # i and j (`bias[b, h, i, j]`): its dS tile stored directly (one writer per element: no reduction)
    GATHER = "gather"  # a score (or sigmoid bias) read at computed indices (`table[h, bucket(i - j)]`,
    # `table[h, dist[b, i, j]]`): a per-program partial histogram over the tensor's entries
    FEATURE = (
        "feature"  # a feature-map read indexed by distinct plain variables (`w[h, d]`, `g[b, hk, j, d]`):
    )
    # a reduction of d(feature)·∂feature/∂read over the feature's other axes (dQ kernel for q, dK/dV for k)
    UNFUSED = "unfused"  # anything else (reads at computed indices in an epilogue or a feature map)


# The roots whose gradient the dQ kernel holds per (i, j) pair (dS: score; and the sigmoid bias, which
# enters the weights exactly as the score does) and per row (the softmax sink, the sum norm's eps).
PAIR_ROOTS = (Root.SCORE, Root.BIAS)
ROW_ROOTS = (Root.SINK, Root.EPS)
_ROOT_OF = {
    "score": Root.SCORE,
    "mask": Root.MASK,
    "sink": Root.SINK,
    "bias": Root.BIAS,
    "eps": Root.EPS,
    "output": Root.OUTPUT,
    "feature q": Root.FEATURE_Q,
    "feature k": Root.FEATURE_K,
}
_PROGRAM_VARS = (Var.B, Var.H, Var.HK)
_PLAIN_VARS = (Var.B, Var.H, Var.HK, Var.I, Var.E)
_PAIR_VARS = (Var.B, Var.H, Var.HK, Var.I, Var.J)


@dataclass(frozen=True)
class AuxRead:
    """One read `tensor[indices]` of a float auxiliary tensor inside `root`, and its reduction."""

    tensor: str
    root: Root
    load: Node
    grad: AuxGrad

    @property
    def gather_lead(self) -> tuple[bool, bool]:
        """(b, h): the program variables a gathered read's indices do not fix, the leading axes (after the
        query tile) of its gradient buffer's rows; an index that is exactly `b` (`h`) fixes it, `hk` does not
        fix h (the heads of a group share it)."""
        plain = {a.attr for a in self.load.args if a.op is Op.VAR}
        return Var.B not in plain, Var.H not in plain

    @property
    def plain_vars(self) -> tuple[Var, ...]:
        """The index variable of each axis (DENSE_ROW, DENSE_PAIR and FEATURE reads only)."""
        return tuple(a.attr for a in self.load.args)  # type: ignore[misc]


@dataclass(frozen=True)
class AttentionPlan:
    name: str
    tiles: TilePlan | None  # None: no mask, every tile is visited and fully visible
    summaries: tuple[tuple[Node, Node], ...]  # (query side A(b, h, hk, i), key side B(b, hk, j))
    heavy: int  # 0 none, 1 float32 weights (norm = none), 2 a gather per (i, j) pair or tile summaries
    linear: LinearDecision | None
    aux_reads: tuple[AuxRead, ...] = ()

    def fused_aux(self) -> tuple[str, ...]:
        """The float auxiliary tensors whose every read the Triton backward reduces itself."""
        names: dict[str, bool] = {}
        for r in self.aux_reads:
            names[r.tensor] = names.get(r.tensor, True) and r.grad is not AuxGrad.UNFUSED
        return tuple(n for n, ok in names.items() if ok)

    def kernel_reads(self) -> tuple[AuxRead, ...]:
        """The reads whose partials the dQ kernel writes (one [programs, numel] buffer each: a scalar per
        program, or a histogram for a gathered read), in a fixed order."""
        fused = set(self.fused_aux())
        kinds = (AuxGrad.PROGRAM, AuxGrad.GATHER)
        return tuple(
            r
            for r in self.aux_reads
            if r.tensor in fused and r.grad in kinds and r.root is not Root.FEATURE_K  # k's: `kv_reads`
        )

    def pair_reads(self) -> tuple[AuxRead, ...]:
        """The dense (i, j) reads whose dS tiles the dQ kernel stores (one buffer each), in a fixed order."""
        fused = set(self.fused_aux())
        return tuple(r for r in self.aux_reads if r.tensor in fused and r.grad is AuxGrad.DENSE_PAIR)

    def epilogue_reads(self) -> tuple[AuxRead, ...]:
        """The epilogue reads by distinct plain variables, reduced over the output rows and columns by the dQ
        kernel (gathered ones are `kernel_reads`)."""
        fused = set(self.fused_aux())
        return tuple(r for r in self.aux_reads if r.tensor in fused and r.grad is AuxGrad.DENSE_ROW)

    def feature_reads(self, root: Root) -> tuple[AuxRead, ...]:
        """The feature-map reads by distinct plain variables of q's map (`Root.FEATURE_Q`: reduced by the dQ
        kernel) or k's (`Root.FEATURE_K`: by the dK/dV kernel), in a fixed order."""
        fused = set(self.fused_aux())
        return tuple(
            r for r in self.aux_reads if r.tensor in fused and r.grad is AuxGrad.FEATURE and r.root is root
        )

    def kv_reads(self) -> tuple[AuxRead, ...]:
        """The reads the dK/dV kernel reduces, one buffer each: k's feature map's plain reads, then its
        gathered ones (computed or possibly out-of-range indices)."""
        fused = set(self.fused_aux())
        gathered = tuple(
            r
            for r in self.aux_reads
            if r.tensor in fused and r.grad is AuxGrad.GATHER and r.root is Root.FEATURE_K
        )
        return (*self.feature_reads(Root.FEATURE_K), *gathered)

    @property
    def kv_intervals(self) -> tuple[Interval, ...] | None:
        return None if self.tiles is None else self.tiles.kv_intervals

    @property
    def q_intervals(self) -> tuple[Interval, ...] | None:
        return None if self.tiles is None else self.tiles.q_intervals


def plan_attention(att: Attention) -> AttentionPlan:
    summaries = summary_atoms(att)
    return AttentionPlan(
        name=att.name,
        tiles=None if att.mask is None else plan_tiles(att),
        summaries=summaries,
        heavy=_heavy(att, summaries),
        linear=linear_form(att),
        aux_reads=aux_reads(att),
    )


def aux_reads(att: Attention) -> tuple[AuxRead, ...]:
    """Each distinct read of a float auxiliary tensor per root, classified by what its indices depend on:
    indices of b, h, hk alone reduce to a scalar per program (in the score, the sigmoid bias or the sink);
    an epilogue read by distinct plain variables reduces over the output's other axes; a read inside the
    mask carries no gradient. Everything else is left unfused."""
    floats = {p.name: p for p in att.aux_tensors if p.type.kind is DType.FLOAT}
    out: list[AuxRead] = []
    for field, node in att.roots().items():
        root = _ROOT_OF[field]
        seen: set[Node] = set()
        for n in walk([node]):
            if n.op is not Op.LOAD or str(n.attr) not in floats or n in seen:
                continue
            seen.add(n)
            p = floats[str(n.attr)]
            out.append(AuxRead(p.name, root, n, _classify(att, p, root, n)))
    return tuple(out)


def _classify(att: Attention, p: TensorParam, root: Root, load: Node) -> AuxGrad:
    if root is Root.MASK:
        return AuxGrad.NONE
    in_range = all(
        index_status(ix, ext, att.layout) == "in" for ix, ext in zip(load.args, p.shape, strict=True)
    )
    if root in PAIR_ROOTS:
        program = not any(uses_var(a, v) for a in load.args for v in Var if v not in _PROGRAM_VARS)
        if program and in_range:
            return AuxGrad.PROGRAM
        pair = [a.attr for a in load.args if a.op is Op.VAR and a.attr in _PAIR_VARS]
        distinct = len(pair) == len(load.args) and len(set(pair)) == len(pair)
        if (
            in_range
            and distinct
            and Var.I in pair
            and Var.J in pair
            and not (Var.H in pair and Var.HK in pair)
        ):
            return AuxGrad.DENSE_PAIR
        # Computed indices (a bucket of i - j, a gathered index tensor): the dQ program adds each visible
        # pair's dS·∂s/∂read into its own row of a [programs, numel] buffer at the read's flat index. Indices
        # out of range read 0 (a constant), so they carry no gradient: the kernel drops them.
        return AuxGrad.GATHER
    if root in (Root.FEATURE_Q, Root.FEATURE_K, Root.OUTPUT):
        # By distinct plain variables, in range: a reduction over the tile's other axes, stored at the
        # element. Otherwise (computed indices, or ones that may leave the tensor): a per-program histogram
        # over the entries the tile touches, as for a gathered score read; out-of-range indices read 0, a
        # constant, and carry no gradient.
        plain = [a.attr for a in load.args if a.op is Op.VAR and a.attr in ROOT_VARS[root]]
        distinct = len(plain) == len(load.args) and len(set(plain)) == len(plain)
        if in_range and distinct and not (Var.H in plain and Var.HK in plain):
            return AuxGrad.DENSE_ROW if root is Root.OUTPUT else AuxGrad.FEATURE
        return AuxGrad.GATHER
    program = not any(uses_var(a, v) for a in load.args for v in Var if v not in _PROGRAM_VARS)
    if root in ROW_ROOTS:
        # A scalar per program, or (per row, computed, possibly out of range) a histogram row.
        return AuxGrad.PROGRAM if program and in_range else AuxGrad.GATHER
    return AuxGrad.UNFUSED  # not reached by the roots of an attention block (the state roots plan apart)


def _heavy(att: Attention, summaries: tuple[tuple[Node, Node], ...]) -> int:
    """2 when the score or mask gathers a tensor per (i, j) pair or the mask has data-dependent per-tile
    summaries, 1 when only the weights stay in float32 (norm = none), else 0."""
    roots = [r for r in (att.score, att.mask) if r is not None]
    gathers = bool(summaries) or any(
        n.op is Op.LOAD
        and any(uses_var(a, Var.I) for a in n.args)
        and any(uses_var(a, Var.J) for a in n.args)
        for n in walk(roots)
    )
    if gathers:
        return 2
    return 1 if att.norm.kind is NormKind.NONE else 0


def summary_atoms(att: Attention) -> tuple[tuple[Node, Node], ...]:
    """Conjuncts `A == B` of the mask with A a function of the query side only (b, h, hk, i) and B of the key
    side only (b, hk, j), reading a tensor (document ids, segment ids...). Tiles whose [min, max] ranges of A
    and B do not overlap hold no visible pair: a device pre-pass summarises each tile, the kernels skip."""
    if att.mask is None:
        return ()
    conjuncts, stack = [], [att.mask]
    while stack:
        n = stack.pop()
        if n.op is Op.AND:
            stack.extend(n.args)
        else:
            conjuncts.append(n)
    out = []
    for c in conjuncts:
        if c.op is not Op.EQ or any(a.dtype is not DType.INT for a in c.args):
            continue
        a, b = c.args
        for x, y in ((a, b), (b, a)):
            q_side = uses_var(x, Var.I) and not uses_var(x, Var.J)
            k_side = uses_var(y, Var.J) and not uses_var(y, Var.I) and not uses_var(y, Var.H)
            reads = any(n.op is Op.LOAD for n in walk([x, y]))
            if q_side and k_side and reads:
                out.append((x, y))
                break
    return tuple(out[:MAX_SUMMARIES])
