"""The common shape of a zoo attention layer: q/k/v/out projections, optional rotary embeddings on q and k,
an optional KV cache, and a variant-specific `attend` that calls the generated operator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import ops

Rope = Callable[[Tensor, Tensor], Tensor]
"""A rotary embedding: `rope(x, positions)` rotates `x: [B, H, T, D]` by the positions `[T]` or `[B, T]`."""


class KVCache:
    """Keys and values of the positions seen so far, `[B, G, N, D]` and `[B, G, N, E]`, for decoding."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new positions and return all cached keys and values."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class ZooAttention(nn.Module):
    """Multi-head self-attention whose core is a generated attnc operator.

    `x: [B, T, dim]` -> `[B, T, dim]`. `heads` query heads, `kv_heads` key/value heads (GQA/MQA when
    fewer, Ainslie et al. 2023), `head_dim` channels per head. Subclasses set `spec` (the file stem in
    `zoo/specs/`) and `causal`, and implement `attend(q, k, v, x=..., backend=..., **ctx)`.
    """

    spec: ClassVar[str]
    causal: ClassVar[bool] = False
    needs_grid: ClassVar[bool] = False  # takes `grid=(rows, width)`: tokens are an image in raster order

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        head_dim = dim // heads if head_dim is None else head_dim
        if heads % kv_heads:
            raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=False)

    @staticmethod
    def new_cache() -> Any:
        """An empty decoding cache for this layer (the linear family overrides it with a state cache)."""
        return KVCache()

    def op(self, name: str | None = None) -> Callable[..., Any]:
        return ops.op(self.spec, name)

    def _split(self, t: Tensor, heads: int) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        *,
        rope: Rope | None = None,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        backend: str | None = None,
        **ctx: Any,
    ) -> Tensor:
        """`x: [B, T, dim]`; with `cache`, x holds the T newest positions and the keys/values are appended
        (the causal specs are bottom-right aligned, so the same operator serves prefill and decoding).
        `rope` rotates q and k at `positions` (default: the cache length onwards)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, rope, positions, 0 if cache is None else cache.length)
        if cache is not None:
            k, v = cache.update(k, v)
        o = self.attend(q, k, v, x=x, backend=backend, **ctx)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def project(
        self, x: Tensor, rope: Rope | None, positions: Tensor | None, offset: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q `[B, H, T, D]`, k and v `[B, G, T, D]` of `x: [B, T, dim]`, q and k rotated at `positions`
        (default: `offset` onwards, the positions already cached)."""
        T = x.shape[1]
        q = self._split(self.q_proj(x), self.heads)
        k = self._split(self.k_proj(x), self.kv_heads)
        v = self._split(self.v_proj(x), self.kv_heads)
        if rope is not None:
            if positions is None:
                positions = torch.arange(offset, offset + T, device=x.device)
            q, k = rope(q, positions), rope(k, positions)
        return q, k, v

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None, **ctx: Any
    ) -> Tensor:
        """`q: [B, H, M, D]`, `k, v: [B, G, N, D]` -> `o: [B, H, M, D]`."""
        raise NotImplementedError
