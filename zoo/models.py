"""Small models built from zoo layers: a decoder-only language model and a ViT.

- `DecoderLM`: pre-norm decoder blocks (RMSNorm, attention, SwiGLU MLP; as in LLaMA, Touvron et al. 2023),
  rotary position embeddings on q and k before the generated operator (RoFormer, Su et al. 2021, sec.
  3.4.2), any causal zoo variant by name, token-by-token generation with a KV cache (decoding calls the same
  generated operator with M = 1: the zoo's causal specs are bottom-right aligned), and packed
  variable-length training through the `document` variant (`pack_documents`).
- `ViT`: patch embedding, learned position embeddings, pre-norm encoder blocks with any bidirectional image
  variant (full, agent, 2-D neighbourhood, BiFormer, ...), mean pooling and a linear head (Dosovitskiy et al.
  2021, "An Image is Worth 16x16 Words", sec. 3.1).

The same models run the Triton kernels on CUDA tensors (`backend=None`) and the PyTorch reference on CPU;
`backend="triton"` forces the kernels (on CPU: under the Triton interpreter, slow).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import registry
from . import variant as registry_variant
from .layers.base import ZooAttention


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021, "RoFormer", eq. 34): channel pairs (d, d + D/2) rotated by position * theta_d,
    theta_d = base^(-2d / D) (the "rotate half" layout of GPT-NeoX / LLaMA)."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.register_buffer(
            "inv_freq", base ** (-torch.arange(0, head_dim, 2).double() / head_dim), persistent=False
        )

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """`x: [B, H, T, D]`, `positions: [T]` or `[B, T]` -> x rotated."""
        angles = positions.double()[..., None] * self.inv_freq  # [T, D/2] or [B, T, D/2]
        if angles.dim() == 3:
            angles = angles[:, None]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class SwiGLU(nn.Module):
    """The gated MLP of LLaMA (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def make_attention(variant: str, dim: int, heads: int, **kwargs: Any) -> ZooAttention:
    layer = registry_variant(variant).layer(dim, heads, **kwargs)
    if not isinstance(layer, ZooAttention):
        raise ValueError(f"zoo variant {variant!r} is not a self-attention layer")
    return layer


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (Xiong et al. 2020)."""

    def __init__(
        self, attn: ZooAttention, dim: int, mlp_ratio: float = 4.0, norm: type[nn.Module] = nn.RMSNorm
    ) -> None:
        super().__init__()
        self.norm1, self.attn = norm(dim), attn
        self.norm2, self.mlp = norm(dim), SwiGLU(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, **attn_kwargs: Any) -> Tensor:
        x = x + self.attn(self.norm1(x), **attn_kwargs)
        return x + self.mlp(self.norm2(x))


class TokenGenerator:
    """Token-by-token generation for a language model made of `blocks` (each with an `attn` layer) that takes
    `model(tokens, caches=..., backend=...)`: one prefill call over the prompt, then one call per new token
    with M = 1. The caches are each layer's own: a `KVCache` for softmax variants (the bottom-right aligned
    operator over the cached keys), a recurrent state for the linear family."""

    blocks: nn.ModuleList

    def new_caches(self) -> list[Any]:
        """One empty decoding cache per block (the layer's `new_cache()`)."""
        return [block.attn.new_cache() for block in self.blocks]

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        steps: int,
        *,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        backend: str | None = None,
    ) -> Tensor:
        """Prefill the caches with `prompt: [B, T]`, then decode `steps` tokens one at a time. Greedy when
        temperature == 0."""
        caches = self.new_caches()
        logits = self(prompt, caches=caches, backend=backend)[:, -1]  # type: ignore[operator]
        out = [prompt]
        for step in range(steps):
            if temperature > 0:
                probs = (logits.float() / temperature).softmax(-1)
                token = torch.multinomial(probs, 1, generator=generator)
            else:
                token = logits.argmax(-1, keepdim=True)
            out.append(token)
            if step + 1 < steps:
                logits = self(token, caches=caches, backend=backend)[:, -1]  # type: ignore[operator]
        return torch.cat(out, dim=1)


class DecoderLM(TokenGenerator, nn.Module):
    """A decoder-only language model whose attention is any causal zoo variant (`zoo.list()` entries with
    `use == Use.CAUSAL`). `tokens: [B, T]` int64 -> logits `[B, T, vocab]`."""

    def __init__(
        self,
        vocab: int,
        *,
        variant: str = "causal",
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        kv_heads: int | None = None,
        rope_base: float = 10000.0,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        v = registry_variant(variant)
        if v.use is not registry.Use.CAUSAL:
            causal = [x.name for x in registry.VARIANTS if x.use is registry.Use.CAUSAL]
            raise ValueError(f"DecoderLM needs a causal variant, {variant!r} is not one of {causal}")
        self.variant = variant
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            Block(make_attention(variant, dim, heads, kv_heads=kv_heads, **(attn_kwargs or {})), dim)
            for _ in range(depth)
        )
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.rope = RotaryEmbedding(dim // heads, rope_base)

    def forward(
        self,
        tokens: Tensor,
        *,
        doc: Tensor | None = None,
        positions: Tensor | None = None,
        caches: Sequence[Any] | None = None,
        backend: str | None = None,
    ) -> Tensor:
        """`doc: [B, T]` document ids of a packed batch (the `document` variant; with `positions` restarting
        at each document); `caches`: one `KVCache` per block for incremental decoding."""
        ctx: dict[str, Any] = {}
        if doc is not None:
            if self.variant != "document":
                raise ValueError(f"packed batches (doc=...) need variant='document', not {self.variant!r}")
            ctx["doc"] = doc
        x = self.embed(tokens)
        for n, block in enumerate(self.blocks):
            cache = None if caches is None else caches[n]
            x = block(x, rope=self.rope, positions=positions, cache=cache, backend=backend, **ctx)
        return self.head(self.norm(x))

    def loss(
        self,
        tokens: Tensor,
        *,
        doc: Tensor | None = None,
        positions: Tensor | None = None,
        backend: str | None = None,
    ) -> Tensor:
        """Next-token cross-entropy; in a packed batch no position predicts across a document boundary or
        into padding (doc id -1)."""
        logits = self(
            tokens[:, :-1],
            doc=None if doc is None else doc[:, :-1],
            positions=None if positions is None else positions[:, :-1],
            backend=backend,
        )
        target = tokens[:, 1:].clone()
        if doc is not None:
            target[(doc[:, 1:] != doc[:, :-1]) | (doc[:, 1:] < 0)] = -100
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def pack_documents(docs: Sequence[Tensor], length: int, pad: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Pack 1-D token sequences into rows of `length` (first fit in order; a document longer than a row is
    cut). Returns `(tokens, doc, positions)`, each `[rows, length]`: document ids (-1 for the padding at
    the end of a row, which `DecoderLM.loss` does not train on) and positions restarting at 0 in each document, for `DecoderLM.loss(tokens, doc=doc, positions=positions)`."""
    rows: list[list[Tensor]] = [[]]
    used = 0
    for d in docs:
        d = d[:length]
        if used + len(d) > length:
            rows.append([])
            used = 0
        rows[-1].append(d)
        used += len(d)
    tokens = torch.full((len(rows), length), pad, dtype=torch.long)
    doc = torch.zeros(len(rows), length, dtype=torch.int32)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for n, d in enumerate(row):
            tokens[r, at : at + len(d)] = d
            doc[r, at : at + len(d)] = n
            positions[r, at : at + len(d)] = torch.arange(len(d))
            at += len(d)
        doc[r, at:] = -1  # padding: a document of its own, whose targets the loss ignores
        positions[r, at:] = torch.arange(length - at)
    return tokens, doc, positions


class ViT(nn.Module):
    """A Vision Transformer (Dosovitskiy et al. 2021) whose attention is any bidirectional zoo variant
    (`use` IMAGE or BIDIRECTIONAL): `images: [B, C, S, S]` -> class logits `[B, classes]`. Variants that need
    the token grid (2-D neighbourhood, BiFormer, agent) get `grid=(S / patch, S / patch)`."""

    def __init__(
        self,
        *,
        image_size: int = 32,
        patch: int = 4,
        channels: int = 3,
        classes: int = 10,
        variant: str = "full",
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        v = registry_variant(variant)
        if v.use not in (registry.Use.IMAGE, registry.Use.BIDIRECTIONAL):
            ok = [
                x.name for x in registry.VARIANTS if x.use in (registry.Use.IMAGE, registry.Use.BIDIRECTIONAL)
            ]
            raise ValueError(f"ViT needs a bidirectional variant, {variant!r} is not one of {ok}")
        self.grid = (image_size // patch, image_size // patch)
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(make_attention(variant, dim, heads, **(attn_kwargs or {})), dim, norm=nn.LayerNorm)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: Tensor, *, backend: str | None = None) -> Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            kw: dict[str, Any] = {"backend": backend}
            if block.attn.needs_grid:
                kw["grid"] = self.grid
            x = block(x, **kw)
        return self.head(self.norm(x).mean(1))
