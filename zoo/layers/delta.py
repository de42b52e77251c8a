"""Delta-rule family zoo layers (DeltaNet, Gated DeltaNet, KDA, GLA, RWKV-7): state blocks of `zoo/specs/`.

Each layer projects q, k, v (with the short causal convolution and SiLU where the papers use one, and the
q/k L2 normalisation of the delta-rule papers), computes its per-token gates from x, and calls the generated
operator, which runs the delta-rule runtime (docs/delta.md): chunked or recurrent for prefill, one recurrent
step per decoded token from the carried [E, D] state. `DeltaCache` holds that state and the last inputs of
the short convolutions, so decoding token by token equals one pass over the whole sequence.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import KVCache, Rope
from .linear import LinearZooAttention, StateCache


class DeltaCache(StateCache):
    """The recurrent state `[B, H, E, D]` of one delta-family layer and the last `kernel - 1` inputs of each
    short convolution (`conv[name]`: `[B, kernel - 1, channels]`)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv: dict[str, Tensor] = {}


class ShortConv(nn.Module):
    """A causal depthwise convolution over time followed by SiLU (the "short convolution" of Mamba, DeltaNet
    and Gated DeltaNet; fla's ShortConvolution). `x: [B, T, C]`; `past` (`[B, K - 1, C]`) continues a
    sequence, and the new past is returned with the output."""

    def __init__(self, channels: int, kernel: int = 4) -> None:
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.randn(channels, kernel) / math.sqrt(kernel))

    def forward(self, x: Tensor, past: Tensor | None) -> tuple[Tensor, Tensor]:
        B, _, C = x.shape
        if past is None:
            past = x.new_zeros(B, self.kernel - 1, C)
        full = torch.cat([past, x], dim=1)  # [B, K - 1 + T, C]
        y = F.conv1d(full.transpose(1, 2), self.weight.to(x.dtype)[:, None, :], groups=C).transpose(1, 2)
        return F.silu(y), full[:, -(self.kernel - 1) :]


class DeltaZooAttention(LinearZooAttention):
    """The common layer: projections, optional short convolutions on q, k, v, optional q/k L2 norm, the
    per-token `inputs(x)` of the spec after q, k, v, a per-head RMS norm of the output and an output gate."""

    conv: ClassVar[bool] = True
    l2_norm: ClassVar[bool] = True
    output_gate: ClassVar[bool] = True

    def __init__(self, dim: int, heads: int, **kwargs: Any) -> None:
        super().__init__(dim, heads, **kwargs)
        qk, vv = heads * self.head_dim, self.kv_heads * self.head_dim
        kk = self.kv_heads * self.head_dim
        if self.conv:
            self.convs = nn.ModuleDict({"q": ShortConv(qk), "k": ShortConv(kk), "v": ShortConv(vv)})
        if self.output_gate:
            self.g_proj = nn.Linear(dim, heads * self.head_dim, bias=False)

    @staticmethod
    def new_cache() -> DeltaCache:
        return DeltaCache()

    def inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        """The spec's per-token inputs after q, k, v, from `x: [B, T, dim]` (each `[B, H, T]` or `[B, H, T, D]`)."""
        return ()

    def heads_of(self, t: Tensor, per_channel: bool = False) -> Tensor:
        """`[B, T, H]` -> `[B, H, T]`, or `[B, T, H * D]` -> `[B, H, T, D]`."""
        B, T, _ = t.shape
        if per_channel:
            return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        return t.transpose(1, 2)

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
        """`x: [B, T, dim]`; with a `DeltaCache`, x holds the T newest positions (T == 1: one recurrent step)."""
        if cache is not None and not isinstance(cache, DeltaCache):
            raise TypeError(
                f"{type(self).__name__} decodes from a DeltaCache (layer.new_cache()), not {cache!r}"
            )
        B, T, _ = x.shape
        proj = {"q": self.q_proj(x), "k": self.k_proj(x), "v": self.v_proj(x)}
        if self.conv:
            for name, t in proj.items():
                past = None if cache is None else cache.conv.get(name)
                proj[name], new_past = self.convs[name](t, past)
                if cache is not None:
                    cache.conv[name] = new_past
        q, k, v = (
            self._split(proj["q"], self.heads),
            self._split(proj["k"], self.kv_heads),
            self._split(proj["v"], self.kv_heads),
        )
        if rope is not None:
            offset = 0 if cache is None else cache.length
            pos = positions if positions is not None else torch.arange(offset, offset + T, device=x.device)
            q, k = rope(q, pos), rope(k, pos)
        if self.l2_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        rep = self.heads // self.kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        op = self.op()
        aux = self.inputs(x)
        if cache is None:
            o = op(q, k, v, *aux, backend=backend)
        else:
            algorithm = "recurrent" if T == 1 else "auto"
            o, cache.state = op(
                q,
                k,
                v,
                *aux,
                backend=backend,
                algorithm=algorithm,
                initial_state=cache.state,
                return_state=True,
            )
            cache.seen += T
        o = F.rms_norm(o, (o.shape[-1],))  # per head, as the papers' (gated) RMSNorm of each head's output
        o = o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        if self.output_gate:
            o = o * F.silu(self.g_proj(x))
        return self.out_proj(o)


class DeltaNetAttention(DeltaZooAttention):
    """DeltaNet (Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule
    over Sequence Length", sec. 4): S_t = S_{t-1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ with L2-normalised q, k
    after a short convolution and SiLU, β_t = sigmoid(W_β x_t) per head."""

    spec = "deltanet"
    output_gate = False

    def __init__(self, dim: int, heads: int, **kwargs: Any) -> None:
        super().__init__(dim, heads, **kwargs)
        self.b_proj = nn.Linear(dim, heads)

    def inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        return (self.heads_of(torch.sigmoid(self.b_proj(x))),)


class GatedDeltaNetAttention(DeltaNetAttention):
    """Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks", sec. 3): the delta rule with a
    scalar decay α_t = exp(g_t) per head, g_t = −exp(A_h) softplus(W_α x_t + dt_bias) (Mamba-2's
    parameterisation), and a SiLU output gate on the RMS-normalised heads."""

    spec = "gated_deltanet"
    output_gate = True

    def __init__(self, dim: int, heads: int, **kwargs: Any) -> None:
        super().__init__(dim, heads, **kwargs)
        self.a_proj = nn.Linear(dim, heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(torch.log(torch.expm1(torch.empty(heads).uniform_(1e-3, 1e-1))))

    def gate(self, x: Tensor) -> Tensor:
        return -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias)

    def inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        return (*super().inputs(x), self.heads_of(self.gate(x)))


class KDAAttention(GatedDeltaNetAttention):
    """Kimi Delta Attention (Kimi Team 2025, "Kimi Linear", sec. 3): Gated DeltaNet with a per-channel
    decay, g_t = −exp(A_h) softplus(W_↑ W_↓ x_t + dt_bias) ∈ R^D (low-rank), kept in float32."""

    spec = "kda"

    def __init__(self, dim: int, heads: int, *, gate_rank: int = 16, **kwargs: Any) -> None:
        super().__init__(dim, heads, **kwargs)
        self.a_proj = nn.Sequential(  # type: ignore[assignment]
            nn.Linear(dim, gate_rank, bias=False), nn.Linear(gate_rank, heads * self.head_dim, bias=False)
        )
        self.dt_bias = nn.Parameter(torch.zeros(heads * self.head_dim))

    def gate(self, x: Tensor) -> Tensor:
        A = self.A_log.float().exp().repeat_interleave(self.head_dim)
        return -A * F.softplus(self.a_proj(x).float() + self.dt_bias)

    def inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        beta = self.heads_of(torch.sigmoid(self.b_proj(x)))
        return beta, self.heads_of(self.gate(x), per_channel=True).float()


class GLAAttention(DeltaZooAttention):
    """Gated Linear Attention (Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient
    Training", sec. 4.1): S_t = S_{t-1} Diag(α_t) + v_t k_tᵀ with α_t = sigmoid(W_2 W_1 x_t + b)^{1/16}
    (low-rank, temperature 16), passed as the float32 log-decay g_t = logsigmoid(·)/16 — no exp(±G) feature
    maps; a SiLU output gate on the RMS-normalised heads; no short convolution or q/k norm."""

    spec = "gla"
    conv = False
    l2_norm = False

    def __init__(self, dim: int, heads: int, *, gate_rank: int = 16, **kwargs: Any) -> None:
        super().__init__(dim, heads, **kwargs)
        self.gk_proj = nn.Sequential(
            nn.Linear(dim, gate_rank, bias=False), nn.Linear(gate_rank, heads * self.head_dim, bias=True)
        )

    def inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        g = F.logsigmoid(self.gk_proj(x).float()) / 16
        return (self.heads_of(g, per_channel=True),)


class RWKV7Attention(DeltaZooAttention):
    """RWKV-7 "Goose" time mixing, its core (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic State
    Evolution", sec. 4): S_t = S_{t-1}(Diag(w_t) − κ̂_tᵀ(a_t ⊙ κ̂_t)) + v_tᵀ k_t, o_t = S_t r_t, with the
    decay w_t = exp(−exp(wl_t)) (wl a low-rank function of x), the in-context learning rate
    a_t = sigmoid(·) (low rank) and the normalised removal key κ̂_t = normalize(W_κ x_t ⊙ ξ) per head.
    Not here: token shift, the bonus term and the replacement-key mixing of the full block; q plays r."""

    spec = "rwkv7"
    conv = False
    l2_norm = False

    def __init__(self, dim: int, heads: int, *, rank: int = 16, **kwargs: Any) -> None:
        super().__init__(dim, heads, **kwargs)
        hd = heads * self.head_dim
        self.w_proj = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Tanh(), nn.Linear(rank, hd))
        nn.init.constant_(self.w_proj[2].bias, -0.5)  # w = exp(-exp(-0.5)) ≈ 0.55 at initialisation
        self.a_proj = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, hd))
        self.kappa_proj = nn.Linear(dim, hd, bias=False)
        self.k_k = nn.Parameter(torch.full((hd,), 0.85))

    def inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        kappa = self.heads_of(self.kappa_proj(x) * self.k_k, per_channel=True)
        wl = self.heads_of(self.w_proj(x).float(), per_channel=True)
        iclr = self.heads_of(torch.sigmoid(self.a_proj(x)), per_channel=True)
        return wl, F.normalize(kappa, dim=-1), iclr


__all__ = [
    "DeltaCache",
    "DeltaNetAttention",
    "DeltaZooAttention",
    "GLAAttention",
    "GatedDeltaNetAttention",
    "KDAAttention",
    "RWKV7Attention",
    "ShortConv",
]
