"""Linear-family zoo variants against implementations written here from their papers (float64), on both
backends (reference exact; Triton under the interpreter in float32), forward and gradients; the layers'
state-carrying decoding; the TransNormerLLM-style model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attnc.zoo import ops
from attnc.zoo.layers.linear import HedgehogAttention, LightningAttention, RetentionAttention
from attnc.zoo.linear_models import TransNormerLM

from attnc import zoo


def _causal_decay(log_gamma: torch.Tensor, N: int) -> torch.Tensor:
    """D_nm = gamma^(n-m) for n >= m, else 0 (RetNet eq. 5), from log gamma per head: [H, N, N]."""
    n = torch.arange(N, dtype=torch.float64)
    dist = n[:, None] - n[None, :]
    return torch.where(dist >= 0, torch.exp(log_gamma.view(-1, 1, 1) * dist.clamp(min=0)), 0.0)


def lightning_paper(q, k, v, decay):
    """TransNormerLLM / Lightning Attention: o_t = Σ_{s<=t} e^{-λ_h (t-s)} φ(q_t)·φ(k_s) v_s / sqrt(D), φ = SiLU."""
    D = q.shape[-1]
    a = F.silu(q) @ F.silu(k).transpose(-1, -2) * D**-0.5
    return (a * _causal_decay(-decay, q.shape[2])) @ v


def retention_paper(q, k, v, gamma):
    D = q.shape[-1]
    return ((q @ k.transpose(-1, -2)) * D**-0.5 * _causal_decay(torch.log(gamma), q.shape[2])) @ v


def normalised_linear_paper(fq, fk, v):
    """Katharopoulos et al. eq. 6 with a causal sum: φ(q_i) Σ_{j<=i} φ(k_j) v_jᵀ / (φ(q_i)·Σ_{j<=i} φ(k_j) + eps)."""
    a = (fq @ fk.transpose(-1, -2)).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


CASES = {
    "lightning": (lambda q, k, v, aux: lightning_paper(q, k, v, aux), lambda H: torch.rand(H) * 0.5),
    "retention": (
        lambda q, k, v, aux: retention_paper(q, k, v, aux),
        lambda H: 1 - 2.0 ** (-5 - torch.arange(H)),
    ),
    "linear_elu": (lambda q, k, v, aux: normalised_linear_paper(F.elu(q) + 1, F.elu(k) + 1, v), None),
    "hedgehog": (lambda q, k, v, aux: normalised_linear_paper(q, k, v), None),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("spec", sorted(CASES))
def test_linear_zoo_operator_matches_paper(spec: str, backend: str) -> None:
    paper, make_aux = CASES[spec]
    gen = torch.Generator().manual_seed(0)
    B, H, N, D = 1, 2, 70, 16
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    if spec == "hedgehog":  # features are probabilities (the layer's softmax maps)
        q, k = q.softmax(-1), k.softmax(-1)
    aux = [] if make_aux is None else [make_aux(H).double()]
    dtype = torch.float64 if backend == "reference" else torch.float32
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, *aux)]
    got = ops.op(spec)(*leaves, backend=backend)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, *aux)]
    want = paper(*ref_leaves[:3], ref_leaves[3] if aux else None)
    tol = 1e-9 if backend == "reference" else 2e-4
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= tol * max(scale, 1.0)
    w = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    g_got = torch.autograd.grad((got.double() * w).sum(), leaves)
    g_want = torch.autograd.grad((want * w).sum(), ref_leaves)
    for name, a, b in zip(["q", "k", "v", "aux"], g_got, g_want, strict=False):
        err = (a.double() - b).abs().max().item()
        assert err <= 2 * tol * max(b.abs().max().item(), 1.0), f"d{name}: {err}"


@pytest.mark.parametrize("cls", [LightningAttention, RetentionAttention, HedgehogAttention])
def test_layer_decodes_from_its_state(cls) -> None:
    """Prefill (chunked) then token-by-token (recurrent) from a StateCache equals one full forward."""
    torch.manual_seed(0)
    layer = cls(32, 2, kv_heads=1).double()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache()
    outs = [layer(x[:, :13], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(13, 21)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.length == 21 and cache.state is not None


def test_lightning_layer_triton_prefill_and_decode() -> None:
    torch.manual_seed(1)
    layer = LightningAttention(32, 2)
    x = torch.randn(1, 40, 32)
    full = layer(x, backend="reference")
    cache = layer.new_cache()
    outs = [layer(x[:, :37], cache=cache, backend="triton")]
    outs += [layer(x[:, t : t + 1], cache=cache, backend="triton") for t in range(37, 40)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)


def test_linear_variants_are_registered() -> None:
    linear = zoo.list("linear")
    assert set(CASES) <= set(linear)
    for name in CASES:
        v = zoo.variant(name)
        assert v.spec_file.is_file() and v.paper


@pytest.mark.parametrize("variant", ["lightning", "retention"])
def test_transnormer_trains_and_generates_recurrently(variant: str) -> None:
    torch.manual_seed(0)
    model = TransNormerLM(32, variant=variant, dim=32, depth=2, heads=2)
    tokens = torch.randint(0, 32, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model.loss(tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]
    prompt = tokens[:1, :10]
    out = model.generate(prompt, 6)
    # Greedy decoding from the recurrent states equals re-running the whole sequence at every step.
    seq = prompt
    for _ in range(6):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_transnormer_rejects_softmax_variants() -> None:
    with pytest.raises(ValueError, match="needs a linear variant"):
        TransNormerLM(8, variant="causal")


def test_generate_linear_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/generate_linear.py: the loss falls and generation reports a fixed-size state."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "generate_linear.py"
    spec = importlib.util.spec_from_file_location("zoo_example_generate_linear", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--steps", "20", "--batch", "4", "--seq", "32", "--sample", "8", "--dim", "32", "--heads", "2"]
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "recurrent state 1024 numbers per sequence" in out
