"""IR -> sympy. Sizes are positive integers, index variables non-negative integers, int scalars integers;
loads become applications of an undefined function named after the tensor."""

from __future__ import annotations

import functools

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


_UNARY = {
    Op.EXP: sp.exp,
    Op.LOG: sp.log,
    Op.SQRT: sp.sqrt,
    Op.TANH: sp.tanh,
    Op.ABS: sp.Abs,
    Op.FLOOR: sp.floor,
    Op.CEIL: sp.ceiling,
}


def to_sympy(root: Node) -> sp.Basic:
    """Convert without recursion (node by node in topological order)."""
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
        elif op is Op.LOAD:
            r = sp.Function(str(n.attr))(*a)
        elif op is Op.DOT:
            r = sp.Symbol("qk", real=True)
        elif op is Op.ELEM:
            r = sp.Symbol(str(n.attr), real=True)
        elif op is Op.TO_FLOAT:
            r = a[0]
        elif op is Op.NEG:
            r = -a[0]
        elif op is Op.NOT:
            r = sp.Not(a[0])
        elif op in _UNARY:
            r = _UNARY[op](a[0])
        elif op is Op.EXP2:
            r = 2 ** a[0]
        elif op is Op.LOG2:
            r = sp.log(a[0], 2)
        elif op is Op.RSQRT:
            r = 1 / sp.sqrt(a[0])
        elif op is Op.SIGMOID:
            r = 1 / (1 + sp.exp(-a[0]))
        elif op is Op.RELU:
            r = sp.Max(a[0], 0)
        elif op is Op.ELU:
            r = sp.Piecewise((a[0], a[0] > 0), (sp.exp(a[0]) - 1, True))
        elif op is Op.ADD:
            r = a[0] + a[1]
        elif op is Op.SUB:
            r = a[0] - a[1]
        elif op is Op.MUL:
            r = a[0] * a[1]
        elif op is Op.DIV:
            r = a[0] / a[1]
        elif op is Op.FLOORDIV:
            r = sp.floor(a[0] / a[1])
        elif op is Op.MOD:
            r = sp.Mod(a[0], a[1])
        elif op is Op.POW:
            r = a[0] ** a[1]
        elif op is Op.MIN:
            r = sp.Min(a[0], a[1])
        elif op is Op.MAX:
            r = sp.Max(a[0], a[1])
        elif op is Op.LT:
            r = sp.Lt(a[0], a[1])
        elif op is Op.LE:
            r = sp.Le(a[0], a[1])
        elif op is Op.GT:
            r = sp.Gt(a[0], a[1])
        elif op is Op.GE:
            r = sp.Ge(a[0], a[1])
        elif op is Op.EQ:
            r = sp.Eq(a[0], a[1])
        elif op is Op.NE:
            r = sp.Ne(a[0], a[1])
        elif op is Op.AND:
            r = sp.And(a[0], a[1])
        elif op is Op.OR:
            r = sp.Or(a[0], a[1])
        elif op is Op.WHERE:
            r = sp.Piecewise((a[1], a[0]), (a[2], True))
        else:  # pragma: no cover - every Op is handled above
            raise NotImplementedError(op)
        val[n] = r
    return val[root]
