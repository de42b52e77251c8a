"""The schedule search space of each kernel kind: typed parameters, their choices, constraints, the default.

A spec fixes *what* a kernel computes; a `Candidate` fixes *how* (Halide's split): tile sizes, warps, pipeline
stages, and for later kernel kinds a chunk size or a split-KV factor. Each kernel kind registers one
`SpaceBuilder` in `SPACES`: a function from the `Problem` (head dims, dtype, sequence buckets) to a
`KernelSpace`. Adding the linear family's chunk kernel or the split-KV decode kernel is one more entry:

    @register(KernelKind.CHUNK)
    def _chunk_space(p: Problem) -> KernelSpace: ...

The space is small on purpose (a few hundred points at most): ground truth can be enumerated in a lease, and
the resource model (`resource.py`) prunes it further before any GPU time is spent.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

__all__ = [
    "SPACES",
    "Candidate",
    "DType",
    "KernelKind",
    "KernelSpace",
    "Param",
    "Problem",
    "bucket",
    "register",
    "space_for",
]


class KernelKind(enum.Enum):
    """The kernels a generated module launches; the value is the runtime's name for each."""

    FWD = "fwd"
    DKDV = "dkdv"
    DQ = "dq"
    LIN_CHUNK = "lin_chunk"  # the linear family's chunked forward (state pass + per-chunk output)
    FWD_SPLIT = "fwd_split"  # the split-KV decoding forward (M <= 16): key tile, warps, stages, splits


class DType(enum.Enum):
    """Tensor dtypes the Triton backend takes; the value is torch's name."""

    FP16 = "float16"
    BF16 = "bfloat16"
    FP32 = "float32"

    @property
    def bytes(self) -> int:
        return 4 if self is DType.FP32 else 2

    @property
    def short(self) -> str:
        """Triton's / `attnc inspect`'s spelling: fp16, bf16, fp32."""
        return {DType.FP16: "fp16", DType.BF16: "bf16", DType.FP32: "fp32"}[self]

    @staticmethod
    def parse(text: str) -> DType:
        aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32"}
        name = aliases.get(text.lower().removeprefix("torch."), text.lower().removeprefix("torch."))
        try:
            return DType(name)
        except ValueError:
            raise ValueError(f"unknown dtype {text!r}: expected fp16, bf16 or fp32") from None


def bucket(n: int) -> int:
    """Sequence lengths are tuned per power-of-two bucket (the next power of two, at least 16): 3000 and 4096
    share a config, so a new length does not need a new study."""
    return max(16, 1 << (max(1, int(n)) - 1).bit_length())


@dataclass(frozen=True)
class Problem:
    """What a schedule depends on: head dims, dtype, sequence buckets, and how `heavy` the spec is (a tensor
    gathered per (i, j) pair, or float32 weights: such kernels keep more live values and want narrower
    tiles; the runtime's defaults narrow by level)."""

    head_dim: int  # D
    v_dim: int  # E
    dtype: DType
    q_len: int  # M (bucketed by the key, not here)
    kv_len: int  # N
    heavy: int = 0  # KernelWriter.heavy: 0 none, 1 float32 weights, 2 a gather per (i, j) or tile summaries

    @property
    def width(self) -> int:
        return max(self.head_dim, self.v_dim)


@dataclass(frozen=True)
class Param:
    """One integer schedule parameter and its admissible values, in the order a grid would visit them."""

    name: str
    choices: tuple[int, ...]
    # The value of a candidate that does not name this parameter (one tuned before the parameter existed).
    default: int | None = None


@dataclass(frozen=True, order=True)
class Candidate:
    """One point of a kernel's schedule space: parameter name -> value, sorted by name (hashable, comparable,
    and the same whatever order the sampler suggested the parameters in)."""

    kind: KernelKind = field(compare=False)
    values: tuple[tuple[str, int], ...]

    @staticmethod
    def of(kind: KernelKind, values: Mapping[str, int]) -> Candidate:
        return Candidate(kind, tuple(sorted((k, int(v)) for k, v in values.items())))

    def __getitem__(self, name: str) -> int:
        for k, v in self.values:
            if k == name:
                return v
        raise KeyError(name)

    def get(self, name: str, default: int | None = None) -> int | None:
        return dict(self.values).get(name, default)

    def as_dict(self) -> dict[str, int]:
        return dict(self.values)

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values)


Constraint = Callable[[Candidate], "str | None"]  # None: admissible; else why not


@dataclass(frozen=True)
class KernelSpace:
    """The admissible schedules of one kernel kind for one problem. `constraints` are structural rules that
    hold on every GPU (tile divisibility, no tile longer than the sequence bucket); per-GPU limits (shared
    memory, registers) are the resource model's job."""

    kind: KernelKind
    problem: Problem
    params: tuple[Param, ...]
    default: Candidate
    constraints: tuple[tuple[str, Constraint], ...] = ()

    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def violation(self, c: Candidate) -> str | None:
        """Why `c` is outside the space, or None. The heuristic default is always inside."""
        if c == self.default:
            return None
        for p in self.params:
            v = c.get(p.name, p.default)
            if v not in p.choices:
                return f"{p.name}={v} not in {list(p.choices)}"
        for name, rule in self.constraints:
            why = rule(c)
            if why is not None:
                return f"{name}: {why}"
        return None

    def product(self) -> Iterator[Candidate]:
        """Every combination of choices, admissible or not (what a grid sampler walks)."""
        for combo in itertools.product(*(p.choices for p in self.params)):
            yield Candidate.of(self.kind, dict(zip(self.names(), combo, strict=True)))

    def candidates(self) -> list[Candidate]:
        """The admissible points, the default first."""
        out = [self.default]
        out += [c for c in self.product() if c != self.default and self.violation(c) is None]
        return out


SpaceBuilder = Callable[[Problem], KernelSpace]
SPACES: dict[KernelKind, SpaceBuilder] = {}


def register(kind: KernelKind) -> Callable[[SpaceBuilder], SpaceBuilder]:
    """Register the space of a kernel kind (one entry per kind; a second registration is a bug)."""

    def deco(fn: SpaceBuilder) -> SpaceBuilder:
        if kind in SPACES:
            raise ValueError(f"a search space for {kind.value!r} is registered already")
        SPACES[kind] = fn
        return fn

    return deco


def space_for(kind: KernelKind, problem: Problem) -> KernelSpace:
    try:
        return SPACES[kind](problem)
    except KeyError:
        raise ValueError(f"no search space registered for kernel kind {kind.value!r}") from None


# ---------------------------------------------------------------------------------- FlashAttention-2 kernels


def _default(kind: KernelKind, p: Problem, params: tuple[Param, ...]) -> Candidate:
    """The runtime's heuristic schedule, on this space's parameters: every study starts from it, and it
    stays the fallback."""
    from attnc.runtime.triton import _default_config

    cfg = _default_config(p.head_dim, p.v_dim, kind.value, p.heavy)._asdict()
    return Candidate.of(kind, {q.name: cfg[q.name] for q in params})


def _tiles_fit(p: Problem, kind: KernelKind) -> Constraint:
    """No tile longer than its sequence bucket: a 128-row tile over 64 queries computes half padding."""
    rows, cols = bucket(p.q_len), bucket(p.kv_len)

    def rule(c: Candidate) -> str | None:
        if c["block_m"] > rows:
            return f"block_m={c['block_m']} exceeds the query bucket {rows}"
        if c["block_n"] > cols:
            return f"block_n={c['block_n']} exceeds the key bucket {cols}"
        return None

    return rule


def _warps_have_work(c: Candidate) -> str | None:
    """Each warp of the tile's MMA needs at least one 16x16 fragment: more warps than fragments idle."""
    frags = (c["block_m"] // 16) * (c["block_n"] // 16)
    if c["num_warps"] > frags:
        return f"{c['num_warps']} warps for {frags} 16x16 fragments"
    return None


def _flash_space(kind: KernelKind, p: Problem) -> KernelSpace:
    # fp32 tiles take twice the registers and shared memory: cap them one step lower.
    big = 128 if p.dtype is DType.FP32 or p.width > 128 else 256
    tiles = tuple(t for t in (16, 32, 64, 128, 256) if t <= big)
    params = (
        Param("block_m", tiles),
        Param("block_n", tiles),
        Param("num_warps", (2, 4, 8)),
        Param("num_stages", (1, 2, 3)),  # AOT: stages 1-4 give one binary today (loops not pipelined)
    )
    return KernelSpace(
        kind,
        p,
        params,
        _default(kind, p, params),
        (("tile fits the sequence", _tiles_fit(p, kind)), ("warps have work", _warps_have_work)),
    )


@register(KernelKind.FWD)
def _fwd_space(p: Problem) -> KernelSpace:
    """The forward's tiles, warps and stages, and whether its key loops are warp-specialised (`_WS`: TMA
    producer warps beside the MMA and softmax warps, FlashAttention-3's split; the resource model keeps it to
    the GPUs where Triton partitions the loops)."""
    base = _flash_space(KernelKind.FWD, p)
    params = (*base.params, Param("warp_specialize", (0, 1), default=0))
    return KernelSpace(base.kind, p, params, _default(base.kind, p, params), base.constraints)


@register(KernelKind.DKDV)
def _dkdv_space(p: Problem) -> KernelSpace:
    return _flash_space(KernelKind.DKDV, p)


@register(KernelKind.DQ)
def _dq_space(p: Problem) -> KernelSpace:
    return _flash_space(KernelKind.DQ, p)


# ---------------------------------------------------------------------------------- linear-family chunk kernels


@register(KernelKind.LIN_CHUNK)
def _lin_chunk_space(p: Problem) -> KernelSpace:
    """The chunked linear forward (attnc/runtime/linear_kernels.py): chunk length C, the D- and E-blocks of
    the sequential state pass (block_k, block_v; block_v also splits the output kernel's E), warps, stages.
    The default is the runtime's `_lin_default_config`."""
    from attnc.runtime.linear import _lin_default_config

    dpow, epow = max(16, 1 << (p.head_dim - 1).bit_length()), max(16, 1 << (p.v_dim - 1).bit_length())
    params = (
        Param("chunk", (16, 32, 64, 128)),
        Param("block_k", tuple(b for b in (16, 32, 64, 128) if b <= dpow)),
        Param("block_v", tuple(b for b in (16, 32, 64, 128) if b <= epow)),
        Param("num_warps", (2, 4, 8)),
        Param("num_stages", (1, 2, 3)),
    )
    cfg = _lin_default_config(p.head_dim, p.v_dim)._asdict()
    default = Candidate.of(KernelKind.LIN_CHUNK, {q.name: cfg[q.name] for q in params})
    rows = bucket(p.kv_len)

    def chunk_fits(c: Candidate) -> str | None:
        return f"chunk={c['chunk']} exceeds the sequence bucket {rows}" if c["chunk"] > rows else None

    def wide_heads(c: Candidate) -> str | None:
        # A chunk's C x D and C x E fp32 tiles in the dq/dk/dv kernels: 128-row chunks only for narrow heads.
        return "128-row chunks need D, E <= 64" if c["chunk"] == 128 and p.width > 64 else None

    return KernelSpace(
        KernelKind.LIN_CHUNK, p, params, default, (("chunk fits", chunk_fits), ("wide heads", wide_heads))
    )


# ------------------------------------------------------------------------------ split-KV decoding forward


@register(KernelKind.FWD_SPLIT)
def _split_space(p: Problem) -> KernelSpace:
    """The split-KV forward for decoding shapes (FlashDecoding): one 16-row query tile, the key tile, warps,
    stages and the number of key splits. The default is the runtime's: its schedule, and the splits its
    heuristic picks without a GPU to size against (ceil(key tiles / 4), at most 64)."""
    from attnc.runtime.triton import _SPLIT_MAX, _SPLIT_MIN_TILES, _default_split_config

    cfg = _default_split_config(p.head_dim, p.v_dim, p.heavy)
    tiles = -(-max(1, p.kv_len) // cfg.block_n)
    splits = min(_SPLIT_MAX, -(-tiles // _SPLIT_MIN_TILES))
    split_choices = tuple(sorted({1, 2, 4, 8, 16, 32, 64, splits}))
    params = (
        Param("block_m", (16,)),
        Param("block_n", (16, 32, 64, 128)),
        Param("num_warps", (2, 4, 8)),
        Param("num_stages", (1, 2, 3)),
        Param("num_splits", split_choices),
    )
    default = Candidate.of(
        KernelKind.FWD_SPLIT,
        {"block_m": 16, "block_n": cfg.block_n, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        | {"num_splits": splits},
    )
    cols = bucket(p.kv_len)

    def splits_have_keys(c: Candidate) -> str | None:
        keys = -(-max(1, p.kv_len) // c["block_n"])
        if c["block_n"] > cols:
            return f"block_n={c['block_n']} exceeds the key bucket {cols}"
        return f"{c['num_splits']} splits for {keys} key tiles" if c["num_splits"] > keys else None

    return KernelSpace(
        KernelKind.FWD_SPLIT,
        p,
        params,
        default,
        (("splits have keys", splits_have_keys), ("warps have work", _warps_have_work)),
    )
