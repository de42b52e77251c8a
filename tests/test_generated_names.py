"""Spec names never meet the generated code's own names: kernels take the spec's tensors and scalars under
prefixed parameter names, host functions prefix their locals, and the few fixed keyword names are reserved
(a spec using one gets a clear error)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from attnc.codegen.module import generate_all
from attnc.dsl.check import GENERATED_NAMES, INDEX_VARS
from attnc.dsl.errors import SpecError
from attnc.dsl.lower import compile_to_ir

from attnc import codegen

from .conftest import SPECS

_IDENT = re.compile(
    r"[a-z][A-Za-z0-9_]*\Z"
)  # what a spec may name a tensor or scalar (sizes are capitalised)


def _assigned_names(tree: ast.AST, owner: str) -> set[str]:
    """Parameters and assigned names of every function generated for attention `owner` (comprehension
    variables live in their own scope and are left out)."""
    out: set[str] = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or owner not in fn.name:
            continue
        out |= {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        for node in ast.walk(fn):
            if isinstance(node, ast.comprehension):
                continue
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                out.add(node.id)
        for comp in (n for n in ast.walk(fn) if isinstance(n, ast.comprehension)):
            out -= {t.id for t in ast.walk(comp.target) if isinstance(t, ast.Name)}
    return out


@pytest.mark.parametrize("spec", sorted(p.stem for p in SPECS.glob("*.attn")))
def test_generated_functions_assign_only_reserved_or_private_names(spec: str) -> None:
    path = SPECS / f"{spec}.attn"
    source = path.read_text()
    program = compile_to_ir(source, path.name)
    main, kernels = generate_all(source, path.name)
    for att in program.attentions:
        user = {p.name for p in att.params}
        chosen = {p.name for p in att.aux_tensors} | {p.name for p in att.scalars}  # q, k, v are fixed names
        kernel_names = _assigned_names(ast.parse(kernels or ""), att.name)
        # Kernels take the spec's tensors and scalars as _a_* / _c_* parameters: no local can shadow one.
        assert not (kernel_names & chosen), f"kernel names equal to spec inputs: {kernel_names & chosen}"
        # Host functions take the spec's names as parameters on purpose; their own locals must be private,
        # index variables or reserved.
        host = _assigned_names(ast.parse(main), att.name) - user
        clash = {
            n
            for n in host
            if _IDENT.match(n) and n not in INDEX_VARS and n not in GENERATED_NAMES and n != "output"
        }
        assert not clash, f"host functions of {att.name} assign spec-legal names: {sorted(clash)}"


CLASH = """attention clash(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, E],
                  s: [H], p: [H], acc: [H], row: [H], kern: [H], ref: [H], out: [H], alpha: [H], dalpha: [H],
                  w: float = 0.5) {
    score = dot(q, k) * D ** -0.5 + s[h] * (i - j) * w + p[h] + acc[h] - row[h] + kern[h] * ref[h]
            + out[h] + alpha[h] * dalpha[h]
    mask  = j <= i
}
"""


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_spec_names_that_match_generated_locals(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "clash.attn"
    path.write_text(CLASH)
    mod = codegen.compile_file(path, cache_dir=tmp_path / "cache")
    gen = torch.Generator().manual_seed(0)
    B, H, N, D = 1, 2, 40, 16
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    aux = [torch.rand(H, generator=gen, dtype=torch.float64) for _ in range(9)]
    s, p, acc, row, kern, ref, out, alpha, dalpha = aux
    i = torch.arange(N, dtype=torch.float64)
    bias = (s[:, None, None] * (i[:, None] - i[None, :]) * 0.3 + p[:, None, None] + acc[:, None, None]
            - row[:, None, None] + (kern * ref + out + alpha * dalpha)[:, None, None])  # fmt: skip
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    )
    dt = torch.float64 if backend == "reference" else torch.float32
    leaves = [x.to(dt).requires_grad_() for x in (q, k, v, *aux)]
    got = mod.clash(*leaves, 0.3, backend=backend)
    tol = 1e-9 if backend == "reference" else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    grads = torch.autograd.grad(got.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[3 + 7].abs().sum() > 0  # alpha's gradient reaches it, apart from dalpha's


@pytest.mark.parametrize(
    "reserved", ["algorithm", "initial_state", "return_state", "block_layout", "do", "ctx"]
)
def test_reserved_names_are_refused_clearly(reserved: str) -> None:
    src = f"attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], {reserved}: [H]) {{\n    score = dot(q, k)\n}}\n"
    with pytest.raises(SpecError, match=f"'{reserved}' is a built-in name"):
        compile_to_ir(src, "a.attn")
