"""The runtime library generated modules import (attnc/runtime/): its version check, what importing a
module pulls in, custom-op names per spec, the state API that replaced writing into a module's globals, and
`attnc codegen --standalone` (the runtime vendored in, for shipping without attnc)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attnc.codegen import module as codegen_module
from attnc.codegen.module import Target, generate_all, load_module_file

from attnc.runtime import RUNTIME_VERSION, RuntimeVersionError, api
from attnc.runtime import linear as rt_linear

from .conftest import REPO, SPECS

# A Python snippet that makes `import attnc` fail for the rest of the process, whatever sys.path holds.
_BLOCK_ATTNC = textwrap.dedent(
    """
    import sys
    class _NoAttnc:
        def find_spec(self, name, path=None, target=None):
            if name == "attnc" or name.startswith("attnc."):
                raise ImportError("attnc is not installed here: " + name)
    sys.meta_path.insert(0, _NoAttnc())
    """
)


def _subprocess(code: str, cwd: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _write(directory: Path, stem: str, spec: str, **kwargs) -> Path:
    from attnc.codegen.module import render_all
    from attnc.dsl.lower import compile_to_ir

    source = (SPECS / f"{spec}.attn").read_text() if "{" not in spec else spec
    main, kernels = render_all(compile_to_ir(source, f"{stem}.attn"), source, Target.ALL, **kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}_triton.py").write_text(kernels or "")
    (directory / f"{stem}.py").write_text(main)
    return directory / f"{stem}.py"


# ---- versions -----------------------------------------------------------------------------------------------


def test_module_for_another_runtime_fails_on_import_naming_both_versions(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(codegen_module, "RUNTIME_VERSION", "0")  # what an older attnc would have written
    path = _write(tmp_path, "old", "causal")
    assert "_require_runtime('0')" in path.read_text()
    with pytest.raises(RuntimeVersionError) as info:
        load_module_file(path, "attnc_test_old_runtime")
    msg = str(info.value)
    assert "runtime version 0" in msg and f"is version {RUNTIME_VERSION}" in msg and "regenerate" in msg
    assert "attnc_test_old_runtime" not in sys.modules


# ---- what importing a generated module pulls in ---------------------------------------------------------------


def test_importing_a_module_loads_neither_the_compiler_nor_sympy_nor_triton(tmp_path) -> None:
    path = _write(tmp_path, "alibi_mod", "alibi")
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        import alibi_mod
        imported = sorted(m for m in sys.modules if m.split(".")[0] in ("lark", "sympy", "triton", "optuna")
                          or m.startswith(("attnc.dsl", "attnc.codegen", "attnc.autotune", "attnc.zoo")))
        q = torch.randn(1, 2, 5, 8)
        o = alibi_mod.alibi(q, q, q, torch.ones(2))
        # Calling it may import what torch itself looks for (sympy, triton), never the compiler.
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("lark", "optuna")
                     or m.startswith(("attnc.dsl", "attnc.codegen", "attnc.autotune", "attnc.zoo")))
        print(json.dumps({{"shape": list(o.shape), "bad": bad, "runtime": "attnc.runtime.api" in sys.modules, "imported": imported}}))
        """
    )
    got = _subprocess(code, REPO)
    assert path.exists() and got["shape"] == [1, 2, 5, 8]
    assert got["runtime"] and got["imported"] == [], got["imported"]
    assert got["bad"] == [], got["bad"]


def test_every_runtime_name_generated_code_uses_exists(tmp_path) -> None:
    """`_rt.X` in every example's module is a name of attnc.runtime.api (and of the vendored runtime)."""
    vendored = {
        n
        for node in ast.parse(codegen_module.vendor.runtime_source()).body
        for n in (
            [node.name]
            if isinstance(node, ast.FunctionDef | ast.ClassDef)
            else [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        )
    }
    used, used_lin = set(), set()
    for spec in sorted(SPECS.glob("*.attn")):
        main, _ = generate_all(spec.read_text(), spec.name)
        for node in ast.walk(ast.parse(main)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "_rt":
                    used.add(node.attr)
                elif node.value.id == "_rt_lin":
                    used_lin.add(node.attr)
    assert used and used <= set(api.__all__), sorted(used - set(api.__all__))
    assert used_lin and all(hasattr(rt_linear, n) for n in used_lin), sorted(used_lin)
    assert (used | used_lin) <= vendored, sorted((used | used_lin) - vendored)


def test_generated_module_holds_only_the_spec_specific_part() -> None:
    main, kernels = generate_all((SPECS / "alibi.attn").read_text(), "alibi.attn")
    # The block's entry points (batched, varlen, paged) and launch description; its custom ops are built by
    # the runtime (attention_op.py). 1,202 lines when the runtime was copied in.
    assert len(main.splitlines()) <= 300, len(main.splitlines())
    tree = ast.parse(main)
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert not {"_attend", "_bind", "_TritonAttention", "BlockLayout"} & defined  # the runtime's, imported
    assert (
        kernels is not None and "_lin_fwd_out_kernel" not in kernels
    )  # the linear core lives in the runtime


def test_fingerprint_covers_the_runtime_sources() -> None:
    names = {n for n, _ in codegen_module.fingerprinted_sources()}
    for f in (REPO / "attnc" / "runtime").glob("*.py"):
        assert f"runtime/{f.name}" in names, f
    assert "settings.py" in names and "codegen/module.py" in names and any(n.endswith(".lark") for n in names)


# ---- custom-op names: per spec, per file ------------------------------------------------------------------------

_SPEC_A = """attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {
    score = dot(q, k) * D ** -0.5
    mask  = j <= i
}
"""
_SPEC_B = _SPEC_A.replace("D ** -0.5", "D ** -0.5 * 3.0").replace("j <= i", "j >= i")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_two_specs_written_to_one_path_register_distinct_ops(tmp_path, backend) -> None:
    """Same attention name, same output path, one after the other in one process: the second module
    registers its own op (the op key hashes the spec), and calling it runs the new code."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen) for _ in range(3))
    ops, outs = [], []
    for src in (_SPEC_A, _SPEC_B):
        path = _write(tmp_path / backend, "same", src)
        mod = load_module_file(path, f"attnc_test_same_{backend}")  # the same module name: a reload
        assert len(mod._OP_KEY) == 16, mod._OP_KEY
        ops.append(mod._a_op._qualname)
        outs.append(mod.a(q, k, v, backend=backend))
    assert ops[0] != ops[1], ops
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    want_a = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=16**-0.5)
    want_b = F.scaled_dot_product_attention(q, k, v, attn_mask=causal.T, scale=3 * 16**-0.5)
    torch.testing.assert_close(outs[0], want_a, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(outs[1], want_b, atol=2e-5, rtol=2e-5)


def test_reference_backward_recomputes_on_the_calling_thread(compiled, monkeypatch) -> None:
    """The reference backend's backward recomputes the forward under autograd on the caller's thread, and its
    gradients match SDPA's. (It used a helper thread: on CUDA the caller of a custom op's backward is the
    autograd engine's device thread, which waited for the helper while the helper's autograd.grad queued its
    work to it, so every CUDA backward with backend="reference" hung; seen on an H200.)"""
    import threading

    from attnc.runtime import attention_op

    seen = []
    grad = attention_op._grad

    def spy(*a):
        seen.append(threading.get_ident())
        return grad(*a)

    monkeypatch.setattr(attention_op, "_grad", spy)
    mod = compiled("causal")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(2, 3, 33, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    do = torch.randn(2, 3, 33, 16, generator=gen, dtype=torch.float64)
    mod.causal(q, k, v, backend="reference").backward(do)
    assert seen == [threading.get_ident()], seen
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref, is_causal=True).backward(do)
    for t, r in zip((q, k, v), ref, strict=True):
        torch.testing.assert_close(t.grad, r.grad, atol=1e-10, rtol=1e-10)


def test_a_stale_kernels_file_is_refused(tmp_path) -> None:
    path = _write(tmp_path, "stale", _SPEC_A)
    mod = load_module_file(path, "attnc_test_stale")
    _, other = generate_all(_SPEC_B, "stale.attn")
    (tmp_path / "stale_triton.py").write_text(other or "")  # another spec's kernels beside this module
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="does not belong to this module"):
        mod.a(q, q, q, backend="triton")


# ---- state through the runtime's API --------------------------------------------------------------------------


def test_forced_configs_and_visit_probe_are_scoped(compiled) -> None:
    from attnc.runtime import forced_configs, module_state, visit_probe
    from attnc.runtime.triton import _KernelConfig

    mod = compiled("causal")
    q = torch.randn(1, 1, 64, 16)
    forced = _KernelConfig(16, 16, 2, 1)
    with visit_probe() as probe, forced_configs(mod, {"fwd": forced}):
        mod.causal(q, q, q, backend="triton")
        assert module_state(mod).forced == {"fwd": forced}
    assert probe["fwd_config"] == forced
    assert module_state(mod).forced is None
    with visit_probe() as probe:
        mod.causal(q, q, q, backend="triton")
    assert probe["fwd_config"] != forced  # the default again
    assert "_FORCED_CONFIGS" not in vars(mod) and "_VISIT_PROBE" not in vars(mod)


def test_codegen_imports_nothing_of_the_autotuner() -> None:
    code = (
        "import json, sys\n"
        "from attnc.codegen.module import generate\n"
        f"generate(open({str(SPECS / 'causal.attn')!r}).read(), 'causal.attn')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('attnc.autotune'))))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


# ---- --standalone ---------------------------------------------------------------------------------------------


def _standalone_run(directory: Path, stem: str, call: str) -> str:
    return _BLOCK_ATTNC + textwrap.dedent(
        f"""
        import importlib.util, json, torch
        spec = importlib.util.spec_from_file_location({stem!r}, {str(directory / (stem + ".py"))!r})
        mod = importlib.util.module_from_spec(spec)
        sys.modules[{stem!r}] = mod
        spec.loader.exec_module(mod)
        try:
            import attnc  # noqa: F401
            blocked = False
        except ImportError:
            blocked = True
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
        aux = torch.rand(2, generator=g)
        out = {{b: mod.{call}(q, k, v, aux, backend=b).tolist() for b in ("reference", "triton")}}
        print(json.dumps({{"out": out, "blocked": blocked,
                           "attnc": sorted(m for m in sys.modules if m.split(".")[0] == "attnc")}}))
        """
    )


@pytest.mark.parametrize(("spec", "call"), [("alibi", "alibi"), ("lightning", "lightning")])
def test_standalone_module_runs_where_attnc_cannot_be_imported(tmp_path, compiled, spec, call) -> None:
    from attnc.cli import main

    out = tmp_path / "out"
    assert main(["codegen", str(SPECS / f"{spec}.attn"), "-o", str(out), "--standalone"]) == 0
    text = (out / f"{spec}.py").read_text()
    assert "from attnc" not in text and "import attnc" not in text
    got = _subprocess(_standalone_run(out, spec, call), tmp_path)
    assert got["blocked"] and got["attnc"] == []
    mod = compiled(spec)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    aux = torch.rand(2, generator=g)
    for backend in ("reference", "triton"):
        want = getattr(mod, call)(q, k, v, aux, backend=backend)
        torch.testing.assert_close(torch.tensor(got["out"][backend]), want, atol=1e-6, rtol=1e-6)


def test_assume_constant_result_matches_dynamo() -> None:
    """The runtime marks constant-result functions without importing torch._dynamo (seconds of import time);
    the mark must be the one dynamo's own decorator sets, or a torch.compile trace would stop honouring it."""
    import torch._dynamo

    from attnc.runtime import compat

    def ours() -> int:
        return 1

    def theirs() -> int:
        return 1

    torch._dynamo.assume_constant_result(theirs)
    saved = sys.modules.pop("torch._dynamo")
    try:
        compat.assume_constant_result(ours)
    finally:
        sys.modules["torch._dynamo"] = saved
    marks = dict(vars(theirs))
    assert marks and dict(vars(ours)) == marks


def test_a_linear_module_imports_without_dynamo(tmp_path) -> None:
    """Importing a generated linear-form module must not pull in torch's compiler stack (issue 15)."""
    path = _write(tmp_path, "lightning_mod", "lightning")
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        import lightning_mod
        print(json.dumps({{"dynamo": "torch._dynamo" in sys.modules}}))
        """
    )
    got = _subprocess(code, REPO)
    assert path.exists() and got == {"dynamo": False}
