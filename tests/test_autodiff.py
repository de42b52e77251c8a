"""Symbolic IR derivatives against torch autograd, through a small IR evaluator written here."""

from __future__ import annotations

import pytest
import torch
from attnc.dsl.autodiff import gradients
from attnc.dsl.ir import Node, Op, linearize, walk
from attnc.dsl.lower import compile_to_ir

from .conftest import SPECS

_TORCH = {
    Op.NEG: torch.neg,
    Op.ABS: torch.abs,
    Op.EXP: torch.exp,
    Op.EXP2: torch.exp2,
    Op.LOG: torch.log,
    Op.LOG2: torch.log2,
    Op.SQRT: torch.sqrt,
    Op.RSQRT: torch.rsqrt,
    Op.TANH: torch.tanh,
    Op.SIGMOID: torch.sigmoid,
    Op.RELU: torch.relu,
    Op.ELU: torch.nn.functional.elu,
    Op.FLOOR: torch.floor,
    Op.CEIL: torch.ceil,
    Op.NOT: torch.logical_not,
    Op.ADD: torch.add,
    Op.SUB: torch.sub,
    Op.MUL: torch.mul,
    Op.DIV: torch.div,
    Op.FLOORDIV: lambda a, b: torch.div(a, b, rounding_mode="floor"),
    Op.MOD: torch.remainder,
    Op.POW: torch.pow,
    Op.MIN: torch.minimum,
    Op.MAX: torch.maximum,
    Op.LT: torch.lt,
    Op.LE: torch.le,
    Op.GT: torch.gt,
    Op.GE: torch.ge,
    Op.EQ: torch.eq,
    Op.NE: torch.ne,
    Op.AND: torch.logical_and,
    Op.OR: torch.logical_or,
    Op.WHERE: torch.where,
}


def evaluate(root: Node, leaves: dict[Node, torch.Tensor], env: dict[str, float]) -> torch.Tensor:
    val: dict[Node, torch.Tensor] = {}
    for n in linearize([root]):
        if n in leaves:
            val[n] = leaves[n]
        elif n.op is Op.CONST:
            val[n] = torch.tensor(n.attr, dtype=torch.float64 if isinstance(n.attr, float) else None)
        elif n.op in (Op.SIZE, Op.SCALAR):
            val[n] = torch.tensor(env[str(n.attr)])
        elif n.op is Op.VAR:
            val[n] = torch.as_tensor(env[n.attr.value])  # type: ignore[union-attr]
        elif n.op is Op.TO_FLOAT:
            val[n] = val[n.args[0]].double()
        else:
            val[n] = _TORCH[n.op](*(val[a] for a in n.args))
    return val[root]


SCORES = [
    "cap * tanh(dot(q, k) / cap)",
    "sigmoid(dot(q, k)) * log(abs(dot(q, k)) + 1) ** 2.5 + t[h]",
    "where(j < i, exp(dot(q, k) * t[h]), rsqrt(dot(q, k) * dot(q, k) + 1))",
    "max(dot(q, k), 0.3) / sqrt(dot(q, k) * dot(q, k) + 2) + min(t[h], dot(q, k))",
    "elu(dot(q, k)) + relu(t[h] * dot(q, k)) - 2 ** dot(q, k) + exp2(t[h]) + log2(t[h] * t[h] + 1)",
    "dot(q, k) ** t[h] + t[h] ** 3",
]


@pytest.mark.parametrize("score", SCORES, ids=[f"expr{n}" for n in range(len(SCORES))])
def test_gradients_match_autograd(score: str) -> None:
    src = (
        "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], t: [H], cap: float = 3.0) {\n"
        f"    score = {score}\n}}\n"
    )
    att = compile_to_ir(src, "a.attn").attentions[0]
    wrt = list(dict.fromkeys(n for n in walk([att.score]) if n.op in (Op.DOT, Op.LOAD)))
    grads = gradients(att.score, wrt)
    g = torch.Generator().manual_seed(0)
    shape = (64,)
    leaves = {
        n: (torch.rand(shape, generator=g, dtype=torch.float64) * 1.5 + 0.1).requires_grad_() for n in wrt
    }
    i = torch.randint(0, 5, shape, generator=g)
    j = torch.randint(0, 5, shape, generator=g)
    env = {"cap": 3.0, "i": i, "j": j, "h": 0, "D": 16.0, "N": 5.0}
    out = evaluate(att.score, leaves, env)  # type: ignore[arg-type]
    expected = torch.autograd.grad(out.sum(), list(leaves.values()), allow_unused=True)
    for n, want in zip(wrt, expected, strict=True):
        got = evaluate(grads[n], {k: v.detach() for k, v in leaves.items()}, env)  # type: ignore[arg-type]
        want = torch.zeros(shape, dtype=torch.float64) if want is None else want
        torch.testing.assert_close(got.expand(shape), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", ["alibi", "softcap", "t5_bias", "moh_gate", "lightning"])
def test_example_specs_differentiate(spec: str) -> None:
    att = compile_to_ir((SPECS / f"{spec}.attn").read_text(), f"{spec}.attn").attentions[0]
    for root in att.roots().values():
        if root.dtype.value != "float":
            continue
        wrt = [
            n
            for n in walk([root])
            if n.op in (Op.DOT, Op.ELEM) or (n.op is Op.LOAD and n.dtype.value == "float")
        ]
        grads = gradients(root, wrt)
        assert set(grads) == set(wrt)
        # d score / d qk of `qk * D ** -0.5 + ...` folds to the constant-free scale expression
        if spec == "alibi" and root is att.score:
            dot = next(n for n in wrt if n.op is Op.DOT)
            assert "dot" not in repr(grads[dot]) and "0.5" in repr(grads[dot])
