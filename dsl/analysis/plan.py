"""One analysis result per attention block: what the backends need to know beyond the IR itself.

`plan_attention(att)` gathers, once, the facts that used to be recomputed inside the code generators:

- `tiles`: the block-sparsity plan of the mask (`dsl.analysis.tiles.plan_tiles`): key intervals per query
  tile, query intervals per key tile and the full-tile predicate; None when the spec has no mask.
- `summaries`: the data-dependent mask terms `A(i) == B(j)` whose per-tile [min, max] ranges let a kernel skip
  tiles (document ids, segment ids...).
- `heavy`: how much register pressure the spec adds per tile (the default schedules narrow tiles by it).
- `linear`: the linear-attention decision (`dsl.analysis.linear.linear_form`), None outside that family.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Attention, DType, Node, NormKind, Op, Var, uses_var, walk
from .linear import LinearDecision, linear_form
from .tiles import Interval, TilePlan, plan_tiles

# At most this many summarised terms per mask: each costs four tile lookups per visited tile.
MAX_SUMMARIES = 2


@dataclass(frozen=True)
class AttentionPlan:
    name: str
    tiles: TilePlan | None  # None: no mask, every tile is visited and fully visible
    summaries: tuple[tuple[Node, Node], ...]  # (query side A(b, h, hk, i), key side B(b, hk, j))
    heavy: int  # 0 none, 1 float32 weights (norm = none), 2 a gather per (i, j) pair or tile summaries
    linear: LinearDecision | None

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
    )


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
