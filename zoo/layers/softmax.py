"""Softmax-family zoo layers: one class per spec in `zoo/specs/`, each a thin `ZooAttention` subclass that
owns the variant's parameters (slopes, sinks, bias tables, routers, offsets) and calls its generated operator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import ZooAttention


class FullAttention(ZooAttention):
    """Bidirectional multi-head attention (Vaswani et al. 2017, "Attention Is All You Need", sec. 3.2.2,
    eq. 1), computed by the generated FlashAttention-2-style kernels (Dao 2023). Grouped-query and
    multi-query attention (Ainslie et al. 2023, "GQA"; Shazeer 2019, "Fast Transformer Decoding") come from
    `kv_heads < heads`: query head h reads key/value head h // (heads / kv_heads)."""

    spec = "full"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        return self.op()(q, k, v, backend=backend)


class CausalAttention(ZooAttention):
    """Causal multi-head attention with GQA/MQA, the decoder default (Vaswani et al. 2017 sec. 3.2.3;
    FlashAttention-2, Dao 2023). The spec's mask is bottom-right aligned (`j <= i + N - M`), so decoding one
    token against a KV cache calls the very operator used for training."""

    spec = "causal"
    causal = True

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        return self.op()(q, k, v, backend=backend)


def alibi_slopes(heads: int) -> Tensor:
    """The head slopes of ALiBi (Press et al. 2022, sec. 3): the geometric sequence starting at
    2^(-8/n) with ratio 2^(-8/n) for n a power of two; other head counts interleave the next power's."""

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return torch.tensor(pow2(heads))
    closest = 2 ** math.floor(math.log2(heads))
    return torch.tensor(pow2(closest) + pow2(2 * closest)[0::2][: heads - closest])


class ALiBiAttention(ZooAttention):
    """ALiBi (Press et al. 2022, "Train Short, Test Long", sec. 3): no position embeddings; each head adds
    -m_h * (i - j) to its causal logits, with fixed geometric slopes m_h (a buffer; they still receive a
    gradient if made a parameter). Extrapolates to longer contexts than seen in training."""

    spec = "alibi"
    causal = True

    def __init__(self, dim: int, heads: int, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.register_buffer("slopes", alibi_slopes(heads))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        return self.op()(q, k, v, self.slopes.to(q.dtype), backend=backend)


class SoftcapAttention(ZooAttention):
    """Logit soft-capping (Gemma Team 2024, "Gemma 2", sec. 2 "Logit soft-capping"): causal attention whose
    logits are squashed to (-cap, cap) by cap * tanh(s / cap) before the softmax (cap = 50 in Gemma 2)."""

    spec = "softcap"
    causal = True

    def __init__(self, dim: int, heads: int, *, cap: float = 50.0, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.cap = cap

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        return self.op()(q, k, v, cap=self.cap, backend=backend)


class SlidingWindowAttention(ZooAttention):
    """Sliding-window attention (Beltagy et al. 2020, "Longformer", sec. 3.1; Jiang et al. 2023,
    "Mistral 7B", sec. 2): each query attends causally to itself and the `window - 1` positions before it;
    the kernels skip the key tiles outside the band."""

    spec = "sliding_window"
    causal = True

    def __init__(self, dim: int, heads: int, *, window: int = 256, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.window = window

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        return self.op()(q, k, v, W=self.window, backend=backend)


class SinkAttention(ZooAttention):
    """Attention sinks as a learnable logit (Xiao et al. 2024, "Efficient Streaming Language Models with
    Attention Sinks", sec. 3.3; Miller 2023 "softmax off by one"; the per-head sinks of gpt-oss): each head
    has a learned logit that enters every row's softmax normaliser with a zero value vector, so a head can
    attend to "nothing" instead of dumping attention on the first tokens."""

    spec = "sink"
    causal = True

    def __init__(self, dim: int, heads: int, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.sinks = nn.Parameter(torch.zeros(heads))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        return self.op()(q, k, v, self.sinks.to(q.dtype), backend=backend)


class StreamingLLMAttention(ZooAttention):
    """StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks",
    sec. 3.2): every query keeps the first `sink_tokens` positions (the attention sinks) plus a causal
    window of the last `window` positions, which keeps perplexity stable far beyond the training length."""

    spec = "streaming_llm"
    causal = True

    def __init__(
        self, dim: int, heads: int, *, sink_tokens: int = 4, window: int = 256, **kw: object
    ) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.sink_tokens, self.window = sink_tokens, window

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        return self.op()(q, k, v, S=self.sink_tokens, W=self.window, backend=backend)


class CalibratedAttention(ZooAttention):
    """Attention calibration (Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks", ACT,
    sec. 4): a training-free fix that scales the attention a head pays to sink tokens by alpha[h] < 1 and
    renormalises, i.e. adds log(alpha[h]) to the sink columns' logits. `is_sink: [B, N] bool` marks the
    sinks (by default the first token, the usual sink); `alpha` is a buffer of per-head factors."""

    spec = "calibration"
    causal = True

    def __init__(self, dim: int, heads: int, *, alpha: float = 0.4, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.register_buffer("alpha", torch.full((heads,), float(alpha)))

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        x: Tensor,
        backend: str | None,
        is_sink: Tensor | None = None,
    ) -> Tensor:
        if is_sink is None:
            is_sink = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
            is_sink[:, 0] = True
        return self.op()(q, k, v, self.alpha.to(q.dtype), is_sink, backend=backend)


class ImageReweightAttention(ZooAttention):
    """Per-head re-weighting of image tokens in a vision-language decoder (the calibration mechanism of
    ACT applied to visual tokens, as in Liu et al. 2024, "Paying More Attention to Image", PAI, sec. 3):
    each head multiplies the attention numerators of the image columns by a learnable weight[h] > 0
    (parameterised as exp(log_weight[h]), i.e. added to the logits); `is_image: [B, N] bool` is required."""

    spec = "image_reweight"
    causal = True

    def __init__(self, dim: int, heads: int, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.log_weight = nn.Parameter(torch.zeros(heads))

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None, is_image: Tensor
    ) -> Tensor:
        return self.op()(q, k, v, self.log_weight.exp().to(q.dtype), is_image, backend=backend)


class T5BiasAttention(ZooAttention):
    """T5 relative-position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", sec.
    2.1): a learned scalar per head and relative-distance bucket is added to the causal logits; distances
    below buckets / 2 have a bucket each, longer ones share logarithmically spaced buckets up to
    `max_distance`. The bias table receives gradients through the generated backward."""

    spec = "t5_bias"
    causal = True

    def __init__(
        self, dim: int, heads: int, *, buckets: int = 32, max_distance: int = 128, **kw: object
    ) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.bias = nn.Parameter(torch.zeros(heads, buckets))
        self.max_distance = max_distance

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        return self.op()(q, k, v, self.bias.to(q.dtype), MAXD=self.max_distance, backend=backend)


class ClippedRelposAttention(ZooAttention):
    """Learned relative-position bias with clipped distances (Shaw et al. 2018, "Self-Attention with
    Relative Position Representations", sec. 3.2-3.3, eq. 3-4, as a scalar bias per head; used by RCMHA):
    bidirectional attention plus table[h, clip(j - i, -R, R) + R]; the table is learned (gradients flow)."""

    spec = "relpos_clipped"

    def __init__(self, dim: int, heads: int, *, max_relative: int = 16, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.max_relative = max_relative
        self.table = nn.Parameter(torch.zeros(heads, 2 * max_relative + 1))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        return self.op()(q, k, v, self.table.to(q.dtype), R=self.max_relative, backend=backend)


class PrefixLMAttention(ZooAttention):
    """Prefix-LM attention (Raffel et al. 2020, sec. 3.2.1, fig. 3; Dong et al. 2019, "UniLM"): the first
    `prefix` positions (the input) attend to each other bidirectionally, later positions causally. The
    prefix length is a constructor default and can be given per call (`prefix=`)."""

    spec = "prefix_lm"
    causal = True

    def __init__(self, dim: int, heads: int, *, prefix: int = 16, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.prefix = prefix

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None, prefix: int | None = None
    ) -> Tensor:
        return self.op()(q, k, v, P=self.prefix if prefix is None else prefix, backend=backend)


class DocumentAttention(ZooAttention):
    """Document masking for packed variable-length batches (Krell et al. 2021, "Efficient Sequence Packing
    without Cross-contamination", sec. 4): several documents share a row, and each position attends causally
    within its own document only. `doc: [B, N]` int document ids of all N key positions (without it, the
    whole row is one document)."""

    spec = "document"
    causal = True

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None, doc: Tensor | None = None
    ) -> Tensor:
        if doc is None:
            doc = torch.zeros(k.shape[0], k.shape[2], dtype=torch.int32, device=k.device)
        return self.op()(q, k, v, doc, backend=backend)


class Neighborhood1DAttention(ZooAttention):
    """1-D neighbourhood attention (Hassani et al. 2023, "Neighborhood Attention Transformer", sec. 3.1;
    dilation from Hassani & Shi 2022, "DiNAT", sec. 3; kernels in the style of Hassani et al. 2024, "Faster
    Neighborhood Attention"): each token attends to its `kernel_size` nearest neighbours among the tokens
    `dilation` apart, the window shifted inwards at the borders so every query sees exactly kernel_size keys."""

    spec = "neighborhood_1d"

    def __init__(
        self, dim: int, heads: int, *, kernel_size: int = 7, dilation: int = 1, **kw: object
    ) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.kernel_size, self.dilation = kernel_size, dilation

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        if q.shape[2] < self.kernel_size * self.dilation:
            raise ValueError(
                f"{q.shape[2]} tokens < kernel_size * dilation = {self.kernel_size * self.dilation}"
            )
        return self.op()(q, k, v, K=self.kernel_size, dil=self.dilation, backend=backend)


class Neighborhood2DAttention(ZooAttention):
    """2-D neighbourhood attention (Hassani et al. 2023, "Neighborhood Attention Transformer", sec. 3.1;
    kernels in the style of Hassani et al. 2024, "Faster Neighborhood Attention") on an image of tokens in
    raster order: each query attends to the kernel x kernel window around it, shifted inwards at the image
    borders so every query sees the same number of keys. Needs the token grid per call: `grid=(rows, width)`."""

    spec = "neighborhood_2d"
    needs_grid = True

    def __init__(self, dim: int, heads: int, *, kernel_size: int | tuple[int, int] = 7, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size

    def _check(self, q: Tensor, grid: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
        rows, width = grid
        if rows * width != q.shape[2]:
            raise ValueError(f"grid {grid} does not cover the {q.shape[2]} tokens")
        (kh, kw), (dh, dw) = self.kernel_size, dilation
        if rows < kh * dh or width < kw * dw:
            raise ValueError(f"grid {grid} is smaller than the dilated window {(kh * dh, kw * dw)}")
        return rows, width

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None, grid: tuple[int, int]
    ) -> Tensor:
        _, width = self._check(q, grid)
        kh, kw = self.kernel_size
        return self.op()(q, k, v, width, KH=kh, KW=kw, backend=backend)


class DilatedNeighborhood2DAttention(Neighborhood2DAttention):
    """Dilated 2-D neighbourhood attention (Hassani & Shi 2022, "Dilated Neighborhood Attention
    Transformer", sec. 3.2; Faster Neighborhood Attention 2024): the kernel x kernel window is taken among
    the tokens `dilation` rows / columns apart (the query's dilation group), centred on the query and shifted
    inwards at the group's borders, which widens the receptive field at the same cost."""

    spec = "neighborhood_2d_dilated"

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kernel_size: int | tuple[int, int] = 7,
        dilation: int | tuple[int, int] = 2,
        **kw: object,
    ) -> None:
        super().__init__(dim, heads, kernel_size=kernel_size, **kw)
        self.dilation = (dilation, dilation) if isinstance(dilation, int) else dilation

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None, grid: tuple[int, int]
    ) -> Tensor:
        _, width = self._check(q, grid, self.dilation)
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        return self.op()(q, k, v, width, KH=kh, KW=kw, DH=dh, DW=dw, backend=backend)


class MixFormerAttention(ZooAttention):
    """MixFormer's asymmetric mixed attention (Cui et al. 2022, "MixFormer: End-to-End Tracking with
    Iterative Mixed Attention", sec. 3.2, eq. 4-5): the sequence is the target templates (the first
    `templates` tokens) followed by the search region; templates attend only to templates, search tokens to
    everything, so the template features can be cached across frames."""

    spec = "mixformer"

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None, templates: int
    ) -> Tensor:
        return self.op()(q, k, v, templates, backend=backend)


class SegmentIsolationAttention(ZooAttention):
    """Segment-isolation masking for multi-subject generation (Isolation-and-Reposition style; the same
    mask idea as Bounded Attention, Dahary et al. 2024, "Be Yourself", sec. 4): `seg: [B, N]` int labels, 0 for the shared
    background and s > 0 for subject s. A subject's tokens attend to their own segment and the background;
    background tokens attend to the background only, so no subject's features leak into another's."""

    spec = "segment_isolation"

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None, seg: Tensor
    ) -> Tensor:
        return self.op()(q, k, v, seg, backend=backend)


class SigmoidAttention(ZooAttention):
    """Sigmoid attention (Ramapuram et al. 2025, "Theory, Analysis, and Best Practices for Sigmoid
    Self-Attention", sec. 2 and 3.2): the softmax is replaced by an element-wise sigma(s + b) with no row
    normaliser, with b = -log(n) for the (training) context length n; causal here. `context` fixes n so
    that decoding with a KV cache uses the same bias as training."""

    spec = "sigmoid_attn"
    causal = True

    def __init__(self, dim: int, heads: int, *, context: int = 256, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.bias_value = -math.log(context)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        return self.op()(q, k, v, offset=self.bias_value, backend=backend)


def moh_gates(logits_shared: Tensor, logits_routed: Tensor, logits_mix: Tensor, top_k: int) -> Tensor:
    """MoH head weights (Jin et al. 2024, eq. 5-6): `[..., Hs]`, `[..., Hr]`, `[..., 2]` router logits ->
    `[..., Hs + Hr]` gates: alpha1 * softmax(shared) for the shared heads, alpha2 * softmax(routed) on the
    top-k routed heads (0 elsewhere), with [alpha1, alpha2] = softmax(mix)."""
    alpha = logits_mix.softmax(-1)
    shared = alpha[..., :1] * logits_shared.softmax(-1)
    routed = logits_routed.softmax(-1)
    keep = torch.zeros_like(routed).scatter(-1, routed.topk(top_k, dim=-1).indices, 1.0)
    return torch.cat([shared, alpha[..., 1:] * routed * keep], dim=-1)


class MoHAttention(ZooAttention):
    """Mixture-of-Head attention (Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head
    Attention", sec. 3.2, eq. 4-6): a per-token router weights the heads' outputs; `shared_heads` are always
    active, the others are routed (top-k per token). The gates are computed here and applied inside the
    generated operator as the epilogue `output = o * gate[b, h, i]`. Causal."""

    spec = "moh"
    causal = True

    def __init__(self, dim: int, heads: int, *, shared_heads: int = 2, top_k: int = 2, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        if not 0 < shared_heads < heads or not 0 < top_k <= heads - shared_heads:
            raise ValueError("need 0 < shared_heads < heads and 0 < top_k <= heads - shared_heads")
        self.top_k = top_k
        self.router_shared = nn.Linear(dim, shared_heads, bias=False)
        self.router_routed = nn.Linear(dim, heads - shared_heads, bias=False)
        self.router_mix = nn.Linear(dim, 2, bias=False)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        gate = moh_gates(self.router_shared(x), self.router_routed(x), self.router_mix(x), self.top_k)
        return self.op()(q, k, v, gate.transpose(1, 2).contiguous().to(q.dtype), backend=backend)


class LoFiTAttention(ZooAttention):
    """LoFiT (Yin et al. 2024, "LoFiT: Localized Fine-tuning on LLM Representations", sec. 3, eq. 2):
    learned offset vectors added to the outputs of (selected) attention heads, fused into the generated
    operator as the epilogue `output = o + offset[h, e]`. Causal; offsets start at zero."""

    spec = "lofit"
    causal = True

    def __init__(self, dim: int, heads: int, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.offset = nn.Parameter(torch.zeros(heads, self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        return self.op()(q, k, v, self.offset.to(q.dtype), backend=backend)


class PerturbedAttention(ZooAttention):
    """Attention with a dense additive perturbation of the logits, for adversarial training of attention
    (Kitada & Iyatomi 2021, "Attention Meets Perturbations: Robust and Interpretable Attention with
    Adversarial Training", sec. 3, Attention-AT / Attention-iVAT): `delta: [B, H, M, N]` is added to the
    scores and receives a gradient, from which the adversarial direction delta = eps * g / ||g|| is taken.
    Bidirectional; `delta=None` is no perturbation."""

    spec = "perturbation"

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None, delta: Tensor | None = None
    ) -> Tensor:
        if delta is None:
            delta = q.new_zeros(q.shape[0], self.heads, q.shape[2], k.shape[2])
        return self.op()(q, k, v, delta.to(q.dtype), backend=backend)


__all__ = [name for name, obj in globals().items() if isinstance(obj, type) and issubclass(obj, ZooAttention)]
