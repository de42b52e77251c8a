"""IR passes: pure functions `Attention -> Attention`, run in the order of `PIPELINE`, with the verifier
after each one (as tinygrad runs its rewrite list). A pass that breaks an invariant is a compiler bug and
raises `IRVerifyError`, never a `SpecError`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from . import builder as bld
from .ir import (
    Attention,
    DType,
    Node,
    Op,
    Program,
    ScalarParam,
    TensorParam,
    Var,
    linearize,
    walk,
)

Pass = Callable[[Attention], Attention]


class IRVerifyError(AssertionError):
    pass


def rewrite(root: Node, fn: Callable[[Node], Node | None]) -> Node:
    """Bottom-up rewrite without recursion: rebuild each node from rewritten arguments, then offer it to fn."""
    new: dict[Node, Node] = {}
    for n in linearize([root]):
        args = tuple(new[a] for a in n.args)
        m = n if args == n.args else _rebuild(n, args)
        r = fn(m)
        new[n] = m if r is None else r
    return new[root]


def _rebuild(n: Node, args: tuple[Node, ...]) -> Node:
    """A node with new arguments, folded again when they became constants."""
    if args and n.op is not Op.LOAD and all(a.op is Op.CONST for a in args):
        try:
            if n.op is Op.TO_FLOAT:
                return bld.to_float(args[0])
            if n.op is Op.WHERE:
                return bld.where(*args)
            if len(args) == 1:
                return bld.unary(n.op, args[0])
            return bld.binary(n.op, *args)
        except bld.BuildError:
            pass  # e.g. 1 // (h - h): keep the operation; it fails at run time like any division by zero
    return Node(n.op, n.dtype, args, n.attr)


def map_roots(att: Attention, fn: Callable[[Node], Node]) -> Attention:
    def f(x: Node | None) -> Node | None:
        return None if x is None else fn(x)

    return dataclasses.replace(
        att,
        score=fn(att.score),
        mask=f(att.mask),
        feature_q=f(att.feature_q),
        feature_k=f(att.feature_k),
        output=f(att.output),
        norm=dataclasses.replace(att.norm, sink=f(att.norm.sink), bias=f(att.norm.bias), eps=f(att.norm.eps)),
    )


def _is_const(n: Node, value: float) -> bool:
    return n.op is Op.CONST and n.dtype is not DType.BOOL and n.attr == value


def _identity(n: Node) -> Node | None:
    if len(n.args) != 2:
        return None
    a, b = n.args
    if n.op is Op.ADD and _is_const(b, 0) and a.dtype is n.dtype:
        return a
    if n.op is Op.ADD and _is_const(a, 0) and b.dtype is n.dtype:
        return b
    if n.op is Op.SUB and _is_const(b, 0) and a.dtype is n.dtype:
        return a
    if n.op in (Op.MUL, Op.DIV) and _is_const(b, 1) and a.dtype is n.dtype:
        return a
    if n.op is Op.MUL and _is_const(a, 1) and b.dtype is n.dtype:
        return b
    if n.op is Op.POW and _is_const(b, 1):
        return a
    if n.op is Op.SUB and a == b and n.dtype is DType.INT:
        return bld.const(0)
    return None


def simplify_identities(att: Attention) -> Attention:
    """x + 0, x * 1, x / 1, x ** 1 -> x; i - i -> 0 for ints (floats keep x - x: it is NaN for inf)."""
    return map_roots(att, lambda r: rewrite(r, _identity))


PIPELINE: list[tuple[str, Pass]] = [
    ("simplify_identities", simplify_identities),
]

_ROOT_VARS = {
    "score": {Var.B, Var.H, Var.HK, Var.I, Var.J},
    "mask": {Var.B, Var.H, Var.HK, Var.I, Var.J},
    "bias": {Var.B, Var.H, Var.HK, Var.I, Var.J},
    "sink": {Var.B, Var.H, Var.HK, Var.I},
    "eps": {Var.B, Var.H, Var.HK, Var.I},
    "output": {Var.B, Var.H, Var.HK, Var.I, Var.E},
    "feature q": {Var.B, Var.H, Var.HK, Var.I, Var.D},
    "feature k": {Var.B, Var.HK, Var.J, Var.D},
}
_ROOT_ELEM = {"output": "o", "feature q": "q", "feature k": "k"}


def verify(att: Attention) -> None:
    tensors = {p.name: p for p in att.params if isinstance(p, TensorParam)}
    scalars = {p.name: p for p in att.params if isinstance(p, ScalarParam)}
    sizes = {str(n.attr) for p in tensors.values() for d in p.shape for n in walk([d]) if n.op is Op.SIZE}

    def fail(msg: str) -> None:
        raise IRVerifyError(f"{att.name}: {msg}")

    for root_name, root in att.roots().items():
        expected = DType.BOOL if root_name == "mask" else DType.FLOAT
        if root.dtype is not expected:
            fail(f"{root_name} has type {root.dtype}")
        for n in walk([root]):
            arg_types = [a.dtype for a in n.args]
            if n.op is Op.VAR and n.attr not in _ROOT_VARS[root_name]:
                fail(f"{root_name} uses index variable {n.attr}")
            if n.op is Op.DOT and root_name != "score":
                fail(f"dot in {root_name}")
            if n.op is Op.ELEM and n.attr != _ROOT_ELEM.get(root_name):
                fail(f"element '{n.attr}' in {root_name}")
            if n.op is Op.LOAD:
                t = tensors.get(str(n.attr))
                if t is None or len(t.shape) != len(n.args) or t.type.kind is not n.dtype:
                    fail(f"bad load {n.attr}")
                if any(x is not DType.INT for x in arg_types):
                    fail(f"non-int index into {n.attr}")
            if n.op is Op.SCALAR and (
                str(n.attr) not in scalars or scalars[str(n.attr)].dtype is not n.dtype
            ):
                fail(f"unknown scalar {n.attr}")
            if n.op is Op.SIZE and str(n.attr) not in sizes:
                fail(f"unknown size {n.attr}")
            if n.op in (Op.AND, Op.OR, Op.NOT) and any(x is not DType.BOOL for x in arg_types):
                fail(f"{n.op} on non-bools")
            if n.op in (Op.ADD, Op.SUB, Op.MUL, Op.FLOORDIV, Op.MOD, Op.MIN, Op.MAX):
                if len(set(arg_types)) != 1 or arg_types[0] is not n.dtype or n.dtype is DType.BOOL:
                    fail(f"{n.op} with operand types {arg_types} -> {n.dtype}")
            if n.op in (Op.DIV, Op.POW) and (n.dtype is not DType.FLOAT or set(arg_types) != {DType.FLOAT}):
                fail(f"{n.op} must be float")
            if n.op is Op.WHERE and (arg_types[0] is not DType.BOOL or arg_types[1] is not arg_types[2]):
                fail("bad where")


def run_pipeline(program: Program, on_pass: Callable[[str, Attention], None] | None = None) -> Program:
    out = []
    for att in program.attentions:
        verify(att)
        for name, p in PIPELINE:
            att = p(att)
            verify(att)
            if on_pass is not None:
                on_pass(name, att)
        out.append(att)
    return dataclasses.replace(program, attentions=tuple(out))
