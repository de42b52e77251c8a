"""The full matrix on a CUDA GPU (skipped elsewhere): every example spec through the compiled Triton kernels,
float16 / bfloat16 / float32, head dims 64, 80 and 128, against the float64 oracles; and CUDA-graph capture.

Run on a GPU machine with `pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import functools
from types import ModuleType

import pytest
import torch

from attnc import codegen

from .test_reference_oracles import (
    F64,
    SPEC_DIR,
    SPECS,
    Case,
    Tol,
    _is_float,
    assert_close,
    grad_names,
    grads,
    leaves,
    make_args,
    oracles,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FWD_TOL = {torch.float32: Tol(1e-3, 1e-3), torch.float16: Tol(8e-3, 8e-3), torch.bfloat16: Tol(4e-2, 4e-2)}
GRAD_TOL = {torch.float32: Tol(2e-3, 2e-3), torch.float16: Tol(3e-2, 3e-2), torch.bfloat16: Tol(1e-1, 1e-1)}


@functools.cache
def _module(spec: str) -> ModuleType:
    return codegen.compile_file(SPEC_DIR / f"{spec}.attn")


def _params() -> list[object]:
    out = []
    for spec in SPECS:
        for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            for d in (64, 80, 128):
                out.append(pytest.param(spec, dtype, d, id=f"{spec}-D{d}-{name}"))
    return out


@pytest.mark.parametrize(("spec", "dtype", "D"), _params())
def test_cuda_kernels_match_oracles(spec: str, dtype: torch.dtype, D: int) -> None:
    info = SPECS[spec]
    M, N = info.shapes[-1]
    case = Case(spec, M, N, D=D, dtype=F64)
    rounded = {n: a.to(dtype).to(F64) if _is_float(a) else a for n, a in make_args(case).items()}
    args = {n: (a.cuda() if isinstance(a, torch.Tensor) else a) for n, a in leaves(rounded, dtype).items()}
    args = {n: a.detach().requires_grad_() if _is_float(a) else a for n, a in args.items()}
    o = getattr(_module(spec), spec)(*args.values())  # backend=None: Triton on CUDA
    weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    names = grad_names(args)
    got = grads(o, weights.cuda(), args, names)
    ref = leaves(rounded, F64)
    expected = oracles(info, autograd_only=True)["naive"](ref)
    assert_close(o.cpu(), expected, FWD_TOL[dtype], f"{spec} forward")
    want = grads(expected, weights, ref, names)
    for n, g, w in zip(names, got, want, strict=True):
        assert_close(g.cpu(), _rounds_to_inf(w, g.dtype), GRAD_TOL[dtype], f"{spec} d{n}")


def _rounds_to_inf(expected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The oracle's value where it fits `dtype`, else the infinity it rounds to there. A gradient must have its
    parameter's dtype: lightning's d(decay) reaches 1e5 in this test, beyond float16's 65504, so float16
    autograd of any implementation gives inf there (the kernels reduce in float32 and round once)."""
    return torch.where(expected.to(dtype).isinf(), expected.sign() * torch.inf, expected)


def test_forward_is_capturable_in_a_cuda_graph() -> None:
    mod = _module("sliding_window")
    q = torch.randn(1, 8, 1024, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 1024, 64, device="cuda", dtype=torch.bfloat16)
    mod.sliding_window(q, k, k, 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mod.sliding_window(q, k, k, 128)
    graph.replay()
    torch.testing.assert_close(out, mod.sliding_window(q, k, k, 128))


def test_reference_backend_backward_completes_on_cuda() -> None:
    """backend="reference" through the custom op's backward on CUDA: it hung once (a helper thread waited on
    by the autograd engine's device thread); run in a thread so that a hang fails instead of stalling."""
    import threading

    mod = _module("causal")
    q, k, v = (torch.randn(1, 2, 64, 32, device="cuda", requires_grad=True) for _ in range(3))
    done: list[bool] = []

    def run() -> None:
        mod.causal(q, k, v, backend="reference").sum().backward()
        torch.cuda.synchronize()
        done.append(True)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert done, "the reference backward did not finish in 120 s"
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=True).sum().backward()
    for x, r in zip((q, k, v), ref, strict=True):
        torch.testing.assert_close(x.grad, r.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", ["causal", "sliding_window", "document"])
def test_tma_and_pointer_loads_agree(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On sm_90 and later the default launch reads tiles through tensor descriptors (TMA); ATTNC_TMA=0 forces
    pointer loads. Both give the same forward and gradients (to float16 rounding)."""
    from attnc.runtime import triton as rt

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or later")
    mod = _module(spec)
    case = Case(spec, 300, 300, D=128, dtype=F64)
    base = make_args(case)
    out = []
    for mode in ("auto", "0"):
        monkeypatch.setenv("ATTNC_TMA", mode)
        args = {
            n: (a.to("cuda", torch.float16).requires_grad_() if _is_float(a) else a.cuda())
            if isinstance(a, torch.Tensor)
            else a
            for n, a in base.items()
        }
        q = args["q"]
        assert rt._tma_ok(rt._TritonSpec(None, None, None, "softmax", ()), [q]) == (mode == "auto")
        o = getattr(mod, spec)(*args.values(), backend="triton")
        o.float().sum().backward()
        out.append((o.float(), *(args[n].grad.float() for n in ("q", "k", "v"))))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
