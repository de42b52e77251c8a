"""Symbolic reverse-mode differentiation of IR expressions.

The Triton backward kernels need, for the score expression s(qk, loads...), the partial derivatives
∂s/∂qk and ∂s/∂(each float load) as IR expressions they can evaluate per tile; the output epilogue needs
∂out/∂o. `gradients(root, wrt)` returns them, built with `dsl.builder` so constants fold and the result
is typed and verifiable like any other IR.

Two rules keep differentiation total on every spec the front end accepts:

- only arguments through which a target is reachable get a local derivative, so a constant sub-expression
  such as `(0 - 2.0) ** (i - j)` never asks for `log(-2.0)`;
- derivative constants fold with IEEE-754 semantics (`bld.ieee_*`): `dot(q, k) * 1e308 * 10` has the
  derivative inf, as the backends' float arithmetic would give, rather than a folding error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from . import builder as bld
from .ir import DType, Node, Op, const, linearize

_unary = bld.ieee_unary
_binary = bld.ieee_binary


def _mul(a: Node, b: Node) -> Node:
    for x, y in ((a, b), (b, a)):
        if x.op is Op.CONST and x.attr == 1.0:
            return y
        if x.op is Op.CONST and x.attr == 0.0:
            return const(0.0)
    return _binary(Op.MUL, a, b)


def _add(a: Node | None, b: Node) -> Node:
    if a is None or (a.op is Op.CONST and a.attr == 0.0):
        return b
    if b.op is Op.CONST and b.attr == 0.0:
        return a
    return _binary(Op.ADD, a, b)


def _indicator(cond: Node) -> Node:
    return bld.where(cond, const(1.0), const(0.0))


def _local(n: Node, needed: list[bool]) -> list[Node | None]:
    """∂n/∂arg for each argument (None: no gradient flows, e.g. to ints, bools and conditions, or the
    argument is not `needed`: no target lies below it)."""
    if not any(needed):
        return [None] * len(n.args)
    op, a = n.op, n.args
    one = const(1.0)
    if op is Op.ADD:
        return [one, one]
    if op is Op.SUB:
        return [one, const(-1.0)]
    if op is Op.MUL:
        return [a[1], a[0]]
    if op is Op.DIV:  # d(x/y) = 1/y, -x/y^2
        return [
            _binary(Op.DIV, one, a[1]) if needed[0] else None,
            _unary(Op.NEG, _binary(Op.DIV, n, a[1])) if needed[1] else None,
        ]
    if op is Op.POW:  # d(x^y) = y x^(y-1), x^y log x
        dx = _mul(a[1], _binary(Op.POW, a[0], _binary(Op.SUB, a[1], one))) if needed[0] else None
        dy = _mul(n, _unary(Op.LOG, a[0])) if needed[1] else None
        return [dx, dy]
    if op is Op.MOD:  # a mod b = a - b floor(a / b): 1 and -floor(a / b) almost everywhere (as torch)
        return [
            one if needed[0] else None,
            _unary(Op.NEG, _binary(Op.FLOORDIV, a[0], a[1])) if needed[1] else None,
        ]
    if op is Op.NEG:
        return [const(-1.0)]
    if op is Op.EXP:
        return [n]
    if op is Op.EXP2:
        return [_mul(n, const(math.log(2.0)))]
    if op is Op.LOG:
        return [_binary(Op.DIV, one, a[0])]
    if op is Op.LOG2:
        return [_binary(Op.DIV, one, _mul(a[0], const(math.log(2.0))))]
    if op is Op.SQRT:
        return [_binary(Op.DIV, const(0.5), n)]
    if op is Op.RSQRT:  # d x^-1/2 = -1/2 x^-3/2 = -n / (2x)
        return [_unary(Op.NEG, _binary(Op.DIV, n, _mul(const(2.0), a[0])))]
    if op is Op.TANH:
        return [_binary(Op.SUB, one, _mul(n, n))]
    if op is Op.SIGMOID:
        return [_mul(n, _binary(Op.SUB, one, n))]
    if op is Op.RELU:
        return [_indicator(_binary(Op.GT, a[0], const(0.0)))]
    if op is Op.ELU:  # x > 0: 1, else exp(x) = elu(x) + 1
        return [bld.where(_binary(Op.GT, a[0], const(0.0)), one, _binary(Op.ADD, n, one))]
    if op is Op.ABS:
        return [bld.where(_binary(Op.GE, a[0], const(0.0)), one, const(-1.0))]
    if op in (Op.MIN, Op.MAX):  # a tie sends the gradient to the first argument (torch splits it evenly);
        # ties have measure zero for float inputs.
        first = _binary(Op.LE if op is Op.MIN else Op.GE, a[0], a[1])
        return [_indicator(first), _indicator(_unary(Op.NOT, first))]
    if op is Op.WHERE:
        return [None, _indicator(a[0]), _indicator(_unary(Op.NOT, a[0]))]
    return [None] * len(a)  # TO_FLOAT of ints, FLOOR/CEIL (zero a.e.), comparisons, logic, leaves


def gradients(root: Node, wrt: Iterable[Node]) -> dict[Node, Node]:
    """∂root/∂w for each w in `wrt` (float nodes, typically DOT, ELEM and float LOADs); 0.0 if unused."""
    targets = list(wrt)
    if root.dtype is not DType.FLOAT:
        raise ValueError("can only differentiate a float expression")
    order = linearize([root])
    # Nodes with a target at or below them: only these carry a gradient (arguments first in `order`).
    wanted = set(targets)
    active: set[Node] = set()
    for n in order:
        if n in wanted or any(a in active for a in n.args):
            active.add(n)
    adjoint: dict[Node, Node] = {root: const(1.0)}
    for n in reversed(order):
        adj = adjoint.get(n)
        if adj is None or n.op in (Op.DOT, Op.ELEM, Op.LOAD):
            continue
        for arg, local in zip(n.args, _local(n, [a in active for a in n.args]), strict=True):
            if local is None or arg.dtype is not DType.FLOAT:
                continue
            if n.op is Op.WHERE:  # where(c, adj, 0): no arithmetic with a possibly-NaN unselected branch
                contrib = bld.where(n.args[0], adj, const(0.0))
                if arg is n.args[2]:
                    contrib = bld.where(n.args[0], const(0.0), adj)
            else:
                contrib = _mul(adj, local)
            adjoint[arg] = _add(adjoint.get(arg), contrib)
    return {w: adjoint.get(w, const(0.0)) for w in targets}
