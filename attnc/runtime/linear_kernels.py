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
def _lin_head(base, head, N, W, bos):
    """Where head `head`'s rows of W elements start in a [heads, N, W] tensor, from row `bos` on (the
    sequence's first row: 0 in a batch, its offset in a packed batch; int64: large tensors)."""
    return base + (head.to(tl.int64) * N + bos) * W


@triton.jit
def _lin_seq(CU, CO, s, N, NC, CHUNK: tl.constexpr, VARLEN: tl.constexpr):
    """Sequence s's first row, its length, the first slot of its state stack and its chunk count. A batch
    has one sequence of N rows per head and NC chunks; a packed batch (VARLEN) reads its offsets CU [nseq + 1]
    and its stacks' first slots CO [nseq] (each sequence's chunks start at its own first row)."""
    if VARLEN:
        bos = tl.load(CU + s).to(tl.int64)
        n = (tl.load(CU + s + 1) - bos).to(tl.int32)
        co = tl.load(CO + s).to(tl.int64)
        nc = (n + CHUNK - 1) // CHUNK  # not tl.cdiv: a jit function, which breaks across interpreter modes
    else:
        bos = 0
        n = N
        co = 0
        nc = NC
    return bos, n, co, nc


@triton.jit
def _lin_program_head(pid, NH, VARLEN: tl.constexpr):
    """A program's head (the rows it reads: [heads, N, ...] tensors) and sequence: pid = bh of a batch, or
    s * NH + h in a packed batch, whose per-position tensors hold every sequence of a head in one row block.
    The program's states (S0, SO, DSO) are indexed by pid in both."""
    if VARLEN:
        bh = pid % NH
        s = pid // NH
    else:
        bh = pid
        s = 0
    return bh, s


@triton.jit
def _lin_chunk_idle(CU, C_AXIS: tl.constexpr, NH, CHUNK: tl.constexpr):
    """Whether a packed batch's per-chunk program lies past its sequence's last chunk (the grid spans the
    longest sequence's chunks)."""
    s = tl.program_id(C_AXIS + 1) // NH
    n = tl.load(CU + s + 1) - tl.load(CU + s)
    return tl.program_id(C_AXIS) * CHUNK >= n


@triton.jit
def _lin_chunk_step(GL, GS, bh, bos, n, N, NC, c, CHUNK: tl.constexpr, VARLEN: tl.constexpr):
    """Chunk c's whole step of G: GS[bh, c] of a batch; a packed batch reads GL at the chunk's last row,
    which is the same difference (GL is re-based at the chunk's start)."""
    if VARLEN:
        last = tl.minimum((c + 1) * CHUNK, n) - 1
        gs = tl.load(GL + bh.to(tl.int64) * N + bos + tl.maximum(last, 0), mask=last >= 0, other=0.0)
    else:
        gs = tl.load(GS + bh.to(tl.int64) * NC + c)
    return gs


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
    X, Y, ZW, GL, GS, S0, Z0, HS, ZS, CU, CO, REP_X, REP_Y, N, NH, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REVERSE: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """The sequential pass of both directions, per (D-block, E-block, head[, sequence]): before it takes in
    chunk c it stores the carried state at HS[bh, co + c] (what is left after the last chunk: at
    HS[bh, co + nc]; co: the sequence's first slot, 0 in a batch); chunk c adds

        S ← e^{GS_c} S + Σ_t w_t x_tᵀ y_t,   z ← e^{GS_c} z + Σ_t w_t x_t (times ZW_t in the reverse pass)

    with x = X[bh // REP_X], y = Y[bh // REP_Y] ([N, D] and [N, E] rows). Forward (the state): x = k~, y = v,
    w_t = e^{GS_c − GL_t}, chunks first to last; REVERSE (dS): x = q~, y = do, w_t = e^{GL_t}, ZW = dden,
    chunks last to first."""
    pid_v = tl.program_id(1)
    pid = tl.program_id(2)
    bh, s = _lin_program_head(pid, NH, VARLEN)
    bos, n, co, nc = _lin_seq(CU, CO, s, N, NC, CHUNK, VARLEN)
    hx = bh // REP_X
    hy = bh // REP_Y
    offs_k, offs_v, kmask, vmask, s_off, s_msk = _lin_state_block(
        tl.program_id(0), pid_v, D, E, BLOCK_K, BLOCK_V
    )
    z_off = offs_k[None, :]  # z is a row [1, BLOCK_K]: what a column sum of a chunk tile gives
    z_msk = kmask[None, :]
    S, z = _lin_state_in(S0, Z0, pid, s_off, s_msk, z_off, z_msk, D, E, HAS_S0)
    offs_c = tl.arange(0, CHUNK)
    hs_base = HS + (bh.to(tl.int64) * (NC + 1) + co) * D * E
    zs_base = ZS + (bh.to(tl.int64) * (NC + 1) + co) * D
    for i in range(0, nc):
        c = nc - 1 - i if REVERSE else i
        _lin_state_out(
            hs_base + c * D * E, zs_base + c * D, S, z, s_off, s_msk, z_off, z_msk, pid_v, NORM_SUM
        )
        t = c * CHUNK + offs_c
        tmask = t < n
        x = _lin_rows(_lin_head(X, hx, N, D, bos), t, offs_k, tmask, kmask, D)
        y = _lin_rows(_lin_head(Y, hy, N, E, bos), t, offs_v, tmask, vmask, E)
        w = x.to(tl.float32)
        if HAS_DECAY:
            gl = _lin_percol(_lin_head(GL, bh, N, 1, bos), t, tmask)
            gs = _lin_chunk_step(GL, GS, bh, bos, n, N, NC, c, CHUNK, VARLEN)
            w = w * tl.exp(gl if REVERSE else gs - gl)
            S = S * tl.exp(gs)
            z = z * tl.exp(gs)
        S += tl.dot(tl.trans(w.to(x.dtype)), y.to(x.dtype), input_precision=DOT_PRECISION)
        if NORM_SUM:
            if REVERSE:
                w = w * _lin_percol(_lin_head(ZW, bh, N, 1, bos), t, tmask)
            z += _lin_colsum(w)
    _lin_state_out(hs_base + nc * D * E, zs_base + nc * D, S, z, s_off, s_msk, z_off, z_msk, pid_v, NORM_SUM)


@triton.jit
def _lin_chunk_program(
    CU, CO, C_AXIS: tl.constexpr, N, NH, NC, REP_K, REP_V, D,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """What a per-chunk program works on: its head bh (grid axis C_AXIS + 1, with the sequence in a packed
    batch; its chunk c of that sequence: axis C_AXIS), the key and value heads bh reads (GQA groups of
    REP_K / REP_V), the sequence's first row, length and chunk count, the chunk's positions t (from the
    sequence's start) and their mask, the offsets over the whole key dimension and their mask, and the index
    of the state it reads in a [heads, NC + 1, ...] stack: the one entering the chunk (causal) or the
    sequence's final one (bidirectional: every chunk sees all keys)."""
    c = tl.program_id(C_AXIS)
    bh, s = _lin_program_head(tl.program_id(C_AXIS + 1), NH, VARLEN)
    bos, n, co, nc = _lin_seq(CU, CO, s, N, NC, CHUNK, VARLEN)
    bk = bh // REP_K
    bv = bh // REP_V
    offs_d = tl.arange(0, BLOCK_D)
    t = c * CHUNK + tl.arange(0, CHUNK)
    tmask = t < n
    dmask = offs_d < D
    slot = bh.to(tl.int64) * (NC + 1) + co + (c if CAUSAL else nc)
    return bh, bk, bv, bos, n, c, t, tmask, offs_d, dmask, slot


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
def _lin_fwd_out(
    QT, KT, V, GL, HS, ZS, OUT, DEN, CU, CO,
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    """One chunk's output: exact masked attention inside the chunk plus the state entering it."""
    pid_v = tl.program_id(0)
    bh, bk, bv, bos, _n, _c, t, tmask, offs_d, dmask, slot = _lin_chunk_program(
        CU, CO, 1, N, NH, NC, REP_K, REP_V, D, CHUNK, BLOCK_D, CAUSAL, VARLEN
    )
    offs_v, vmask = _lin_block(pid_v, BLOCK_V, E)
    q = _lin_rows(_lin_head(QT, bh, N, D, bos), t, offs_d, tmask, dmask, D)
    h = _lin_rows(HS + slot * D * E, offs_d, offs_v, dmask, vmask, E)
    qd = q.to(tl.float32)
    gi = 0.0  # G_i, read only with a decay
    if HAS_DECAY:
        gi = _lin_percol(_lin_head(GL, bh, N, 1, bos), t, tmask)
        qd = qd * tl.exp(gi)
    o = tl.dot(qd.to(q.dtype), h.to(q.dtype), input_precision=DOT_PRECISION)
    if NORM_SUM:
        den = _lin_rowsum(qd * _lin_perrow(ZS + slot * D, offs_d, dmask))
    if CAUSAL:
        kt = _lin_cols(_lin_head(KT, bk, N, D, bos), t, offs_d, tmask, dmask, D)
        a = tl.dot(q, kt, input_precision=DOT_PRECISION)
        a = _lin_intra(a, t, tmask, _lin_head(GL, bh, N, 1, bos), gi, HAS_DECAY)
        v = _lin_rows(_lin_head(V, bv, N, E, bos), t, offs_v, tmask, vmask, E)
        o += tl.dot(a.to(v.dtype), v, input_precision=DOT_PRECISION)
        if NORM_SUM:
            den += _lin_rowsum(a)
    _lin_put_rows(_lin_head(OUT, bh, N, E, bos), t, offs_v, tmask, vmask, E, o)
    if NORM_SUM:
        tl.store(
            _lin_head(DEN, bh, N, 1, bos) + t[:, None],
            den,
            mask=tmask[:, None] & (t[:, None] * 0 + pid_v == 0),
        )


@triton.jit
def _lin_bwd_dq(
    QT, KT, V, DO, DDEN, GL, HS, ZS, DQ, CU, CO,
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    """dq~ for one chunk: through the carried state and through the chunk's own keys (E in blocks)."""
    bh, bk, bv, bos, _n, _c, t, tmask, offs_d, dmask, slot = _lin_chunk_program(
        CU, CO, 0, N, NH, NC, REP_K, REP_V, D, CHUNK, BLOCK_D, CAUSAL, VARLEN
    )
    ty = QT.dtype.element_ty
    dq = tl.full([CHUNK, BLOCK_D], 0.0, tl.float32)
    dw = tl.full([CHUNK, CHUNK], 0.0, tl.float32)
    for e0 in range(0, E, BLOCK_V):
        offs_e = e0 + tl.arange(0, BLOCK_V)
        emask = offs_e < E
        do = _lin_rows(_lin_head(DO, bh, N, E, bos), t, offs_e, tmask, emask, E).to(ty)
        ht = _lin_cols(HS + slot * D * E, offs_d, offs_e, dmask, emask, E)
        dq += tl.dot(do, ht.to(ty), input_precision=DOT_PRECISION)
        if CAUSAL:
            vt = _lin_cols(_lin_head(V, bv, N, E, bos), t, offs_e, tmask, emask, E)
            dw += tl.dot(do, vt.to(ty), input_precision=DOT_PRECISION)
    if NORM_SUM:
        dden = _lin_percol(_lin_head(DDEN, bh, N, 1, bos), t, tmask)
        dq += dden * _lin_perrow(ZS + slot * D, offs_d, dmask)
    gi = 0.0  # G_i, read only with a decay
    if HAS_DECAY:
        gi = _lin_percol(_lin_head(GL, bh, N, 1, bos), t, tmask)
        dq = dq * tl.exp(gi)
    if CAUSAL:
        if NORM_SUM:
            dw += dden
        dw = _lin_intra(dw, t, tmask, _lin_head(GL, bh, N, 1, bos), gi, HAS_DECAY)
        k = _lin_rows(_lin_head(KT, bk, N, D, bos), t, offs_d, tmask, dmask, D)
        dq += tl.dot(dw.to(k.dtype), k, input_precision=DOT_PRECISION)
    _lin_put_rows(_lin_head(DQ, bh, N, D, bos), t, offs_d, tmask, dmask, D, dq)


@triton.jit
def _lin_bwd_dkv(
    QT, KT, V, DO, DDEN, GL, GS, DHS, DZS, DK, DV, CU, CO,
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    """dk~ and dv for one chunk's keys (per query head; the caller sums a GQA group). Tiles are transposed:
    rows are keys j, columns queries i of the same chunk; E is walked in blocks."""
    bh, bk, bv, bos, n, c, t, tmask, offs_d, dmask, slot = _lin_chunk_program(
        CU, CO, 0, N, NH, NC, REP_K, REP_V, D, CHUNK, BLOCK_D, CAUSAL, VARLEN
    )
    k = _lin_rows(_lin_head(KT, bk, N, D, bos), t, offs_d, tmask, dmask, D)
    if HAS_DECAY:
        gj = _lin_percol(_lin_head(GL, bh, N, 1, bos), t, tmask)
        gs = _lin_chunk_step(GL, GS, bh, bos, n, N, NC, c, CHUNK, VARLEN)
        wk = tl.exp(gs - gj)  # e^{G_last − G_j}: from key j to the state after the chunk
    if CAUSAL:
        qt = _lin_cols(_lin_head(QT, bh, N, D, bos), t, offs_d, tmask, dmask, D)
        keep = (t[:, None] <= t[None, :]) & tmask[None, :]
        at = tl.dot(k, qt, input_precision=DOT_PRECISION)  # [j, i] = q~_i·k~_j
        if HAS_DECAY:
            gi = _lin_perrow(_lin_head(GL, bh, N, 1, bos), t, tmask)
            decay = tl.exp(tl.where(keep, gi - gj, float("-inf")))
            at = at * decay
        else:
            at = tl.where(keep, at, 0.0)
        dwt = tl.full([CHUNK, CHUNK], 0.0, tl.float32)
    dk = tl.full([CHUNK, BLOCK_D], 0.0, tl.float32)
    for e0 in range(0, E, BLOCK_V):
        offs_e = e0 + tl.arange(0, BLOCK_V)
        emask = offs_e < E
        v = _lin_rows(_lin_head(V, bv, N, E, bos), t, offs_e, tmask, emask, E).to(k.dtype)
        dh = _lin_rows(DHS + slot * D * E, offs_d, offs_e, dmask, emask, E).to(k.dtype)
        dk += tl.dot(v, tl.trans(dh), input_precision=DOT_PRECISION)
        dv = tl.dot(k, dh, input_precision=DOT_PRECISION)
        if HAS_DECAY:
            dv = dv * wk
        if CAUSAL:
            dot_ = _lin_cols(_lin_head(DO, bh, N, E, bos), t, offs_e, tmask, emask, E).to(k.dtype)
            dwt += tl.dot(v, dot_, input_precision=DOT_PRECISION)  # [j, i] = do_i·v_j
            dv += tl.dot(at.to(k.dtype), tl.trans(dot_), input_precision=DOT_PRECISION)
        _lin_put_rows(_lin_head(DV, bh, N, E, bos), t, offs_e, tmask, emask, E, dv)
    if NORM_SUM:
        dk += _lin_perrow(DZS + slot * D, offs_d, dmask)
    if HAS_DECAY:
        dk = dk * wk
    if CAUSAL:
        if NORM_SUM:
            dwt += _lin_perrow(_lin_head(DDEN, bh, N, 1, bos), t, tmask)
        if HAS_DECAY:
            dwt = dwt * decay
        else:
            dwt = tl.where(keep, dwt, 0.0)
        dk += tl.dot(dwt.to(k.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    _lin_put_rows(_lin_head(DK, bh, N, D, bos), t, offs_d, tmask, dmask, D, dk)


@triton.jit
def _lin_recurrent(
    QT, KT, V, GSTEP, S0, Z0, OUT, DEN, SO, ZO, CU,
    N, NH, REP_K, REP_V,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, HAS_DECAY: tl.constexpr,
    HAS_S0: tl.constexpr, NORM_SUM: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """Token by token: S_t = e^{G_t − G_{t−1}} S_{t−1} + k~_t v_tᵀ, o_t = q~_t S_t (decoding)."""
    pid_v = tl.program_id(0)
    pid = tl.program_id(1)
    bh, s = _lin_program_head(pid, NH, VARLEN)
    bos, n, _, _ = _lin_seq(CU, CU, s, N, 0, 1, VARLEN)
    bk = bh // REP_K
    bv = bh // REP_V
    offs_d, offs_v, dmask, vmask, s_off, s_msk = _lin_state_block(0, pid_v, D, E, BLOCK_D, BLOCK_V)
    z_off = offs_d[:, None]  # z is a column [BLOCK_D, 1], as k~_t is here
    z_msk = dmask[:, None]
    S, z = _lin_state_in(S0, Z0, pid, s_off, s_msk, z_off, z_msk, D, E, HAS_S0)
    # Rows addressed from (head, token) in the loop, not as six row pointers carried through it: that kept
    # the batched kernel at its registers (sm_90) once the varlen form shared this body.
    for t in range(0, n):
        q = _lin_percol(_lin_head(QT, bh, N, D, bos + t), offs_d, dmask)
        k = _lin_percol(_lin_head(KT, bk, N, D, bos + t), offs_d, dmask)
        v = _lin_perrow(_lin_head(V, bv, N, E, bos + t), offs_v, vmask)
        k32 = k.to(tl.float32)
        q32 = q.to(tl.float32)
        if HAS_DECAY:
            g = tl.load(_lin_head(GSTEP, bh, N, 1, bos + t))
            S = S * tl.exp(g)
            z = z * tl.exp(g)
        S += k32 * v.to(tl.float32)
        o = _lin_colsum(q32 * S)
        tl.store(_lin_head(OUT, bh, N, E, bos + t) + offs_v[None, :], o, mask=vmask[None, :])
        if NORM_SUM:
            z += k32
            den = _lin_colsum(q32 * z)
            tl.store(
                _lin_head(DEN, bh, N, 1, bos + t) + offs_v[None, :] * 0, den, mask=(offs_v[None, :] == 0)
            )
    _lin_state_out(
        SO + pid.to(tl.int64) * D * E, ZO + pid.to(tl.int64) * D, S, z, s_off, s_msk, z_off, z_msk, pid_v,
        NORM_SUM,
    )  # fmt: skip


# ---- the entry points: a batch [B·H, N, ...] (the bodies' VARLEN=False; CU and CO unused), and a packed batch
# of variable-length sequences [H, total, ...] whose offsets are CU (the `_varlen` kernels: core_abi). ----


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
    _lin_state_scan(
        KT, V, V, GL, GS, S0, Z0, HS, ZS, KT, KT, REP_K, REP_V, N, NH, NC,
        D, E, CHUNK, BLOCK_K, BLOCK_V, HAS_DECAY, HAS_S0, NORM_SUM, DOT_PRECISION, REVERSE=False, VARLEN=False,
    )  # fmt: skip


@triton.jit
def _lin_fwd_state_varlen_kernel(
    KT, V, GL, S0, Z0, HS, ZS, CU, CO,  # core_abi.LIN_FWD_STATE_VARLEN
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Per (D-block, E-block, sequence · head): HS[h, CO[s] + c] = the state entering the sequence's chunk c,
    HS[h, CO[s] + nc_s] its final state (N: the packed rows per head, NC + 1: the stack's slots per head)."""
    _lin_state_scan(
        KT, V, V, GL, GL, S0, Z0, HS, ZS, CU, CO, REP_K, REP_V, N, NH, NC,
        D, E, CHUNK, BLOCK_K, BLOCK_V, HAS_DECAY, HAS_S0, NORM_SUM, DOT_PRECISION, REVERSE=False, VARLEN=True,
    )  # fmt: skip


@triton.jit
def _lin_fwd_out_kernel(
    QT, KT, V, GL, HS, ZS, OUT, DEN,  # core_abi.LIN_FWD_OUT
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One chunk's output (`_lin_fwd_out`)."""
    _lin_fwd_out(
        QT, KT, V, GL, HS, ZS, OUT, DEN, QT, QT, N, NH, REP_K, REP_V, NC,
        D, E, CHUNK, BLOCK_D, BLOCK_V, CAUSAL, HAS_DECAY, NORM_SUM, DOT_PRECISION, VARLEN=False,
    )  # fmt: skip


@triton.jit
def _lin_fwd_out_varlen_kernel(
    QT, KT, V, GL, HS, ZS, OUT, DEN, CU, CO,  # core_abi.LIN_FWD_OUT_VARLEN
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One chunk of one sequence (`_lin_fwd_out`); programs past the sequence's chunks return at once."""
    if _lin_chunk_idle(CU, 1, NH, CHUNK):
        return
    _lin_fwd_out(
        QT, KT, V, GL, HS, ZS, OUT, DEN, CU, CO, N, NH, REP_K, REP_V, NC,
        D, E, CHUNK, BLOCK_D, BLOCK_V, CAUSAL, HAS_DECAY, NORM_SUM, DOT_PRECISION, VARLEN=True,
    )  # fmt: skip


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
    _lin_state_scan(
        QT, DO, DDEN, GL, GS, DSO, DZO, DHS, DZS, QT, QT, 1, 1, N, NH, NC,
        D, E, CHUNK, BLOCK_K, BLOCK_V, HAS_DECAY, HAS_DSO, NORM_SUM, DOT_PRECISION, REVERSE=True, VARLEN=False,
    )  # fmt: skip


@triton.jit
def _lin_bwd_dstate_varlen_kernel(
    QT, DO, DDEN, GL, DSO, DZO, DHS, DZS, CU, CO,  # core_abi.LIN_BWD_DSTATE_VARLEN
    N, NH, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_DSO: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Reverse pass per sequence: DHS[h, CO[s] + c] = dL/dS after its chunk c, DHS[h, CO[s] + nc_s] = dL/dS_in."""
    _lin_state_scan(
        QT, DO, DDEN, GL, GL, DSO, DZO, DHS, DZS, CU, CO, 1, 1, N, NH, NC,
        D, E, CHUNK, BLOCK_K, BLOCK_V, HAS_DECAY, HAS_DSO, NORM_SUM, DOT_PRECISION, REVERSE=True, VARLEN=True,
    )  # fmt: skip


@triton.jit
def _lin_bwd_dq_kernel(
    QT, KT, V, DO, DDEN, GL, HS, ZS, DQ,  # core_abi.LIN_BWD_DQ
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dq~ for one chunk (`_lin_bwd_dq`)."""
    _lin_bwd_dq(
        QT, KT, V, DO, DDEN, GL, HS, ZS, DQ, QT, QT, N, NH, REP_K, REP_V, NC,
        D, E, CHUNK, BLOCK_D, BLOCK_V, CAUSAL, HAS_DECAY, NORM_SUM, DOT_PRECISION, VARLEN=False,
    )  # fmt: skip


@triton.jit
def _lin_bwd_dq_varlen_kernel(
    QT, KT, V, DO, DDEN, GL, HS, ZS, DQ, CU, CO,  # core_abi.LIN_BWD_DQ_VARLEN
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dq~ for one chunk of one sequence (`_lin_bwd_dq`)."""
    if _lin_chunk_idle(CU, 0, NH, CHUNK):
        return
    _lin_bwd_dq(
        QT, KT, V, DO, DDEN, GL, HS, ZS, DQ, CU, CO, N, NH, REP_K, REP_V, NC,
        D, E, CHUNK, BLOCK_D, BLOCK_V, CAUSAL, HAS_DECAY, NORM_SUM, DOT_PRECISION, VARLEN=True,
    )  # fmt: skip


@triton.jit
def _lin_bwd_dkv_kernel(
    QT, KT, V, DO, DDEN, GL, GS, DHS, DZS, DK, DV,  # core_abi.LIN_BWD_DKV
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dk~ and dv for one chunk's keys (`_lin_bwd_dkv`)."""
    _lin_bwd_dkv(
        QT, KT, V, DO, DDEN, GL, GS, DHS, DZS, DK, DV, QT, QT, N, NH, REP_K, REP_V, NC,
        D, E, CHUNK, BLOCK_D, BLOCK_V, CAUSAL, HAS_DECAY, NORM_SUM, DOT_PRECISION, VARLEN=False,
    )  # fmt: skip


@triton.jit
def _lin_bwd_dkv_varlen_kernel(
    QT, KT, V, DO, DDEN, GL, DHS, DZS, DK, DV, CU, CO,  # core_abi.LIN_BWD_DKV_VARLEN
    N, NH, REP_K, REP_V, NC,
    D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORM_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dk~ and dv for one chunk of one sequence (`_lin_bwd_dkv`)."""
    if _lin_chunk_idle(CU, 0, NH, CHUNK):
        return
    _lin_bwd_dkv(
        QT, KT, V, DO, DDEN, GL, GL, DHS, DZS, DK, DV, CU, CO, N, NH, REP_K, REP_V, NC,
        D, E, CHUNK, BLOCK_D, BLOCK_V, CAUSAL, HAS_DECAY, NORM_SUM, DOT_PRECISION, VARLEN=True,
    )  # fmt: skip


@triton.jit
def _lin_recurrent_kernel(
    QT, KT, V, GSTEP, S0, Z0, OUT, DEN, SO, ZO,  # core_abi.LIN_RECURRENT
    N, NH, REP_K, REP_V,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, HAS_DECAY: tl.constexpr,
    HAS_S0: tl.constexpr, NORM_SUM: tl.constexpr,
):  # fmt: skip
    """Token by token (`_lin_recurrent`), per (E-block, head)."""
    _lin_recurrent(
        QT, KT, V, GSTEP, S0, Z0, OUT, DEN, SO, ZO, QT, N, NH, REP_K, REP_V,
        D, E, BLOCK_D, BLOCK_V, HAS_DECAY, HAS_S0, NORM_SUM, VARLEN=False,
    )  # fmt: skip


@triton.jit
def _lin_recurrent_varlen_kernel(
    QT, KT, V, GSTEP, S0, Z0, OUT, DEN, SO, ZO, CU,  # core_abi.LIN_RECURRENT_VARLEN
    N, NH, REP_K, REP_V,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, HAS_DECAY: tl.constexpr,
    HAS_S0: tl.constexpr, NORM_SUM: tl.constexpr,
):  # fmt: skip
    """Token by token per (E-block, sequence · head): each program walks its own sequence's rows."""
    _lin_recurrent(
        QT, KT, V, GSTEP, S0, Z0, OUT, DEN, SO, ZO, CU, N, NH, REP_K, REP_V,
        D, E, BLOCK_D, BLOCK_V, HAS_DECAY, HAS_S0, NORM_SUM, VARLEN=True,
    )  # fmt: skip
