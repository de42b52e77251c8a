"""The zoo's models: the decoder LM (every causal variant: KV-cache decoding equals full recomputation;
packed training equals separate documents; a few training steps lower the loss) and the ViT (every image
variant trains a few steps)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from attnc.zoo.models import DecoderLM, RotaryEmbedding, ViT, pack_documents

from attnc import zoo

F64 = torch.float64
# The softmax/routing causal variants (the linear family's decoding is tested in test_zoo_linear.py).
CAUSAL = [v.name for v in zoo.VARIANTS if v.use is zoo.Use.CAUSAL and v.family is not zoo.Family.LINEAR]
LM_KWARGS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 5},
    "streaming_llm": {"sink_tokens": 2, "window": 4},
    "topk_retrieval": {"block": 4, "top_k": 2, "window": 3},
    "prefix_lm": {"prefix": 4},  # the prefill (5 tokens) covers the prefix
    "moh": {"shared_heads": 1, "top_k": 2},
}


def _lm(variant: str, **kw: Any) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(
        40, variant=variant, dim=32, depth=2, heads=4, kv_heads=2, attn_kwargs=LM_KWARGS.get(variant), **kw
    )


@pytest.mark.parametrize("variant", CAUSAL)
def test_kv_cache_decoding_equals_full_recomputation(variant: str) -> None:
    model = _lm(variant).double().eval()
    tokens = torch.randint(0, 40, (2, 21), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    caches = model.new_caches()
    steps = [model(tokens[:, :5], caches=caches)] + [
        model(tokens[:, t : t + 1], caches=caches) for t in range(5, 21)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "variant", [v.name for v in zoo.VARIANTS if v.family is zoo.Family.LINEAR and v.use is zoo.Use.CAUSAL]
)
def test_lm_decodes_linear_variants_from_their_state_cache(variant: str) -> None:
    """The same LM runs the linear family: `new_caches` asks each layer for its cache (a recurrent state)."""
    model = _lm(variant).double().eval()
    tokens = torch.randint(0, 40, (1, 11), generator=torch.Generator().manual_seed(1))
    caches = model.new_caches()
    steps = [model(tokens[:, :4], caches=caches)] + [
        model(tokens[:, t : t + 1], caches=caches) for t in range(4, 11)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(tokens), atol=1e-10, rtol=1e-10)


def test_generate_matches_greedy_full_recomputation() -> None:
    model = _lm("alibi").double().eval()
    prompt = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, 6)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_kv_cache_decoding_on_the_triton_backend() -> None:
    pytest.importorskip("triton")
    model = _lm("sliding_window").eval()
    tokens = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens, backend="reference")
        caches = model.new_caches()
        steps = [model(tokens[:, :6], caches=caches, backend="triton")]
        steps += [model(tokens[:, t : t + 1], caches=caches, backend="triton") for t in range(6, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_packed_batch_equals_separate_documents() -> None:
    """Document masking + per-document positions: each packed document's logits are those it gets alone."""
    model = _lm("document").double().eval()
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 40, (n,), generator=g) for n in (5, 7, 3, 6)]
    tokens, doc, positions = pack_documents(docs, 16)
    assert tokens.shape == (2, 16) and doc[0].tolist() == [0] * 5 + [1] * 7 + [2] * 3 + [-1]
    assert positions[0, :12].tolist() == list(range(5)) + list(range(7)) and doc[1, 6:].eq(-1).all()
    packed = model(tokens, doc=doc, positions=positions)
    at = {0: 0, 1: 5, 2: 12, 3: 0}
    rows = {0: 0, 1: 0, 2: 0, 3: 1}
    for n, d in enumerate(docs):
        alone = model(d[None])
        got = packed[rows[n], at[n] : at[n] + len(d)]
        torch.testing.assert_close(got, alone[0], atol=1e-10, rtol=1e-10)


def test_packed_loss_ignores_cross_document_targets() -> None:
    model = _lm("document").double()
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, 40, (n,), generator=g) for n in (6, 8)]
    tokens, doc, positions = pack_documents(docs, 16)  # two padding slots at the end (doc id -1)
    packed = model.loss(tokens, doc=doc, positions=positions)
    # Per-token losses of each document alone, averaged over all next-token targets (5 + 7), none on padding.
    total = sum(model.loss(d[None]) * (len(d) - 1) for d in docs)
    torch.testing.assert_close(packed, total / 12, atol=1e-10, rtol=1e-10)


def test_rope_rotation_is_relative() -> None:
    """RoPE (Su et al. eq. 16): <R_m q, R_n k> depends only on n - m."""
    rope = RotaryEmbedding(8).double()
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 1, 1, 8, generator=g, dtype=F64), torch.randn(1, 1, 1, 8, generator=g, dtype=F64)

    def score(m: int, n: int) -> torch.Tensor:
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum()

    torch.testing.assert_close(score(3, 7), score(10, 14))
    assert not torch.allclose(score(3, 7), score(3, 8))


def _train(model: torch.nn.Module, loss_fn: Any, steps: int = 12, lr: float = 3e-3) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", ["causal", "alibi", "sink", "document"])
def test_lm_trains(variant: str) -> None:
    model = _lm(variant)
    g = torch.Generator().manual_seed(7)
    if variant == "document":
        tokens, doc, positions = pack_documents(
            [torch.randint(0, 40, (n,), generator=g) for n in (9, 12, 7, 13)], 24
        )
        losses = _train(model, lambda: model.loss(tokens, doc=doc, positions=positions))
    else:
        tokens = torch.randint(0, 40, (2, 24), generator=g)
        losses = _train(model, lambda: model.loss(tokens))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    ("variant", "kwargs"),
    [
        ("full", {}),
        ("agent", {"agents": 4}),
        ("neighborhood_2d", {"kernel_size": 3}),
        ("biformer", {"regions": 2, "top_k": 2}),
    ],
)
def test_vit_trains(variant: str, kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = ViT(image_size=16, patch=4, classes=4, variant=variant, dim=32, heads=2, attn_kwargs=kwargs)
    g = torch.Generator().manual_seed(8)
    images, labels = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    losses = _train(model, lambda: torch.nn.functional.cross_entropy(model(images), labels), steps=15)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_models_reject_the_wrong_kind_of_variant() -> None:
    with pytest.raises(ValueError, match="causal variant"):
        DecoderLM(10, variant="full")
    with pytest.raises(ValueError, match="bidirectional variant"):
        ViT(variant="alibi")
    with pytest.raises(ValueError, match="variant='document'"):
        _lm("causal")(torch.zeros(1, 4, dtype=torch.long), doc=torch.zeros(1, 4, dtype=torch.int32))
