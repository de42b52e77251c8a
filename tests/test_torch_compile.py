"""Generated ops are torch.library custom ops with fake implementations: torch.compile(fullgraph=True)
traces a model that calls them (on CPU with the aot_eager backend), forward and backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnc import codegen

from .conftest import SPECS


class TinyAttention(torch.nn.Module):
    def __init__(self, mod: object, heads: int = 2, dim: int = 16) -> None:
        super().__init__()
        self.mod, self.h, self.d = mod, heads, dim
        self.qkv = torch.nn.Linear(heads * dim, 3 * heads * dim)
        self.out = torch.nn.Linear(heads * dim, heads * dim)
        self.slopes = torch.nn.Parameter(torch.linspace(0.1, 0.5, heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        o = self.mod.alibi(q, k, v, self.slopes)  # type: ignore[attr-defined]
        return self.out(o.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fullgraph_compile_matches_eager(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    mod = codegen.compile_file(SPECS / "alibi.attn", cache_dir=tmp_path)
    torch.manual_seed(0)
    model = TinyAttention(mod).double() if backend == "reference" else TinyAttention(mod)
    if backend == "triton":
        # CPU tensors pick the reference by default; ask for the kernels (run by the interpreter here).
        original = mod.alibi
        monkeypatch.setattr(mod, "alibi", lambda *a, **kw: original(*a, backend="triton", **kw))
    x = torch.randn(2, 37, 32, dtype=next(model.parameters()).dtype)
    eager = model(x)
    eager.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    tol = {"atol": 1e-10, "rtol": 1e-10} if backend == "reference" else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(out, eager, **tol)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, **tol)
    assert model.slopes.grad is not None and model.slopes.grad.abs().sum() > 0


def test_fake_implementation_gives_shapes_without_running(tmp_path: Path) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mod = codegen.compile_file(SPECS / "cross.attn", cache_dir=tmp_path)
    with FakeTensorMode():
        q = torch.empty(2, 4, 5, 16)
        k = torch.empty(2, 4, 9, 16)
        v = torch.empty(2, 4, 9, 24)
        o, lse = mod.cross(q, k, v, return_lse=True)
        assert o.shape == (2, 4, 5, 24) and lse.shape == (2, 4, 5) and lse.dtype == torch.float32


def test_compiled_backward_through_head_split_views() -> None:
    """A zoo LM splits heads with view + transpose: the compiled backward must agree with the custom op's
    real gradient strides (the fake promises contiguous gradients, the op returns them)."""
    from attnc.zoo.models import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(40, variant="causal", dim=32, depth=1, heads=2)
    tokens = torch.randint(0, 40, (2, 12))
    model.loss(tokens).backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    loss = torch.compile(model.loss, fullgraph=True, backend="aot_eager")(tokens)
    loss.backward()
    for p, g in zip(model.parameters(), eager, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)
