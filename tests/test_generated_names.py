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

from .conftest import REPO, SPECS

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
    "reserved", ["algorithm", "initial_state", "return_state", "position_offset", "block_layout", "do", "ctx"]
)
def test_reserved_names_are_refused_clearly(reserved: str) -> None:
    src = f"attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], {reserved}: [H]) {{\n    score = dot(q, k)\n}}\n"
    with pytest.raises(SpecError, match=f"'{reserved}' is a built-in name"):
        compile_to_ir(src, "a.attn")


# ---- module-level names: every one the generator emits is reserved (issue 16) --------------------------------

_ALL_SPECS = sorted(
    {p.name: p for p in [*SPECS.glob("*.attn"), *(REPO / "zoo" / "specs").glob("*.attn")]}.items()
)


def _unreserved(text: str, ns, blocks: list[str]) -> set[str]:
    """Module-level names of generated `text` that neither a fixed name nor a block's template covers and that
    a spec could reach: public names, and private ones that some legal block name would form from a template
    (a private name no block can spell cannot be shadowed)."""
    from attnc.codegen.names import module_level_names

    covered = set(ns.fixed).union(*(ns.block_names(b) for b in blocks))
    return {n for n in module_level_names(text) - covered if not n.startswith("_") or _formable(n, ns)}


def _formable(name: str, ns) -> bool:
    for template in ns.per_block:
        head, _, tail = template.partition("{name}")
        if name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail):
            block = name[len(head) : len(name) - len(tail)]
            if block[:1].isalpha() and block.replace("_", "a").isalnum():
                return True
    return False


@pytest.mark.parametrize(("spec", "path"), _ALL_SPECS, ids=[n for n, _ in _ALL_SPECS])
def test_every_module_level_name_the_generator_emits_is_reserved(spec: str, path: Path) -> None:
    """Read back from the generator's real output (every example and zoo spec), not from a list: each name
    the main module or the kernels file binds at module level is one `codegen.names` registers."""
    from attnc.codegen.names import generated_names

    source = path.read_text()
    program = compile_to_ir(source, spec)
    blocks = [a.name for a in (*program.attentions, *program.recurrences)]
    main, kernels = generate_all(source, spec)
    main_ns, kernels_ns = generated_names()
    assert not _unreserved(main, main_ns, blocks), "main module names not reserved"
    assert not _unreserved(kernels or "", kernels_ns, blocks), "kernels file names not reserved"


@pytest.mark.parametrize(
    "path",
    [SPECS / "causal.attn", SPECS / "linear_elu.attn", REPO / "zoo" / "specs" / "gla.attn"],
    ids=lambda p: p.name,
)
def test_every_module_level_name_of_a_standalone_module_is_reserved(path: Path) -> None:
    """`attnc codegen --standalone` also defines the vendored runtime: its names are reserved for that mode.
    (gla: a state block, with the delta runtime vendored; that runtime's own `gla` takes a prefixed name.)"""
    from attnc.codegen.module import render_all
    from attnc.codegen.names import generated_names

    spec = path.name
    source = path.read_text()
    program = compile_to_ir(source, spec)
    main, kernels = render_all(program, source, standalone=True)
    main_ns, kernels_ns = generated_names(standalone=True)
    blocks = [a.name for a in (*program.attentions, *program.recurrences)]
    assert not _unreserved(main, main_ns, blocks)
    assert not _unreserved(kernels or "", kernels_ns, blocks)


def test_the_generator_registers_its_names_with_the_front_end() -> None:
    from attnc.codegen.names import generated_names
    from attnc.dsl import check

    assert generated_names in check.RESERVED_PROVIDERS
    block = "attention {}(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {{\n    score = dot(q, k)\n}}\n"
    for n in ["BlockLayout", "ATTNC_VERSION", "LANGUAGE_VERSION", "SPEC_SHA256", "Optional"]:
        with pytest.raises(SpecError, match="a name the generated module defines for itself") as err:
            compile_to_ir(block.format(n))
        assert (err.value.line, err.value.col) == (1, 11)
    for first, second in [("a", "a_triton"), ("a", "a_backward"), ("a_linear", "a"), ("a", "a_reference")]:
        with pytest.raises(SpecError, match=f"attention '{second}' clashes with an earlier attention") as err:
            compile_to_ir(block.format(first) + block.format(second))
        assert (err.value.line, err.value.col) == (4, 11)


@pytest.mark.parametrize("name", ["require_runtime", "settings", "warnings", "triton_cdiv"])
def test_a_block_named_like_a_vendored_runtime_name_is_refused_by_codegen_standalone(
    tmp_path: Path, name: str
) -> None:
    from attnc.cli import main

    path = tmp_path / "v.attn"
    path.write_text(
        f"attention {name}(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {{\n    score = dot(q, k)\n}}\n"
    )
    assert main(["codegen", "--standalone", str(path), "-o", str(tmp_path / "out")]) != 0
    assert main(["codegen", str(path), "-o", str(tmp_path / "out")]) == 0  # the plain module has no such name
