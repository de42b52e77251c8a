"""A TransNormerLLM-style language model on the linear family (Qin et al. 2023, "TransNormerLLM", sec. 3):
pre-norm blocks of Lightning Attention (decayed linear attention with SiLU features and per-head output
normalisation; no position embeddings: the decay encodes position) and a SwiGLU MLP.

Training runs the chunked kernels; `generate` prefills each layer's recurrent state with one chunked call
and then decodes token by token with the recurrent kernel: O(1) time and memory per token in the sequence
length, where a softmax model's KV cache grows with it. Any linear zoo variant can replace Lightning.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import registry
from . import variant as registry_variant
from .layers.linear import StateCache
from .models import Block, TokenGenerator


class TransNormerLM(TokenGenerator, nn.Module):
    """`tokens: [B, T]` int64 -> logits `[B, T, vocab]`; `variant` is a linear zoo variant (default
    "lightning", TransNormerLLM's attention)."""

    def __init__(
        self, vocab: int, *, variant: str = "lightning", dim: int = 64, depth: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        v = registry_variant(variant)
        if v.family is not registry.Family.LINEAR:
            linear = [x.name for x in registry.VARIANTS if x.family is registry.Family.LINEAR]
            raise ValueError(f"TransNormerLM needs a linear variant, {variant!r} is not one of {linear}")
        self.variant = variant
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(v.layer(dim, heads), dim) for _ in range(depth))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(
        self, tokens: Tensor, *, caches: list[StateCache] | None = None, backend: str | None = None
    ) -> Tensor:
        x = self.embed(tokens)
        for n, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[n], backend=backend)
        return self.head(self.norm(x))

    def loss(self, tokens: Tensor, *, backend: str | None = None) -> Tensor:
        logits = self(tokens[:, :-1], backend=backend)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


__all__ = ["TransNormerLM"]
