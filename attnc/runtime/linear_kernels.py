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
def _lin_head(base, head, N, W):
    """Where head `head`'s N rows of W elements start in a [heads, N, W] tensor (int64: large tensors)."""
    return base + head.to(tl.int64) * N * W


@triton.jit
def _lin_put_rows(base, rows, cols, rmask, cmask, width, x):
    """Stores x as the [rows, cols] tile of a row-major matrix `width` wide at `base` (as `_lin_rows` reads
    it)."""
    tl.store(base + rows[:, None] * width + cols[None, :], x, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _lin_block(pid, BLOCK: tl.constexpr, n):
    """The offsets of block `pid` along an axis of length n cut into BLOCK-wide blocks, and their mask."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _lin_state_block(pid_k, pid_v, D, E, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """This program's [BLOCK_K, BLOCK_V] block of a row-major [D, E] state: its key and value offsets, their
    masks, and the block's offsets and mask in the state."""
    offs_k, kmask = _lin_block(pid_k, BLOCK_K, D)
    offs_v, vmask = _lin_block(pid_v, BLOCK_V, E)
    s_off = offs_k[:, None] * E + offs_v[None, :]
    s_msk = kmask[:, None] & vmask[None, :]
    return offs_k, offs_v, kmask, vmask, s_off, s_msk


@triton.jit
def _lin_state_in(S0, Z0, bh, s_off, s_msk, z_off, z_msk, D, E, HAS_S0: tl.constexpr):
    """The state block and its normaliser z that a pass starts from: head bh's of S0 [heads, D, E] and
    Z0 [heads, D] (z_off/z_msk: the key offsets shaped as the caller carries z), or zeros."""
    if HAS_S0:
        S = tl.load(S0 + bh.to(tl.int64) * D * E + s_off, mask=s_msk, other=0.0).to(tl.float32)
        z = tl.load(Z0 + bh.to(tl.int64) * D + z_off, mask=z_msk, other=0.0).to(tl.float32)
    else:
        S = tl.full(s_off.shape, 0.0, tl.float32)
        z = tl.full(z_off.shape, 0.0, tl.float32)
    return S, z


@triton.jit
def _lin_state_out(HS, ZS, S, z, s_off, s_msk, z_off, z_msk, pid_v, NORM_SUM: tl.constexpr):
    """Stores a state block at HS and its normaliser at ZS; z does not depend on the E-block, so only the
    programs of the first E-block write it."""
    tl.store(HS + s_off, S, mask=s_msk)
    if NORM_SUM:
        tl.store(ZS + z_off, z, mask=z_msk & (z_off * 0 + pid_v == 0))


@triton.jit
def _lin_state_scan(
    X, Y, ZW, GL, GS, S0, Z0, HS, ZS, hx, hy, N, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REVERSE: tl.constexpr,
):  # fmt: skip
    """The sequential pass of both directions, per (D-block, E-block, head): before it takes in chunk c it
    stores the carried state at HS[bh, c] (what is left after the last chunk: at HS[bh, NC]); chunk c adds

        S ← e^{GS_c} S + Σ_t w_t x_tᵀ y_t,   z ← e^{GS_c} z + Σ_t w_t x_t (times ZW_t in the reverse pass)

    with x = X[hx], y = Y[hy] ([N, D] and [N, E] rows). Forward (the state): x = k~, y = v,
    w_t = e^{GS_c − GL_t}, chunks first to last; REVERSE (dS): x = q~, y = do, w_t = e^{GL_t}, ZW = dden,
    chunks last to first."""
    pid_v = tl.program_id(1)
    bh = tl.program_id(2)
    offs_k, offs_v, kmask, vmask, s_off, s_msk = _lin_state_block(
        tl.program_id(0), pid_v, D, E, BLOCK_K, BLOCK_V
    )
    z_off = offs_k[None, :]  # z is a row [1, BLOCK_K]: what a column sum of a chunk tile gives
    z_msk = kmask[None, :]
    S, z = _lin_state_in(S0, Z0, bh, s_off, s_msk, z_off, z_msk, D, E, HAS_S0)
    offs_c = tl.arange(0, CHUNK)
    hs_base = HS + bh.to(tl.int64) * (NC + 1) * D * E
    zs_base = ZS + bh.to(tl.int64) * (NC + 1) * D
    for i in range(0, NC):
        c = NC - 1 - i if REVERSE else i
        _lin_state_out(
            hs_base + c * D * E, zs_base + c * D, S, z, s_off, s_msk, z_off, z_msk, pid_v, NORM_SUM
        )
        t = c * CHUNK + offs_c
        tmask = t < N
        x = _lin_rows(_lin_head(X, hx, N, D), t, offs_k, tmask, kmask, D)
        y = _lin_rows(_lin_head(Y, hy, N, E), t, offs_v, tmask, vmask, E)
        w = x.to(tl.float32)
        if HAS_DECAY:
            gl = _lin_percol(_lin_head(GL, bh, N, 1), t, tmask)
            gs = tl.load(GS + bh.to(tl.int64) * NC + c)
            w = w * tl.exp(gl if REVERSE else gs - gl)
            S = S * tl.exp(gs)
            z = z * tl.exp(gs)
        S += tl.dot(tl.trans(w.to(x.dtype)), y.to(x.dtype), input_precision=DOT_PRECISION)
        if NORM_SUM:
            if REVERSE:
                w = w * _lin_percol(_lin_head(ZW, bh, N, 1), t, tmask)
            z += _lin_colsum(w)
    _lin_state_out(hs_base + NC * D * E, zs_base + NC * D, S, z, s_off, s_msk, z_off, z_msk, pid_v, NORM_SUM)


@triton.jit
def _lin_chunk_program(
    C_AXIS: tl.constexpr, N, NC, REP_K, REP_V, D,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    """What a per-chunk program works on: its head bh (grid axis C_AXIS + 1; its chunk c: axis C_AXIS), the
    key and value heads bh reads (GQA groups of REP_K / REP_V), the chunk's positions t and their mask, the
    offsets over the whole key dimension and their mask, and the index of the state it reads in a
    [heads, NC + 1, ...] stack: the one entering the chunk (causal) or the final one (bidirectional: every
    chunk sees all keys)."""
    c = tl.program_id(C_AXIS)
    bh = tl.program_id(C_AXIS + 1)
    bk = bh // REP_K
    bv = bh // REP_V
    offs_d = tl.arange(0, BLOCK_D)
    t = c * CHUNK + tl.arange(0, CHUNK)
    tmask = t < N
    dmask = offs_d < D
    slot = bh.to(tl.int64) * (NC + 1) + (c if CAUSAL else NC)
    return bh, bk, bv, t, tmask, offs_d, dmask, slot


@triton.jit
def _lin_intra(a, t, tmask, g, gi, HAS_DECAY: tl.constexpr):
    """a [C, C] (rows: queries i, columns: keys j of one chunk) kept where j <= i and, with a decay,
    weighted by e^{G_i − G_j} (gi: the column G_i, g: where G's row for this head starts). Padded rows are
    dropped: their e^{+G} could overflow."""
    keep = (t[None, :] <= t[:, None]) & tmask[:, None]
    if HAS_DECAY:
        a = a * tl.exp(tl.where(keep, gi - _lin_perrow(g, t, tmask), float("-inf")))
    else:
        a = tl.where(keep, a, 0.0)
    return a


@triton.jit
def _lin_fwd_state_kernel(
    KT, V, GL, GS,  # core_abi.LIN_FWD_STATE; the scan's x, y and decays,
    S0, Z0,  # the state it starts from,
    HS, ZS,  # the states it stores
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """HS[bh, c] = the state entering chunk c (c = 0..NC-1); HS[bh, NC] = the final state."""
    bh = tl.program_id(2)
    _lin_state_scan(
        KT, V, V, GL, GS, S0, Z0, HS, ZS, bh // REP_K, bh // REP_V, N, NC,
        D, E, CHUNK, BLOCK_K, BLOCK_V, HAS_DECAY, HAS_S0, NORM_SUM, DOT_PRECISION, REVERSE=False,
    )  # fmt: skip


@triton.jit
def _lin_fwd_out_kernel(
    QT, KT, V, GL, HS, ZS, OUT, DEN,  # core_abi.LIN_FWD_OUT
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One chunk's output: exact masked attention inside the chunk plus the state entering it."""
    pid_v = tl.program_id(0)
    bh, bk, bv, t, tmask, offs_d, dmask, slot = _lin_chunk_program(
        1, N, NC, REP_K, REP_V, D, CHUNK, BLOCK_D, CAUSAL
    )
    offs_v, vmask = _lin_block(pid_v, BLOCK_V, E)
    q = _lin_rows(_lin_head(QT, bh, N, D), t, offs_d, tmask, dmask, D)
    h = _lin_rows(HS + slot * D * E, offs_d, offs_v, dmask, vmask, E)
    qd = q.to(tl.float32)
    gi = 0.0  # G_i, read only with a decay
    if HAS_DECAY:
        gi = _lin_percol(_lin_head(GL, bh, N, 1), t, tmask)
        qd = qd * tl.exp(gi)
    o = tl.dot(qd.to(q.dtype), h.to(q.dtype), input_precision=DOT_PRECISION)
    if NORM_SUM:
        den = _lin_rowsum(qd * _lin_perrow(ZS + slot * D, offs_d, dmask))
    if CAUSAL:
        kt = _lin_cols(_lin_head(KT, bk, N, D), t, offs_d, tmask, dmask, D)
        a = tl.dot(q, kt, input_precision=DOT_PRECISION)
        a = _lin_intra(a, t, tmask, _lin_head(GL, bh, N, 1), gi, HAS_DECAY)
        v = _lin_rows(_lin_head(V, bv, N, E), t, offs_v, tmask, vmask, E)
        o += tl.dot(a.to(v.dtype), v, input_precision=DOT_PRECISION)
        if NORM_SUM:
            den += _lin_rowsum(a)
    _lin_put_rows(_lin_head(OUT, bh, N, E), t, offs_v, tmask, vmask, E, o)
    if NORM_SUM:
        tl.store(
            DEN + bh.to(tl.int64) * N + t[:, None], den, mask=tmask[:, None] & (t[:, None] * 0 + pid_v == 0)
        )


@triton.jit
def _lin_bwd_dstate_kernel(
    QT, DO, DDEN, GL, GS,  # core_abi.LIN_BWD_DSTATE; the scan's x, y, z weights and decays,
    DSO, DZO,  # the state it starts from,
    DHS, DZS,  # the states it stores
    N, NH, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_DSO: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Reverse pass: DHS[bh, c] = dL/dS for the state after chunk c; DHS[bh, NC] = dL/dS_in."""
    bh = tl.program_id(2)
    _lin_state_scan(
        QT, DO, DDEN, GL, GS, DSO, DZO, DHS, DZS, bh, bh, N, NC,
        D, E, CHUNK, BLOCK_K, BLOCK_V, HAS_DECAY, HAS_DSO, NORM_SUM, DOT_PRECISION, REVERSE=True,
    )  # fmt: skip


@triton.jit
def _lin_bwd_dq_kernel(
    QT, KT, V, DO, DDEN, GL, HS, ZS, DQ,  # core_abi.LIN_BWD_DQ
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dq~ for one chunk: through the carried state and through the chunk's own keys (E in blocks)."""
    bh, bk, bv, t, tmask, offs_d, dmask, slot = _lin_chunk_program(
        0, N, NC, REP_K, REP_V, D, CHUNK, BLOCK_D, CAUSAL
    )
    ty = QT.dtype.element_ty
    dq = tl.full([CHUNK, BLOCK_D], 0.0, tl.float32)
    dw = tl.full([CHUNK, CHUNK], 0.0, tl.float32)
    for e0 in range(0, E, BLOCK_V):
        offs_e = e0 + tl.arange(0, BLOCK_V)
        emask = offs_e < E
        do = _lin_rows(_lin_head(DO, bh, N, E), t, offs_e, tmask, emask, E).to(ty)
        ht = _lin_cols(HS + slot * D * E, offs_d, offs_e, dmask, emask, E)
        dq += tl.dot(do, ht.to(ty), input_precision=DOT_PRECISION)
        if CAUSAL:
            vt = _lin_cols(_lin_head(V, bv, N, E), t, offs_e, tmask, emask, E)
            dw += tl.dot(do, vt.to(ty), input_precision=DOT_PRECISION)
    if NORM_SUM:
        dden = _lin_percol(_lin_head(DDEN, bh, N, 1), t, tmask)
        dq += dden * _lin_perrow(ZS + slot * D, offs_d, dmask)
    gi = 0.0  # G_i, read only with a decay
    if HAS_DECAY:
        gi = _lin_percol(_lin_head(GL, bh, N, 1), t, tmask)
        dq = dq * tl.exp(gi)
    if CAUSAL:
        if NORM_SUM:
            dw += dden
        dw = _lin_intra(dw, t, tmask, _lin_head(GL, bh, N, 1), gi, HAS_DECAY)
        k = _lin_rows(_lin_head(KT, bk, N, D), t, offs_d, tmask, dmask, D)
        dq += tl.dot(dw.to(k.dtype), k, input_precision=DOT_PRECISION)
    _lin_put_rows(_lin_head(DQ, bh, N, D), t, offs_d, tmask, dmask, D, dq)


@triton.jit
def _lin_bwd_dkv_kernel(
    QT, KT, V, DO, DDEN, GL, GS, DHS, DZS, DK, DV,  # core_abi.LIN_BWD_DKV
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dk~ and dv for one chunk's keys (per query head; the caller sums a GQA group). Tiles are transposed:
    rows are keys j, columns queries i of the same chunk; E is walked in blocks."""
    bh, bk, bv, t, tmask, offs_d, dmask, slot = _lin_chunk_program(
        0, N, NC, REP_K, REP_V, D, CHUNK, BLOCK_D, CAUSAL
    )
    k = _lin_rows(_lin_head(KT, bk, N, D), t, offs_d, tmask, dmask, D)
    if HAS_DECAY:
        gj = _lin_percol(_lin_head(GL, bh, N, 1), t, tmask)
        gs = tl.load(GS + bh.to(tl.int64) * NC + tl.program_id(0))  # chunk c's step
        wk = tl.exp(gs - gj)  # e^{G_last − G_j}: from key j to the state after the chunk
    if CAUSAL:
        qt = _lin_cols(_lin_head(QT, bh, N, D), t, offs_d, tmask, dmask, D)
        keep = (t[:, None] <= t[None, :]) & tmask[None, :]
        at = tl.dot(k, qt, input_precision=DOT_PRECISION)  # [j, i] = q~_i·k~_j
        if HAS_DECAY:
            gi = _lin_perrow(_lin_head(GL, bh, N, 1), t, tmask)
            decay = tl.exp(tl.where(keep, gi - gj, float("-inf")))
            at = at * decay
        else:
            at = tl.where(keep, at, 0.0)
        dwt = tl.full([CHUNK, CHUNK], 0.0, tl.float32)
    dk = tl.full([CHUNK, BLOCK_D], 0.0, tl.float32)
    for e0 in range(0, E, BLOCK_V):
        offs_e = e0 + tl.arange(0, BLOCK_V)
        emask = offs_e < E
        v = _lin_rows(_lin_head(V, bv, N, E), t, offs_e, tmask, emask, E).to(k.dtype)
        dh = _lin_rows(DHS + slot * D * E, offs_d, offs_e, dmask, emask, E).to(k.dtype)
        dk += tl.dot(v, tl.trans(dh), input_precision=DOT_PRECISION)
        dv = tl.dot(k, dh, input_precision=DOT_PRECISION)
        if HAS_DECAY:
            dv = dv * wk
        if CAUSAL:
            dot_ = _lin_cols(_lin_head(DO, bh, N, E), t, offs_e, tmask, emask, E).to(k.dtype)
            dwt += tl.dot(v, dot_, input_precision=DOT_PRECISION)  # [j, i] = do_i·v_j
            dv += tl.dot(at.to(k.dtype), tl.trans(dot_), input_precision=DOT_PRECISION)
        _lin_put_rows(_lin_head(DV, bh, N, E), t, offs_e, tmask, emask, E, dv)
    if NORM_SUM:
        dk += _lin_perrow(DZS + slot * D, offs_d, dmask)
    if HAS_DECAY:
        dk = dk * wk
    if CAUSAL:
        if NORM_SUM:
            dwt += _lin_perrow(_lin_head(DDEN, bh, N, 1), t, tmask)
        if HAS_DECAY:
            dwt = dwt * decay
        else:
            dwt = tl.where(keep, dwt, 0.0)
        dk += tl.dot(dwt.to(k.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    _lin_put_rows(_lin_head(DK, bh, N, D), t, offs_d, tmask, dmask, D, dk)


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
    offs_d, offs_v, dmask, vmask, s_off, s_msk = _lin_state_block(0, pid_v, D, E, BLOCK_D, BLOCK_V)
    z_off = offs_d[:, None]  # z is a column [BLOCK_D, 1], as k~_t is here
    z_msk = dmask[:, None]
    S, z = _lin_state_in(S0, Z0, bh, s_off, s_msk, z_off, z_msk, D, E, HAS_S0)
    for t in range(0, N):
        q = _lin_percol(QT + (bh.to(tl.int64) * N + t) * D, offs_d, dmask)
        k = _lin_percol(KT + (bk.to(tl.int64) * N + t) * D, offs_d, dmask)
        v = _lin_perrow(V + (bv.to(tl.int64) * N + t) * E, offs_v, vmask)
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
    _lin_state_out(
        SO + bh.to(tl.int64) * D * E,
        ZO + bh.to(tl.int64) * D,
        S,
        z,
        s_off,
        s_msk,
        z_off,
        z_msk,
        pid_v,
        NORM_SUM,
    )
