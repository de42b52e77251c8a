"""Routing and retrieval zoo layers: BiFormer bi-level routing, top-k block retrieval for decoding and
DARE-style target attention. The routing decisions (top-k over regions or blocks) are computed here in
PyTorch and handed to the generated operator as a boolean table read in the mask. That is exact today but
not yet block-sparse: the kernels still visit every key tile (the runtime block layout, a separate issue,
will let them skip unrouted blocks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .base import ZooAttention


def region_major(x: Tensor, grid: tuple[int, int], regions: int) -> Tensor:
    """`[B, rows*width, C]` in raster order -> the same tokens ordered region by region (regions x regions
    regions of (rows/regions) x (width/regions) tokens each, raster order inside a region)."""
    B, _, C = x.shape
    rows, width = grid
    rh, rw = rows // regions, width // regions
    x = x.view(B, regions, rh, regions, rw, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, rows * width, C)


def raster_order(x: Tensor, grid: tuple[int, int], regions: int) -> Tensor:
    """The inverse of `region_major`."""
    B, _, C = x.shape
    rows, width = grid
    rh, rw = rows // regions, width // regions
    x = x.view(B, regions, regions, rh, rw, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, rows * width, C)


def biformer_route(q: Tensor, k: Tensor, regions: int, top_k: int) -> Tensor:
    """BiFormer's region-to-region routing (Zhu et al. 2023, sec. 3.2, eq. 2-3): region-level queries and
    keys are the means of the tokens of each region (`q, k: [B, S*S*R, C]` in region-major order);
    A^r = Q^r (K^r)^T and each region keeps its top-k regions. Returns `route: [B, S*S, S*S] bool`."""
    B, N, C = q.shape
    nr = regions * regions
    qr = q.view(B, nr, N // nr, C).mean(2)
    kr = k.view(B, nr, N // nr, C).mean(2)
    affinity = qr @ kr.transpose(1, 2)
    idx = affinity.topk(top_k, dim=-1).indices
    return torch.zeros(B, nr, nr, dtype=torch.bool, device=q.device).scatter(-1, idx, True)


class BiFormerAttention(ZooAttention):
    """Bi-level routing attention (Zhu et al. 2023, "BiFormer: Vision Transformer with Bi-Level Routing
    Attention", sec. 3.2): the image is cut into regions x regions regions; a region-level affinity graph
    keeps each region's top-k regions (eq. 2-3), then every token attends to the tokens of its routed
    regions (eq. 4), plus the local context enhancement LCE(V), a 5x5 depth-wise convolution of the values.
    Tokens are reordered region by region so the operator's mask is `route[b, i // R, j // R]` with R tokens
    per region. Needs `grid=(rows, width)` per call, both divisible by `regions`."""

    spec = "biformer"
    needs_grid = True

    def __init__(self, dim: int, heads: int, *, regions: int = 4, top_k: int = 4, **kw: object) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.regions, self.top_k = regions, top_k
        width = self.kv_heads * self.head_dim
        self.lce = nn.Conv2d(width, width, 5, padding=2, groups=width)

    def forward(  # type: ignore[override]
        self, x: Tensor, *, grid: tuple[int, int], backend: str | None = None, **unused: object
    ) -> Tensor:
        if unused:
            raise TypeError(f"BiFormerAttention takes no argument(s) {', '.join(sorted(unused))}")
        B, N, _ = x.shape
        rows, width = grid
        s = self.regions
        if rows * width != N or rows % s or width % s:
            raise ValueError(f"grid {grid} must cover the {N} tokens and be divisible by regions={s}")
        xr = region_major(x, grid, s)
        q, k, v = self.q_proj(xr), self.k_proj(xr), self.v_proj(xr)
        k_wide = k.detach()
        if self.kv_heads != self.heads:  # region affinity over all query heads' channels: repeat k like GQA
            group = self.heads // self.kv_heads
            k_wide = (
                k_wide.view(B, N, self.kv_heads, 1, self.head_dim)
                .expand(-1, -1, -1, group, -1)
                .reshape(B, N, -1)
            )
        top_k = min(self.top_k, s * s)
        route = biformer_route(q.detach(), k_wide, s, top_k)
        R = N // (s * s)
        layout = None
        if R % 16 == 0:  # regions are whole kernel blocks: the kernels visit only the routed regions (eq. 4)
            regions = route.float().topk(top_k, dim=-1).indices.to(torch.int32)  # [B, NR, k]: the True ones
            counts = torch.full(regions.shape[:2], top_k, dtype=torch.int32, device=x.device)
            layout = ops.load("biformer", reference_only=True).BlockLayout(
                regions[:, None], counts[:, None], q_block=R, kv_block=R
            )
        o = self.op()(
            self._split(q, self.heads),
            self._split(k, self.kv_heads),
            self._split(v, self.kv_heads),
            route,
            R,
            backend=backend,
            block_layout=layout,
        )
        o = raster_order(o.transpose(1, 2).reshape(B, N, -1), grid, s)
        v_img = raster_order(v, grid, s).transpose(1, 2).reshape(B, -1, rows, width)
        lce = self.lce(v_img).flatten(2).transpose(1, 2)
        if self.kv_heads != self.heads:  # LCE is on the kv heads' channels: repeat them like GQA does
            lce = lce.view(B, N, self.kv_heads, 1, self.head_dim).expand(
                -1, -1, -1, self.heads // self.kv_heads, -1
            )
            lce = lce.reshape(B, N, -1)
        return self.out_proj(o + lce)


def retrieval_selection(q: Tensor, k: Tensor, block: int, top_k: int) -> Tensor:
    """Top-k key blocks per query (Landmark Attention, Mohtashami & Jaggi 2023, sec. 3.1, with each block
    represented by the mean of its keys, as in InfLLM / Quest): `q: [B, H, M, D]`, `k: [B, G, N, D]`, the
    queries being the last M positions. Only blocks that end at or before the query are candidates (a block
    still being filled would leak later keys into its mean during training; the local window covers it).
    Returns `sel: [B, H, M, ceil(N / block)] bool`."""
    B, H, M, D = q.shape
    G, N = k.shape[1], k.shape[2]
    nb = -(-N // block)
    padded = F.pad(k, (0, 0, 0, nb * block - N))
    count = F.pad(torch.ones(N, device=k.device), (0, nb * block - N)).view(nb, block).sum(1)
    reps = padded.view(B, G, nb, block, D).sum(3) / count[:, None]
    reps = reps.repeat_interleave(H // G, dim=1)
    scores = q @ reps.transpose(-1, -2)  # [B, H, M, nb]
    pos = torch.arange(N - M, N, device=q.device)
    ends = (torch.arange(nb, device=q.device) + 1) * block - 1
    complete = ends[None, :] <= pos[:, None]  # [M, nb]
    scores = scores.masked_fill(~complete, float("-inf"))
    idx = scores.topk(min(top_k, nb), dim=-1).indices
    sel = torch.zeros(B, H, M, nb, dtype=torch.bool, device=q.device).scatter(-1, idx, True)
    return sel & complete


class TopKRetrievalAttention(ZooAttention):
    """Top-k block retrieval attention for long-context decoding (Mohtashami & Jaggi 2023, "Landmark
    Attention", sec. 3; Liu et al. 2024, "RetrievalAttention"): the KV cache is cut into blocks of `block`
    tokens, each query retrieves its `top_k` most relevant blocks (by its dot product with each block's mean
    key) and attends to them plus a local window of the last `window` positions, causally. Exact attention
    over the selected blocks; the selection is not differentiated."""

    spec = "topk_retrieval"
    causal = True

    def __init__(
        self, dim: int, heads: int, *, block: int = 64, top_k: int = 4, window: int = 64, **kw: object
    ) -> None:
        super().__init__(dim, heads, **kw)  # type: ignore[arg-type]
        self.block, self.top_k, self.window = block, top_k, window

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, x: Tensor, backend: str | None) -> Tensor:
        sel = retrieval_selection(q.detach(), k.detach(), self.block, self.top_k)
        return self.op()(q, k, v, sel, L=self.block, W=self.window, backend=backend)


class TargetAttention(nn.Module):
    """DARE-style target attention (Feng et al. 2024, "Long-Sequence Recommendation Models Need Decoupled
    Attention and Representation Embeddings", sec. 4): one target item attends over a user's behaviour
    history (M = 1). Attention scores use their own embeddings (target and history *attention* embeddings
    -> q, k), while the pooled vector uses separate *representation* embeddings (-> v), so the two roles do
    not fight over one embedding table. `target: [B, Da]`, `hist_att: [B, N, Da]`, `hist_repr: [B, N, Dr]`,
    `lens: [B]` valid history lengths -> `[B, Dr]`."""

    spec = "target_attention"

    def __init__(self, att_dim: int, repr_dim: int, heads: int = 1, head_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim or att_dim // heads
        self.v_dim = repr_dim // heads
        self.q_proj = nn.Linear(att_dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(att_dim, heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(repr_dim, heads * self.v_dim, bias=False)
        self.out_proj = nn.Linear(heads * self.v_dim, repr_dim, bias=False)

    def forward(
        self, target: Tensor, hist_att: Tensor, hist_repr: Tensor, lens: Tensor, *, backend: str | None = None
    ) -> Tensor:
        B, N, _ = hist_att.shape
        q = self.q_proj(target).view(B, self.heads, 1, self.head_dim)
        k = self.k_proj(hist_att).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hist_repr).view(B, N, self.heads, self.v_dim).transpose(1, 2)
        o = ops.op(self.spec)(q, k, v, lens, backend=backend)  # [B, H, 1, Dr / H]
        return self.out_proj(o.reshape(B, self.heads * self.v_dim))
