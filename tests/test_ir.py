"""The IR: structural hashing, linearisation, typing/folding, the verifier, passes and range analysis."""

from __future__ import annotations

import dataclasses

import pytest
import sympy as sp
from attnc.dsl import builder as bld
from attnc.dsl.analysis.ranges import index_status, nonneg
from attnc.dsl.analysis.symbolic import to_sympy
from attnc.dsl.ir import DType, Node, Op, Var, const, linearize, size, var, walk
from attnc.dsl.lower import compile_to_ir
from attnc.dsl.passes import IRVerifyError, simplify_identities, verify

QKV = "q: [B, H, M, D], k: [B, G, N, D], v: [B, G, N, E]"


def one(body: str, params: str = "") -> object:
    src = f"attention t({QKV}{', ' + params if params else ''}) {{\n{body}\n}}\n"
    return compile_to_ir(src, "t.attn").attentions[0]


def test_structural_hash_and_equality() -> None:
    a = bld.binary(Op.ADD, var(Var.I), const(1))
    b = bld.binary(Op.ADD, var(Var.I), const(1))
    assert a is not b and a == b and hash(a) == hash(b)
    assert a != bld.binary(Op.ADD, var(Var.J), const(1))
    assert const(1) != const(1.0) and const(True) != const(1)


def test_linearize_shares_common_subexpressions_without_recursion() -> None:
    x = var(Var.I)
    for _ in range(3000):  # a DAG far deeper than Python's recursion limit, with 2^3000 paths
        x = Node(Op.ADD, DType.INT, (x, x))
    order = linearize([x])
    assert len(order) == 3001 and order[0] == var(Var.I) and order[-1] is x
    assert sum(1 for _ in walk([x])) == 3001


def test_builder_typing_and_folding() -> None:
    assert bld.binary(Op.POW, const(2), const(3)) == const(8.0)  # ** is real power
    assert bld.binary(Op.FLOORDIV, const(-7), const(2)) == const(-4)  # floor semantics
    assert bld.binary(Op.MOD, const(-7), const(2)) == const(1)
    assert bld.binary(Op.DIV, var(Var.I), const(2)).dtype is DType.FLOAT
    mixed = bld.binary(Op.MUL, var(Var.I), const(0.5))
    assert mixed.args[0].op is Op.TO_FLOAT  # the int operand is cast explicitly
    with pytest.raises(bld.BuildError, match="overflows"):
        bld.binary(Op.POW, const(9), bld.binary(Op.POW, const(9), const(9)))
    with pytest.raises(bld.BuildError, match="division by zero"):
        bld.binary(Op.FLOORDIV, var(Var.I), const(0))
    with pytest.raises(bld.BuildError, match="bool"):
        bld.binary(Op.ADD, const(True), const(1))
    c = bld.binary(Op.LT, var(Var.J), var(Var.I))
    assert bld.binary(Op.AND, const(True), c) is c
    assert bld.binary(Op.OR, const(True), c) == const(True)


def test_verifier_rejects_broken_ir() -> None:
    att = one("score = dot(q, k)\nmask = j <= i")
    verify(att)
    with pytest.raises(IRVerifyError, match="dot in mask"):
        verify(
            dataclasses.replace(att, mask=Node(Op.GT, DType.BOOL, (Node(Op.DOT, DType.FLOAT), const(0.0))))
        )
    with pytest.raises(IRVerifyError, match="index variable"):
        verify(dataclasses.replace(att, norm=dataclasses.replace(att.norm, sink=bld.to_float(var(Var.J)))))
    with pytest.raises(IRVerifyError, match="unknown size"):
        verify(dataclasses.replace(att, score=bld.to_float(size("Z"))))
    with pytest.raises(IRVerifyError, match="with operand types"):
        verify(dataclasses.replace(att, score=Node(Op.ADD, DType.FLOAT, (var(Var.I), const(1.0)))))


def test_simplify_pass_is_pure_and_removes_identities() -> None:
    att = one("score = dot(q, k) * 1.0 + 0.0 + (i - i)")
    # Lowering already ran the pipeline; rebuild the unsimplified tree by hand and run the pass.
    raw = bld.binary(Op.ADD, bld.binary(Op.MUL, Node(Op.DOT, DType.FLOAT), const(1.0)), const(0.0))
    before = dataclasses.replace(att, score=raw)
    after = simplify_identities(before)
    assert before.score is raw  # input untouched
    assert after.score == Node(Op.DOT, DType.FLOAT)
    assert att.score == Node(
        Op.DOT, DType.FLOAT
    )  # the pipeline also folded (i - i) -> 0 -> 0.0 and removed it


def test_to_sympy() -> None:
    att = one("score = dot(q, k)\nmask = i // 2 == j % 3 and j <= i + N - M")
    e = to_sympy(att.mask)
    i, j = sp.Symbol("i", integer=True, nonnegative=True), sp.Symbol("j", integer=True, nonnegative=True)
    assert (
        e.subs(
            {
                i: 4,
                j: 2,
                sp.Symbol("N", integer=True, positive=True): 8,
                sp.Symbol("M", integer=True, positive=True): 8,
            }
        )
        == sp.true
    )


@pytest.mark.parametrize(
    ("index", "dim", "status"),
    [
        ("h", "H", "in"),
        ("hk", "G", "in"),
        ("h + H", "H", "out"),
        ("0 - 1", "H", "out"),
        ("h + 1", "H", "unknown"),
        ("j - i", "N", "unknown"),
        ("clamp(j - i, -4, 4) + 4", "9", "in"),
        ("clamp(j - i, -4, 4) + 4", "8", "unknown"),
        ("(i - j) % 7", "7", "in"),
        ("i // 2", "M", "in"),
        ("abs(j - i)", "N", "unknown"),
        ("min(i, N - 1)", "N", "in"),
    ],
)
def test_index_range_analysis(index: str, dim: str, status: str) -> None:
    params = f"t: [{dim}]"
    if status == "out":
        with pytest.raises(Exception, match="always out of range"):
            one(f"score = dot(q, k) + t[{index}]", params)
        return
    att = one(f"score = dot(q, k) + t[{index}]", params)
    load = next(n for n in walk([att.score]) if n.op is Op.LOAD)
    assert index_status(load.args[0], att.param("t").shape[0], att.layout) == status


def test_nonneg_sees_through_min_max() -> None:
    r = sp.Symbol("R", integer=True)
    m = sp.Symbol("M", integer=True, positive=True)
    assert nonneg(r + sp.Max(-r, 1 - m))
    assert not nonneg(r + sp.Min(-r, 1 - m))


def test_every_op_has_a_sympy_form() -> None:
    from attnc.dsl.analysis.symbolic import _OPS

    handled_directly = {Op.CONST, Op.VAR, Op.SIZE, Op.SCALAR, Op.LOAD, Op.DOT, Op.ELEM, Op.TO_FLOAT}
    assert set(Op) - handled_directly == set(_OPS)
