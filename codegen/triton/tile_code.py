"""Sympy expressions of a `TilePlan` as Triton scalar code (loop bounds and full-tile tests in kernels).

Integer semantics are kept exact: `floor(a / b)` becomes `_floordiv(a, b)` (Python's floor division), and
anything the printer does not know raises `Unprintable`, in which case the kernel falls back to visiting
every key tile with the mask applied: never to skipping.
"""

from __future__ import annotations

import sympy as sp
from attnc.dsl.analysis.symbolic import symbol_for_scalar
from attnc.dsl.analysis.tiles import TILE_BM, TILE_BN, TILE_M0, TILE_N0

from .expr import scalar_name


class Unprintable(Exception):
    pass


_TILE_NAMES = {TILE_M0: "m0", TILE_BM: "_BLOCK_M", TILE_N0: "n0", TILE_BN: "_BLOCK_N"}
_REL = {
    sp.StrictLessThan: "<",
    sp.LessThan: "<=",
    sp.StrictGreaterThan: ">",
    sp.GreaterThan: ">=",
    sp.Equality: "==",
    sp.Unequality: "!=",
}


# The Python flavour (`python_code`): the same expressions as host code, for the runtime's schedules
# (attnc.distributed asks which key ranges a range of queries may see). Integers stay exact: floor division.
_PY_TILE_NAMES = {TILE_M0: "_m0", TILE_BM: "_bm", TILE_N0: "_n0", TILE_BN: "_bn"}


def python_code(e: sp.Basic) -> str:
    """Python code for an integer or boolean sympy expression: tile symbols _m0, _bm (_n0, _bn: a leading
    underscore is never a spec's name), the spec's sizes and scalars by their own names."""
    return _print(e, True)


def code(e: sp.Basic) -> str:
    """Triton code for an integer or boolean sympy expression."""
    return _print(e, False)


def _print(e: sp.Basic, py: bool) -> str:
    def code(x: sp.Basic) -> str:
        return _print(x, py)

    if e is sp.true:
        return "True"
    if e is sp.false:
        return "False"
    if isinstance(e, sp.Symbol):
        if e in _TILE_NAMES:
            return (_PY_TILE_NAMES if py else _TILE_NAMES)[e]
        if e in (symbol_for_scalar(e.name, True), symbol_for_scalar(e.name, False)):
            # a runtime scalar: the kernel's parameter for it (on the host: the scalar's own variable)
            return e.name if py else scalar_name(e.name)
        return e.name
    if isinstance(e, sp.Integer):
        return str(int(e))
    if isinstance(e, sp.Add):
        terms = [code(t) for t in e.args]
        return "(" + " + ".join(terms) + ")"
    if isinstance(e, sp.Mul):
        coeff, rest = e.as_coeff_Mul()
        if not coeff.is_Integer:
            raise Unprintable(f"non-integer coefficient in {e}")
        factors = sp.Mul.make_args(rest)
        if any(isinstance(f, sp.Pow) and f.exp.is_negative for f in factors):
            raise Unprintable(f"division outside floor in {e}")
        body = " * ".join(code(f) for f in factors)
        return f"({int(coeff)} * {body})" if coeff != 1 else f"({body})"
    if isinstance(e, sp.Pow) and e.exp.is_Integer and 1 <= int(e.exp) <= 4:
        return "(" + " * ".join([code(e.base)] * int(e.exp)) + ")"
    if isinstance(e, sp.floor):
        num, den = sp.fraction(sp.together(e.args[0]))
        if den == 1:
            return code(num)
        return f"({code(num)} // {code(den)})" if py else f"_floordiv({code(num)}, {code(den)})"
    if isinstance(e, sp.Min | sp.Max):
        if py:
            return ("min(" if isinstance(e, sp.Min) else "max(") + ", ".join(code(a) for a in e.args) + ")"
        fn = "tl.minimum" if isinstance(e, sp.Min) else "tl.maximum"
        out = code(e.args[0])
        for a in e.args[1:]:
            out = f"{fn}({out}, {code(a)})"
        return out
    if isinstance(e, sp.Piecewise):
        *cases, (last, cond) = e.args
        if cond is not sp.true:
            raise Unprintable("Piecewise without a default")
        out = code(last)
        for val, c in reversed(cases):
            out = (
                f"({code(val)} if {code(c)} else {out})" if py else f"tl.where({code(c)}, {code(val)}, {out})"
            )
        return out
    if type(e) in _REL:
        return f"({code(e.lhs)} {_REL[type(e)]} {code(e.rhs)})"
    if isinstance(e, sp.And | sp.Or):
        op = (
            (" and " if isinstance(e, sp.And) else " or ")
            if py
            else (" & " if isinstance(e, sp.And) else " | ")
        )
        return "(" + op.join(code(a) for a in e.args) + ")"
    if isinstance(e, sp.Not):
        return f"(not {code(e.args[0])})" if py else f"({code(e.args[0])} == 0)"
    raise Unprintable(f"cannot print {type(e).__name__}: {e}")
