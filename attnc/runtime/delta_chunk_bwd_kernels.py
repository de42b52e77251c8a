"""Triton kernels of the chunk-parallel delta-rule backward (host side: attnc/runtime/delta_chunk_bwd.py; the
shared design and the forward → backward contract: delta_chunk_design.md, issue 12).

The forward (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
§3; Gated DeltaNet, Yang, Kautz, Hatamizadeh 2024, §3.3) runs, per chunk c entered with the state S = h_c,

    U = Ũ − W Sᵀ,   O = (Q ⊙ e^Γ) Sᵀ + P U,   S' = S Diag(e^{Γ_last}) + Uᵀ (K ⊙ e^{Γ_last − Γ})

with Γ the log-gates cumulated within the chunk, P_ij = ⟨q_i, k_j⟩_Γ (j ≤ i), W = Tinv diag(β) (K ⊙ e^Γ),
Ũ = Tinv diag(β) V and Tinv = (I + A)⁻¹, A_ij = β_i ⟨k_i, k_j⟩_Γ (j < i). Without the delta rule (GLA),
U = V. Its backward splits the same way as the forward (the appendix of Yang et al. 2024 on the backward;
flash-linear-attention's chunk_bwd_dv_local / chunk_bwd_dh / chunk_bwd_dqkwg / prepare_wy_repr_bwd):
only the gradient of the state is a recurrence, everything else is independent per chunk.

Kernels, in launch order (NT chunks, B·H state heads):
- `_delta_cbwd_intra_kernel`, grid (NT, B·H): the chunk's decayed products P and ⟨k_i, k_j⟩_Γ (scratch),
  dP = dO Uᵀ (scratch) and the local part of dU, Pᵀ dO; the scalar gate's dΓ from P (D-independent).
- `_delta_cbwd_dstate_kernel`, grid (E-blocks, B·H): the one sequential pass, last chunk first, carrying
  dS = ∂L/∂S'; it stores dS' of every chunk and completes dU = Pᵀ dO + (K ⊙ e^{Γ_last − Γ}) dS'ᵀ, then
  dS ← dS' Diag(e^{Γ_last}) + dOᵀ (Q ⊙ e^Γ) − dUᵀ W.
- `_delta_cbwd_dqkw_kernel`, grid (D-blocks, NT, B·H): dq, the state and P parts of dk, dW = −dU S, and
  every dΓ term those products give (contractions over E loop over E-blocks).
- `_delta_cbwd_wy_kernel`, grid (NT, B·H): the WY backward through Tinv (dTinv = dW (β K e^Γ)ᵀ + dU (β V)ᵀ,
  dA = −Tinvᵀ dTinv Tinvᵀ on the strict lower triangle) to dk, dv, dβ, dΓ; then dg = the reverse cumsum
  of dΓ within the chunk (Γ_i = Σ_{j ≤ i} g_j). Without the delta rule only the cumsum.

Per-channel gates (G_MODE 2) never form e^{−Γ} (it overflows: Γ reaches −5·64 in a chunk). A chunk is cut
into sub-blocks of SUB rows; an off-diagonal pair of sub-blocks is one tensor-core product of two bounded
factors (x_i e^{Γ_i − Γ_r}) · (y_j e^{Γ_r − Γ_j}) with a reference row r between them; the diagonal sub-blocks
are exact and elementwise, one key (or query) row at a time, with the exponent masked to −inf before exp
where it would be positive (flash-linear-attention's chunk_gla does the same). The diagonal sub-blocks of
all sub-block rows are processed together as a [NS, SUB, BK] tile, so no tile is sliced.

Builtins only (tl.reduce / tl.associative_scan with the standard combiners, no tl.sum/tl.cdiv): the kernels
run in whichever mode Triton was imported in (the interpreter-based CPU tests rely on it). All state and
accumulation in float32; inputs of any float dtype are converted on load.
"""

import triton
import triton.language as tl


@triton.jit
def _dsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _dcumsum(x):
    return tl.associative_scan(x, 0, tl.standard._sum_combine)


@triton.jit
def _rev_cumsum(x):
    """Σ_{i ≥ j} x_i along axis 0 (dg_j from dΓ_i, since Γ_i = Σ_{j ≤ i} g_j)."""
    return _dsum(x, 0)[None, :] - _dcumsum(x) + x


@triton.jit
def _rev_cumsum1(x):
    return _dsum(x, 0) - _dcumsum(x) + x


@triton.jit
def _head_row(bh, H, REP, T):
    """Token 0's row of the input head that state head `bh % H` of batch `bh // H` reads in a
    [B, H // REP, T, ...] tensor (REP state heads share one input head)."""
    b = bh // H
    h = bh % H
    return (b.to(tl.int64) * (H // REP) + h // REP) * T


@triton.jit
def _chunk_span(CROW, CEND, c, T, CHUNK: tl.constexpr, VARLEN: tl.constexpr):
    """(first row, end row) of chunk slot c: c·C and T in a batch; in a packed batch (VARLEN) the chunk
    table's entries (delta_chunk.ChunkTable), the end being the sequence's: rows past it are masked exactly
    as a batch's rows past T. A padding slot is (total, total)."""
    if VARLEN:
        c0 = tl.load(CROW + c)
        tn = tl.load(CEND + c)
    else:
        c0 = c * CHUNK
        tn = T
    return c0, tn


@triton.jit
def _seq_span(CU, CO, pid, H, T, NT, CHUNK: tl.constexpr, VARLEN: tl.constexpr):
    """The sequential pass's program `pid` (of B·H, packed: of nseq·H): (its head's index into the row-major
    tensors, its sequence's first row, end row, first chunk slot, chunk count); packed batches have B = 1."""
    if VARLEN:
        seq = pid // H
        bh = pid % H
        row0 = tl.load(CU + seq)
        tn = tl.load(CU + seq + 1)
        cfirst = tl.load(CO + seq)
        nc = (tn - row0 + CHUNK - 1) // CHUNK
    else:
        bh = pid
        row0 = 0
        tn = T
        cfirst = 0
        nc = NT
    return bh, row0, tn, cfirst, nc


@triton.jit
def _last_row(c0, T, CHUNK: tl.constexpr):
    """The chunk-relative index of the chunk's last real token (padded tokens have g = 0: Γ_last is its Γ)."""
    return tl.minimum(T - c0, CHUNK) - 1


@triton.jit
def _gam_last(GC, srow, c0, T, offs_k, kmask, D, G_MODE: tl.constexpr, CHUNK: tl.constexpr):
    """Γ_last: a scalar (G_MODE 1), a [BK] vector (2), 0 (none)."""
    lr = c0 + _last_row(c0, T, CHUNK)
    if G_MODE == 1:
        gl = tl.load(GC + srow + lr)
    elif G_MODE == 2:
        gl = tl.load(GC + (srow + lr) * D + offs_k, mask=kmask, other=0.0)
    else:
        gl = 0.0
    return gl


@triton.jit
def _gam_chunk(GC, srow, c0, T, offs_c, offs_k, kmask, gl, D, G_MODE: tl.constexpr):
    """The chunk's Γ, [C] (G_MODE 1) or [C, BK] (2), padded rows set to Γ_last (their g is 0), so that every
    exponent the kernels take stays ≤ 0."""
    tm = c0 + offs_c < T
    if G_MODE == 1:
        gam = tl.where(tm, tl.load(GC + srow + c0 + offs_c, mask=tm, other=0.0), gl)
    elif G_MODE == 2:
        m = tm[:, None] & kmask[None, :]
        gam = tl.load(GC + (srow + c0 + offs_c[:, None]) * D + offs_k[None, :], mask=m, other=0.0)
        gam = tl.where(tm[:, None], gam, gl[None, :])
    else:
        gam = offs_c * 0.0
    return gam


@triton.jit
def _rows(P, rows, cols, c0, T, kmask, stride):
    """P[c0 + rows, cols] as float32 (rows, cols: broadcastable index tensors; rows past T read 0)."""
    return tl.load(P + (c0 + rows) * stride + cols, mask=(c0 + rows < T) & kmask, other=0.0).to(tl.float32)


@triton.jit
def _gam_at(GCb, rows, cols, c0, T, kmask, glast, D):
    """Γ[c0 + rows, cols] of a per-channel gate (GCb: the head's row 0), padded rows Γ_last."""
    return tl.where(c0 + rows < T, _rows(GCb, rows, cols, c0, T, kmask, D), glast)


@triton.jit
def _g2_mat(
    CM, Xb, Yb, GCb, c0, T, offs_c, D,
    STRICT: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """M_ij = ⟨x_i, y_j⟩_Γ = Σ_d x_i[d] y_j[d] e^{Γ_i[d] − Γ_j[d]} for j ≤ i (j < i if STRICT), else 0, stored to
    CM (the chunk's [C, C] scratch, row stride C). Xb, Yb, GCb: row 0 of x, y and Γ (row stride D); the sum
    over d runs in blocks of BK key channels (registers). Off-diagonal sub-blocks: with e the last row of key
    block b, (x_i e^{Γ_i − Γ_e}) · (y_j e^{Γ_e − Γ_j}) for i > e ≥ j, one [C, BK] x [BK, SUB] product per key
    block and D-block. Diagonal sub-blocks: elementwise, exact, all NS of them as one [NS, SUB, BK] tile."""
    NS: tl.constexpr = CHUNK // SUB
    offs_s = tl.arange(0, SUB)
    lr = c0 + _last_row(c0, T, CHUNK)
    for b in tl.static_range(NS - 1):
        e = (b + 1) * SUB - 1
        rb = b * SUB + offs_s
        m = tl.full((CHUNK, SUB), 0.0, tl.float32)
        for k0 in range(0, D, BK):
            offs_k = k0 + tl.arange(0, BK)
            kmask = offs_k < D
            glast = tl.load(GCb + lr * D + offs_k, mask=kmask, other=0.0)
            G = _gam_at(GCb, offs_c[:, None], offs_k[None, :], c0, T, kmask[None, :], glast[None, :], D)
            ge = _dsum(tl.where(offs_c[:, None] == e, G, 0.0), 0)
            Yt = _rows(Yb, rb[:, None], offs_k[None, :], c0, T, kmask[None, :], D)
            Gt = _gam_at(GCb, rb[:, None], offs_k[None, :], c0, T, kmask[None, :], glast[None, :], D)
            Yt = Yt * tl.exp(ge[None, :] - Gt)
            Xm = _rows(Xb, offs_c[:, None], offs_k[None, :], c0, T, kmask[None, :], D)
            Xm = Xm * tl.exp(tl.where(offs_c[:, None] > e, G - ge[None, :], float("-inf")))
            m += tl.dot(Xm, tl.trans(Yt), input_precision=DOT_PRECISION)
        tl.store(CM + offs_c[:, None] * CHUNK + rb[None, :], m)
    # the last key block's rows above the diagonal sub-block
    zl = (NS - 1) * SUB + offs_s
    zero = tl.full((CHUNK, SUB), 0.0, tl.float32)
    tl.store(CM + offs_c[:, None] * CHUNK + zl[None, :], zero, mask=offs_c[:, None] < (NS - 1) * SUB)
    # diagonal sub-blocks, all NS at once: [NS, SUB(i), SUB(j)]
    a2 = tl.arange(0, NS)[:, None]
    s3 = offs_s[None, :, None]
    r3 = tl.arange(0, NS)[:, None, None] * SUB + s3
    j3 = offs_s[None, None, :]
    acc = tl.full((NS, SUB, SUB), 0.0, tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < D
        glast = tl.load(GCb + lr * D + offs_k, mask=kmask, other=0.0)
        k3 = offs_k[None, None, :]
        X3 = _rows(Xb, r3, k3, c0, T, kmask[None, None, :], D)
        G3 = _gam_at(GCb, r3, k3, c0, T, kmask[None, None, :], glast[None, None, :], D)
        for jj in range(SUB):
            rj = a2 * SUB + jj
            yj = _rows(Yb, rj, offs_k[None, :], c0, T, kmask[None, :], D)
            gj = _gam_at(GCb, rj, offs_k[None, :], c0, T, kmask[None, :], glast[None, :], D)
            if STRICT:
                keep = s3 > jj
            else:
                keep = s3 >= jj
            m3 = _dsum(X3 * yj[:, None, :] * tl.exp(tl.where(keep, G3 - gj[:, None, :], float("-inf"))), 2)
            acc += tl.where(j3 == jj, m3[:, :, None], 0.0)
    tl.store(CM + r3 * CHUNK + tl.arange(0, NS)[:, None, None] * SUB + j3, acc)


@triton.jit
def _g2_dx(
    CM, G, Yb, GCb, glast, c0, T, offs_c, offs_k, kmask, D,
    CHUNK: tl.constexpr, SUB: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """∂f/∂x_i = Σ_j c_ij y_j e^{Γ_i − Γ_j} [C, BK] for f = Σ c_ij ⟨x_i, y_j⟩_Γ, c lower triangular in CM
    (scratch, [C, C]). Off-diagonal: per key block b (e its last row) a [C, SUB] x [SUB, BK] product of
    c's column block with y_j e^{Γ_e − Γ_j}, rows i > e scaled by e^{Γ_i − Γ_e}; diagonal exact."""
    NS: tl.constexpr = CHUNK // SUB
    BK: tl.constexpr = G.shape[1]
    offs_s = tl.arange(0, SUB)
    out = tl.full((CHUNK, BK), 0.0, tl.float32)
    for b in tl.static_range(NS - 1):
        e = (b + 1) * SUB - 1
        ge = _dsum(tl.where(offs_c[:, None] == e, G, 0.0), 0)
        rb = b * SUB + offs_s
        Yt = _rows(Yb, rb[:, None], offs_k[None, :], c0, T, kmask[None, :], D)
        Gt = _gam_at(GCb, rb[:, None], offs_k[None, :], c0, T, kmask[None, :], glast[None, :], D)
        Yt = Yt * tl.exp(ge[None, :] - Gt)
        below = offs_c[:, None] > e
        cb = tl.where(below, tl.load(CM + offs_c[:, None] * CHUNK + rb[None, :]), 0.0)
        out += tl.exp(tl.where(below, G - ge[None, :], float("-inf"))) * tl.dot(
            cb, Yt, input_precision=DOT_PRECISION
        )
    a2 = tl.arange(0, NS)[:, None]
    s3 = offs_s[None, :, None]
    G3 = tl.reshape(G, (NS, SUB, BK))
    acc = tl.full((NS, SUB, BK), 0.0, tl.float32)
    for jj in range(SUB):
        rj = a2 * SUB + jj
        yj = _rows(Yb, rj, offs_k[None, :], c0, T, kmask[None, :], D)
        gj = _gam_at(GCb, rj, offs_k[None, :], c0, T, kmask[None, :], glast[None, :], D)
        cj = tl.load(CM + (a2 * SUB + offs_s[None, :]) * CHUNK + rj)  # c[a·SUB + ii, a·SUB + jj]
        dec = tl.exp(tl.where(s3 >= jj, G3 - gj[:, None, :], float("-inf")))
        acc += cj[:, :, None] * yj[:, None, :] * dec
    return out + tl.reshape(acc, (CHUNK, BK))


@triton.jit
def _g2_dy(
    CM, G, Xb, GCb, glast, c0, T, offs_c, offs_k, kmask, D,
    CHUNK: tl.constexpr, SUB: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """∂f/∂y_j = Σ_i c_ij x_i e^{Γ_i − Γ_j} [C, BK] (as `_g2_dx`). Off-diagonal: per query block a (r its
    first row) the product of c's row block, transposed, with x_i e^{Γ_i − Γ_r}, rows j < r scaled by
    e^{Γ_r − Γ_j}; diagonal exact."""
    NS: tl.constexpr = CHUNK // SUB
    BK: tl.constexpr = G.shape[1]
    offs_s = tl.arange(0, SUB)
    out = tl.full((CHUNK, BK), 0.0, tl.float32)
    for a in tl.static_range(1, NS):
        r = a * SUB
        gr = _dsum(tl.where(offs_c[:, None] == r, G, 0.0), 0)
        ra = r + offs_s
        Xt = _rows(Xb, ra[:, None], offs_k[None, :], c0, T, kmask[None, :], D)
        Gt = _gam_at(GCb, ra[:, None], offs_k[None, :], c0, T, kmask[None, :], glast[None, :], D)
        Xt = Xt * tl.exp(Gt - gr[None, :])
        ca = tl.where(offs_c[None, :] < r, tl.load(CM + ra[:, None] * CHUNK + offs_c[None, :]), 0.0)
        above = offs_c[:, None] < r
        out += tl.exp(tl.where(above, gr[None, :] - G, float("-inf"))) * tl.dot(
            tl.trans(ca), Xt, input_precision=DOT_PRECISION
        )
    a2 = tl.arange(0, NS)[:, None]
    s3 = offs_s[None, :, None]
    G3 = tl.reshape(G, (NS, SUB, BK))
    acc = tl.full((NS, SUB, BK), 0.0, tl.float32)
    for ii in range(SUB):
        ri = a2 * SUB + ii
        xi = _rows(Xb, ri, offs_k[None, :], c0, T, kmask[None, :], D)
        gi = _gam_at(GCb, ri, offs_k[None, :], c0, T, kmask[None, :], glast[None, :], D)
        ci = tl.load(CM + ri * CHUNK + a2 * SUB + offs_s[None, :])  # c[a·SUB + ii, a·SUB + jj]
        dec = tl.exp(tl.where(s3 <= ii, gi[:, None, :] - G3, float("-inf")))
        acc += ci[:, :, None] * xi[:, None, :] * dec
    return out + tl.reshape(acc, (CHUNK, BK))


@triton.jit
def _decay(gam, offs_c, STRICT: tl.constexpr):
    """e^{Γ_i − Γ_j} for j ≤ i (j < i if STRICT), else 0, of a scalar gate."""
    if STRICT:
        keep = offs_c[:, None] > offs_c[None, :]
    else:
        keep = offs_c[:, None] >= offs_c[None, :]
    return tl.exp(tl.where(keep, gam[:, None] - gam[None, :], float("-inf")))


@triton.jit
def _delta_cbwd_intra_kernel(
    Q, K, V, U, GC, DO, PM, KM, DPM, DU, DGS, CROW, CEND,  # core_abi.DELTA_CBWD_INTRA
    T, H, NT, REP_Q, REP_K, REP_V, REP_B,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
    SUB: tl.constexpr, G_MODE: tl.constexpr, DELTA: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Per chunk (grid (NT, B·H)), independent of the recurrence:
        P_ij = ⟨q_i, k_j⟩_Γ (j ≤ i),  KK_ij = ⟨k_i, k_j⟩_Γ (j < i, DELTA),  dP = dO Uᵀ (j ≤ i),  dU_local = Pᵀ dO.
    KM ← KK and DPM ← dP (G_MODE 0 and 1: with the decay e^{Γ_i − Γ_j} folded in, since their dq and dk are
    then plain products), PM ← P (G_MODE 2 only, as the off-diagonal/diagonal sub-block scheme builds it);
    DU ← Pᵀ dO (the sequential pass adds the state part); scalar gates: DGS ← ∂/∂Γ_i through P,
    Σ_j (dP ⊙ P)_ij − Σ_j (dP ⊙ P)_ji (the decay's derivative, independent of D).
    Shapes: PM/KM/DPM [B·H, NT·C, C] fp32, DU [B, H, T, E] fp32, DGS [B, H, T] fp32."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    c0, tn = _chunk_span(CROW, CEND, c, T, CHUNK, VARLEN)
    if VARLEN:  # a packed batch's padding slot (a batch has none: no test in its code)
        if c0 >= tn:
            return
    cs = c * CHUNK  # the chunk's rows of the per-slot scratch (PM, KM, DPM)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    tm = c0 + offs_c < tn
    srow = bh.to(tl.int64) * T  # state-head rows (GC, DO, U, DU)
    rq = _head_row(bh, H, REP_Q, T)
    rk = _head_row(bh, H, REP_K, T)
    rv = _head_row(bh, H, REP_V, T)
    cm = (bh.to(tl.int64) * NT * CHUNK + cs + offs_c[:, None]) * CHUNK + offs_c[None, :]
    kd = tm[:, None] & dmask[None, :]
    if G_MODE == 2:
        PMc = PM + (bh.to(tl.int64) * NT * CHUNK + cs) * CHUNK
        GCb = GC + srow * D
        _g2_mat(
            PMc, Q + rq * D, K + rk * D, GCb, c0, tn, offs_c, D, False, CHUNK, SUB, BLOCK_D, DOT_PRECISION
        )
        if DELTA:
            KMc = KM + (bh.to(tl.int64) * NT * CHUNK + cs) * CHUNK
            _g2_mat(
                KMc, K + rk * D, K + rk * D, GCb, c0, tn, offs_c, D, True, CHUNK, SUB, BLOCK_D, DOT_PRECISION
            )
        tl.debug_barrier()
        P = tl.load(PM + cm)
    else:
        # products of two input tiles in the input dtype (fp32 accumulation)
        Qn = tl.load(Q + (rq + c0 + offs_c[:, None]) * D + offs_d[None, :], mask=kd, other=0.0)
        Kn = tl.load(K + (rk + c0 + offs_c[:, None]) * D + offs_d[None, :], mask=kd, other=0.0)
        dec = offs_c[:, None] * 0.0 + 1.0
        if G_MODE == 1:
            gl = _gam_last(GC, srow, c0, tn, offs_d, dmask, D, G_MODE, CHUNK)
            gam = _gam_chunk(GC, srow, c0, tn, offs_c, offs_d, dmask, gl, D, G_MODE)
            dec = _decay(gam, offs_c, False)
        P = tl.where(offs_c[:, None] >= offs_c[None, :], tl.dot(Qn, tl.trans(Kn)) * dec, 0.0)
        if DELTA:
            KK = tl.where(offs_c[:, None] > offs_c[None, :], tl.dot(Kn, tl.trans(Kn)) * dec, 0.0)
            tl.store(KM + cm, KK)
    dP = tl.full((CHUNK, CHUNK), 0.0, tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        ve = tm[:, None] & (offs_e < E)[None, :]
        dO = tl.load(DO + (srow + c0 + offs_c[:, None]) * E + offs_e[None, :], mask=ve, other=0.0)
        dO = dO.to(tl.float32)
        if DELTA:
            Ub = tl.load(U + (srow + c0 + offs_c[:, None]) * E + offs_e[None, :], mask=ve, other=0.0)
        else:
            Ub = tl.load(V + (rv + c0 + offs_c[:, None]) * E + offs_e[None, :], mask=ve, other=0.0)
        dP += tl.dot(dO, tl.trans(Ub.to(tl.float32)), input_precision=DOT_PRECISION)
        dUl = tl.dot(tl.trans(P), dO, input_precision=DOT_PRECISION)
        tl.store(DU + (srow + c0 + offs_c[:, None]) * E + offs_e[None, :], dUl, mask=ve)
    dP = tl.where(offs_c[:, None] >= offs_c[None, :], dP, 0.0)
    if G_MODE == 1:
        pp = dP * P
        tl.store(DGS + srow + c0 + offs_c, _dsum(pp, 1) - _dsum(pp, 0), mask=tm)
        dP = dP * dec
    elif G_MODE == 0:
        dP = dP * dec
    tl.store(DPM + cm, dP)


@triton.jit
def _delta_cbwd_dstate_kernel(
    Q, K, W, GC, DO, DSN, DU, DHS, DS0, CU, CO,  # core_abi.DELTA_CBWD_DSTATE
    T, H, NT, REP_Q, REP_K, REP_V, REP_B,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
    SUB: tl.constexpr, G_MODE: tl.constexpr, DELTA: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DSN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The one sequential pass (grid (E-blocks, B·H)), last chunk first, dS = ∂L/∂S' of the chunk (dS of the
    last chunk = DSN or 0). Per chunk: DHS[c] ← dS; DU ← DU + (K ⊙ e^{Γ_last − Γ}) dSᵀ (= dU, complete);
    dS ← dS Diag(e^{Γ_last}) + dOᵀ (Q ⊙ e^Γ) − [DELTA] dUᵀ W. After chunk 0, DS0 ← dS (∂L/∂S_0).
    Each state row (value channel) is independent, so E splits over programs; D stays whole (the
    contractions over key channels need every column). DHS [B, H, NT, E, D], DSN/DS0 [B, H, E, D]."""
    pid_e = tl.program_id(0)
    pid = tl.program_id(1)
    bh, row0, tn, cfirst, nc = _seq_span(CU, CO, pid, H, T, NT, CHUNK, VARLEN)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    dmask = offs_d < D
    emask = offs_e < E
    s_off = offs_e[:, None] * D + offs_d[None, :]
    s_msk = emask[:, None] & dmask[None, :]
    srow = bh.to(tl.int64) * T
    rq = _head_row(bh, H, REP_Q, T)
    rk = _head_row(bh, H, REP_K, T)
    if HAS_DSN:
        dS = tl.load(DSN + pid.to(tl.int64) * E * D + s_off, mask=s_msk, other=0.0).to(tl.float32)
    else:
        dS = tl.full((BLOCK_E, BLOCK_D), 0.0, tl.float32)
    for ci in range(0, nc):
        i = nc - 1 - ci
        c = cfirst + i
        c0 = row0 + i * CHUNK
        tm = c0 + offs_c < tn
        kd = tm[:, None] & dmask[None, :]
        ve = tm[:, None] & emask[None, :]
        tl.store(DHS + (bh.to(tl.int64) * NT + c) * E * D + s_off, dS, mask=s_msk)
        Kc = tl.load(K + (rk + c0 + offs_c[:, None]) * D + offs_d[None, :], mask=kd, other=0.0).to(tl.float32)
        gl = _gam_last(GC, srow, c0, tn, offs_d, dmask, D, G_MODE, CHUNK)
        gam = _gam_chunk(GC, srow, c0, tn, offs_c, offs_d, dmask, gl, D, G_MODE)
        if G_MODE == 1:
            Kc = Kc * tl.exp(gl - gam)[:, None]
        elif G_MODE == 2:
            Kc = Kc * tl.exp(gl[None, :] - gam)
        du_ptr = DU + (srow + c0 + offs_c[:, None]) * E + offs_e[None, :]
        dU = tl.load(du_ptr, mask=ve, other=0.0) + tl.dot(Kc, tl.trans(dS), input_precision=DOT_PRECISION)
        tl.store(du_ptr, dU, mask=ve)
        Qc = tl.load(Q + (rq + c0 + offs_c[:, None]) * D + offs_d[None, :], mask=kd, other=0.0).to(tl.float32)
        if G_MODE == 1:
            Qc = Qc * tl.exp(gam)[:, None]
            dS = dS * tl.exp(gl)
        elif G_MODE == 2:
            Qc = Qc * tl.exp(gam)
            dS = dS * tl.exp(gl)[None, :]
        dO = tl.load(DO + (srow + c0 + offs_c[:, None]) * E + offs_e[None, :], mask=ve, other=0.0)
        dS += tl.dot(tl.trans(dO.to(tl.float32)), Qc, input_precision=DOT_PRECISION)
        if DELTA:
            Wc = tl.load(W + (srow + c0 + offs_c[:, None]) * D + offs_d[None, :], mask=kd, other=0.0)
            dS -= tl.dot(tl.trans(dU), Wc, input_precision=DOT_PRECISION)
    tl.store(DS0 + pid.to(tl.int64) * E * D + s_off, dS, mask=s_msk)


@triton.jit
def _delta_cbwd_dqkw_kernel(
    Q, K, V, U, GC, HS, DO, DU, DHS, DPM, DQ, DK, DW, DGK, CROW, CEND,  # core_abi.DELTA_CBWD_DQKW
    T, H, NT, REP_Q, REP_K, REP_V, REP_B,
    D: tl.constexpr, E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
    SUB: tl.constexpr, G_MODE: tl.constexpr, DELTA: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Per (D-block, chunk, head), from S = HS[c], dS' = DHS[c], dU, dP (all contractions over E loop over
    E-blocks; r = e^{Γ_last − Γ}):
        dq = e^Γ ⊙ (dO S) + ∂/∂q of Σ dP_ij ⟨q_i, k_j⟩_Γ
        dk = r ⊙ (U dS') + ∂/∂k of the same        (the WY part is added by `_delta_cbwd_wy_kernel`)
        dW = −dU S                                  (DELTA)
        dΓ_i = (q ⊙ e^Γ ⊙ dO S)_i − (k ⊙ r ⊙ U dS')_i + q_i ⊙ dq^P_i − k_i ⊙ dk^P_i, and at the last real row
               dΓ_last += Σ_i (k ⊙ r ⊙ U dS')_i + e^{Γ_last} ⊙ Σ_e S ⊙ dS'   (Σ over d for a scalar gate)
    (design doc: ∂f/∂Γ_i = x_i ⊙ ∂f/∂x_i − y_i ⊙ ∂f/∂y_i). The scalar gate's P term is DGS (intra kernel).
    DQ/DK/DW [B, H, T, D]; DGK [B, H, T, D] (G_MODE 2) or per D-block partials [NK, B, H, T] (G_MODE 1)."""
    pid_k = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2)
    c0, tn = _chunk_span(CROW, CEND, c, T, CHUNK, VARLEN)
    if VARLEN:  # a packed batch's padding slot (a batch has none: no test in its code)
        if c0 >= tn:
            return
    cs = c * CHUNK  # the chunk's rows of the per-slot scratch (PM, KM, DPM)
    offs_c = tl.arange(0, CHUNK)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < D
    tm = c0 + offs_c < tn
    kd = tm[:, None] & kmask[None, :]
    srow = bh.to(tl.int64) * T
    rq = _head_row(bh, H, REP_Q, T)
    rk = _head_row(bh, H, REP_K, T)
    rv = _head_row(bh, H, REP_V, T)
    st = (bh.to(tl.int64) * NT + c) * E * D
    dQs = tl.full((CHUNK, BLOCK_K), 0.0, tl.float32)
    dKr = tl.full((CHUNK, BLOCK_K), 0.0, tl.float32)
    dW = tl.full((CHUNK, BLOCK_K), 0.0, tl.float32)
    sds = tl.full((BLOCK_K,), 0.0, tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < E
        ve = tm[:, None] & emask[None, :]
        s_off = offs_e[:, None] * D + offs_k[None, :]
        s_msk = emask[:, None] & kmask[None, :]
        S = tl.load(HS + st + s_off, mask=s_msk, other=0.0)
        dSn = tl.load(DHS + st + s_off, mask=s_msk, other=0.0)
        tok = (srow + c0 + offs_c[:, None]) * E + offs_e[None, :]
        dO = tl.load(DO + tok, mask=ve, other=0.0).to(tl.float32)
        if DELTA:
            Ub = tl.load(U + tok, mask=ve, other=0.0)
            dU = tl.load(DU + tok, mask=ve, other=0.0)
            dW -= tl.dot(dU, S, input_precision=DOT_PRECISION)
        else:
            Ub = tl.load(V + (rv + c0 + offs_c[:, None]) * E + offs_e[None, :], mask=ve, other=0.0)
        dQs += tl.dot(dO, S, input_precision=DOT_PRECISION)
        dKr += tl.dot(Ub.to(tl.float32), dSn, input_precision=DOT_PRECISION)
        if G_MODE != 0:
            sds += _dsum(S * dSn, 0)
    lr = _last_row(c0, tn, CHUNK)
    tok = (srow + c0 + offs_c[:, None]) * D + offs_k[None, :]
    if DELTA:
        tl.store(DW + tok, dW, mask=kd)  # stored first: one [C, BK] tile fewer live below
    if G_MODE == 2:
        # ordered so that few [C, BK] tiles are live at once (register pressure on sm_90)
        gl = _gam_last(GC, srow, c0, tn, offs_k, kmask, D, G_MODE, CHUNK)
        gam = _gam_chunk(GC, srow, c0, tn, offs_c, offs_k, kmask, gl, D, G_MODE)
        DPMc = DPM + (bh.to(tl.int64) * NT * CHUNK + cs) * CHUNK
        GCb = GC + srow * D
        dq = tl.exp(gam) * dQs
        dqP = _g2_dx(
            DPMc, gam, K + rk * D, GCb, gl, c0, tn, offs_c, offs_k, kmask, D, CHUNK, SUB, DOT_PRECISION
        )
        dq += dqP
        Qc = tl.load(Q + (rq + c0 + offs_c[:, None]) * D + offs_k[None, :], mask=kd, other=0.0).to(tl.float32)
        dgam = Qc * dq
        tl.store(DQ + tok, dq, mask=kd)
        dkP = _g2_dy(
            DPMc, gam, Q + rq * D, GCb, gl, c0, tn, offs_c, offs_k, kmask, D, CHUNK, SUB, DOT_PRECISION
        )
        Kc = tl.load(K + (rk + c0 + offs_c[:, None]) * D + offs_k[None, :], mask=kd, other=0.0).to(tl.float32)
        dk = tl.exp(gl[None, :] - gam) * dKr
        kr = Kc * dk
        dgam -= Kc * dkP + kr
        dgam += tl.where(offs_c[:, None] == lr, _dsum(kr, 0)[None, :] + (tl.exp(gl) * sds)[None, :], 0.0)
        tl.store(DGK + tok, dgam, mask=kd)
        tl.store(DK + tok, dk + dkP, mask=kd)
    else:
        cm = (bh.to(tl.int64) * NT * CHUNK + cs + offs_c[:, None]) * CHUNK + offs_c[None, :]
        dPd = tl.load(DPM + cm)  # dP ⊙ decay
        Qc = tl.load(Q + (rq + c0 + offs_c[:, None]) * D + offs_k[None, :], mask=kd, other=0.0).to(tl.float32)
        Kc = tl.load(K + (rk + c0 + offs_c[:, None]) * D + offs_k[None, :], mask=kd, other=0.0).to(tl.float32)
        dq = dQs
        dk = dKr
        if G_MODE == 1:
            gl = _gam_last(GC, srow, c0, tn, offs_k, kmask, D, G_MODE, CHUNK)
            gam = _gam_chunk(GC, srow, c0, tn, offs_c, offs_k, kmask, gl, D, G_MODE)
            dq = dq * tl.exp(gam)[:, None]
            dk = dk * tl.exp(gl - gam)[:, None]
            kr = _dsum(Kc * dk, 1)
            dgam = (
                _dsum(Qc * dq, 1)
                - kr
                + tl.where(offs_c == lr, _dsum(kr, 0) + tl.exp(gl) * _dsum(sds, 0), 0.0)
            )
            tl.store(DGK + (pid_k * tl.num_programs(2) + bh).to(tl.int64) * T + c0 + offs_c, dgam, mask=tm)
        dq += tl.dot(dPd, Kc, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(dPd), Qc, input_precision=DOT_PRECISION)
        tl.store(DQ + tok, dq, mask=kd)
        tl.store(DK + tok, dk, mask=kd)


@triton.jit
def _delta_cbwd_wy_kernel(
    K, V, BETA, GC, AI, DU, DW, KM, PM, DK, DGK, DGS, DV, DBETA, DG, CROW, CEND,  # core_abi.DELTA_CBWD_WY
    T, H, NT, NK, REP_Q, REP_K, REP_V, REP_B,
    D: tl.constexpr, E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
    SUB: tl.constexpr, G_MODE: tl.constexpr, DELTA: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Per chunk (grid (NT, B·H)), the WY backward (Yang et al. 2024 §3 and its backward appendix; X = Tinv):
        W = X diag(β) (K ⊙ e^Γ), Ũ = X diag(β) V (dŨ = dU):
            dX = dW (β K ⊙ e^Γ)ᵀ + dU (β V)ᵀ,  d(βV) = Xᵀ dU,  d(β K ⊙ e^Γ) = Xᵀ dW
        X = (I + A)⁻¹:  dA = −Xᵀ dX Xᵀ on the strict lower triangle
        A_ij = β_i ⟨k_i, k_j⟩_Γ:  dβ_i += Σ_j dA_ij KK_ij;  c = diag(β) dA gives dk and dΓ as a decayed product
    then dg = Σ_{i ≥ j} dΓ_i within the chunk (with the dqkw kernel's and, for a scalar gate, the intra
    kernel's dΓ terms). Writes DK (completing the dqkw kernel's part, in place), DV [B, H, T, E], DBETA
    [B, H, T], DG [B, H, T(, D)]. Without DELTA only dg."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    c0, tn = _chunk_span(CROW, CEND, c, T, CHUNK, VARLEN)
    if VARLEN:  # a packed batch's padding slot (a batch has none: no test in its code)
        if c0 >= tn:
            return
    cs = c * CHUNK  # the chunk's rows of the per-slot scratch (PM, KM, DPM)
    offs_c = tl.arange(0, CHUNK)
    tm = c0 + offs_c < tn
    srow = bh.to(tl.int64) * T
    rk = _head_row(bh, H, REP_K, T)
    rv = _head_row(bh, H, REP_V, T)
    rb = _head_row(bh, H, REP_B, T)
    cm = (bh.to(tl.int64) * NT * CHUNK + cs + offs_c[:, None]) * CHUNK + offs_c[None, :]
    dgam1 = offs_c * 0.0  # a scalar gate's dΓ, [C]
    if G_MODE == 1:
        gl = _gam_last(GC, srow, c0, tn, offs_c, tm, D, G_MODE, CHUNK)
        gam1 = _gam_chunk(GC, srow, c0, tn, offs_c, offs_c, tm, gl, D, G_MODE)
        dgam1 += tl.load(DGS + srow + c0 + offs_c, mask=tm, other=0.0)
        for kb in range(0, NK):
            dgam1 += tl.load(
                DGK + (kb * tl.num_programs(1) + bh).to(tl.int64) * T + c0 + offs_c, mask=tm, other=0.0
            )
    if DELTA:
        beta = tl.load(BETA + rb + c0 + offs_c, mask=tm, other=0.0).to(tl.float32)
        X = tl.load(AI + (srow + c0 + offs_c[:, None]) * CHUNK + offs_c[None, :], mask=tm[:, None], other=0.0)
        dX = tl.full((CHUNK, CHUNK), 0.0, tl.float32)
        dbeta = tl.full((CHUNK,), 0.0, tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            ve = tm[:, None] & (offs_e < E)[None, :]
            tok = (srow + c0 + offs_c[:, None]) * E + offs_e[None, :]
            dU = tl.load(DU + tok, mask=ve, other=0.0)
            Vb = tl.load(V + (rv + c0 + offs_c[:, None]) * E + offs_e[None, :], mask=ve, other=0.0).to(
                tl.float32
            )
            dX += tl.dot(dU, tl.trans(beta[:, None] * Vb), input_precision=DOT_PRECISION)
            dVb = tl.dot(tl.trans(X), dU, input_precision=DOT_PRECISION)
            tl.store(DV + tok, beta[:, None] * dVb, mask=ve)
            dbeta += _dsum(Vb * dVb, 1)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < D
            kd = tm[:, None] & kmask[None, :]
            tok = (srow + c0 + offs_c[:, None]) * D + offs_k[None, :]
            Kb = tl.load(K + (rk + c0 + offs_c[:, None]) * D + offs_k[None, :], mask=kd, other=0.0).to(
                tl.float32
            )
            if G_MODE == 1:
                Kb = Kb * tl.exp(gam1)[:, None]
            elif G_MODE == 2:
                gl2 = _gam_last(GC, srow, c0, tn, offs_k, kmask, D, G_MODE, CHUNK)
                Kb = Kb * tl.exp(_gam_chunk(GC, srow, c0, tn, offs_c, offs_k, kmask, gl2, D, G_MODE))
            dWb = tl.load(DW + tok, mask=kd, other=0.0)
            dX += tl.dot(dWb, tl.trans(beta[:, None] * Kb), input_precision=DOT_PRECISION)
        lower = offs_c[:, None] > offs_c[None, :]
        dA = tl.dot(dX, tl.trans(X), input_precision=DOT_PRECISION)
        dA = -tl.dot(tl.trans(X), dA, input_precision=DOT_PRECISION)
        dA = tl.where(lower, dA, 0.0)
        KK = tl.load(KM + cm)  # G_MODE 0/1: with the decay folded in
        dbeta += _dsum(dA * KK, 1)
        cA = dA * beta[:, None]
        if G_MODE == 1:
            ck = cA * KK
            dgam1 += _dsum(ck, 1) - _dsum(ck, 0)
            cA = cA * _decay(gam1, offs_c, True)
        if G_MODE == 2:
            tl.store(PM + cm, cA)
            tl.debug_barrier()
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < D
            kd = tm[:, None] & kmask[None, :]
            tok = (srow + c0 + offs_c[:, None]) * D + offs_k[None, :]
            Kc = tl.load(K + (rk + c0 + offs_c[:, None]) * D + offs_k[None, :], mask=kd, other=0.0).to(
                tl.float32
            )
            dWb = tl.load(DW + tok, mask=kd, other=0.0)
            dKb = tl.dot(tl.trans(X), dWb, input_precision=DOT_PRECISION)  # ∂/∂(β K ⊙ e^Γ)
            dk = tl.load(DK + tok, mask=kd, other=0.0)
            if G_MODE == 2:
                gl2 = _gam_last(GC, srow, c0, tn, offs_k, kmask, D, G_MODE, CHUNK)
                gam = _gam_chunk(GC, srow, c0, tn, offs_c, offs_k, kmask, gl2, D, G_MODE)
                keg = Kc * tl.exp(gam) * dKb
                dk += beta[:, None] * tl.exp(gam) * dKb
                dgam = tl.load(DGK + tok, mask=kd, other=0.0) + beta[:, None] * keg
                PMc = PM + (bh.to(tl.int64) * NT * CHUNK + cs) * CHUNK
                GCb = GC + srow * D
                kb_ = K + rk * D
                dx = _g2_dx(
                    PMc, gam, kb_, GCb, gl2, c0, tn, offs_c, offs_k, kmask, D, CHUNK, SUB, DOT_PRECISION
                )
                dk += dx
                dgam += Kc * dx
                dy = _g2_dy(
                    PMc, gam, kb_, GCb, gl2, c0, tn, offs_c, offs_k, kmask, D, CHUNK, SUB, DOT_PRECISION
                )
                dk += dy
                dgam -= Kc * dy
                tl.store(DG + tok, _rev_cumsum(dgam), mask=kd)
            else:
                if G_MODE == 1:
                    keg = Kc * tl.exp(gam1)[:, None] * dKb
                    dk += (beta * tl.exp(gam1))[:, None] * dKb
                    dgam1 += beta * _dsum(keg, 1)
                else:
                    keg = Kc * dKb
                    dk += beta[:, None] * dKb
                dk += tl.dot(cA, Kc, input_precision=DOT_PRECISION)
                dk += tl.dot(tl.trans(cA), Kc, input_precision=DOT_PRECISION)
            dbeta += _dsum(keg, 1)
            tl.store(DK + tok, dk, mask=kd)
        tl.store(DBETA + srow + c0 + offs_c, dbeta, mask=tm)
    elif G_MODE == 2:
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kd = tm[:, None] & (offs_k < D)[None, :]
            tok = (srow + c0 + offs_c[:, None]) * D + offs_k[None, :]
            tl.store(DG + tok, _rev_cumsum(tl.load(DGK + tok, mask=kd, other=0.0)), mask=kd)
    if G_MODE == 1:
        tl.store(DG + srow + c0 + offs_c, _rev_cumsum1(dgam1), mask=tm)
