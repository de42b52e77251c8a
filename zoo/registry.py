"""The zoo's catalogue: one `Variant` per attention variant (name -> family, paper, spec file, layer).

Adding a variant is one entry in `VARIANTS` (plus its spec in `zoo/specs/` and its layer); the linear family
(Lightning / TransNormerLLM, RetNet retention, linear elu+1, Hedgehog) drops in the same way with
`Family.LINEAR`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import layers as L
from .layers import delta as LD
from .layers import linear as LL
from .ops import spec_path


class Family(enum.Enum):
    SOFTMAX = "softmax"
    ROUTING = "routing"  # routing and retrieval: a top-k selection feeds a mask table
    TWO_STAGE = "two-stage"  # several generated operators per layer
    LINEAR = "linear"


class Use(enum.Enum):
    """Which models a variant fits: causal self-attention (the LM), bidirectional self-attention on an
    image (the ViT), or neither (special inputs: cross/target attention, per-call tables)."""

    CAUSAL = "causal"
    IMAGE = "image"
    BIDIRECTIONAL = "bidirectional"
    OTHER = "other"


@dataclass(frozen=True)
class Variant:
    name: str
    family: Family
    paper: str
    spec: str  # the stem of zoo/specs/<spec>.attn
    layer: type[nn.Module]
    use: Use

    @property
    def spec_file(self) -> Path:
        return spec_path(self.spec)


S, R, T, LI = Family.SOFTMAX, Family.ROUTING, Family.TWO_STAGE, Family.LINEAR
CA, IM, BI, OT = Use.CAUSAL, Use.IMAGE, Use.BIDIRECTIONAL, Use.OTHER

# fmt: off
VARIANTS: tuple[Variant, ...] = (
    Variant("full", S, "Vaswani et al. 2017, Attention Is All You Need; GQA: Ainslie et al. 2023", "full", L.FullAttention, IM),
    Variant("causal", S, "Dao 2023, FlashAttention-2; GQA: Ainslie et al. 2023", "causal", L.CausalAttention, CA),
    Variant("alibi", S, "Press et al. 2022, Train Short, Test Long (ALiBi)", "alibi", L.ALiBiAttention, CA),
    Variant("softcap", S, "Gemma Team 2024, Gemma 2 (logit soft-capping)", "softcap", L.SoftcapAttention, CA),
    Variant("sliding_window", S, "Beltagy et al. 2020, Longformer; Jiang et al. 2023, Mistral 7B", "sliding_window", L.SlidingWindowAttention, CA),
    Variant("sink", S, "Xiao et al. 2024, Attention Sinks (learnable sink logit)", "sink", L.SinkAttention, CA),
    Variant("streaming_llm", S, "Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks", "streaming_llm", L.StreamingLLMAttention, CA),
    Variant("calibration", S, "Yu et al. 2024, Unveiling and Harnessing Hidden Attention Sinks (ACT)", "calibration", L.CalibratedAttention, CA),
    Variant("image_reweight", S, "Liu et al. 2024, Paying More Attention to Image (PAI); ACT mechanism", "image_reweight", L.ImageReweightAttention, OT),
    Variant("t5_bias", S, "Raffel et al. 2020, T5 (relative-position buckets)", "t5_bias", L.T5BiasAttention, CA),
    Variant("relpos_clipped", S, "Shaw et al. 2018, Relative Position Representations (clipped); RCMHA", "relpos_clipped", L.ClippedRelposAttention, BI),
    Variant("prefix_lm", S, "Raffel et al. 2020, T5 sec. 3.2.1; Dong et al. 2019, UniLM", "prefix_lm", L.PrefixLMAttention, CA),
    Variant("document", S, "Krell et al. 2021, Efficient Sequence Packing without Cross-contamination", "document", L.DocumentAttention, CA),
    Variant("neighborhood_1d", S, "Hassani et al. 2023, NAT; Hassani & Shi 2022, DiNAT; Faster Neighborhood Attention 2024", "neighborhood_1d", L.Neighborhood1DAttention, BI),
    Variant("neighborhood_2d", S, "Hassani et al. 2023, NAT; Faster Neighborhood Attention 2024", "neighborhood_2d", L.Neighborhood2DAttention, IM),
    Variant("neighborhood_2d_dilated", S, "Hassani & Shi 2022, DiNAT; Faster Neighborhood Attention 2024", "neighborhood_2d_dilated", L.DilatedNeighborhood2DAttention, IM),
    Variant("mixformer", S, "Cui et al. 2022, MixFormer (asymmetric mixed attention)", "mixformer", L.MixFormerAttention, OT),
    Variant("segment_isolation", S, "Isolation-and-Reposition style subject isolation; cf. Dahary et al. 2024, Bounded Attention", "segment_isolation", L.SegmentIsolationAttention, OT),
    Variant("sigmoid", S, "Ramapuram et al. 2025, Theory, Analysis, and Best Practices for Sigmoid Self-Attention", "sigmoid_attn", L.SigmoidAttention, CA),
    Variant("moh", S, "Jin et al. 2024, MoH: Multi-Head Attention as Mixture-of-Head Attention", "moh", L.MoHAttention, CA),
    Variant("lofit", S, "Yin et al. 2024, LoFiT: Localized Fine-tuning on LLM Representations", "lofit", L.LoFiTAttention, CA),
    Variant("perturbation", S, "Kitada & Iyatomi 2021, Attention Meets Perturbations (Attention-AT/iVAT)", "perturbation", L.PerturbedAttention, BI),
    Variant("biformer", R, "Zhu et al. 2023, BiFormer: Bi-Level Routing Attention", "biformer", L.BiFormerAttention, IM),
    Variant("topk_retrieval", R, "Mohtashami & Jaggi 2023, Landmark Attention; Liu et al. 2024, RetrievalAttention", "topk_retrieval", L.TopKRetrievalAttention, CA),
    Variant("target_attention", R, "Feng et al. 2024, DARE: Decoupled Attention and Representation Embeddings", "target_attention", L.TargetAttention, OT),
    Variant("agent", T, "Han et al. 2024, Agent Attention", "agent", L.AgentAttention, IM),
    Variant("lightning", LI, "Qin et al. 2023, TransNormerLLM; Qin et al. 2024, Lightning Attention-2", "lightning", LL.LightningAttention, CA),
    Variant("retention", LI, "Sun et al. 2023, Retentive Network: A Successor to Transformer for LLMs", "retention", LL.RetentionAttention, CA),
    Variant("linear_elu", LI, "Katharopoulos et al. 2020, Transformers are RNNs (linear attention, elu + 1)", "linear_elu", LL.LinearEluAttention, CA),
    Variant("hedgehog", LI, "Zhang et al. 2024, The Hedgehog & the Porcupine (learned feature maps)", "hedgehog", LL.HedgehogAttention, CA),
    # The delta-rule family: state blocks (`state S = ...`) run by attnc.runtime.delta (docs/delta.md).
    Variant("deltanet", LI, "Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule over Sequence Length", "deltanet", LD.DeltaNetAttention, CA),
    Variant("gated_deltanet", LI, "Yang, Kautz, Hatamizadeh 2024, Gated Delta Networks: Improving Mamba2 with Delta Rule", "gated_deltanet", LD.GatedDeltaNetAttention, CA),
    Variant("kda", LI, "Kimi Team 2025, Kimi Linear: An Expressive, Efficient Attention Architecture (KDA)", "kda", LD.KDAAttention, CA),
    Variant("gla", LI, "Yang et al. 2023, Gated Linear Attention Transformers with Hardware-Efficient Training", "gla", LD.GLAAttention, CA),
    Variant("rwkv7", LI, "Peng et al. 2025, RWKV-7 Goose with Expressive Dynamic State Evolution (time-mix core)", "rwkv7", LD.RWKV7Attention, CA),
)
# fmt: on

BLOCKED: dict[str, str] = {}
"""Variants of issue 6 that a current compiler limit blocks: name -> the missing capability."""
