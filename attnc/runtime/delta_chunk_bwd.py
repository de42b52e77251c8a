"""The chunk-parallel backward of the delta-rule family (DeltaNet, Gated DeltaNet, KDA, GLA): host side of
attnc/runtime/delta_chunk_bwd_kernels.py, per the forward → backward contract of delta_chunk_design.md.

`chunk_backward` takes the forward's float32 intermediates (Γ, Tinv, W, Ũ, the chunk-entering states, U) and
returns the gradients of every input in four launches: the intra-chunk products (parallel over chunks), the
one sequential reverse pass over chunks that carries ∂L/∂S (parallel over E-blocks and heads), dq/dk/dW
(parallel over D-blocks and chunks) and the WY backward with the gates' reverse cumsum (parallel over
chunks). Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length", §3
and its appendix on the backward; Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024) §3.3.

`chunk_forward_reference` evaluates the chunked forward in plain PyTorch (float64 inside, a loop over
chunks) and returns exactly the contract's intermediates: the tests' fixture, and a readable statement of the
chunked algorithm the kernels implement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .core_abi import (
    DELTA_CBWD_DQKW,
    DELTA_CBWD_DSTATE,
    DELTA_CBWD_INTRA,
    DELTA_CBWD_WY,
    launch_core,
)
from .delta_chunk import ChunkTable, _cdiv, _fold_heads, _g_mode, _next_pow2
from .triton import _load_kernels

_KERNELS_FILE = Path(__file__).with_name("delta_chunk_bwd_kernels.py")


def _kernels(interpret: bool) -> ModuleType:
    """delta_chunk_bwd_kernels.py, loaded once per mode (`interpret`: CPU tensors, the Triton interpreter)."""
    return _load_kernels(_KERNELS_FILE, interpret)


# ---------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class ChunkBwdSchedule:
    """Tiles and launch options of the four backward kernels (never part of the math).

    block_e_state: state rows (value channels) per program of the sequential pass (E splits over programs);
    block_k: key channels per program of the dq/dk/dW kernel; block_k_wy: per step of the WY kernel's D loop;
    block_d_intra: per step of the intra kernel's D loop (per-channel gates; else D is one tile);
    block_e: value channels per step of the loops over E; sub: rows of the per-channel sub-blocks;
    warps_*: num_warps of each kernel (multiples of 4: one warpgroup or more, for wgmma); num_stages."""

    block_e_state: int = 32
    block_k: int = 64
    block_k_wy: int = 32
    block_d_intra: int = 64
    block_e: int = 64
    sub: int = 16
    warps_intra: int = 4
    warps_state: int = 4
    warps_dqkw: int = 4
    warps_wy: int = 4
    num_stages: int = 1


def default_schedule(D: int, E: int, g_mode: int = 2) -> ChunkBwdSchedule:
    """The schedule every kernel compiles to for sm_90 with 0 spills at D = E = 64 and 128, fp16 and bf16, each
    variant (tests/test_delta_chunk_bwd.py checks it ahead of time)."""
    wide = max(D, E) > 64
    return ChunkBwdSchedule(
        block_e_state=32,
        block_k=32 if g_mode == 2 else 64,
        block_k_wy=16 if g_mode == 2 else 32,
        block_e=32,
        block_d_intra=32 if wide else 64,
        warps_intra=8,
        warps_state=8 if wide else 4,
        warps_dqkw=8,
        warps_wy=8,
    )


def intra_block_d(sch: ChunkBwdSchedule, D: int, g_mode: int) -> int:
    """The intra kernel's BLOCK_D: all of D in one tile, except per-channel gates (a loop over D-blocks)."""
    bd = max(16, _next_pow2(D))
    return max(16, min(sch.block_d_intra, bd)) if g_mode == 2 else bd


# ---------------------------------------------------------------------------------------------- backward


def chunk_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    g: torch.Tensor | None,
    do: torch.Tensor,
    dsn: torch.Tensor | None,
    *,
    gc: torch.Tensor | None,
    ai: torch.Tensor | None,
    w: torch.Tensor | None,
    ut: torch.Tensor | None,
    hs: torch.Tensor,
    u: torch.Tensor | None,
    delta: bool,
    chunk: int = 64,
    schedule: ChunkBwdSchedule | None = None,
    table: ChunkTable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(dq, dk, dv, dbeta, dg, ds0) of the chunked forward, from do = ∂L/∂o [B, H, T, E] and dsn = ∂L/∂S_T
    [B, H, E, D] (None: 0), per the contract of delta_chunk_design.md (the forward's intermediates gc, ai, w,
    hs, u; ut is not needed: ∂L/∂Ũ = ∂L/∂U). Gradients per input at the input's head count (shared heads
    summed over their group), float32; dbeta None without `delta`, dg None without a gate.

    table: a packed batch (delta_chunk.chunk_table, at the forward's chunk): inputs [1, heads, total, ...],
    dsn and ds0 [nseq, H, E, D], one state gradient per sequence."""
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two ≥ 16, got {chunk}")
    B, _, T, D = q.shape
    E = v.shape[-1]
    H = hs.shape[1]
    NT = hs.shape[2]
    if table is not None and (B != 1 or table.chunk != chunk or table.slots != NT):
        raise ValueError("chunk_backward: a packed batch has B = 1 and the forward's chunk table")
    nst = B if table is None else table.nseq  # state gradients: one per batch entry or per sequence
    i32 = q.new_empty(1, dtype=torch.int32)
    seqs = dict(CU=i32, CO=i32) if table is None else dict(CU=table.cu, CO=table.co)
    rows = dict(CROW=i32, CEND=i32) if table is None else dict(CROW=table.crow, CEND=table.cend)
    gm = _g_mode(g)
    sch = schedule or default_schedule(D, E, gm)
    sub = min(sch.sub, chunk)
    dev, f32 = q.device, torch.float32
    kern = _kernels(interpret=dev.type != "cuda")
    q, k, v, do = (x.contiguous() for x in (q, k, v, do))
    fp32_in = all(x.dtype in (torch.float32, torch.float64) for x in (q, k, v))
    prec = "ieee" if fp32_in else "tf32"
    d1 = torch.empty(1, device=dev, dtype=f32)

    def opt(x: torch.Tensor | None) -> torch.Tensor:
        return d1 if x is None else x.contiguous()

    bd = max(16, _next_pow2(D))
    bk = max(16, min(sch.block_k, bd))
    bkw = max(16, min(sch.block_k_wy, bd))
    be = max(16, min(sch.block_e, _next_pow2(E)))
    bes = max(16, min(sch.block_e_state, _next_pow2(E)))
    nk = _cdiv(D, bk)
    reps = {
        "REP_Q": H // q.shape[1],
        "REP_K": H // k.shape[1],
        "REP_V": H // v.shape[1],
        "REP_B": 1 if beta is None else H // beta.shape[1],
    }
    ints = {"T": T, "H": H, "NT": NT, **reps}
    cx = {"D": D, "E": E, "BLOCK_E": be, "CHUNK": chunk, "SUB": sub, "G_MODE": gm, "DELTA": delta}
    cx["VARLEN"] = table is not None
    scratch = (B * H, NT * chunk, chunk)
    pm = torch.empty(scratch, device=dev, dtype=f32) if gm == 2 else d1
    km = torch.empty(scratch, device=dev, dtype=f32) if delta else d1
    dpm = torch.empty(scratch, device=dev, dtype=f32)
    du = torch.empty(B, H, T, E, device=dev, dtype=f32)
    dgs = torch.empty(B, H, T, device=dev, dtype=f32) if gm == 1 else d1
    GC, U, W = opt(gc), opt(u), opt(w)
    launch_core(
        kern, DELTA_CBWD_INTRA, (NT, B * H),
        dict(Q=q, K=k, V=v, U=U, GC=GC, DO=do, PM=pm, KM=km, DPM=dpm, DU=du, DGS=dgs, **rows),
        ints, dict(cx, BLOCK_D=intra_block_d(sch, D, gm), DOT_PRECISION=prec),
        num_warps=sch.warps_intra, num_stages=sch.num_stages,
    )  # fmt: skip
    dhs = torch.empty(B, H, NT, E, D, device=dev, dtype=f32)
    ds0 = torch.empty(nst, H, E, D, device=dev, dtype=f32)
    launch_core(
        kern, DELTA_CBWD_DSTATE, (_cdiv(E, bes), nst * H),
        dict(Q=q, K=k, W=W, GC=GC, DO=do, DSN=opt(dsn), DU=du, DHS=dhs, DS0=ds0, **seqs),
        ints, dict(cx, BLOCK_D=bd, BLOCK_E=bes, HAS_DSN=dsn is not None, DOT_PRECISION=prec),
        num_warps=sch.warps_state, num_stages=sch.num_stages,
    )  # fmt: skip
    dq = torch.empty(B, H, T, D, device=dev, dtype=f32)
    dk = torch.empty(B, H, T, D, device=dev, dtype=f32)
    dw = torch.empty(B, H, T, D, device=dev, dtype=f32) if delta else d1
    dgk = {0: d1, 1: torch.empty(nk, B, H, T, device=dev, dtype=f32), 2: torch.empty_like(dk)}[gm]
    launch_core(
        kern, DELTA_CBWD_DQKW, (nk, NT, B * H),
        dict(Q=q, K=k, V=v, U=U, GC=GC, HS=hs.contiguous(), DO=do, DU=du, DHS=dhs, DPM=dpm, DQ=dq, DK=dk,
             DW=dw, DGK=dgk, **rows),
        ints, dict(cx, BLOCK_K=bk, DOT_PRECISION=prec),
        num_warps=sch.warps_dqkw, num_stages=sch.num_stages,
    )  # fmt: skip
    dv = torch.empty(B, H, T, E, device=dev, dtype=f32) if delta else du
    dbeta = torch.empty(B, H, T, device=dev, dtype=f32) if delta else None
    dg = torch.empty(B, H, *gc.shape[2:], device=dev, dtype=f32) if gc is not None and gm else None
    if delta or gm:
        launch_core(
            kern, DELTA_CBWD_WY, (NT, B * H),
            dict(K=k, V=v, BETA=opt(beta), GC=GC, AI=opt(ai), DU=du, DW=dw, KM=km, PM=pm, DK=dk, DGK=dgk,
                 DGS=dgs, DV=dv, DBETA=d1 if dbeta is None else dbeta, DG=d1 if dg is None else dg, **rows),
            dict(ints, NK=nk), dict(cx, BLOCK_K=bkw, DOT_PRECISION=prec),
            num_warps=sch.warps_wy, num_stages=sch.num_stages,
        )  # fmt: skip
    return (
        _fold_heads(dq, q.shape[1]),
        _fold_heads(dk, k.shape[1]),
        _fold_heads(dv, v.shape[1]),
        None if dbeta is None or beta is None else _fold_heads(dbeta, beta.shape[1]),
        None if dg is None or g is None else _fold_heads(dg, g.shape[1]),
        ds0,
    )


# ---------------------------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class ChunkReference:
    """The chunked forward's outputs and the contract's intermediates, float32 (None where a variant has
    none): o [B, H, T, E], sn [B, H, E, D], gc [B, H, T(, D)], ai [B, H, T, C], w [B, H, T, D], ut and u
    [B, H, T, E], hs [B, H, NT, E, D]."""

    o: torch.Tensor
    sn: torch.Tensor
    gc: torch.Tensor | None
    ai: torch.Tensor | None
    w: torch.Tensor | None
    ut: torch.Tensor | None
    hs: torch.Tensor
    u: torch.Tensor | None


def _expand(x: torch.Tensor, H: int) -> torch.Tensor:
    return x.double().repeat_interleave(H // x.shape[1], dim=1)


def _decayed(x: torch.Tensor, y: torch.Tensor, gam: torch.Tensor, strict: bool) -> torch.Tensor:
    """⟨x_i, y_j⟩_Γ = Σ_d x_i[d] y_j[d] e^{Γ_i[d] − Γ_j[d]} for j ≤ i (j < i if strict), else 0 (float64)."""
    n = x.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    if gam.dim() == x.dim() - 1:  # a scalar gate: (X Yᵀ) ⊙ e^{Γ_i − Γ_j}
        diff = gam[..., :, None] - gam[..., None, :]
        return (x @ y.transpose(-1, -2)) * torch.where(keep, diff, -torch.inf).exp()
    diff = gam[..., :, None, :] - gam[..., None, :, :]  # [.., i, j, d]
    dec = torch.where(keep[..., None], diff, -torch.inf).exp()
    return torch.einsum("...id,...jd,...ijd->...ij", x, y, dec)


def chunk_forward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    g: torch.Tensor | None,
    s0: torch.Tensor | None,
    *,
    delta: bool,
    chunk: int,
) -> ChunkReference:
    """The chunked forward of delta_chunk_design.md, chunk by chunk in float64 (inputs at their head counts,
    shared heads expanded to H). Per chunk, entered with S: Γ = cumsum of g within the chunk;
    DELTA: A_ij = β_i ⟨k_i, k_j⟩_Γ (j < i), Tinv = (I + A)⁻¹, W = Tinv diag(β) (K ⊙ e^Γ), Ũ = Tinv diag(β) V,
    U = Ũ − W Sᵀ (else U = V); O = (Q ⊙ e^Γ) Sᵀ + P U with P_ij = ⟨q_i, k_j⟩_Γ (j ≤ i);
    S ← S Diag(e^{Γ_last}) + Uᵀ (K ⊙ e^{Γ_last − Γ})."""
    xs = [q, k, v] + [x for x in (beta, g) if x is not None]
    H = max(x.shape[1] for x in xs)
    B, _, T, D = q.shape
    E = v.shape[-1]
    NT = _cdiv(T, chunk)
    Q, K, V = (_expand(x, H) for x in (q, k, v))
    Bt = None if beta is None else _expand(beta, H)
    G = None if g is None else _expand(g, H)
    f64 = dict(dtype=torch.float64, device=q.device)
    S = torch.zeros(B, H, E, D, **f64) if s0 is None else s0.double().clone()
    o = torch.zeros(B, H, T, E, **f64)
    hs = torch.zeros(B, H, NT, E, D, **f64)
    gc = None if G is None else torch.zeros_like(G)
    ai = torch.zeros(B, H, T, chunk, **f64) if delta else None
    w = torch.zeros(B, H, T, D, **f64) if delta else None
    ut = torch.zeros(B, H, T, E, **f64) if delta else None
    u = torch.zeros(B, H, T, E, **f64) if delta else None
    for c in range(NT):
        sl = slice(c * chunk, min(T, (c + 1) * chunk))
        n = sl.stop - sl.start
        hs[:, :, c] = S
        Qc, Kc, Vc = Q[:, :, sl], K[:, :, sl], V[:, :, sl]
        if G is None:
            gam = torch.zeros(B, H, n, **f64)
        else:
            gam = G[:, :, sl].cumsum(2)
            gc[:, :, sl] = gam
        eg = gam.exp() if gam.dim() == 4 else gam.exp()[..., None]
        gl = gam[:, :, -1]  # Γ_last: [B, H] or [B, H, D]
        r = (gl[:, :, None] - gam).exp()
        r = r if r.dim() == 4 else r[..., None]
        if delta:
            bc = Bt[:, :, sl, None]
            A = bc * _decayed(Kc, Kc, gam, strict=True)
            eye = torch.eye(n, **f64)
            Tinv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
            Wc = Tinv @ (bc * Kc * eg)
            Utc = Tinv @ (bc * Vc)
            Uc = Utc - Wc @ S.transpose(-1, -2)
            ai[:, :, sl, :n], w[:, :, sl], ut[:, :, sl], u[:, :, sl] = Tinv, Wc, Utc, Uc
        else:
            Uc = Vc
        P = _decayed(Qc, Kc, gam, strict=False)
        o[:, :, sl] = (Qc * eg) @ S.transpose(-1, -2) + P @ Uc
        decay_last = gl.exp()[..., None, :] if gl.dim() == 3 else gl.exp()[..., None, None]
        S = S * decay_last + Uc.transpose(-1, -2) @ (Kc * r)

    def f(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.float().contiguous()

    return ChunkReference(f(o), f(S), f(gc), f(ai), f(w), f(ut), f(hs), f(u))


__all__ = [
    "ChunkBwdSchedule",
    "ChunkReference",
    "chunk_backward",
    "chunk_forward_reference",
    "default_schedule",
    "intra_block_d",
]
