"""Zoo layers: `nn.Module`s with the usual projections around generated attnc operators."""

from __future__ import annotations

from .agent import AgentAttention
from .base import KVCache, Rope, ZooAttention
from .routing import BiFormerAttention, TargetAttention, TopKRetrievalAttention
from .softmax import (
    ALiBiAttention,
    CalibratedAttention,
    CausalAttention,
    ClippedRelposAttention,
    DilatedNeighborhood2DAttention,
    DocumentAttention,
    FullAttention,
    ImageReweightAttention,
    LoFiTAttention,
    MixFormerAttention,
    MoHAttention,
    Neighborhood1DAttention,
    Neighborhood2DAttention,
    PerturbedAttention,
    PrefixLMAttention,
    SegmentIsolationAttention,
    SigmoidAttention,
    SinkAttention,
    SlidingWindowAttention,
    SoftcapAttention,
    StreamingLLMAttention,
    T5BiasAttention,
)

__all__ = [
    "ALiBiAttention",
    "AgentAttention",
    "BiFormerAttention",
    "CalibratedAttention",
    "CausalAttention",
    "ClippedRelposAttention",
    "DilatedNeighborhood2DAttention",
    "DocumentAttention",
    "FullAttention",
    "ImageReweightAttention",
    "KVCache",
    "LoFiTAttention",
    "MixFormerAttention",
    "MoHAttention",
    "Neighborhood1DAttention",
    "Neighborhood2DAttention",
    "PerturbedAttention",
    "PrefixLMAttention",
    "Rope",
    "SegmentIsolationAttention",
    "SigmoidAttention",
    "SinkAttention",
    "SlidingWindowAttention",
    "SoftcapAttention",
    "StreamingLLMAttention",
    "T5BiasAttention",
    "TargetAttention",
    "TopKRetrievalAttention",
    "ZooAttention",
]
