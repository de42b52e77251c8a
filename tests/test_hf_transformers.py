"""attnc operators inside Hugging Face transformers models (attnc.integrations.transformers).

The oracle is transformers itself: the same tiny model, same weights, run with `attn_implementation="sdpa"`
(PyTorch's own attention with transformers' own causal, padding and sliding-window masks). Models come from
small configs with random weights; nothing is downloaded.

Tolerances (float32, 2 layers, hidden 64): logits within 1e-5 absolute; every weight gradient within
1e-4 relative (of that gradient's largest entry); greedy generation token for token.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if os.environ.get("CI", "").lower() == "true":
    import transformers  # CI installs the `hf` extra (Makefile): a missing transformers is a failure there
else:
    transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from attnc.integrations import transformers as attnc_hf

from .conftest import SPECS

LOGITS_ATOL = 1e-5
GRAD_RTOL = 1e-4
VOCAB = 256


def llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=256,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**(cfg | overrides))).eval()


def mistral(window: int, seed: int = 0) -> MistralForCausalLM:
    cfg = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=window,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return MistralForCausalLM(cfg).eval()


def batch(lengths: list[int], total: int, left: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, total]: each row `lengths[b]` real tokens, padded left or right."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, total - n :] = 1
        else:
            mask[b, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def causal() -> str:
    attnc_hf.register_spec(attnc_hf.spec_path("causal"), name="attnc_test_causal")
    return "attnc_test_causal"


def logits(model, impl: str, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_padded_batch_logits_match_sdpa(causal: str, left: bool) -> None:
    model = llama()
    ids, mask = batch([17, 9, 1], 17, left)
    want, got = logits(model, "sdpa", ids, mask), logits(model, causal, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=LOGITS_ATOL, rtol=0)
    assert torch.isfinite(got).all()  # padded queries (no key left) give finite logits, never NaN


def test_unpadded_batch_logits_match_sdpa(causal: str) -> None:
    model = llama()
    ids, _ = batch([20, 20], 20, False)
    torch.testing.assert_close(
        logits(model, causal, ids, None), logits(model, "sdpa", ids, None), atol=LOGITS_ATOL, rtol=0
    )


def grads(
    model, impl: str, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.set_attn_implementation(impl)
    model.train()
    model.zero_grad()
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_training_gradients_match_sdpa(causal: str) -> None:
    model = llama()
    ids, mask = batch([16, 11], 16, left=True)  # left padding: real tokens would see pad keys if unmasked
    want_loss, want = grads(model, "sdpa", ids, mask)
    got_loss, got = grads(model, causal, ids, mask)
    torch.testing.assert_close(got_loss, want_loss, atol=LOGITS_ATOL, rtol=0)
    assert got.keys() == want.keys() and len(got) > 10
    for name, g in want.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(
            got[name], g, atol=GRAD_RTOL * scale, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )


def generate(model, impl: str, ids: torch.Tensor, mask: torch.Tensor | None, steps: int) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False
        )


@pytest.mark.parametrize("padded", [False, True], ids=["B1", "B3-left-padded"])
def test_greedy_generate_matches_sdpa(causal: str, padded: bool) -> None:
    model = llama()
    ids, mask = batch([10, 4, 7], 10, left=True) if padded else batch([6], 6, False)
    got = generate(model, causal, ids, mask, 20)
    want = generate(model, "sdpa", ids, mask, 20)
    assert got.shape[1] == ids.shape[1] + 20
    assert torch.equal(got, want)


def test_sliding_window_matches_mistral_masking() -> None:
    """Mistral passes sliding_window=4 to the attention function; the spec's W takes it, and prefill,
    padding and decoding past the window agree with transformers' own sliding-window masks."""
    attnc_hf.register_spec(attnc_hf.spec_path("sliding_window"), name="attnc_test_window")
    model = mistral(window=4)
    ids, mask = batch([15, 8], 15, left=True)
    want, got = logits(model, "sdpa", ids, mask), logits(model, "attnc_test_window", ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=LOGITS_ATOL, rtol=0)
    # the window matters: plain causal attention gives other logits on this model
    attnc_hf.register_spec(attnc_hf.spec_path("causal"), name="attnc_test_causal_on_mistral")
    with pytest.raises(ValueError, match="sliding window of 4"):
        logits(model, "attnc_test_causal_on_mistral", ids, mask)
    assert torch.equal(
        generate(model, "attnc_test_window", ids, mask, 10), generate(model, "sdpa", ids, mask, 10)
    )


def test_alibi_trains_loss_goes_down() -> None:
    heads = 4
    slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)])
    attnc_hf.register_spec(attnc_hf.spec_path("alibi"), name="attnc_test_alibi", tensors={"slopes": slopes})
    model = llama(seed=3)
    model.set_attn_implementation("attnc_test_alibi")
    model.train()
    text = (SPECS.parent / "data" / "sonnets.txt").read_bytes()[:4096]
    data = torch.tensor(list(text), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        start = torch.randint(0, len(data) - 33, (4,), generator=g)
        ids = torch.stack([data[s : s + 32] for s in start.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_triton_interpreter_backend_forward_and_backward() -> None:
    """The Triton kernels (interpreter on CPU) inside the model: loss and gradients match sdpa, and greedy
    decoding (one query row per step: the split-KV forward) gives sdpa's tokens."""
    attnc_hf.register_spec(attnc_hf.spec_path("causal"), name="attnc_test_causal_triton", backend="triton")
    model = llama(num_hidden_layers=1)
    ids, mask = batch([16, 10], 16, left=True)
    want_loss, want = grads(model, "sdpa", ids, mask)
    got_loss, got = grads(model, "attnc_test_causal_triton", ids, mask)
    torch.testing.assert_close(got_loss, want_loss, atol=LOGITS_ATOL, rtol=0)
    for name, g in want.items():
        torch.testing.assert_close(
            got[name], g, atol=GRAD_RTOL * g.abs().max().item(), rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )
    model.eval()
    ids, mask = batch([6, 3], 6, left=True)
    want = generate(model, "sdpa", ids, mask, 4)
    assert torch.equal(generate(model, "attnc_test_causal_triton", ids, mask, 4), want)


# ---- what the operator cannot honour raises, never a silent wrong result -------------------------------------


def test_top_left_aligned_spec_is_refused_for_decoding() -> None:
    """examples/specs/alibi.attn writes positions top-left (`j - i`, `j <= i`): right for M = N, wrong for a
    decoding step, so the probe refuses it before any model output is produced."""
    attnc_hf.register_spec(
        SPECS / "alibi.attn", name="attnc_test_topleft", tensors={"slopes": torch.full((4,), 0.5)}
    )
    model = llama()
    ids, _ = batch([6], 6, False)
    with pytest.raises(ValueError, match="decoding with a KV cache would be wrong"):
        logits(model, "attnc_test_topleft", ids, None)


def test_dropout_and_wrong_scale_raise(causal: str) -> None:
    model = llama(attention_dropout=0.1)
    model.set_attn_implementation(causal)
    model.train()
    ids, _ = batch([8], 8, False)
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=ids)
    # decode.attn has no scale scalar: its built-in D ** -0.5 must equal the model's scaling
    fn = attnc_hf.register_spec(SPECS / "decode.attn", name="attnc_test_decode")
    q = torch.randn(1, 4, 3, 16)
    k = v = torch.randn(1, 2, 3, 16)
    module = model.model.layers[0].self_attn
    with pytest.raises(ValueError, match=r"scales scores by 0\.5"):
        fn(module, q, k, v, None, scaling=0.5)
    out, weights = fn(module, q, k, v, None, scaling=16**-0.5)
    assert out.shape == (1, 3, 4, 16) and weights is None


def test_masks_it_cannot_honour_raise(causal: str) -> None:
    fn = attnc_hf.AttentionFunction(attnc_hf.Operator.from_spec(attnc_hf.spec_path("causal")))
    module = llama().model.layers[0].self_attn
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    causal_mask = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5)
    out, _ = fn(module, q, k, v, causal_mask)  # causal + (no) padding: fine
    bias = torch.zeros(2, 1, 5, 5).masked_fill(~causal_mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(fn(module, q, k, v, bias)[0], out)  # the additive form of the same mask
    with pytest.raises(ValueError, match="additive bias"):
        fn(module, q, k, v, bias + torch.randn(2, 1, 5, 5))
    with pytest.raises(ValueError, match="not the causal"):
        fn(module, q, k, v, torch.ones(2, 1, 5, 5, dtype=torch.bool))  # bidirectional
    with pytest.raises(ValueError, match="not the causal"):
        fn(module, q, k, v, causal_mask & ~torch.eye(5, dtype=torch.bool))  # a hole that is not padding
    per_head = causal_mask.expand(2, 4, 5, 5).clone()
    torch.testing.assert_close(fn(module, q, k, v, per_head)[0], out)  # the same mask for every head
    per_head[:, 1, 4, 0] = False
    with pytest.raises(ValueError, match="not the causal"):
        fn(module, q, k, v, per_head)  # heads that differ
    module.is_causal = False
    with pytest.raises(ValueError, match="bidirectional"):
        fn(module, q, k, v, None)


def test_bare_generated_function_without_padding(compiled) -> None:
    """register() also takes a bare generated function: unpadded batches work, padded ones say what to do."""
    fn = attnc_hf.register("attnc_test_bare", compiled("decode").decode)
    model = llama()
    ids, mask = batch([9, 9], 9, False)
    torch.testing.assert_close(
        logits(model, "attnc_test_bare", ids, None),
        logits(model, "sdpa", ids, None),
        atol=LOGITS_ATOL,
        rtol=0,
    )
    ids, mask = batch([9, 5], 9, False)
    with pytest.raises(ValueError, match="register_spec"):
        logits(model, "attnc_test_bare", ids, mask)
    assert fn.operator.att is None


SOFTCAP_SPEC = """
attention capped(q: [B, H, M, D], k: [B, G, N, D], v: [B, G, N, E], scale: float = D ** -0.5, cap: float = 50.0) {
    let s = dot(q, k) * scale
    score = cap * tanh(s / cap)
    mask  = j <= i + N - M
}
"""


def test_softcap_and_scaling_reach_the_spec(causal: str) -> None:
    """Gemma-style arguments: scaling goes to `scale`, softcap to `cap` (the oracle: eager attention with
    tanh capping after scaling, as transformers' eager Gemma 2 computes it)."""
    fn = attnc_hf.register_spec(SOFTCAP_SPEC, name="attnc_test_softcap")
    module = llama().model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 6, 16, generator=g) * 3 for h in (4, 2, 2))
    out, _ = fn(module, q, k, v, None, scaling=0.3, softcap=2.0)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = 2.0 * torch.tanh(q @ kk.transpose(-1, -2) * 0.3 / 2.0)
    s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    want = (s.softmax(-1) @ vv).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="soft-capping"):
        attnc_hf.AttentionFunction(attnc_hf.Operator.from_spec(attnc_hf.spec_path("causal")))(
            module, q, k, v, None, scaling=0.3, softcap=2.0
        )


def test_non_causal_spec_is_refused() -> None:
    """examples/specs/softcap.attn attends every key (no mask): not a decoder's attention."""
    fn = attnc_hf.register_spec(SPECS / "softcap.attn", name="attnc_test_full")
    module = llama().model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 4, 5, 16), torch.randn(1, 4, 5, 16)
    with pytest.raises(ValueError, match="attends keys that transformers' causal mask excludes"):
        fn(module, q, k, v, None, scaling=16**-0.5)


def _python_blocks(text: str) -> list[str]:
    blocks, inside = [], None
    for line in text.splitlines():
        if inside is None and line.strip() == "```python":
            inside = []
        elif inside is not None and line.strip() == "```":
            blocks.append("\n".join(inside))
            inside = None
        elif inside is not None:
            inside.append(line)
    return blocks


def test_docs_snippets_run() -> None:
    """docs/transformers.md's snippets (run in order, as one session) and README's transformers section."""
    repo = SPECS.parent.parent
    docs = _python_blocks((repo / "docs" / "transformers.md").read_text())
    assert len(docs) >= 3
    env: dict = {"__name__": "docs_example"}
    exec(compile("\n".join(docs), "docs/transformers.md", "exec"), env)
    assert env["out"].shape == (2, 32) and env["logits"].shape == (2, 12, VOCAB)
    readme = (repo / "README.md").read_text().split("## Hugging Face transformers", 1)[1].split("\n## ", 1)[0]
    (snippet,) = _python_blocks(readme)
    env = {"__name__": "readme_example"}
    exec(compile(snippet, "README.md", "exec"), env)
    assert env["out"].shape == (1, 28)
