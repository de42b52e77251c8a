"""Linear-family zoo layers: decayed / normalised linear attention with a recurrent state for decoding.

Each layer calls a generated operator whose spec attnc proves linear (docs/linear.md): training and prefill
run the chunked kernels, decoding runs the recurrent kernel from the carried state, so generation costs O(1)
per token in the sequence length (no KV cache: `StateCache` holds a D×E state per head).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import KVCache, Rope, ZooAttention


class StateCache(KVCache):
    """The recurrent state of one linear layer, `[B, H, D, E]` (`E + 1` with a normaliser), and how many
    positions it has absorbed (for rotary positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.state: Tensor | None = None
        self.seen = 0

    @property
    def length(self) -> int:
        return self.seen

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - guard
        raise TypeError("a linear layer keeps a recurrent state, not keys and values")


class LinearZooAttention(ZooAttention):
    """Causal linear attention over the projections; `aux()` gives the spec's extra inputs (decays)."""

    causal: ClassVar[bool] = True

    def aux(self) -> tuple[Tensor, ...]:
        return ()

    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Feature maps applied in PyTorch before the operator (Hedgehog); identity by default."""
        return q, k

    def post(self, o: Tensor) -> Tensor:
        """Per-head output normalisation (RetNet's GroupNorm, TransNormerLLM's SRMSNorm); identity here."""
        return o

    @staticmethod
    def new_cache() -> StateCache:
        return StateCache()

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
        """`x: [B, T, dim]`. With a `StateCache`, x holds the T newest positions: T > 1 runs the chunked
        kernels from the cached state, T == 1 one recurrent step; the cache then holds the new state."""
        if cache is not None and not isinstance(cache, StateCache):
            raise TypeError(
                f"{type(self).__name__} decodes from a StateCache (layer.new_cache()), not a KV cache"
            )
        B, T, _ = x.shape
        q, k, v = self.project(x, rope, positions, 0 if cache is None else cache.length)
        rep = self.heads // self.kv_heads
        if rep > 1:  # the linear specs take one head count; the state is per query head anyway
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        q, k = self.features(q, k)
        op = self.op()
        if cache is None:
            o = op(q, k, v, *self.aux(), backend=backend)
        else:
            algorithm = "recurrent" if T == 1 else "chunk"
            o, cache.state = op(
                q, k, v, *self.aux(), backend=backend, algorithm=algorithm, initial_state=cache.state,
                return_state=True,
            )  # fmt: skip
            cache.seen += T
        o = self.post(o)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class LightningAttention(LinearZooAttention):
    """Lightning Attention as in TransNormerLLM (Qin et al. 2023, sec. 3.1, "TransNormerLLM: A Faster and
    Better LLM"; Lightning Attention-2, Qin et al. 2024, sec. 3): o_t = Σ_{s≤t} λ_h^{t−s} φ(q_t)·φ(k_s) v_s with
    φ = SiLU, fixed per-head decays λ_h = exp(−8h/H) (decay[h] = 8h/H; head 0 does not decay), and the
    output normalised per head (SRMSNorm). Linear in the sequence length; decodes from a D×E state."""

    spec = "lightning"

    def __init__(self, dim: int, heads: int, **kwargs: Any) -> None:
        super().__init__(dim, heads, **kwargs)
        self.register_buffer("decay", 8.0 * torch.arange(heads) / heads, persistent=False)

    def aux(self) -> tuple[Tensor, ...]:
        return (self.decay,)

    def post(self, o: Tensor) -> Tensor:
        return F.rms_norm(o, (o.shape[-1],))


class RetentionAttention(LinearZooAttention):
    """RetNet multi-scale retention (Sun et al. 2023, "Retentive Network", eq. 5 and sec. 2.2): per-head
    decays γ_h = 1 − 2^{−5−h}, Retention(X) = (QKᵀ ⊙ D)V with D_nm = γ^{n−m} on n ≥ m, then GroupNorm per
    head. The recurrent form (eq. 1–2) serves decoding."""

    spec = "retention"

    def __init__(self, dim: int, heads: int, **kwargs: Any) -> None:
        super().__init__(dim, heads, **kwargs)
        gamma = 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64))
        self.register_buffer("gamma", gamma.float(), persistent=False)

    def aux(self) -> tuple[Tensor, ...]:
        return (self.gamma,)

    def post(self, o: Tensor) -> Tensor:
        return (
            F.group_norm(o.transpose(1, 2).reshape(-1, self.heads, o.shape[-1]), self.heads)
            .view(o.shape[0], o.shape[2], self.heads, -1)
            .transpose(1, 2)
        )


class LinearEluAttention(LinearZooAttention):
    """Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", eq. 6–9): φ(x) = elu(x) + 1,
    causal, each row normalised by φ(q_i)·Σ_{j≤i} φ(k_j). An RNN at decoding time (eq. 16–18)."""

    spec = "linear_elu"


class HedgehogAttention(LinearZooAttention):
    """Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine", sec. 4.1, eq. 3): learnable feature maps
    φ(x) = [softmax(xW), softmax(−xW)] per head (W initialised to the identity, trained to mimic softmax
    attention's spikiness and monotonicity), applied before the generated normalised linear operator."""

    spec = "hedgehog"

    def __init__(self, dim: int, heads: int, *, feature_dim: int | None = None, **kwargs: Any) -> None:
        super().__init__(dim, heads, **kwargs)
        f = feature_dim or self.head_dim
        w = torch.zeros(heads, self.head_dim, f)
        w[:, : min(f, self.head_dim), : min(f, self.head_dim)] = torch.eye(min(f, self.head_dim))
        self.feature_q = nn.Parameter(w.clone())
        self.feature_k = nn.Parameter(w.clone())
        self.scale = 1 / math.sqrt(self.head_dim)

    @staticmethod
    def _phi(x: Tensor, w: Tensor) -> Tensor:
        z = torch.einsum("bhtd,hdf->bhtf", x, w.to(x.dtype))
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)

    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self._phi(q * self.scale, self.feature_q), self._phi(k * self.scale, self.feature_k)


__all__ = [
    "HedgehogAttention",
    "LightningAttention",
    "LinearEluAttention",
    "LinearZooAttention",
    "RetentionAttention",
    "StateCache",
]
