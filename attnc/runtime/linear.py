"""Runtime of the linear family: what a generated `NAME_linear` calls.

The generated function evaluates the spec's prologue in PyTorch (feature maps, per-position scales and the
log-decay G), so that autograd carries gradients to every auxiliary tensor (decay rates, gates), then runs
the core (see linear_kernels.py beside this file for the formulas) with the Triton kernels (`_lin_core`, a
custom op registered once per process) or exactly in PyTorch (`_lin_core_torch`, the reference). The core's
kernels are generic: they live in this package and load once per interpreter mode, as a module's own
kernels file does.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .compat import assume_constant_result
from .core_abi import (
    LIN_BWD_DKV,
    LIN_BWD_DKV_VARLEN,
    LIN_BWD_DQ,
    LIN_BWD_DQ_VARLEN,
    LIN_BWD_DSTATE,
    LIN_BWD_DSTATE_VARLEN,
    LIN_FWD_OUT,
    LIN_FWD_OUT_VARLEN,
    LIN_FWD_STATE,
    LIN_FWD_STATE_VARLEN,
    LIN_RECURRENT,
    LIN_RECURRENT_VARLEN,
    launch_core,
)
from .layout import _next_pow2, triton_cdiv
from .ops import _custom_op
from .triton import _load_kernels
from .tuning import _STATES, _config_from, _tuned_entry
from .varlen import check_offsets, longest_sequence, read_offsets, sync_allowed

# The generic core kernels (a standalone module, which vendors this runtime, points it at its own kernels
# file instead: `attnc codegen --standalone` appends the core there).
_LINEAR_KERNELS = Path(__file__).with_name("linear_kernels.py")


def _linear_kernels(interpret):
    return _load_kernels(_LINEAR_KERNELS, interpret)


_LINEAR_PARALLEL_MAX_N = (
    256  # up to this length the quadratic (parallel) kernels win; the autotuner may own it
)
_LINEAR_ALGORITHMS = ("chunk", "recurrent", "parallel")


class _LinConfig(NamedTuple):
    """Schedule of the linear kernels (never part of the spec)."""

    chunk: int
    block_k: int  # D-block of the sequential state passes
    block_v: int  # E-block of the state passes and of the output kernel
    num_warps: int
    num_stages: int


def _lin_default_config(D, E):
    """Chunks of 64 (Lightning Attention-2's choice), 16 for heads wider than 128, and 8 warps above 64,
    so that the per-chunk dq and dk/dv kernels, which hold C×D and C×E fp32 tiles, do not spill on sm_90
    (CI compiles every variant ahead of time and checks)."""
    width = max(D, E)
    warps = 4 if width <= 64 else 8
    if width > 128:  # chunks of 16 and E-blocks of 32 keep the dk/dv kernel's C×D tiles in registers
        return _LinConfig(16, 64, 32, warps, 2)
    return _LinConfig(64, 64 if D > 32 else _next_pow2(D), 64 if E > 32 else _next_pow2(E), warps, 2)


def _lin_config(state, attention, q, D, E, N):
    """The chunked form's schedule for this call: the tuner's probe, else a tuned (or baked) config for the
    call's key (kernel kind "lin_chunk", the same key text as the softmax kernels'), else the default."""
    forced = (state.forced or {}).get("lin_chunk")
    if forced is not None:
        return forced
    return _lin_lookup(state.ident, attention, q.dtype, q.device, D, E, _next_pow2(N))


@assume_constant_result  # traced models take the schedule as a constant, not its dict lookups
def _lin_lookup(ident, attention, dtype, device, D, E, N):
    """Looked up once per key, then a dictionary hit. `ident` names the module's state (a string, so that
    the traced call's arguments stay constants)."""
    state = _STATES[ident]
    memo = ("lin_chunk", attention, dtype, device, D, E, N)
    if memo not in state.memo:
        digest = (state.kernels_sha256 or "")[:16]  # the key names the module's kernels file, as autotune's
        probe = torch.empty(0, dtype=dtype, device=device)  # what the key reads of the call: dtype, device
        _, entry = _tuned_entry(state, attention, "lin_chunk", digest, probe, D, E, N, N)
        tuned = None if entry is None else _config_from(_LinConfig, entry)
        state.memo[memo] = tuned or _lin_default_config(D, E)
    return state.memo[memo]


class _LinOpts(NamedTuple):
    causal: bool
    norm_sum: bool
    recurrent: bool
    cfg: object  # _LinConfig


def _lin_chunk_g(gfull, N, C):
    """G re-based per chunk: GL[t] = G_t − G(end of the previous chunk), GS[c] = one chunk's whole step.
    gfull: [B, H, N + 1], index 0 is position −1 (the initial state). Differences are taken in gfull's dtype
    (float64 from the prologue) before rounding to float32, so long sequences keep their precision."""
    dev = gfull.device
    t = torch.arange(N, device=dev)
    ref = (t // C) * C  # gfull index of the position before the chunk's first
    gl = (gfull[..., 1:] - gfull[..., ref]).float().contiguous()
    c = torch.arange(triton_cdiv(N, C), device=dev)
    last = torch.clamp((c + 1) * C, max=N)  # gfull index of the chunk's last position
    gs = (gfull[..., last] - gfull[..., c * C]).float().contiguous()
    return gl, gs


def _lin_dummy(x):
    return x.new_empty(1, dtype=torch.float32)


def _lin_chunk_constexprs(opts, D, E, block_v, decay, dot):
    """The constexprs the per-chunk kernels share (output, dq, dk/dv): `core_abi._LIN_CHUNK`."""
    return dict(
        D=D, E=E, CHUNK=opts.cfg.chunk, BLOCK_D=_next_pow2(D), BLOCK_V=block_v, CAUSAL=opts.causal,
        HAS_DECAY=decay, NORM_SUM=opts.norm_sum, DOT_PRECISION=dot,
    )  # fmt: skip


def _lin_forward(kern, opts, qt, kt, v, gfull, s0, z0):
    """The chunked (or recurrent) core on q~ [B, H, N, D], k~ [B, Gk, N, D], v [B, G, N, E], G [B, H, N + 1];
    returns o_num [B, H, N, E] and den [B, H, N] (fp32) and the final state S [B, H, D, E], z [B, H, D]."""
    B, H, N, D = qt.shape
    Gk, G, E = kt.shape[1], v.shape[1], v.shape[3]
    cfg = opts.cfg
    dot = "ieee" if qt.dtype is torch.float32 else "tf32"
    o = torch.empty((B, H, N, E), device=qt.device, dtype=torch.float32)
    den = torch.empty((B, H, N), device=qt.device, dtype=torch.float32) if opts.norm_sum else _lin_dummy(qt)
    has_s0 = s0 is not None
    s0_ = s0.contiguous() if has_s0 else _lin_dummy(qt)
    z0_ = z0.contiguous() if has_s0 and z0 is not None else _lin_dummy(qt)
    if opts.recurrent:
        gstep = (
            (gfull[..., 1:] - gfull[..., :-1]).float().contiguous() if gfull is not None else _lin_dummy(qt)
        )
        so = torch.empty((B, H, D, E), device=qt.device, dtype=torch.float32)
        zo = torch.zeros((B, H, D), device=qt.device, dtype=torch.float32)
        bv = min(cfg.block_v, _next_pow2(E))
        launch_core(
            kern, LIN_RECURRENT, (triton_cdiv(E, bv), B * H),
            dict(QT=qt, KT=kt, V=v, GSTEP=gstep, S0=s0_, Z0=z0_, OUT=o, DEN=den, SO=so, ZO=zo),
            dict(N=N, NH=H, REP_K=H // Gk, REP_V=H // G),
            dict(D=D, E=E, BLOCK_D=_next_pow2(D), BLOCK_V=bv, HAS_DECAY=gfull is not None, HAS_S0=has_s0,
                 NORM_SUM=opts.norm_sum),
            num_warps=cfg.num_warps,
        )  # fmt: skip
    else:
        hs, zs, _ = _lin_states(kern, opts, kt, v, gfull, s0_, z0_, has_s0, B, H, N, D, E, dot)
        gl = _lin_chunk_g(gfull, N, cfg.chunk)[0] if gfull is not None else _lin_dummy(qt)
        nc = triton_cdiv(N, cfg.chunk)
        bv = min(cfg.block_v, _next_pow2(E))
        launch_core(
            kern, LIN_FWD_OUT, (triton_cdiv(E, bv), nc, B * H),
            dict(QT=qt, KT=kt, V=v, GL=gl, HS=hs, ZS=zs, OUT=o, DEN=den),
            dict(N=N, NH=H, REP_K=H // Gk, REP_V=H // G, NC=nc),
            _lin_chunk_constexprs(opts, D, E, bv, gfull is not None, dot),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        so = hs[:, nc].view(B, H, D, E)
        zo = zs[:, nc].view(B, H, D)
    return o, den, so, zo


def _lin_backward(kern, opts, qt, kt, v, gfull, s0, z0, so, zo, do, dden, dso, dzo):
    """Gradients of the core's inputs (the recurrent form's too: it computes the same function)."""
    cfg = opts.cfg
    B, H, N, D = qt.shape
    Gk, G, E = kt.shape[1], v.shape[1], v.shape[3]
    dot = "ieee" if qt.dtype is torch.float32 else "tf32"
    has_s0 = s0 is not None
    s0_ = s0.contiguous() if has_s0 else _lin_dummy(qt)
    z0_ = z0.contiguous() if (z0 is not None) else _lin_dummy(qt)
    hs, zs, _ = _lin_states(kern, opts, kt, v, gfull, s0_, z0_, has_s0, B, H, N, D, E, dot)
    nc = triton_cdiv(N, cfg.chunk)
    gl, gs = _lin_chunk_g(gfull, N, cfg.chunk) if gfull is not None else (_lin_dummy(qt),) * 2
    do = (do if do is not None else qt.new_zeros((B, H, N, E))).float().contiguous()
    dden_ = dden.float().contiguous() if (opts.norm_sum and dden is not None) else None
    if opts.norm_sum and dden_ is None:
        dden_ = torch.zeros((B, H, N), device=qt.device, dtype=torch.float32)
    has_dso = dso is not None or dzo is not None
    dso_ = (dso if dso is not None else torch.zeros_like(so)).float().contiguous()
    dzo_ = (dzo if dzo is not None else torch.zeros_like(zo)).float().contiguous()
    dhs = torch.empty((B * H, nc + 1, D, E), device=qt.device, dtype=torch.float32)
    dzs = torch.zeros((B * H, nc + 1, D), device=qt.device, dtype=torch.float32)
    bk, bv = min(cfg.block_k, _next_pow2(D)), min(cfg.block_v, _next_pow2(E))
    dd = dden_ if dden_ is not None else _lin_dummy(qt)
    launch_core(
        kern, LIN_BWD_DSTATE, (triton_cdiv(D, bk), triton_cdiv(E, bv), B * H),
        dict(QT=qt, DO=do, DDEN=dd, GL=gl, GS=gs, DSO=dso_, DZO=dzo_, DHS=dhs, DZS=dzs),
        dict(N=N, NH=H, NC=nc),
        dict(D=D, E=E, CHUNK=cfg.chunk, BLOCK_K=bk, BLOCK_V=bv, HAS_DECAY=gfull is not None, HAS_DSO=has_dso,
             NORM_SUM=opts.norm_sum, DOT_PRECISION=dot),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    dqt = torch.empty((B, H, N, D), device=qt.device, dtype=torch.float32)
    dkt = torch.empty((B, H, N, D), device=qt.device, dtype=torch.float32)
    dv = torch.empty((B, H, N, E), device=qt.device, dtype=torch.float32)
    ints = dict(N=N, NH=H, REP_K=H // Gk, REP_V=H // G, NC=nc)
    common = _lin_chunk_constexprs(opts, D, E, bv, gfull is not None, dot)
    run = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    io = dict(QT=qt, KT=kt, V=v, DO=do, DDEN=dd, GL=gl)
    launch_core(kern, LIN_BWD_DQ, (nc, B * H), dict(**io, HS=hs, ZS=zs, DQ=dqt), ints, common, **run)
    io = dict(**io, GS=gs, DHS=dhs, DZS=dzs, DK=dkt, DV=dv)
    launch_core(kern, LIN_BWD_DKV, (nc, B * H), io, ints, common, **run)
    dgfull = None
    if gfull is not None:
        # dL/dG_t = q~_t·dq~_t − k~_t·dk~_t: every term carrying e^{+G_t} sits in row t, every e^{−G_t} in
        # column t; the final state carries e^{+G_{N−1}}, the initial one e^{−G_{−1}}.
        ktq = kt.float().repeat_interleave(H // Gk, dim=1)
        dg = (qt.float() * dqt).sum(-1) - (ktq * dkt).sum(-1)
        dgfull = torch.zeros_like(gfull)
        dgfull[..., 1:] = dg.to(gfull.dtype)
        dgfull[..., N] += ((dso_ * so).sum((-1, -2)) + (dzo_ * zo).sum(-1)).to(gfull.dtype)
    ds0 = dz0 = None
    if has_s0:
        ds0 = dhs[:, nc].view(B, H, D, E).to(s0.dtype)
        if z0 is not None:
            dz0 = dzs[:, nc].view(B, H, D).to(z0.dtype)
        if dgfull is not None:
            edge = (s0.float() * dhs[:, nc].view(B, H, D, E)).sum((-1, -2))
            if z0 is not None:
                edge = edge + (z0.float() * dzs[:, nc].view(B, H, D)).sum(-1)
            dgfull[..., 0] -= edge.to(gfull.dtype)
    dk = dkt.view(B, Gk, H // Gk, N, D).sum(2).to(kt.dtype)
    dv_ = dv.view(B, G, H // G, N, E).sum(2).to(v.dtype)
    return dqt.to(qt.dtype), dk, dv_, dgfull, ds0, dz0


def _lin_states(kern, opts, kt, v, gfull, s0_, z0_, has_s0, B, H, N, D, E, dot):
    """The sequential pass: the state entering every chunk (and the final one), fp32."""
    cfg = opts.cfg
    nc = triton_cdiv(N, cfg.chunk)
    hs = torch.empty((B * H, nc + 1, D, E), device=kt.device, dtype=torch.float32)
    zs = torch.zeros((B * H, nc + 1, D), device=kt.device, dtype=torch.float32)
    gl, gs = _lin_chunk_g(gfull, N, cfg.chunk) if gfull is not None else (_lin_dummy(kt),) * 2
    bk, bv = min(cfg.block_k, _next_pow2(D)), min(cfg.block_v, _next_pow2(E))
    launch_core(
        kern, LIN_FWD_STATE, (triton_cdiv(D, bk), triton_cdiv(E, bv), B * H),
        dict(KT=kt, V=v, GL=gl, GS=gs, S0=s0_, Z0=z0_, HS=hs, ZS=zs),
        dict(N=N, NH=H, REP_K=H // kt.shape[1], REP_V=H // v.shape[1], NC=nc),
        dict(D=D, E=E, CHUNK=cfg.chunk, BLOCK_K=bk, BLOCK_V=bv, HAS_DECAY=gfull is not None, HAS_S0=has_s0,
             NORM_SUM=opts.norm_sum, DOT_PRECISION=dot),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return hs, zs, nc


def _lin_core_torch(qt, kt, v, gfull, s0, z0, causal, norm_sum):
    """The same core, exactly, in PyTorch (O(N²) memory per head: the reference for tests and CPU runs)."""
    H = qt.shape[1]
    kt = kt.repeat_interleave(H // kt.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    a = qt @ kt.transpose(-1, -2)
    N = qt.shape[2]
    if causal:
        tril = torch.ones(N, N, dtype=torch.bool, device=qt.device).tril()
        if gfull is not None:
            g = gfull[..., 1:].to(qt.dtype)
            expo = torch.where(tril, g[..., :, None] - g[..., None, :], float("-inf"))
            a = a * torch.exp(expo)
        else:
            a = torch.where(tril, a, 0.0)
    o = a @ v
    den = a.sum(-1) if norm_sum else None
    kw = kt
    if gfull is not None:
        g = gfull.to(qt.dtype)
        kw = kt * torch.exp(g[..., -1:] - g[..., 1:])[..., None]
    so = kw.transpose(-1, -2) @ v
    zo = kw.sum(-2) if norm_sum else torch.zeros_like(kw[..., 0, :])
    if s0 is not None:
        s0 = s0.to(qt.dtype)
        w, carry = 1.0, 1.0
        if gfull is not None:  # e^{G_i − G_{−1}} per row, e^{G_{N−1} − G_{−1}} for the carried state
            w = torch.exp(gfull[..., 1:] - gfull[..., :1]).to(qt.dtype)[..., None]
            carry = torch.exp(gfull[..., -1:] - gfull[..., :1]).to(qt.dtype)[..., None]
        o = o + w * (qt @ s0)
        so = so + carry * s0
        if z0 is not None:
            z0 = z0.to(qt.dtype)
            if norm_sum:
                den = den + (w * (qt @ z0[..., None]))[..., 0]
            zo = zo + (carry[..., 0] if gfull is not None else 1.0) * z0
    return o, den, so, zo


def _lin_state_split(state, B, H, D, E, norm_sum, device, name="initial_state"):
    """The user's state [B, H, D, E] (norm = none) or [B, H, D, E + 1] (norm = sum: last column is z)."""
    if state is None:
        return None, None
    width = E + 1 if norm_sum else E
    want = (B, H, D, width)
    if not isinstance(state, torch.Tensor) or tuple(state.shape) != want:
        got = list(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise ValueError(
            f"{name}: expected a tensor of shape [B, H, D, {'E + 1' if norm_sum else 'E'}] = {list(want)}, "
            f"got {got}"
        )
    if not state.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {state.dtype}")
    if state.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where q is), got {state.device}")
    if norm_sum:
        return state[..., :E], state[..., E]
    return state, None


def _lin_load0(t, idx):
    """t[idx] where every index is in range, else 0: how the log-decay G reads tensors at position −1."""
    idx = torch.broadcast_tensors(*(torch.as_tensor(x, device=t.device) for x in idx))
    ok = torch.ones(idx[0].shape, dtype=torch.bool, device=t.device)
    for ix, n in zip(idx, t.shape, strict=True):
        ok = ok & (ix >= 0) & (ix < n)
    safe = tuple(torch.where(ok, ix, 0) for ix in idx)
    return torch.where(ok, t[safe], 0)


def _lin_state_join(so, zo, norm_sum):
    return torch.cat([so, zo[..., None]], dim=-1) if norm_sum else so


def _lin_check_shard(position_offset, initial_log_decay, return_log_decay, algorithm):
    """The shard arguments of `NAME_linear` (context parallelism): position_offset, the global position of
    row 0, is an int >= 0; the quadratic form takes none of them."""
    if isinstance(position_offset, bool) or not isinstance(position_offset, int) or position_offset < 0:
        raise ValueError(
            f"position_offset={position_offset!r}: expected an int >= 0 (the global position of row 0)"
        )
    if algorithm == "parallel" and (position_offset or initial_log_decay is not None or return_log_decay):
        raise ValueError(
            "algorithm='parallel' takes no position_offset, initial_log_decay or return_log_decay; "
            "use algorithm='chunk'"
        )


def _lin_g_start(gfull, initial_log_decay):
    """G [B, H, N + 1] with its column 0 (position offset − 1, where the initial state sits) replaced by the
    caller's `initial_log_decay` [B, H] (the G another shard computed there), or unchanged."""
    if initial_log_decay is None:
        return gfull
    want = tuple(gfull.shape[:2])
    t = initial_log_decay
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or not t.is_floating_point():
        got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"initial_log_decay: expected a floating-point tensor of shape [B, H] = {list(want)}, got {got}"
        )
    return torch.cat([t.to(gfull)[..., None], gfull[..., 1:]], dim=-1)


def _lin_results(o, so, zo, norm_sum, gfull, return_state, return_log_decay):
    """What `NAME_linear` returns with return_state / return_log_decay: o, then the final state, then G at
    the first and last positions' ends [B, H, 2] (float64; zeros without a decay)."""
    out = [o]
    if return_state:
        out.append(_lin_state_join(so, zo, norm_sum))
    if return_log_decay:
        if gfull is None:
            out.append(o.new_zeros((*o.shape[:2], 2), dtype=torch.float64))
        else:
            out.append(gfull[..., [0, -1]])
    return tuple(out)


# ---- the core as a torch.library custom op: torch.compile(fullgraph=True) traces models calling it ----


def _lin_opts(packed):
    """The core's options from the ops' one `int[]` argument (`_lin_pack`): causal, norm_sum, recurrent, then
    the schedule's fields. One list, so that the forward and backward ops do not spell the options out twice."""
    causal, norm_sum, recurrent, *cfg = packed
    return _LinOpts(bool(causal), bool(norm_sum), bool(recurrent), _LinConfig(*cfg))


def _lin_pack(opts):
    return [int(opts.causal), int(opts.norm_sum), int(opts.recurrent), *(int(x) for x in opts.cfg)]


def _lin_core_impl(
    qt: torch.Tensor,
    kt: torch.Tensor,
    v: torch.Tensor,
    gfull: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    s0: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    z0: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    opts: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    kern = _linear_kernels(interpret=not qt.is_cuda)
    opts = _lin_opts(opts)
    o, den, so, zo = _lin_forward(kern, opts, qt, kt, v, gfull, s0, z0)
    return o, den, so.clone(), zo.clone()  # views of a scratch buffer must not alias an op's outputs


def _lin_core_fake(qt, kt, v, gfull, s0, z0, opts):
    norm_sum = _lin_opts(opts).norm_sum
    B, H, N, D = qt.shape
    E = v.shape[3]
    f32 = torch.float32
    den = qt.new_empty((B, H, N) if norm_sum else (1,), dtype=f32)
    return (
        qt.new_empty((B, H, N, E), dtype=f32),
        den,
        qt.new_empty((B, H, D, E), dtype=f32),
        qt.new_empty((B, H, D), dtype=f32),
    )


def _lin_core_bwd_impl(
    do: torch.Tensor,
    dden: torch.Tensor,
    dso: torch.Tensor,
    dzo: torch.Tensor,
    qt: torch.Tensor,
    kt: torch.Tensor,
    v: torch.Tensor,
    gfull: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    s0: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    z0: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    so: torch.Tensor,
    zo: torch.Tensor,
    opts: list[int],
) -> list[torch.Tensor]:
    kern = _linear_kernels(interpret=not qt.is_cuda)
    opts = _lin_opts(opts)
    grads = _lin_backward(kern, opts, qt, kt, v, gfull, s0, z0, so, zo, do, dden, dso, dzo)
    return [g if g is not None else qt.new_empty(0) for g in grads]


def _lin_core_bwd_fake(do, dden, dso, dzo, qt, kt, v, gfull, s0, z0, so, zo, opts):
    return [torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(v)] + [
        torch.empty_like(x) if x is not None else qt.new_empty(0) for x in (gfull, s0, z0)
    ]


def _lin_core_setup(ctx, inputs, output):
    qt, kt, v, gfull, s0, z0, opts = inputs
    _, _, so, zo = output
    ctx.opts = opts
    ctx.present = (gfull is not None, s0 is not None, z0 is not None)
    ctx.save_for_backward(qt, kt, v, gfull, s0, z0, so, zo)


def _lin_core_backward(ctx, do, dden, dso, dzo):
    qt, kt, v, gfull, s0, z0, so, zo = ctx.saved_tensors
    B, H, N, _ = qt.shape
    do = do if do is not None else qt.new_zeros((B, H, N, v.shape[3]), dtype=torch.float32)
    dden = (
        dden
        if dden is not None
        else qt.new_zeros((B, H, N) if _lin_opts(ctx.opts).norm_sum else (1,), dtype=torch.float32)
    )
    dso = dso if dso is not None else torch.zeros_like(so)
    dzo = dzo if dzo is not None else torch.zeros_like(zo)
    grads = _LIN_OPS[1](do, dden, dso, dzo, qt, kt, v, gfull, s0, z0, so, zo, ctx.opts)
    out = [*grads[:3], *(g if p else None for g, p in zip(grads[3:], ctx.present, strict=True))]
    return (*out, None)


def _lin_register():
    # One pair of ops per process (per copy of this file: a standalone module registers its own).
    op, fresh = _custom_op("lin_core", _lin_core_impl, _lin_core_fake, "runtime", __file__)
    bwd, _ = _custom_op("lin_core_backward", _lin_core_bwd_impl, _lin_core_bwd_fake, "runtime", __file__)
    if fresh:
        op.register_autograd(_lin_core_backward, setup_context=_lin_core_setup)
    return op, bwd


def _lin_core(qt, kt, v, gfull, s0, z0, opts):
    """Run the Triton core through the module's custom op (autograd: the chunked backward kernels)."""
    global _LIN_OPS
    if _LIN_OPS is None:
        _LIN_OPS = _lin_register()
    return _LIN_OPS[0](qt, kt, v, gfull, s0, z0, _lin_pack(opts))


_LIN_OPS = None


# ---- packed variable-length batches (`NAME_linear_varlen`) ----------------------------------------------------
#
# The prologue runs on the packed batch as one [1, H, total] "sequence" whose index variables b and i are each
# token's sequence number and position inside it; the core then takes q~ [H, total, D], k~ [Gk, total, D],
# v [G, total, E] (every sequence of a head in one row block) and the log-decay G at positions −1..n_s−1 of every
# sequence, [H, total + nseq] ("extended" rows: sequence s's position p sits at cu[s] + s + 1 + p). The kernels
# read the offsets cu_seqlens themselves: one program per (sequence, head) of the sequential passes, per
# (chunk, sequence, head) of the per-chunk kernels (chunks start at each sequence's first row).


class _Seqs(NamedTuple):
    """What the varlen core derives from cu_seqlens (device tensors: no host synchronisation)."""

    cu: torch.Tensor  # int32 [nseq + 1]
    co: (
        torch.Tensor
    )  # int32 [nseq]: the first slot of each sequence's state stack (its chunks, then its final)
    final: torch.Tensor  # int64 [nseq]: the slot of each sequence's final state (co + its chunk count)
    nslot: int  # slots per head of the stacks: an upper bound of Σ_s (nc_s + 1), known from the shapes
    tok_ext: torch.Tensor  # int64 [total]: each token's extended row
    ref_ext: torch.Tensor  # int64 [total]: the extended row before the token's chunk (its G re-basing)
    start_ext: torch.Tensor  # int64 [nseq]: each sequence's position −1
    last_ext: torch.Tensor  # int64 [nseq]: each sequence's last position (its −1 when empty)


def _lin_seqs(cu, total, chunk):
    cu64 = cu.long()
    nseq = cu.numel() - 1
    lens = cu64[1:] - cu64[:-1]
    tok = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu64[1:], tok, right=True)
    start = cu64[seq]
    pos = tok - start
    nc = (lens + chunk - 1) // chunk
    co = torch.cumsum(nc + 1, 0) - (nc + 1)
    ar = torch.arange(nseq, device=cu.device)
    # Σ ceil(n_s / C) <= total // C + nseq, plus one final slot per sequence.
    nslot = total // chunk + 2 * nseq
    return _Seqs(
        cu, co.int(), co + nc, nslot, tok + seq + 1, start + seq + (pos // chunk) * chunk, cu64[:-1] + ar,
        cu64[1:] + ar,
    )  # fmt: skip


def _lin_varlen_index(cu, total, device):
    """Each token's sequence number and position inside it ([total], int64), for the prologue."""
    cu64 = cu.long()
    tok = torch.arange(total, device=device)
    seq = torch.searchsorted(cu64[1:], tok, right=True)
    return seq, tok - cu64[seq]


def _lin_varlen_ext(total, nseq, cu, device):
    """The extended rows' sequence numbers and positions (−1..n_s−1 per sequence), [total + nseq] each."""
    cu64 = cu.long()
    ext = torch.arange(total + nseq, device=device)
    starts = cu64[:-1] + torch.arange(nseq, device=device)  # each sequence's row −1
    seq = torch.searchsorted(starts, ext, right=True) - 1
    return seq, ext - starts[seq] - 1


def _lin_varlen_cu(cu_seqlens, device):
    """cu_seqlens' type, dtype, rank and device (`varlen.check_offsets`, no host read); returns nseq."""
    return check_offsets("cu_seqlens", cu_seqlens, device).numel() - 1


def _lin_varlen_check_values(cu_seqlens, total):
    """The offsets' values (a host synchronisation: the reference backend and max_seqlen=None take it)."""
    return read_offsets("cu_seqlens", cu_seqlens, total)


def _lin_max_seqlen(cu_seqlens, total, max_seqlen):
    """max_seqlen as given (no host synchronisation on CUDA), else read from cu_seqlens (one
    synchronisation): `varlen.longest_sequence`, which also checks CPU offsets."""
    check = sync_allowed(cu_seqlens, max_seqlen is None)
    if max_seqlen is None and not check:
        raise ValueError("max_seqlen: required under torch.compile (a traced graph cannot read the offsets)")
    return longest_sequence("cu_seqlens", cu_seqlens, total, max_seqlen, check)


def _lin_varlen_state(state, nseq, H, D, E, norm_sum, device):
    """A per-sequence state [nseq, H, D, E] (+ 1 column z for norm = sum), split as `_lin_state_split`."""
    return _lin_state_split(state, nseq, H, D, E, norm_sum, device, name="initial_state")


def _lin_varlen_gext(gfull_virtual):
    """The prologue's G [1, H, total + nseq] (extended rows) as the core takes it: [H, total + nseq]."""
    return gfull_virtual[0]


def _lin_forward_varlen(kern, opts, qt, kt, v, gext, s0, z0, seqs, max_n):
    """The chunked (or recurrent) core on a packed batch: q~ [H, T, D], k~ [Gk, T, D], v [G, T, E],
    G [H, T + nseq] (extended rows); returns o_num [H, T, E], den [H, T] and the final states
    [nseq, H, D, E], [nseq, H, D]."""
    H, T, D = qt.shape
    Gk, G, E = kt.shape[0], v.shape[0], v.shape[2]
    nseq = seqs.cu.numel() - 1
    cfg = opts.cfg
    dot = "ieee" if qt.dtype is torch.float32 else "tf32"
    dev = qt.device
    o = torch.zeros((H, T, E), device=dev, dtype=torch.float32)
    den = torch.zeros((H, T), device=dev, dtype=torch.float32) if opts.norm_sum else _lin_dummy(qt)
    has_s0 = s0 is not None
    s0_ = s0.contiguous() if has_s0 else _lin_dummy(qt)
    z0_ = z0.contiguous() if has_s0 and z0 is not None else _lin_dummy(qt)
    if nseq == 0:
        return (
            o,
            den,
            qt.new_zeros((0, H, D, E), dtype=torch.float32),
            qt.new_zeros((0, H, D), dtype=torch.float32),
        )
    bv = min(cfg.block_v, _next_pow2(E))
    if opts.recurrent:
        gstep = (
            (gext[:, seqs.tok_ext] - gext[:, seqs.tok_ext - 1]).float().contiguous()
            if gext is not None
            else _lin_dummy(qt)
        )
        so = torch.empty((nseq, H, D, E), device=dev, dtype=torch.float32)
        zo = torch.zeros((nseq, H, D), device=dev, dtype=torch.float32)
        launch_core(
            kern, LIN_RECURRENT_VARLEN, (triton_cdiv(E, bv), nseq * H),
            dict(QT=qt, KT=kt, V=v, GSTEP=gstep, S0=s0_, Z0=z0_, OUT=o, DEN=den, SO=so, ZO=zo, CU=seqs.cu),
            dict(N=T, NH=H, REP_K=H // Gk, REP_V=H // G),
            dict(D=D, E=E, BLOCK_D=_next_pow2(D), BLOCK_V=bv, HAS_DECAY=gext is not None, HAS_S0=has_s0,
                 NORM_SUM=opts.norm_sum),
            num_warps=cfg.num_warps,
        )  # fmt: skip
        return o, den, so, zo
    gl = _lin_varlen_gl(gext, seqs) if gext is not None else _lin_dummy(qt)
    hs, zs = _lin_states_varlen(kern, opts, kt, v, gl, gext is not None, s0_, z0_, has_s0, seqs, dot, H)
    launch_core(
        kern, LIN_FWD_OUT_VARLEN, (triton_cdiv(E, bv), max(1, triton_cdiv(max_n, cfg.chunk)), nseq * H),
        dict(QT=qt, KT=kt, V=v, GL=gl, HS=hs, ZS=zs, OUT=o, DEN=den, CU=seqs.cu, CO=seqs.co),
        dict(N=T, NH=H, REP_K=H // Gk, REP_V=H // G, NC=seqs.nslot - 1),
        _lin_chunk_constexprs(opts, D, E, bv, gext is not None, dot),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    so = hs[:, seqs.final].transpose(0, 1).contiguous()
    zo = zs[:, seqs.final].transpose(0, 1).contiguous()
    return o, den, so, zo


def _lin_varlen_gl(gext, seqs):
    """G re-based per chunk of each sequence, [H, T] fp32 (differences in float64, as `_lin_chunk_g`)."""
    return (gext[:, seqs.tok_ext] - gext[:, seqs.ref_ext]).float().contiguous()


def _lin_states_varlen(kern, opts, kt, v, gl, decay, s0_, z0_, has_s0, seqs, dot, H):
    """The sequential pass of every (sequence, head): the state entering each chunk and the final one, stacked
    per head [H, nslot, D, E] (sequence s's from slot CO[s] on)."""
    cfg = opts.cfg
    Gk, T, D = kt.shape
    G, E = v.shape[0], v.shape[2]
    nseq = seqs.cu.numel() - 1
    hs = torch.empty((H, seqs.nslot, D, E), device=kt.device, dtype=torch.float32)
    zs = torch.zeros((H, seqs.nslot, D), device=kt.device, dtype=torch.float32)
    bk, bv = min(cfg.block_k, _next_pow2(D)), min(cfg.block_v, _next_pow2(E))
    launch_core(
        kern, LIN_FWD_STATE_VARLEN, (triton_cdiv(D, bk), triton_cdiv(E, bv), nseq * H),
        dict(KT=kt, V=v, GL=gl, S0=s0_, Z0=z0_, HS=hs, ZS=zs, CU=seqs.cu, CO=seqs.co),
        dict(N=T, NH=H, REP_K=H // Gk, REP_V=H // G, NC=seqs.nslot - 1),
        dict(D=D, E=E, CHUNK=cfg.chunk, BLOCK_K=bk, BLOCK_V=bv, HAS_DECAY=decay, HAS_S0=has_s0,
             NORM_SUM=opts.norm_sum, DOT_PRECISION=dot),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return hs, zs


def _lin_backward_varlen(kern, opts, qt, kt, v, gext, s0, z0, so, zo, do, dden, dso, dzo, seqs, max_n):
    """Gradients of the varlen core's inputs (as `_lin_backward`, per sequence)."""
    cfg = opts.cfg
    H, T, D = qt.shape
    Gk, G, E = kt.shape[0], v.shape[0], v.shape[2]
    nseq = seqs.cu.numel() - 1
    dev = qt.device
    dot = "ieee" if qt.dtype is torch.float32 else "tf32"
    decay = gext is not None
    has_s0 = s0 is not None
    if nseq == 0:
        zero = [torch.zeros_like(x) if x is not None else None for x in (qt, kt, v, gext, s0, z0)]
        return tuple(zero)
    s0_ = s0.contiguous() if has_s0 else _lin_dummy(qt)
    z0_ = z0.contiguous() if (z0 is not None) else _lin_dummy(qt)
    gl = _lin_varlen_gl(gext, seqs) if decay else _lin_dummy(qt)
    hs, zs = _lin_states_varlen(kern, opts, kt, v, gl, decay, s0_, z0_, has_s0, seqs, dot, H)
    do = (do if do is not None else qt.new_zeros((H, T, E))).float().contiguous()
    dd = dden.float().contiguous() if (opts.norm_sum and dden is not None) else None
    if opts.norm_sum and dd is None:
        dd = torch.zeros((H, T), device=dev, dtype=torch.float32)
    dd = dd if dd is not None else _lin_dummy(qt)
    has_dso = dso is not None or dzo is not None
    dso_ = (dso if dso is not None else torch.zeros_like(so)).float().contiguous()
    dzo_ = (dzo if dzo is not None else torch.zeros_like(zo)).float().contiguous()
    dhs = torch.empty((H, seqs.nslot, D, E), device=dev, dtype=torch.float32)
    dzs = torch.zeros((H, seqs.nslot, D), device=dev, dtype=torch.float32)
    bk, bv = min(cfg.block_k, _next_pow2(D)), min(cfg.block_v, _next_pow2(E))
    seq_io = dict(CU=seqs.cu, CO=seqs.co)
    launch_core(
        kern, LIN_BWD_DSTATE_VARLEN, (triton_cdiv(D, bk), triton_cdiv(E, bv), nseq * H),
        dict(QT=qt, DO=do, DDEN=dd, GL=gl, DSO=dso_, DZO=dzo_, DHS=dhs, DZS=dzs, **seq_io),
        dict(N=T, NH=H, NC=seqs.nslot - 1),
        dict(D=D, E=E, CHUNK=cfg.chunk, BLOCK_K=bk, BLOCK_V=bv, HAS_DECAY=decay, HAS_DSO=has_dso,
             NORM_SUM=opts.norm_sum, DOT_PRECISION=dot),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    # Rows of empty or short sequences' idle programs are never written: zeros, not garbage.
    dqt = torch.zeros((H, T, D), device=dev, dtype=torch.float32)
    dkt = torch.zeros((H, T, D), device=dev, dtype=torch.float32)
    dv = torch.zeros((H, T, E), device=dev, dtype=torch.float32)
    ints = dict(N=T, NH=H, REP_K=H // Gk, REP_V=H // G, NC=seqs.nslot - 1)
    common = _lin_chunk_constexprs(opts, D, E, bv, decay, dot)
    run = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid = (max(1, triton_cdiv(max_n, cfg.chunk)), nseq * H)
    io = dict(QT=qt, KT=kt, V=v, DO=do, DDEN=dd, GL=gl)
    launch_core(
        kern, LIN_BWD_DQ_VARLEN, grid, dict(**io, HS=hs, ZS=zs, DQ=dqt, **seq_io), ints, common, **run
    )
    io = dict(**io, DHS=dhs, DZS=dzs, DK=dkt, DV=dv, **seq_io)
    launch_core(kern, LIN_BWD_DKV_VARLEN, grid, io, ints, common, **run)
    ds_in = dhs[:, seqs.final].transpose(0, 1)  # [nseq, H, D, E]: dL/dS_in of every sequence
    dz_in = dzs[:, seqs.final].transpose(0, 1)
    dgext = None
    if decay:
        # As `_lin_backward`: dL/dG_t = q~_t·dq~_t − k~_t·dk~_t per token, plus each sequence's final state
        # at its last position and minus its initial state at its position −1.
        ktq = kt.float().repeat_interleave(H // Gk, dim=0)
        dg = (qt.float() * dqt).sum(-1) - (ktq * dkt).sum(-1)
        dgext = torch.zeros_like(gext)
        dgext[:, seqs.tok_ext] = dg.to(gext.dtype)
        edge = (dso_ * so).sum((-1, -2)) + (dzo_ * zo).sum(-1)  # [nseq, H]
        dgext.index_add_(1, seqs.last_ext, edge.t().to(gext.dtype))
        if has_s0:
            edge = (s0.float() * ds_in).sum((-1, -2))
            if z0 is not None:
                edge = edge + (z0.float() * dz_in).sum(-1)
            dgext.index_add_(1, seqs.start_ext, -edge.t().to(gext.dtype))
    ds0 = ds_in.to(s0.dtype) if has_s0 else None
    dz0 = dz_in.to(z0.dtype) if (has_s0 and z0 is not None) else None
    dk = dkt.view(Gk, H // Gk, T, D).sum(1).to(kt.dtype)
    dv_ = dv.view(G, H // G, T, E).sum(1).to(v.dtype)
    return dqt.to(qt.dtype), dk, dv_, dgext, ds0, dz0


def _lin_varlen_pack(opts, max_n):
    return [*_lin_pack(opts), int(max_n)]


def _lin_varlen_unpack(packed):
    *opts, max_n = packed
    return _lin_opts(opts), max_n


def _lin_core_varlen_impl(
    qt: torch.Tensor,
    kt: torch.Tensor,
    v: torch.Tensor,
    gext: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    s0: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    z0: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    cu: torch.Tensor,
    opts: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    kern = _linear_kernels(interpret=not qt.is_cuda)
    opts, max_n = _lin_varlen_unpack(opts)
    seqs = _lin_seqs(cu, qt.shape[1], opts.cfg.chunk)
    return _lin_forward_varlen(kern, opts, qt, kt, v, gext, s0, z0, seqs, max_n)


def _lin_core_varlen_fake(qt, kt, v, gext, s0, z0, cu, opts):
    norm_sum = _lin_varlen_unpack(opts)[0].norm_sum
    H, T, D = qt.shape
    E = v.shape[2]
    nseq = cu.shape[0] - 1
    f32 = torch.float32
    return (
        qt.new_empty((H, T, E), dtype=f32),
        qt.new_empty((H, T) if norm_sum else (1,), dtype=f32),
        qt.new_empty((nseq, H, D, E), dtype=f32),
        qt.new_empty((nseq, H, D), dtype=f32),
    )


def _lin_core_varlen_bwd_impl(
    do: torch.Tensor,
    dden: torch.Tensor,
    dso: torch.Tensor,
    dzo: torch.Tensor,
    qt: torch.Tensor,
    kt: torch.Tensor,
    v: torch.Tensor,
    gext: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    s0: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    z0: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation text
    so: torch.Tensor,
    zo: torch.Tensor,
    cu: torch.Tensor,
    opts: list[int],
) -> list[torch.Tensor]:
    kern = _linear_kernels(interpret=not qt.is_cuda)
    opts, max_n = _lin_varlen_unpack(opts)
    seqs = _lin_seqs(cu, qt.shape[1], opts.cfg.chunk)
    grads = _lin_backward_varlen(kern, opts, qt, kt, v, gext, s0, z0, so, zo, do, dden, dso, dzo, seqs, max_n)
    return [g if g is not None else qt.new_empty(0) for g in grads]


def _lin_core_varlen_bwd_fake(do, dden, dso, dzo, qt, kt, v, gext, s0, z0, so, zo, cu, opts):
    return _lin_core_bwd_fake(do, dden, dso, dzo, qt, kt, v, gext, s0, z0, so, zo, opts)


def _lin_core_varlen_setup(ctx, inputs, output):
    qt, kt, v, gext, s0, z0, cu, opts = inputs
    _, _, so, zo = output
    ctx.opts = opts
    ctx.present = (gext is not None, s0 is not None, z0 is not None)
    ctx.save_for_backward(qt, kt, v, gext, s0, z0, so, zo, cu)


def _lin_core_varlen_backward(ctx, do, dden, dso, dzo):
    qt, kt, v, gext, s0, z0, so, zo, cu = ctx.saved_tensors
    H, T, _ = qt.shape
    do = do if do is not None else qt.new_zeros((H, T, v.shape[2]), dtype=torch.float32)
    norm_sum = _lin_varlen_unpack(ctx.opts)[0].norm_sum
    dden = dden if dden is not None else qt.new_zeros((H, T) if norm_sum else (1,), dtype=torch.float32)
    dso = dso if dso is not None else torch.zeros_like(so)
    dzo = dzo if dzo is not None else torch.zeros_like(zo)
    grads = _LIN_VARLEN_OPS[1](do, dden, dso, dzo, qt, kt, v, gext, s0, z0, so, zo, cu, ctx.opts)
    out = [*grads[:3], *(g if p else None for g, p in zip(grads[3:], ctx.present, strict=True))]
    return (*out, None, None)


def _lin_varlen_register():
    op, fresh = _custom_op(
        "lin_core_varlen", _lin_core_varlen_impl, _lin_core_varlen_fake, "runtime", __file__
    )
    bwd, _ = _custom_op(
        "lin_core_varlen_backward", _lin_core_varlen_bwd_impl, _lin_core_varlen_bwd_fake, "runtime", __file__
    )
    if fresh:
        op.register_autograd(_lin_core_varlen_backward, setup_context=_lin_core_varlen_setup)
    return op, bwd


def _lin_core_varlen(qt, kt, v, gext, s0, z0, cu, opts, max_n):
    """Run the Triton varlen core through its custom op (autograd: the varlen backward kernels)."""
    global _LIN_VARLEN_OPS
    if _LIN_VARLEN_OPS is None:
        _LIN_VARLEN_OPS = _lin_varlen_register()
    return _LIN_VARLEN_OPS[0](qt, kt, v, gext, s0, z0, cu, _lin_varlen_pack(opts, max_n))


_LIN_VARLEN_OPS = None


def _lin_varlen_loop(linear, args, kinds, cu_seqlens, total, state, state_shape, return_state, **kw):
    """The reference backend of `NAME_linear_varlen`: the batched `linear` once per sequence, on the host.
    kinds[k]: how args[k] is packed: ("tok", axis) a packed tensor whose sequence axis sat at `axis` of the
    batched shape ([total, ...] -> [1, ..., n, ...]), "seq" one row per sequence, None as in the batched call."""
    cu = _lin_varlen_check_values(cu_seqlens, total)
    outs, states = [], []
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        s0 = None if state is None else state[s : s + 1]
        if b == a:  # an empty sequence: no output rows; its state is its initial one
            states.append(
                state[s] if state is not None else args[0].new_zeros(state_shape, dtype=torch.float32)
            )
            continue
        one = []
        for x, kind in zip(args, kinds, strict=True):
            if kind == "seq":
                x = x[s : s + 1]
            elif kind is not None:
                x = x[a:b].movedim(0, kind[1] - 1).unsqueeze(0)
            one.append(x)
        r = linear(*one, initial_state=s0, return_state=return_state, **kw)
        o, st = r if return_state else (r, None)
        outs.append(o[0].movedim(1, 0))  # [1, H, n, E] -> [n, H, E]
        if return_state:
            states.append(st[0])
    q, v = args[0], args[2]
    o = torch.cat(outs) if outs else q.new_zeros((0, q.shape[1], v.shape[2]))
    if return_state:
        return o, torch.stack(states) if states else q.new_zeros((0, *state_shape), dtype=torch.float32)
    return o


def _lin_packed_load(t, idx, axis, cu_seqlens):
    """What the batched spec reads as x[b, ..., i, ...] (b: the sequence number, i at `axis`: the position
    inside it) of a tensor packed along the sequence ([total, ...], the batched shape without B and with the
    sequence axis first); reads outside the sequence (position −1) give 0, as `_lin_load0`."""
    idx = torch.broadcast_tensors(*(torch.as_tensor(x, device=t.device) for x in idx))
    cu = cu_seqlens.long()
    seq = idx[0].clamp(0, cu.numel() - 2)
    pos = idx[axis]
    ok = (idx[0] >= 0) & (idx[0] < cu.numel() - 1) & (pos >= 0) & (pos < cu[seq + 1] - cu[seq])
    rest = [ix for k, ix in enumerate(idx) if k not in (0, axis)]
    for ix, n in zip(rest, t.shape[1:], strict=True):
        ok = ok & (ix >= 0) & (ix < n)
    row = torch.where(ok, cu[seq] + pos, 0)
    safe = tuple(torch.where(ok, ix, 0) for ix in rest)
    return torch.where(ok, t[(row, *safe)], 0)
