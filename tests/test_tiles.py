"""Block-sparsity analysis (dsl.analysis.tiles) checked by brute force on small grids.

For every mask of examples/specs and a set of extra masks (sink + window, template/search, 2-D
neighbourhoods, min/max/clamp/where, strided and block-causal masks, float and negative scalars), several scalar
values, sizes with M != N and ragged ends, and three tile shapes, the tile classification a kernel would
compute from the plan (both the forward walk over key tiles and the dK/dV walk over query tiles) is
compared with the dense mask from an independent numpy evaluator:

- sound: no visible pair lies in a SKIP tile, and every FULL tile is entirely visible;
- exact where it should be (causal, sliding window, chunked local, bottom-right, prefix-LM, ...): the
  visited tiles are exactly those holding a visible pair, and the FULL tiles exactly the fully visible ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from attnc.dsl.analysis.tiles import (
    FULL,
    SKIP,
    BindingError,
    TilePlan,
    classify,
    dense_mask,
    lean_tiles,
    plan_tiles,
    visited_fraction,
)
from attnc.dsl.ir import Attention, Op, walk
from attnc.dsl.lower import compile_to_ir

from .conftest import SPECS

SIZES = (1, 7, 37, 64, 100)
TILES = ((16, 16), (32, 16), (64, 64))
# Values tried for each scalar a mask uses; the ones after "|" are checked for soundness only (the analysis
# gives up on a non-positive divisor, and an empty window is not detected as empty).
SCALAR_VALUES: dict[str, tuple[tuple, tuple]] = {
    "W": ((1, 3, 16), (0, -2)),
    "P": ((0, 5), (-3,)),
    "C": ((1, 4, 7), (-3,)),
    "S": ((0, 2), ()),
    "T": ((0, 5, 40), ()),
    "Wd": ((3, 8), (-4,)),
    "R": ((0, 1), ()),
    "w": ((0.5, 3.5), ()),
}

_QKV = "q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D]"
EXTRA_MASKS = {
    "bottom_right": ("", "j <= i + N - M"),
    "sink_window": ("S: int = 4, W: int = 8", "j < S or (j <= i and i - j < W)"),
    "template_search": ("T: int = 8", "j < T or i >= T"),
    "neighbourhood_2d": (
        "Wd: int = 8, R: int = 1",
        "abs(i // Wd - j // Wd) <= R and abs(i % Wd - j % Wd) <= R",
    ),
    "chunked_mn": ("C: int = 4", "i // C == j // C and j <= i"),
    "window_mn": ("W: int = 8", "j <= i and i - j < W"),
    "prefix_mn": ("P: int = 5", "j <= i or j < P"),
    "clamped_window": (
        "W: int = 8",
        "j >= max(i - W + 1, 0) and j <= min(i, N - 1) and not (j > clamp(i, 0, N))",
    ),
    "symmetric_window": ("W: int = 8", "abs(i - j) < W"),
    "negated_causal": ("", "not (j > i)"),
    "where_prefix": ("P: int = 3", "(j <= where(i < P, P, i)) == (i >= 0)"),
    "float_window": ("w: float = 3.5", "i - j < w and j <= i"),
    "strided": ("C: int = 3", "(i - j) % C == 0 and j <= i"),
    "block_causal": ("C: int = 3", "(i - j) // C <= 1 and j // C <= i // C"),
    "dilated_rows": ("C: int = 3", "i % C == j % C and j <= i"),
    "never": ("", "false"),
    "bool_eq": ("P: int = 5", "(j < P) == (i < P)"),
    "gqa_window": ("W: int = 8", "0 <= i + N - M - j < W and j < lens[b]"),
}
_EXTRA_PARAMS = {"gqa_window": ", lens: [B] int64"}

EXACT = {
    # causal family
    "alibi",
    "causal",
    "head_offset",
    "lightning",
    "linear_elu",
    "moh_gate",
    "relpos_table",
    "sink",
    "negated_causal",
    "bottom_right",
    "decode",
    # windows, chunks, prefixes, unions of intervals
    "sliding_window",
    "window_mn",
    "float_window",
    "chunked_local",
    "chunked_mn",
    "prefix_lm",
    "prefix_mn",
    "sink_window",
    "template_search",
    "clamped_window",
    "symmetric_window",
    # no mask / no visible pair
    "cross",
    "sigmoid_attn",
    "softcap",
    "t5_bias",
    "never",
}


def _extra_source(name: str) -> str:
    params, mask = EXTRA_MASKS[name]
    extra = _EXTRA_PARAMS.get(name, "")
    params = f", {params}" if params else ""
    return f"attention {name}({_QKV}{extra}{params}) {{\n    score = dot(q, k)\n    mask = {mask}\n}}\n"


def _all_attentions() -> list[Attention]:
    atts = []
    for path in sorted(SPECS.glob("*.attn")):
        atts += compile_to_ir(path.read_text(), str(path)).attentions
    for name in EXTRA_MASKS:
        atts += compile_to_ir(_extra_source(name), f"{name}.attn").attentions
    return atts


ATTENTIONS = {a.name: a for a in _all_attentions()}
PLANS: dict[str, TilePlan] = {}


def _plan(att: Attention) -> TilePlan:
    if att.name not in PLANS:
        PLANS[att.name] = plan_tiles(att)
    return PLANS[att.name]


def _mask_scalars(att: Attention) -> list[str]:
    if att.mask is None:
        return []
    return sorted({str(n.attr) for n in walk([att.mask]) if n.op is Op.SCALAR})


@dataclass(frozen=True)
class Case:
    name: str
    scalars: tuple[tuple[str, int | float], ...]
    exact: bool

    @property
    def id(self) -> str:
        vals = ",".join(f"{k}={v}" for k, v in self.scalars)
        return f"{self.name}[{vals}]" if vals else self.name


def _cases() -> list[Case]:
    out = []
    for name, att in ATTENTIONS.items():
        used = _mask_scalars(att)
        good = [SCALAR_VALUES[s][0] for s in used]
        for combo in itertools.product(*good):
            out.append(Case(name, tuple(zip(used, combo, strict=True)), name in EXACT))
        for k, s in enumerate(used):  # each soundness-only value, the other scalars at their first value
            for bad in SCALAR_VALUES[s][1]:
                combo = tuple(bad if m == k else good[m][0] for m in range(len(used)))
                out.append(Case(name, tuple(zip(used, combo, strict=True)), False))
    return out


CASES = _cases()


def _size_pairs(att: Attention) -> list[tuple[int, int]]:
    if att.layout.q_len == att.layout.kv_len:
        return [(n, n) for n in SIZES]
    return list(itertools.product(SIZES, SIZES))


def _sizes(att: Attention, m: int, n: int) -> dict[str, int]:
    sizes = {"B": 1, "H": 2, "D": 8}
    for node, value in ((att.layout.q_len, m), (att.layout.kv_len, n)):
        sizes[str(node.attr)] = value
    names = {str(x.attr) for p in att.tensors for d in p.shape for x in walk([d]) if x.op is Op.SIZE}
    return {k: v for k, v in sizes.items() if k in names} | {k: 1 for k in names - set(sizes)}


def _aux(att: Attention, m: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Data for the tensors the mask reads: document ids (sorted runs) for 2-D int tensors, lengths in
    [0, N] for 1-D ones."""
    out = {}
    read = {str(x.attr) for x in walk([att.mask])} if att.mask is not None else set()
    for p in att.aux_tensors:
        if p.name not in read:
            continue
        if len(p.shape) == 1:
            out[p.name] = rng.integers(0, n + 1, size=1)
        else:
            out[p.name] = np.sort(rng.integers(0, 4, size=(1, max(m, n))), axis=1)
    return out


def _tile_counts(mask: np.ndarray, bm: int, bn: int) -> tuple[np.ndarray, np.ndarray]:
    """Visible pairs and in-range pairs per tile."""
    m, n = mask.shape
    rows, cols = np.arange(0, m, bm), np.arange(0, n, bn)
    counts = np.add.reduceat(np.add.reduceat(mask.astype(np.int64), rows, axis=0), cols, axis=1)
    heights = np.minimum(rows + bm, m) - rows
    widths = np.minimum(cols + bn, n) - cols
    return counts, np.outer(heights, widths)


@dataclass(frozen=True)
class Grid:
    """One tiling of one dense truth: sizes, tile shape, walk direction, and per tile the visible and
    in-range pair counts."""

    sizes: dict[str, int]
    M: int
    N: int
    bm: int
    bn: int
    by: str
    counts: np.ndarray
    area: np.ndarray
    where: str


def _grids(case: Case, seed: int) -> Iterator[Grid]:
    """Every size pair, trial (three random document layouts for data-dependent masks), tile shape and
    walk direction of a case, with the dense oracle's tile counts."""
    att = ATTENTIONS[case.name]
    plan = _plan(att)
    rng = np.random.default_rng(seed)
    for m, n in _size_pairs(att):
        sizes = _sizes(att, m, n)
        for trial in range(3 if plan.data_dependent else 1):
            truth = dense_mask(att, sizes, dict(case.scalars), _aux(att, m, n, rng))
            for bm, bn in TILES:
                counts, area = _tile_counts(truth, bm, bn)
                for by in ("query", "key"):
                    where = f"{case.id} M={m} N={n} tiles {bm}x{bn} by {by} (trial {trial})"
                    yield Grid(sizes, m, n, bm, bn, by, counts, area, where)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tiles_sound_and_exact(case: Case) -> None:
    att = ATTENTIONS[case.name]
    plan = _plan(att)
    for g in _grids(case, 0):
        counts, area, where = g.counts, g.area, g.where
        cls = classify(att, plan, g.sizes, dict(case.scalars), g.bm, g.bn, by=g.by)  # type: ignore[arg-type]
        skipped_visible = np.argwhere((cls == SKIP) & (counts > 0))
        assert skipped_visible.size == 0, f"{where}: visible pairs in SKIP tiles {skipped_visible}"
        not_full = np.argwhere((cls == FULL) & (counts < area))
        assert not_full.size == 0, f"{where}: FULL tiles with masked pairs {not_full}"
        if case.exact:
            assert np.count_nonzero(cls != SKIP) == np.count_nonzero(counts > 0), where
            assert np.array_equal(cls != SKIP, counts > 0), where
            assert np.array_equal(cls == FULL, counts == area), where


# Masks whose lean intervals must cover every whole, fully visible tile (the others are checked for soundness).
LEAN_EXACT = {
    "alibi",
    "causal",
    "cross",
    "decode",
    "bottom_right",
    "sliding_window",
    "window_mn",
    "symmetric_window",
    "chunked_local",
    "chunked_mn",
    "negated_causal",
    "softcap",
    "t5_bias",
    "sink",
}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lean_tiles_are_fully_visible(case: Case) -> None:
    """A tile the kernels run without bounds or mask arithmetic (`lean_tiles`) lies inside the matrix and every
    one of its pairs is visible, by the dense oracle; for the masks of LEAN_EXACT, every whole, fully visible
    tile is lean (the split loses nothing)."""
    att = ATTENTIONS[case.name]
    plan = _plan(att)
    for g in _grids(case, 1):
        rows, cols = g.counts.shape
        whole = np.outer(np.arange(rows) < g.M // g.bm, np.arange(cols) < g.N // g.bn)
        lean = lean_tiles(att, plan, g.sizes, dict(case.scalars), g.bm, g.bn, by=g.by)  # type: ignore[arg-type]
        bad = np.argwhere(lean & ~(whole & (g.counts == g.area)))
        assert bad.size == 0, f"{g.where}: lean tiles not whole and fully visible {bad}"
        if case.exact and case.name in LEAN_EXACT:
            assert np.array_equal(lean, whole & (g.counts == g.area)), g.where


def test_lean_intervals_of_the_causal_mask() -> None:
    """Keys j <= m0 are seen by every row of a query tile; queries i >= n0 + BN - 1 see every key of a tile."""
    att = ATTENTIONS["causal"]
    lean = lean_tiles(att, _plan(att), {"B": 1, "H": 1, "N": 256, "D": 8}, {}, 64, 32)
    t, u = np.indices((4, 8))
    assert np.array_equal(lean, u * 32 + 32 <= t * 64 + 1)
    assert "(lean): [0, Min(N, m0 + 1))" in _plan(att).describe()


def test_plans_are_small_and_exactly_described() -> None:
    for name, att in ATTENTIONS.items():
        plan = _plan(att)
        assert 0 <= len(plan.kv_intervals) <= 3 and 0 <= len(plan.q_intervals) <= 3, name
        assert plan.describe().startswith(f"{name}: keys visited by query tile")
    assert PLANS["document"].data_dependent and PLANS["key_padding"].data_dependent
    assert not PLANS["causal"].data_dependent
    assert "note:" not in PLANS["causal"].describe()
    assert "data-dependent" in PLANS["document"].describe()


def test_document_mask_keeps_the_causal_bounds() -> None:
    att = ATTENTIONS["document"]
    plan = _plan(att)
    cls = classify(att, plan, {"B": 1, "H": 1, "N": 256, "D": 8}, {}, 64, 64)
    assert (cls[np.triu_indices(4, 1)] == SKIP).all()  # above the diagonal: skipped
    assert (cls[np.tril_indices(4)] != SKIP).all() and not (cls == FULL).any()


def test_sink_window_uses_two_intervals() -> None:
    plan = _plan(ATTENTIONS["sink_window"])
    assert len(plan.kv_intervals) == 2
    att = ATTENTIONS["sink_window"]
    cls = classify(att, plan, {"M": 1024, "N": 1024}, {"S": 4, "W": 128}, 64, 64)
    # the query tile [960, 1024) sees the sink tile and the window [833, 1024): tiles 0 and 13..15
    assert np.flatnonzero(cls[15]).tolist() == [0, 13, 14, 15]


def test_visited_fractions_at_4096() -> None:
    """Causal visits (T + 1) / 2T of the tiles; a 1024 window visits about 17 per query tile."""
    sizes = {"B": 1, "H": 1, "N": 4096, "D": 64}
    causal = ATTENTIONS["causal"]
    cls = classify(causal, _plan(causal), sizes, {}, 64, 64)
    assert visited_fraction(cls) == pytest.approx(65 / 128)
    assert np.count_nonzero(cls == FULL) == 64 * 63 // 2
    sw = ATTENTIONS["sliding_window"]
    cls = classify(sw, _plan(sw), sizes | {"G": 1}, {"W": 1024}, 64, 64)
    rows = np.count_nonzero(cls != SKIP, axis=1)
    assert rows.max() == 17 and rows[0] == 1
    assert rows.sum() == sum(range(1, 17)) + 48 * 17  # = 952: the first 16 query tiles see 1..16 key tiles
    assert visited_fraction(cls) == pytest.approx(rows.sum() / 4096)


def test_binding_errors() -> None:
    att = ATTENTIONS["sliding_window"]
    plan = _plan(att)
    with pytest.raises(BindingError, match="no scalar parameter 'X'"):
        classify(att, plan, {"N": 8}, {"X": 1}, 16, 16)
    with pytest.raises(BindingError, match="no size symbol"):
        classify(att, plan, {"N": 8, "Z": 3}, {}, 16, 16)
    with pytest.raises(BindingError, match="is an int"):
        classify(att, plan, {"N": 8}, {"W": 1.5}, 16, 16)
    with pytest.raises(BindingError, match="reads doc"):
        dense_mask(ATTENTIONS["document"], {"N": 8, "B": 1}, {})


def test_oracle_floor_semantics() -> None:
    src = (
        f"attention f({_QKV}, C: int = -3) {{ score = dot(q, k)\n"
        "mask = (i - j) // C == -1 and (j - i) % C == -1 }\n"
    )
    att = compile_to_ir(src).attentions[0]
    got = dense_mask(att, {"M": 9, "N": 9}, {})
    want = np.array([[(i - j) // -3 == -1 and (j - i) % -3 == -1 for j in range(9)] for i in range(9)])
    assert np.array_equal(got, want)
