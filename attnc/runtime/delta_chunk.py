"""Chunk-parallel forward of the delta-rule family (kernels: delta_chunk_kernels.py; design and the contract
with the backward: issue 12's delta_chunk_design.md).

`chunk_forward` runs DeltaNet, Gated DeltaNet, KDA (delta=True, g absent / [B, Hg, T] / [B, Hg, T, D]) and GLA
(delta=False, g [B, Hg, T, D] or [B, Hg, T]) as three launches: the per-chunk factors in parallel over
(chunk, head), the sequential state pass over chunks, the outputs in parallel again (Yang et al. 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length", §3). It returns the outputs, the
final state and the float32 intermediates the backward (delta_chunk_bwd.py) reads. Plain functions on tensors:
no autograd and no checks beyond what the kernels need (delta.py's `_check` validates user input; the
integration into `_ChunkFn` / `delta_rule` / `gla` is the caller's).

Schedules (`ChunkConfig`, `default_chunk_config`) are kept here, apart from the math.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .core_abi import DELTA_CHUNK_OUT, DELTA_CHUNK_PREP, DELTA_CHUNK_STATE, launch_core
from .triton import _load_kernels

__all__ = [
    "ChunkConfig",
    "ChunkForward",
    "ChunkTable",
    "chunk_forward",
    "chunk_table",
    "default_chunk_config",
]

_KERNELS_FILE = Path(__file__).with_name("delta_chunk_kernels.py")


def _kernels(interpret: bool) -> ModuleType:
    """delta_chunk_kernels.py, once per mode (`interpret`: CPU tensors run under the Triton interpreter)."""
    return _load_kernels(_KERNELS_FILE, interpret)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ChunkConfig:
    """The schedule of the chunk-parallel forward (never part of the math).

    sub: rows of the sub-blocks: of the per-channel products (G_MODE 2: exact elementwise products on the
        diagonal blocks, tensor-core products off it) and of the blocked (I + A)⁻¹ (sub − 1 substitution
        steps, then chunk/sub − 1 merge steps); any power of two dividing the chunk (no dot dimension);
    block_dk: key channels per step of the per-channel (G_MODE 2) intra-chunk products, which loop over
        D-blocks so that few [C, block_dk] float32 tiles are live at once (≥ 16: a dot dimension);
    block_e_state / block_e_out: value channels (state rows) per program of the state pass / output kernel
        (the state pass's state-update product has M = block_e_state: 64 gives Hopper's wgmma);
    block_e_state_channel: block_e_state of the per-channel delta rule (KDA), whose state pass also holds
        a [C, D] float32 Γ tile beside W and the decayed keys;
    warps_*: warps per program of each kernel; stages: software-pipelining depth of every kernel."""

    sub: int = 16
    block_dk: int = 64
    block_e_state: int = 64
    block_e_state_channel: int = 64
    block_e_out: int = 128
    warps_prep: int = 4
    warps_state: int = 4
    warps_out: int = 4
    stages: int = 1

    def __post_init__(self) -> None:
        for name in ("sub", "block_dk", "block_e_state", "block_e_state_channel", "block_e_out"):
            n = getattr(self, name)
            if n < 1 or n & (n - 1):
                raise ValueError(f"ChunkConfig.{name} must be a power of two, got {n}")
        for name in ("block_dk", "block_e_state", "block_e_state_channel", "block_e_out"):
            if getattr(self, name) < 16:
                raise ValueError(
                    f"ChunkConfig.{name} must be at least 16 (tl.dot), got {getattr(self, name)}"
                )


def default_chunk_config(D: int, E: int) -> ChunkConfig:
    """Schedules that compile for sm_90 without spills at D = E = 64 and 128 (fp16, bf16), every kernel with a
    tl.dot on wgmma (tests/test_delta_chunk_fwd.py compiles them ahead of time). The per-channel (G_MODE 2)
    products step over D-blocks of 32: at 64 the per-chunk kernels spill (8-600 B), their [C, BDK] float32
    operands being held once per warpgroup. Heads up to 64 wide: 4 warps, 64 state rows per program of the
    state pass. Wider: 8 warps; the state pass keeps 64 rows per program (its state update then runs on
    wgmma, M = 64) except for KDA, which takes 32 (at 64 it spills 44 B; its U = Ũ − W Sᵀ product, M = C,
    is still on wgmma, and more programs fill more SMs in the only sequential pass)."""
    if max(D, E) <= 64:
        return ChunkConfig(sub=16, block_dk=32, block_e_state=64, block_e_state_channel=64, block_e_out=64,
                           warps_prep=4, warps_state=4, warps_out=4, stages=1)  # fmt: skip
    return ChunkConfig(sub=16, block_dk=32, block_e_state=64, block_e_state_channel=32, block_e_out=128,
                       warps_prep=8, warps_state=8, warps_out=8, stages=1)  # fmt: skip


@dataclass(frozen=True)
class ChunkForward:
    """The forward's results, all float32 per state head [B, H, ...] (padded tokens not stored); the ones a
    variant does not have are None (see the design's contract):

    o [B, H, T, E]; sn [B, H, E, D] (final state); gc: Γ, [B, H, T] (scalar gate) or [B, H, T, D] (per
    channel), None without a gate; ai: Tinv rows, [B, H, T, C] (DELTA; None with store=False); w [B, H, T, D]
    and ut: Ũ [B, H, T, E] (DELTA); hs [B, H, NT, E, D], the state entering each chunk; u [B, H, T, E]
    (DELTA; without it U = V)."""

    o: torch.Tensor
    sn: torch.Tensor
    gc: torch.Tensor | None
    ai: torch.Tensor | None
    w: torch.Tensor | None
    ut: torch.Tensor | None
    hs: torch.Tensor
    u: torch.Tensor | None


@dataclass(frozen=True)
class ChunkTable:
    """A packed batch's chunks (FlashAttention's varlen packing: the kernels see B = 1, T = total), built on
    the device with no host synchronisation. Chunks start at each sequence's first row and every C rows after
    it; the last chunk of a sequence is cut at the sequence's end, exactly as a batch's last chunk at T.

    cu int32 [nseq + 1]: each sequence's first row, then total; co int32 [nseq]: each sequence's first chunk
    slot; crow / cend int32 [slots]: each slot's first row and its sequence's end row ((total, total) for a
    padding slot); slots: an upper bound on the chunk count known from the shapes, Σ_s ⌈n_s / C⌉ ≤
    total // C + nseq (per-chunk tensors, the entering states HS among them, have this many slots)."""

    cu: torch.Tensor
    co: torch.Tensor
    crow: torch.Tensor
    cend: torch.Tensor
    nseq: int
    slots: int
    chunk: int


def chunk_table(cu_seqlens: torch.Tensor, total: int, chunk: int) -> ChunkTable:
    """The chunk table of a packed batch (cu_seqlens int32 [nseq + 1], already checked by the caller)."""
    cu = cu_seqlens.to(torch.int32).contiguous()
    nseq = cu.numel() - 1
    lens = (cu[1:] - cu[:-1]).long()
    n = (lens + chunk - 1) // chunk
    ends = torch.cumsum(n, 0)
    co = ends - n
    slots = total // chunk + nseq
    slot = torch.arange(slots, device=cu.device)
    seq = torch.searchsorted(ends, slot, right=True)  # the sequence of each slot (nseq: padding)
    real = seq < nseq
    sq = seq.clamp(max=max(nseq - 1, 0))
    crow = cu[sq].long() + (slot - co[sq]) * chunk
    crow = torch.where(real, crow, total).to(torch.int32)
    cend = torch.where(real, cu[sq + 1].long(), total).to(torch.int32)
    return ChunkTable(cu, co.to(torch.int32), crow, cend, nseq, slots, chunk)


def _g_mode(g: torch.Tensor | None) -> int:
    """The kernels' G_MODE: no gate (0), one log-gate per token [B, H, T] (1), one per key channel (2)."""
    return 0 if g is None else (1 if g.dim() == 3 else 2)


def _fold_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, ...] per state head → [B, heads, ...]: the gradient of a shared input sums over its state heads."""
    B, H = x.shape[:2]
    if heads == H:
        return x
    return x.reshape(B, heads, H // heads, *x.shape[2:]).sum(2)


def _rep(H: int, x: torch.Tensor | None) -> int:
    return 1 if x is None else H // x.shape[1]


def chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    g: torch.Tensor | None,
    s0: torch.Tensor | None,
    *,
    delta: bool,
    chunk: int = 64,
    store: bool = True,
    config: ChunkConfig | None = None,
    table: ChunkTable | None = None,
) -> ChunkForward:
    """The chunk-parallel forward: S_t = S_{t−1} T_t + write_t, o_t = S_t q_t (no scale: fold it into q).

    q [B, Hq, T, D], k [B, Hk, T, D], v [B, Hv, T, E] (contiguous, any float dtype), beta [B, Hb, T] (delta
    only), g None | [B, Hg, T] | [B, Hg, T, D] (log-gates, ≤ 0), s0 None | [B, H, E, D] float32; every head
    count divides H = the largest. chunk: C, a power of two ≥ 16. store=False skips AI (Tinv), which only the
    backward reads; the other intermediates are the forward's own hand-offs between its kernels.

    table: a packed batch (`chunk_table`, at the same chunk): q, k, v, beta, g are [1, heads, total, ...],
    s0 and the returned sn [nseq, H, E, D], hs [1, H, slots, E, D]."""
    B, _, T, D = q.shape
    E = v.shape[3]
    heads = [x.shape[1] for x in (q, k, v, beta, g) if x is not None]
    H = max(heads)
    cfg = config or default_chunk_config(D, E)
    if chunk < 16 or chunk & (chunk - 1) or chunk % cfg.sub:
        raise ValueError(f"chunk must be a power of two ≥ 16 and a multiple of sub={cfg.sub}, got {chunk}")
    if delta and beta is None:
        raise ValueError("chunk_forward: delta=True needs beta")
    g_mode = _g_mode(g)
    kern = _kernels(interpret=q.device.type != "cuda")
    dev, f32 = q.device, torch.float32
    if table is not None and (B != 1 or table.chunk != chunk):
        raise ValueError(f"chunk_forward: a packed batch has B = 1 and the table's chunk {table.chunk}")
    NT = _cdiv(T, chunk) if table is None else table.slots
    nst = B if table is None else table.nseq  # states: one per batch entry or per sequence
    i32 = q.new_empty(1, dtype=torch.int32)
    seqs = dict(CU=i32, CO=i32) if table is None else dict(CU=table.cu, CO=table.co)
    rows = dict(CROW=i32, CEND=i32) if table is None else dict(CROW=table.crow, CEND=table.cend)
    varlen = table is not None
    bd, be_full = max(16, _next_pow2(D)), max(16, _next_pow2(E))
    bdk = min(cfg.block_dk, bd)
    fp32_in = all(x.dtype in (torch.float32, torch.float64) for x in (q, k, v))
    prec = "ieee" if fp32_in else "tf32"
    dummy = q.new_empty(1, dtype=f32)

    gc = None
    if g_mode:
        gc = torch.empty(B, H, T, *((D,) if g_mode == 2 else ()), device=dev, dtype=f32)
    ai = w = ut = u = None
    if delta:
        ai = torch.empty(B, H, T, chunk, device=dev, dtype=f32) if store else None
        w = torch.empty(B, H, T, D, device=dev, dtype=f32)
        ut = torch.empty(B, H, T, E, device=dev, dtype=f32)
        u = torch.empty(B, H, T, E, device=dev, dtype=f32)
    hs = torch.empty(B, H, NT, E, D, device=dev, dtype=f32)
    o = torch.empty(B, H, T, E, device=dev, dtype=f32)
    sn = torch.empty(nst, H, E, D, device=dev, dtype=f32)

    def ptr(x: torch.Tensor | None) -> torch.Tensor:
        return dummy if x is None else x

    if delta or g_mode:
        launch_core(
            kern, DELTA_CHUNK_PREP, (NT, B * H),
            dict(K=k, V=v, BETA=ptr(beta), G=ptr(g), GC=ptr(gc), AI=ptr(ai), W=ptr(w), UT=ptr(ut), **rows),
            dict(T=T, H=H, REP_K=_rep(H, k), REP_V=_rep(H, v), REP_B=_rep(H, beta), REP_G=_rep(H, g)),
            dict(D=D, E=E, BLOCK_D=bd, BLOCK_E=be_full, CHUNK=chunk, BLOCK_DK=bdk, SUB=cfg.sub, G_MODE=g_mode, DELTA=delta,
                 STORE_AI=ai is not None, VARLEN=varlen, DOT_PRECISION=prec),
            num_warps=cfg.warps_prep, num_stages=cfg.stages,
        )  # fmt: skip
    bes = min(cfg.block_e_state_channel if delta and g_mode == 2 else cfg.block_e_state, be_full)
    launch_core(
        kern, DELTA_CHUNK_STATE, (_cdiv(E, bes), nst * H),
        dict(K=k, V=v, W=ptr(w), UT=ptr(ut), GC=ptr(gc), S0=ptr(s0), HS=hs, U=ptr(u), SN=sn, **seqs),
        dict(T=T, H=H, NT=NT, REP_K=_rep(H, k), REP_V=_rep(H, v)),
        dict(D=D, E=E, BLOCK_D=bd, BLOCK_E=bes, CHUNK=chunk, G_MODE=g_mode, DELTA=delta, HAS_S0=s0 is not None,
             VARLEN=varlen, DOT_PRECISION=prec),
        num_warps=cfg.warps_state, num_stages=cfg.stages,
    )  # fmt: skip
    beo = min(cfg.block_e_out, be_full)
    launch_core(
        kern, DELTA_CHUNK_OUT, (NT, B * H, _cdiv(E, beo)),
        dict(Q=q, K=k, V=v, U=ptr(u), GC=ptr(gc), HS=hs, OUT=o, **rows),
        dict(T=T, H=H, NT=NT, REP_Q=_rep(H, q), REP_K=_rep(H, k), REP_V=_rep(H, v)),
        dict(D=D, E=E, BLOCK_D=bd, BLOCK_E=beo, CHUNK=chunk, BLOCK_DK=bdk, SUB=cfg.sub, G_MODE=g_mode, DELTA=delta,
             VARLEN=varlen, DOT_PRECISION=prec),
        num_warps=cfg.warps_out, num_stages=cfg.stages,
    )  # fmt: skip
    return ChunkForward(o=o, sn=sn, gc=gc, ai=ai, w=w, ut=ut, hs=hs, u=u)
