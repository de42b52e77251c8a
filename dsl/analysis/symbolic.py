"""IR -> sympy. Sizes are positive integers, index variables non-negative integers, int scalars integers;
loads become applications of an undefined function named after the tensor."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import sympy as sp

from ..ir import DType, Node, Op, Var, linearize


@functools.cache
def symbol_for_size(name: str) -> sp.Symbol:
    return sp.Symbol(name, integer=True, positive=True)


@functools.cache
def symbol_for_var(v: Var) -> sp.Symbol:
    return sp.Symbol(v.value, integer=True, nonnegative=True)


@functools.cache
def symbol_for_scalar(name: str, is_int: bool) -> sp.Symbol:
    return sp.Symbol(name, integer=True) if is_int else sp.Symbol(name, real=True)


# IR op -> sympy, by arity of the lambda.
_OPS = {
    Op.NEG: lambda x: -x,
    Op.NOT: sp.Not,
    Op.EXP: sp.exp,
    Op.LOG: sp.log,
    Op.SQRT: sp.sqrt,
    Op.TANH: sp.tanh,
    Op.ABS: sp.Abs,
    Op.FLOOR: sp.floor,
    Op.CEIL: sp.ceiling,
    Op.EXP2: lambda x: 2**x,
    Op.LOG2: lambda x: sp.log(x, 2),
    Op.RSQRT: lambda x: 1 / sp.sqrt(x),
    Op.SIGMOID: lambda x: 1 / (1 + sp.exp(-x)),
    Op.RELU: lambda x: sp.Max(x, 0),
    Op.ELU: lambda x: sp.Piecewise((x, x > 0), (sp.exp(x) - 1, True)),
    Op.ADD: lambda x, y: x + y,
    Op.SUB: lambda x, y: x - y,
    Op.MUL: lambda x, y: x * y,
    Op.DIV: lambda x, y: x / y,
    Op.FLOORDIV: lambda x, y: sp.floor(x / y),
    Op.MOD: sp.Mod,
    Op.POW: lambda x, y: x**y,
    Op.MIN: sp.Min,
    Op.MAX: sp.Max,
    Op.LT: sp.Lt,
    Op.LE: sp.Le,
    Op.GT: sp.Gt,
    Op.GE: sp.Ge,
    Op.EQ: sp.Eq,
    Op.NE: sp.Ne,
    Op.AND: sp.And,
    Op.OR: sp.Or,
    Op.WHERE: lambda c, x, y: sp.Piecewise((x, c), (y, True)),
}


def to_sympy(
    root: Node,
    ops: Mapping[Op, Callable[..., sp.Basic]] | None = None,
    rename: Mapping[sp.Symbol, sp.Symbol] | None = None,
) -> sp.Basic:
    """Convert without recursion (node by node in topological order). `ops` overrides the constructor of some
    ops (the tile planner builds min/max without sympy's costly evaluation); `rename` replaces leaf symbols
    as they are made."""
    table = {**_OPS, **ops} if ops else _OPS
    val: dict[Node, sp.Basic] = {}
    for n in linearize([root]):
        a = [val[x] for x in n.args]
        op = n.op
        if op is Op.CONST:
            r = sp.true if n.attr is True else sp.false if n.attr is False else sp.sympify(n.attr)
        elif op is Op.VAR:
            r = symbol_for_var(n.attr)  # type: ignore[arg-type]
        elif op is Op.SIZE:
            r = symbol_for_size(str(n.attr))
        elif op is Op.SCALAR:
            r = symbol_for_scalar(str(n.attr), n.dtype is DType.INT)
            if rename:
                r = rename.get(r, r)
        elif op is Op.LOAD:
            r = sp.Function(str(n.attr))(*a)
        elif op is Op.DOT:
            r = sp.Symbol("qk", real=True)
        elif op is Op.ELEM:
            r = sp.Symbol(str(n.attr), real=True)
        elif op is Op.TO_FLOAT:
            r = a[0]
        elif op in table:
            r = table[op](*a)
        else:  # pragma: no cover - every Op is handled above
            raise NotImplementedError(op)
        val[n] = r
    return val[root]
