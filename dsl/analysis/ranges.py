"""Interval analysis of integer index expressions.

`bounds(node)` gives symbolic (lo, hi) bounds over the whole iteration space (b in [0, B), i in [0, M), ...),
ignoring the mask; `index_status` uses them to prove an index always in range (the backend may skip the
check), always out of range (a spec error), or neither (checked at run time by the reference backend).
"""

from __future__ import annotations

from typing import Literal

import sympy as sp

from ..ir import DType, Layout, Node, Op, linearize
from .symbolic import to_sympy

Bounds = tuple[sp.Expr, sp.Expr] | None
_MAX_BOUND_OPS = 40


def nonneg(e: sp.Expr, depth: int = 0) -> bool:
    """A sufficient test for e >= 0 that sees through Min/Max (sympy's assumptions alone do not)."""
    e = sp.expand(e)
    if e.is_nonnegative:
        return True
    if depth > 6:
        return False
    if isinstance(e, sp.Max):
        return any(nonneg(a, depth + 1) for a in e.args)
    if isinstance(e, sp.Min):
        return all(nonneg(a, depth + 1) for a in e.args)
    if isinstance(e, sp.floor):  # floor(y) >= 0 exactly when y >= 0
        return nonneg(e.args[0], depth + 1)
    if isinstance(e, sp.Add):
        for t in e.args:
            tt = _push_negation(t)
            if isinstance(tt, sp.Min | sp.Max):
                rest = e - t
                return nonneg(type(tt)(*(a + rest for a in tt.args)), depth + 1)
    return False


def _push_negation(t: sp.Expr) -> sp.Expr:
    """-Min(a, b) -> Max(-a, -b) and -Max(a, b) -> Min(-a, -b), so Add terms expose Min/Max."""
    if (
        isinstance(t, sp.Mul)
        and len(t.args) == 2
        and t.args[0] == -1
        and isinstance(t.args[1], sp.Min | sp.Max)
    ):
        inner = t.args[1]
        flipped = sp.Max if isinstance(inner, sp.Min) else sp.Min
        return flipped(*(-a for a in inner.args))
    return t


def _too_big(e: sp.Expr) -> bool:
    """Bounds past this size are not worth sympy's time (expanding (H - 1)**256 would take minutes)."""
    if sp.count_ops(e) > _MAX_BOUND_OPS:
        return True
    return any(p.exp.is_Integer and abs(p.exp) > 4 for p in e.atoms(sp.Pow))


def _is_const(e: sp.Expr) -> bool:
    return bool(e.is_number)


def bounds(root: Node, layout: Layout) -> Bounds:
    out: dict[Node, Bounds] = {}
    for n in linearize([root]):
        a = [out[x] for x in n.args]
        op = n.op
        r: Bounds = None
        if n.dtype is not DType.INT:
            r = None
        elif op in (Op.CONST, Op.SIZE, Op.SCALAR):
            s = to_sympy(n)
            r = (s, s)
        elif op is Op.VAR:
            r = (sp.Integer(0), to_sympy(layout.extent(n.attr)) - 1)  # type: ignore[arg-type]
        elif any(x is None for x in a):
            r = None
        elif op is Op.ADD:
            r = (a[0][0] + a[1][0], a[0][1] + a[1][1])
        elif op is Op.SUB:
            r = (a[0][0] - a[1][1], a[0][1] - a[1][0])
        elif op is Op.NEG:
            r = (-a[0][1], -a[0][0])
        elif op is Op.MUL:
            (l0, h0), (l1, h1) = a
            if l1 == h1 and _is_const(l1):
                r = (l1 * l0, l1 * h0) if l1 >= 0 else (l1 * h0, l1 * l0)
            elif l0 == h0 and _is_const(l0):
                r = (l0 * l1, l0 * h1) if l0 >= 0 else (l0 * h1, l0 * l1)
            elif nonneg(l0) and nonneg(l1):
                r = (l0 * l1, h0 * h1)
        elif op is Op.MIN:
            r = (sp.Min(a[0][0], a[1][0]), sp.Min(a[0][1], a[1][1]))
        elif op is Op.MAX:
            r = (sp.Max(a[0][0], a[1][0]), sp.Max(a[0][1], a[1][1]))
        elif op is Op.FLOORDIV:
            (l0, h0), (l1, h1) = a
            if l1 == h1 and _is_const(l1) and l1 > 0:
                # floor(y) <= y: the real quotient is a (sound, slightly loose) upper bound sympy reasons with.
                r = (sp.floor(l0 / l1), h0 / l1)
        elif op is Op.MOD:
            (l1, h1) = a[1]
            if l1 == h1 and nonneg(l1 - 1):
                r = (sp.Integer(0), l1 - 1)
        elif op is Op.ABS:
            lo, hi = a[0]
            r = (lo, hi) if nonneg(lo) else (sp.Integer(0), sp.Max(-lo, hi))
        elif op is Op.WHERE:
            r = (sp.Min(a[1][0], a[2][0]), sp.Max(a[1][1], a[2][1]))
        if r is not None and (_too_big(r[0]) or _too_big(r[1])):
            r = None  # give up rather than let symbolic bounds grow without limit (e.g. repeated squaring)
        out[n] = r
    return out[root]


def index_status(index: Node, extent: Node, layout: Layout) -> Literal["in", "out", "unknown"]:
    b = bounds(index, layout)
    if b is None:
        return "unknown"
    lo, hi = b
    size = to_sympy(extent)
    if nonneg(-1 - hi) or nonneg(lo - size):
        return "out"
    if nonneg(lo) and nonneg(size - 1 - hi):
        return "in"
    return "unknown"
