"""Triton kernels of the linear family's core, generic over specs (attnc.runtime.linear loads this file once per
interpreter mode; `attnc codegen --standalone` appends it to the module's own kernels file).

The generated prologue reduces every separable spec (dsl/analysis/linear.py) to one core computation per
(batch, head), over q~ = φ(q)·a(i), k~ = ψ(k)·c(j) and the log-decay G (fp32, re-based per chunk):

    o_i   = Σ_{j<=i} (q~_i·k~_j) e^{G_i − G_j} v_j + e^{G_i − G_{−1}} q~_i S_in          (causal)
    den_i = Σ_{j<=i} (q~_i·k~_j) e^{G_i − G_j}     + e^{G_i − G_{−1}} q~_i·z_in          (norm = sum)
    S_out = Σ_j e^{G_{N−1} − G_j} k~_j v_jᵀ + e^{G_{N−1} − G_{−1}} S_in,  z_out likewise with 1 for v_j

(bidirectional specs have no G and sum over every j). The chunked algorithm is Lightning Attention-2's
(Qin et al. 2024, section 3.2) in the two-phase layout of flash-linear-attention's simple GLA: a sequential
pass per (D-block, E-block, head) stores the state entering every chunk, then every chunk computes its
output in parallel — exact masked attention inside the chunk plus the carried state. Decays enter only as
differences of G inside one chunk (GL: G_t − G at the end of the previous chunk; GS: a whole chunk's step),
so long sequences neither overflow nor underflow. The backward mirrors it: a reverse sequential pass stores
dS per chunk, then dq and dk/dv are computed per chunk in parallel. The recurrent kernel runs the same
recurrence token by token for decoding.

Builtins only (tl.reduce with the standard combiners, tl.full): the kernels work whichever mode Triton was
imported in, which the interpreter-based CPU tests rely on.
"""

import triton
import triton.language as tl


@triton.jit
def _lin_rows(base, rows, cols, rmask, cmask, width):
    """The [rows, cols] tile of a row-major matrix `width` wide at `base` (masked lanes read 0)."""
    return tl.load(
        base + rows[:, None] * width + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
    )


@triton.jit
def _lin_cols(base, rows, cols, rmask, cmask, width):
    """The same tile transposed, [cols, rows]: what a product with the matrix's transpose reads."""
    return tl.load(
        base + rows[None, :] * width + cols[:, None], mask=rmask[None, :] & cmask[:, None], other=0.0
    )


@triton.jit
def _lin_percol(base, t, tmask):
    """A per-position value as a column [C, 1] (one per row of a chunk tile)."""
    return tl.load(base + t[:, None], mask=tmask[:, None], other=0.0)


@triton.jit
def _lin_perrow(base, t, tmask):
    """A per-position value as a row [1, C] (one per column of a chunk tile)."""
    return tl.load(base + t[None, :], mask=tmask[None, :], other=0.0)


@triton.jit
def _lin_rowsum(x):
    return tl.reduce(x, 1, tl.standard._sum_combine, keep_dims=True)


@triton.jit
def _lin_colsum(x):
    return tl.reduce(x, 0, tl.standard._sum_combine, keep_dims=True)


@triton.jit
def _lin_fwd_state_kernel(
    KT, V, GL, GS, S0, Z0, HS, ZS,  # core_abi.LIN_FWD_STATE
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """HS[bh, c] = the state entering chunk c (c = 0..NC-1); HS[bh, NC] = the final state."""
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2)
    bk = bh // REP_K
    bv = bh // REP_V
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, CHUNK)
    kmask = offs_k < D
    vmask = offs_v < E
    s_off = offs_k[:, None] * E + offs_v[None, :]
    s_msk = kmask[:, None] & vmask[None, :]
    if HAS_S0:
        S = tl.load(S0 + bh.to(tl.int64) * D * E + s_off, mask=s_msk, other=0.0).to(tl.float32)
        z = tl.load(Z0 + bh.to(tl.int64) * D + offs_k[None, :], mask=kmask[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.full([BLOCK_K, BLOCK_V], 0.0, tl.float32)
        z = tl.full([1, BLOCK_K], 0.0, tl.float32)
    hs_base = HS + bh.to(tl.int64) * (NC + 1) * D * E
    zs_base = ZS + bh.to(tl.int64) * (NC + 1) * D
    for c in range(0, NC):
        tl.store(hs_base + c * D * E + s_off, S, mask=s_msk)
        if NORM_SUM:
            tl.store(
                zs_base + c * D + offs_k[None, :], z, mask=kmask[None, :] & (offs_k[None, :] * 0 + pid_v == 0)
            )
        t = c * CHUNK + offs_c
        tmask = t < N
        kt = _lin_rows(KT + bk.to(tl.int64) * N * D, t, offs_k, tmask, kmask, D)
        v = _lin_rows(V + bv.to(tl.int64) * N * E, t, offs_v, tmask, vmask, E)
        kw = kt.to(tl.float32)
        if HAS_DECAY:
            gl = _lin_percol(GL + bh.to(tl.int64) * N, t, tmask)
            gs = tl.load(GS + bh.to(tl.int64) * NC + c)
            kw = kw * tl.exp(gs - gl)
            S = S * tl.exp(gs)
            z = z * tl.exp(gs)
        S += tl.dot(tl.trans(kw.to(kt.dtype)), v.to(kt.dtype), input_precision=DOT_PRECISION)
        if NORM_SUM:
            z += _lin_colsum(kw)
    tl.store(hs_base + NC * D * E + s_off, S, mask=s_msk)
    if NORM_SUM:
        tl.store(
            zs_base + NC * D + offs_k[None, :], z, mask=kmask[None, :] & (offs_k[None, :] * 0 + pid_v == 0)
        )


@triton.jit
def _lin_fwd_out_kernel(
    QT, KT, V, GL, HS, ZS, OUT, DEN,  # core_abi.LIN_FWD_OUT
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One chunk's output: exact masked attention inside the chunk plus the state entering it."""
    pid_v = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2)
    bk = bh // REP_K
    bv = bh // REP_V
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    t = c * CHUNK + tl.arange(0, CHUNK)
    tmask = t < N
    dmask = offs_d < D
    vmask = offs_v < E
    q = _lin_rows(QT + bh.to(tl.int64) * N * D, t, offs_d, tmask, dmask, D)
    slot = c if CAUSAL else NC
    h = _lin_rows(HS + (bh.to(tl.int64) * (NC + 1) + slot) * D * E, offs_d, offs_v, dmask, vmask, E)
    qd = q.to(tl.float32)
    if HAS_DECAY:
        gi = _lin_percol(GL + bh.to(tl.int64) * N, t, tmask)
        qd = qd * tl.exp(gi)
    o = tl.dot(qd.to(q.dtype), h.to(q.dtype), input_precision=DOT_PRECISION)
    if NORM_SUM:
        zc = tl.load(
            ZS + (bh.to(tl.int64) * (NC + 1) + slot) * D + offs_d[None, :], mask=dmask[None, :], other=0.0
        )
        den = _lin_rowsum(qd * zc)
    if CAUSAL:
        kt = _lin_cols(KT + bk.to(tl.int64) * N * D, t, offs_d, tmask, dmask, D)
        a = tl.dot(q, kt, input_precision=DOT_PRECISION)
        keep = (t[None, :] <= t[:, None]) & tmask[:, None]  # padded rows: no e^{+G} overflow
        if HAS_DECAY:
            gj = _lin_perrow(GL + bh.to(tl.int64) * N, t, tmask)
            a = a * tl.exp(tl.where(keep, gi - gj, float("-inf")))
        else:
            a = tl.where(keep, a, 0.0)
        v = _lin_rows(V + bv.to(tl.int64) * N * E, t, offs_v, tmask, vmask, E)
        o += tl.dot(a.to(v.dtype), v, input_precision=DOT_PRECISION)
        if NORM_SUM:
            den += _lin_rowsum(a)
    tl.store(
        OUT + bh.to(tl.int64) * N * E + t[:, None] * E + offs_v[None, :],
        o,
        mask=tmask[:, None] & vmask[None, :],
    )
    if NORM_SUM:
        tl.store(
            DEN + bh.to(tl.int64) * N + t[:, None], den, mask=tmask[:, None] & (t[:, None] * 0 + pid_v == 0)
        )


@triton.jit
def _lin_bwd_dstate_kernel(
    QT, DO, DDEN, GL, GS, DSO, DZO, DHS, DZS,  # core_abi.LIN_BWD_DSTATE
    N, NH, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_DSO: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Reverse pass: DHS[bh, c] = dL/dS for the state after chunk c; DHS[bh, NC] = dL/dS_in."""
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, CHUNK)
    kmask = offs_k < D
    vmask = offs_v < E
    s_off = offs_k[:, None] * E + offs_v[None, :]
    s_msk = kmask[:, None] & vmask[None, :]
    if HAS_DSO:
        dS = tl.load(DSO + bh.to(tl.int64) * D * E + s_off, mask=s_msk, other=0.0).to(tl.float32)
        dz = tl.load(DZO + bh.to(tl.int64) * D + offs_k[None, :], mask=kmask[None, :], other=0.0).to(
            tl.float32
        )
    else:
        dS = tl.full([BLOCK_K, BLOCK_V], 0.0, tl.float32)
        dz = tl.full([1, BLOCK_K], 0.0, tl.float32)
    base = DHS + bh.to(tl.int64) * (NC + 1) * D * E
    zbase = DZS + bh.to(tl.int64) * (NC + 1) * D
    for cc in range(0, NC):
        c = NC - 1 - cc
        tl.store(base + c * D * E + s_off, dS, mask=s_msk)
        if NORM_SUM:
            tl.store(
                zbase + c * D + offs_k[None, :], dz, mask=kmask[None, :] & (offs_k[None, :] * 0 + pid_v == 0)
            )
        t = c * CHUNK + offs_c
        tmask = t < N
        q = _lin_rows(QT + bh.to(tl.int64) * N * D, t, offs_k, tmask, kmask, D)
        do = _lin_rows(DO + bh.to(tl.int64) * N * E, t, offs_v, tmask, vmask, E)
        qw = q.to(tl.float32)
        if HAS_DECAY:
            gl = _lin_percol(GL + bh.to(tl.int64) * N, t, tmask)
            gs = tl.load(GS + bh.to(tl.int64) * NC + c)
            qw = qw * tl.exp(gl)
            dS = dS * tl.exp(gs)
            dz = dz * tl.exp(gs)
        dS += tl.dot(tl.trans(qw.to(q.dtype)), do.to(q.dtype), input_precision=DOT_PRECISION)
        if NORM_SUM:
            dden = _lin_percol(DDEN + bh.to(tl.int64) * N, t, tmask)
            dz += _lin_colsum(qw * dden)
    tl.store(base + NC * D * E + s_off, dS, mask=s_msk)
    if NORM_SUM:
        tl.store(
            zbase + NC * D + offs_k[None, :], dz, mask=kmask[None, :] & (offs_k[None, :] * 0 + pid_v == 0)
        )


@triton.jit
def _lin_bwd_dq_kernel(
    QT, KT, V, DO, DDEN, GL, HS, ZS, DQ,  # core_abi.LIN_BWD_DQ
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dq~ for one chunk: through the carried state and through the chunk's own keys (E in blocks)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    bk = bh // REP_K
    bv = bh // REP_V
    ty = QT.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    t = c * CHUNK + tl.arange(0, CHUNK)
    tmask = t < N
    dmask = offs_d < D
    slot = c if CAUSAL else NC
    dq = tl.full([CHUNK, BLOCK_D], 0.0, tl.float32)
    dw = tl.full([CHUNK, CHUNK], 0.0, tl.float32)
    for e0 in range(0, E, BLOCK_V):
        offs_e = e0 + tl.arange(0, BLOCK_V)
        emask = offs_e < E
        do = _lin_rows(DO + bh.to(tl.int64) * N * E, t, offs_e, tmask, emask, E).to(ty)
        ht = _lin_cols(HS + (bh.to(tl.int64) * (NC + 1) + slot) * D * E, offs_d, offs_e, dmask, emask, E)
        dq += tl.dot(do, ht.to(ty), input_precision=DOT_PRECISION)
        if CAUSAL:
            vt = _lin_cols(V + bv.to(tl.int64) * N * E, t, offs_e, tmask, emask, E)
            dw += tl.dot(do, vt.to(ty), input_precision=DOT_PRECISION)
    if NORM_SUM:
        dden = _lin_percol(DDEN + bh.to(tl.int64) * N, t, tmask)
        zc = tl.load(
            ZS + (bh.to(tl.int64) * (NC + 1) + slot) * D + offs_d[None, :], mask=dmask[None, :], other=0.0
        )
        dq += dden * zc
    if HAS_DECAY:
        gi = _lin_percol(GL + bh.to(tl.int64) * N, t, tmask)
        dq = dq * tl.exp(gi)
    if CAUSAL:
        if NORM_SUM:
            dw += dden
        keep = (t[None, :] <= t[:, None]) & tmask[:, None]
        if HAS_DECAY:
            gj = _lin_perrow(GL + bh.to(tl.int64) * N, t, tmask)
            dw = dw * tl.exp(tl.where(keep, gi - gj, float("-inf")))
        else:
            dw = tl.where(keep, dw, 0.0)
        k = _lin_rows(KT + bk.to(tl.int64) * N * D, t, offs_d, tmask, dmask, D)
        dq += tl.dot(dw.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(
        DQ + bh.to(tl.int64) * N * D + t[:, None] * D + offs_d[None, :],
        dq,
        mask=tmask[:, None] & dmask[None, :],
    )


@triton.jit
def _lin_bwd_dkv_kernel(
    QT, KT, V, DO, DDEN, GL, GS, DHS, DZS, DK, DV,  # core_abi.LIN_BWD_DKV
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dk~ and dv for one chunk's keys (per query head; the caller sums a GQA group). Tiles are transposed:
    rows are keys j, columns queries i of the same chunk; E is walked in blocks."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    bk = bh // REP_K
    bv = bh // REP_V
    offs_d = tl.arange(0, BLOCK_D)
    t = c * CHUNK + tl.arange(0, CHUNK)
    tmask = t < N
    dmask = offs_d < D
    slot = c if CAUSAL else NC
    k = _lin_rows(KT + bk.to(tl.int64) * N * D, t, offs_d, tmask, dmask, D)
    if HAS_DECAY:
        gj = _lin_percol(GL + bh.to(tl.int64) * N, t, tmask)
        gs = tl.load(GS + bh.to(tl.int64) * NC + c)
        wk = tl.exp(gs - gj)  # e^{G_last − G_j}: from key j to the state after the chunk
    if CAUSAL:
        qt = _lin_cols(QT + bh.to(tl.int64) * N * D, t, offs_d, tmask, dmask, D)
        keep = (t[:, None] <= t[None, :]) & tmask[None, :]
        at = tl.dot(k, qt, input_precision=DOT_PRECISION)  # [j, i] = q~_i·k~_j
        if HAS_DECAY:
            gi = _lin_perrow(GL + bh.to(tl.int64) * N, t, tmask)
            decay = tl.exp(tl.where(keep, gi - gj, float("-inf")))
            at = at * decay
        else:
            at = tl.where(keep, at, 0.0)
        dwt = tl.full([CHUNK, CHUNK], 0.0, tl.float32)
    dk = tl.full([CHUNK, BLOCK_D], 0.0, tl.float32)
    for e0 in range(0, E, BLOCK_V):
        offs_e = e0 + tl.arange(0, BLOCK_V)
        emask = offs_e < E
        v = _lin_rows(V + bv.to(tl.int64) * N * E, t, offs_e, tmask, emask, E).to(k.dtype)
        dh = _lin_rows(DHS + (bh.to(tl.int64) * (NC + 1) + slot) * D * E, offs_d, offs_e, dmask, emask, E).to(
            k.dtype
        )
        dk += tl.dot(v, tl.trans(dh), input_precision=DOT_PRECISION)
        dv = tl.dot(k, dh, input_precision=DOT_PRECISION)
        if HAS_DECAY:
            dv = dv * wk
        if CAUSAL:
            dot_ = _lin_cols(DO + bh.to(tl.int64) * N * E, t, offs_e, tmask, emask, E).to(k.dtype)
            dwt += tl.dot(v, dot_, input_precision=DOT_PRECISION)  # [j, i] = do_i·v_j
            dv += tl.dot(at.to(k.dtype), tl.trans(dot_), input_precision=DOT_PRECISION)
        tl.store(
            DV + bh.to(tl.int64) * N * E + t[:, None] * E + offs_e[None, :],
            dv,
            mask=tmask[:, None] & emask[None, :],
        )
    if NORM_SUM:
        dzc = tl.load(
            DZS + (bh.to(tl.int64) * (NC + 1) + slot) * D + offs_d[None, :], mask=dmask[None, :], other=0.0
        )
        dk += dzc
    if HAS_DECAY:
        dk = dk * wk
    if CAUSAL:
        if NORM_SUM:
            dwt += _lin_perrow(DDEN + bh.to(tl.int64) * N, t, tmask)
        if HAS_DECAY:
            dwt = dwt * decay
        else:
            dwt = tl.where(keep, dwt, 0.0)
        dk += tl.dot(dwt.to(k.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    tl.store(
        DK + bh.to(tl.int64) * N * D + t[:, None] * D + offs_d[None, :],
        dk,
        mask=tmask[:, None] & dmask[None, :],
    )


@triton.jit
def _lin_recurrent_kernel(
    QT, KT, V, GSTEP, S0, Z0, OUT, DEN, SO, ZO,  # core_abi.LIN_RECURRENT
    N, NH, REP_K, REP_V,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, HAS_DECAY: tl.constexpr,
    HAS_S0: tl.constexpr, NORM_SUM: tl.constexpr,
):  # fmt: skip
    """Token by token: S_t = e^{G_t − G_{t−1}} S_{t−1} + k~_t v_tᵀ, o_t = q~_t S_t (decoding)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1)
    bk = bh // REP_K
    bv = bh // REP_V
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    dmask = offs_d < D
    vmask = offs_v < E
    s_off = offs_d[:, None] * E + offs_v[None, :]
    s_msk = dmask[:, None] & vmask[None, :]
    if HAS_S0:
        S = tl.load(S0 + bh.to(tl.int64) * D * E + s_off, mask=s_msk, other=0.0).to(tl.float32)
        z = tl.load(Z0 + bh.to(tl.int64) * D + offs_d[:, None], mask=dmask[:, None], other=0.0).to(tl.float32)
    else:
        S = tl.full([BLOCK_D, BLOCK_V], 0.0, tl.float32)
        z = tl.full([BLOCK_D, 1], 0.0, tl.float32)
    for t in range(0, N):
        q = tl.load(QT + (bh.to(tl.int64) * N + t) * D + offs_d[:, None], mask=dmask[:, None], other=0.0)
        k = tl.load(KT + (bk.to(tl.int64) * N + t) * D + offs_d[:, None], mask=dmask[:, None], other=0.0)
        v = tl.load(V + (bv.to(tl.int64) * N + t) * E + offs_v[None, :], mask=vmask[None, :], other=0.0)
        k32 = k.to(tl.float32)
        q32 = q.to(tl.float32)
        if HAS_DECAY:
            g = tl.load(GSTEP + bh.to(tl.int64) * N + t)
            S = S * tl.exp(g)
            z = z * tl.exp(g)
        S += k32 * v.to(tl.float32)
        o = _lin_colsum(q32 * S)
        tl.store(OUT + (bh.to(tl.int64) * N + t) * E + offs_v[None, :], o, mask=vmask[None, :])
        if NORM_SUM:
            z += k32
            den = _lin_colsum(q32 * z)
            tl.store(DEN + bh.to(tl.int64) * N + t + offs_v[None, :] * 0, den, mask=(offs_v[None, :] == 0))
    tl.store(SO + bh.to(tl.int64) * D * E + s_off, S, mask=s_msk)
    if NORM_SUM:
        tl.store(
            ZO + bh.to(tl.int64) * D + offs_d[:, None],
            z,
            mask=dmask[:, None] & (offs_d[:, None] * 0 + pid_v == 0),
        )
