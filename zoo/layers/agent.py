"""Agent Attention (two generated operators plus a depth-wise convolution)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .base import ZooAttention


class AgentAttention(ZooAttention):
    """Agent Attention (Han et al. 2024, "Agent Attention: On the Integration of Softmax and Linear
    Attention", sec. 3.2-3.3, eq. 3-5): `agents` agent tokens A = pool(Q) (adaptive average pooling of the
    queries over the image) first aggregate the keys and values, V_A = softmax(A K^T / sqrt(d)) V (agent
    aggregation), then broadcast them back, O = softmax(Q A^T / sqrt(d)) V_A (agent broadcast), plus the
    depth-wise convolution DWC(V) that restores feature diversity. Each softmax attention is a generated
    operator (`agent_aggregate`, `agent_broadcast` in `zoo/specs/agent.attn`); the paper's agent biases are
    omitted. Needs `grid=(rows, width)` per call; `agents` must be a square number. No GQA."""

    spec = "agent"
    needs_grid = True

    def __init__(self, dim: int, heads: int, *, agents: int = 16, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        side = round(agents**0.5)
        if side * side != agents:
            raise ValueError(f"agents must be a square number, got {agents}")
        if self.kv_heads != self.heads:
            raise ValueError("AgentAttention has no grouped-query form (kv_heads must equal heads)")
        self.agent_side = side
        width = heads * self.head_dim
        self.dwc = nn.Conv2d(width, width, 3, padding=1, groups=width)

    def forward(  # type: ignore[override]
        self, x: Tensor, *, grid: tuple[int, int], backend: str | None = None, **unused: object
    ) -> Tensor:
        if unused:
            raise TypeError(f"AgentAttention takes no argument(s) {', '.join(sorted(unused))}")
        B, N, _ = x.shape
        rows, width = grid
        if rows * width != N:
            raise ValueError(f"grid {grid} does not cover the {N} tokens")
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        C = q.shape[-1]
        agents = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(B, C, rows, width), self.agent_side)
        agents = agents.flatten(2).transpose(1, 2)  # [B, A, C]
        qh, kh, vh, ah = (self._split(t, self.heads) for t in (q, k, v, agents))
        agent_v = ops.op(self.spec, "agent_aggregate")(ah, kh, vh, backend=backend)  # [B, H, A, D]
        o = ops.op(self.spec, "agent_broadcast")(qh, ah, agent_v, backend=backend)  # [B, H, N, D]
        o = o.transpose(1, 2).reshape(B, N, C)
        o = o + self.dwc(v.transpose(1, 2).reshape(B, C, rows, width)).flatten(2).transpose(1, 2)
        return self.out_proj(o)
