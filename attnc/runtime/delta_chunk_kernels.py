"""Chunk-parallel forward kernels of the delta-rule family (host side: attnc/runtime/delta_chunk.py; shared
design and the forward/backward contract: issue 12's delta_chunk_design.md).

Per state head a state S [E, D] (rows: value channels, columns: key channels) evolves as
S_t = S_{t-1} T_t + write_t, o_t = S_t q_t, with the four variants of the design:

    DeltaNet        G_MODE 0, DELTA    T_t = I − β_t k_t k_tᵀ
    Gated DeltaNet  G_MODE 1, DELTA    T_t = α_t (I − β_t k_t k_tᵀ),        α_t = e^{g_t}
    KDA             G_MODE 2, DELTA    T_t = Diag(α_t)(I − β_t k_t k_tᵀ),   α_t = e^{g_t} ∈ R^D
    GLA             G_MODE 2 (or 1)    T_t = Diag(α_t), write v_t k_tᵀ

The sequence is cut into chunks of C tokens; within a chunk entered with state S (Yang et al. 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length", §3, the WY / UT transform;
Gated DeltaNet §3.3 for the gate), with Γ the chunk-local cumulative log-gate:

    A_ij = β_i ⟨k_i, k_j⟩_Γ (j < i),  Tinv = (I + A)⁻¹,  W = Tinv diag(β)(K ⊙ e^Γ),  Ũ = Tinv diag(β) V
    U = Ũ − W Sᵀ,   O = (Q ⊙ e^Γ) Sᵀ + P U  (P_ij = ⟨q_i, k_j⟩_Γ, j ≤ i),
    S_next = S Diag(e^{Γ_last}) + Uᵀ (K ⊙ e^{Γ_last − Γ})

Everything but the last line is independent per chunk, so the work splits into three launches, as
flash-linear-attention's chunk_delta_rule / chunk_gla do:

- `_dchunk_prep_kernel`, grid (NT, B·H): Γ (GC), A, Tinv (AI; by blocks, `_unit_lower_inverse`), W and
  Ũ (UT) of one chunk;
- `_dchunk_state_kernel`, grid (E-blocks, B·H): the only sequential pass, chunk by chunk: the entering
  states HS, U = Ũ − W Sᵀ and S_next (SN at the end);
- `_dchunk_out_kernel`, grid (NT, B·H, E-blocks): O = (Q ⊙ e^Γ) Sᵀ + P U.

Per-channel gates (G_MODE 2) never form e^{−Γ} (Γ reaches −5·C in a chunk): the intra-chunk products use
GLA's secondary chunking (Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient
Training", §4): sub-blocks of SUB rows; off the diagonal a tensor-core product of two tiles each scaled by a
bounded factor, on the diagonal an exact elementwise sum (`_gram_channel`).

All of Γ, the state and every accumulation are float32; with g ≤ 0 every exponent taken is ≤ 0, so nothing
overflows at any T. Tokens past T of the last chunk read k = q = v = 0, β = 0, g = 0 (the identity) and are
never stored; Γ of such rows equals Γ of the last real token (loads of GC clamp the row to T − 1).

Builtins only (tl.reduce / tl.associative_scan with the standard combiners): the kernels work in whichever
mode Triton was imported in, which the interpreter-based CPU tests rely on.
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
def _head_row(bh, H, REP, T):
    """First row (token 0) of the input head that state head `bh % H` of batch `bh // H` reads, in a
    [B, H // REP, T, ...] tensor: REP state heads share one input head (GQA-style)."""
    b = bh // H
    h = bh % H
    return (b.to(tl.int64) * (H // REP) + h // REP) * T


@triton.jit
def _chunk_span(CROW, CEND, c, T, CHUNK: tl.constexpr, VARLEN: tl.constexpr):
    """(first row, end row) of chunk slot c: c·C and T in a batch; in a packed batch (VARLEN) the chunk
    table's entries, the end being its sequence's (rows past it belong to the next sequence and are masked
    exactly as rows past T are). A padding slot (the table has more slots than chunks) is (total, total)."""
    if VARLEN:
        c0 = tl.load(CROW + c)
        tn = tl.load(CEND + c)
    else:
        c0 = c * CHUNK
        tn = T
    return c0, tn


@triton.jit
def _seq_span(CU, CO, pid, H, T, NT, CHUNK: tl.constexpr, VARLEN: tl.constexpr):
    """What program `pid` (of B·H, or of nseq·H in a packed batch) of a sequential pass walks: (the state
    head's index into the row-major inputs, its sequence's first row, its end row, its first chunk slot, its
    number of chunks). Packed (VARLEN): B = 1, so the head is pid % H; the sequence pid // H spans rows
    CU[s]..CU[s + 1] and chunk slots CO[s].. (each chunk starting at a multiple of C from the sequence's
    first row)."""
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
def _rows(X, row0, t, tm, offs, omask, W: tl.constexpr):
    """The [C, BLOCK] tile of rows row0 + t of a row-major [*, W] tensor (zeros where masked)."""
    return tl.load(X + (row0 + t[:, None]) * W + offs[None, :], mask=tm[:, None] & omask[None, :], other=0.0)


@triton.jit
def _decay(gam, STRICT: tl.constexpr, CHUNK: tl.constexpr):
    """e^{Γ_i − Γ_j} for j < i (STRICT) or j ≤ i, else 0, [C, C] (scalar gate): the exponent is masked to
    −inf before the exp, so no e^{positive} is ever formed."""
    offs_c = tl.arange(0, CHUNK)
    if STRICT:
        keep = offs_c[:, None] > offs_c[None, :]
    else:
        keep = offs_c[:, None] >= offs_c[None, :]
    return tl.exp(tl.where(keep, gam[:, None] - gam[None, :], float("-inf")))


@triton.jit
def _gram_channel(
    x, gi, y, Y, GC, ry, rgc, c0, T, offs_d, dmask, acc,
    D: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, STRICT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + M, M_ij = ⟨x_i, y_j⟩_Γ = Σ_d x_i[d] y_j[d] e^{Γ_i[d] − Γ_j[d]} for j < i (STRICT) or j ≤ i, else 0:
    [C, C] float32, for per-channel Γ (GLA §4's secondary chunking, as flash-linear-attention's chunk_gla),
    summed over the key channels offs_d (one D-block: callers loop over D-blocks to bound the live tiles).

    x [C, BDK] fp32 (the chunk's query-side rows, zero past T), gi [C, BD] its Γ (rows past T: Γ of the last
    real token), y [C, BD] fp32 the chunk's key rows (the same positions; x itself for K Kᵀ); the diagonal
    blocks read key rows again from Y at rows ry + c0 + j, their Γ from GC at rows rgc + min(c0 + j, T − 1).
    Sub-blocks of SUB rows:

    - key block b, query rows i in later blocks (i > e, e = b's last row): with e's Γ as the reference,
      (x_i ⊙ e^{Γ_i − Γ_e}) · (y_j ⊙ e^{Γ_e − Γ_j}) has both exponents ≤ 0 (Γ is non-increasing): one
      tensor-core product of two bounded [C, D] tiles per key block, accumulated (the supports are disjoint);
    - diagonal blocks exactly, elementwise: for each offset jj in a block, every row i meets key
      j = (i's block start) + jj, whose Γ row is loaded beside it; the exponent is taken only where i ≥ j
      (−inf before the exp elsewhere)."""
    offs_c = tl.arange(0, CHUNK)
    blk = offs_c // SUB
    for b in tl.static_range(CHUNK // SUB - 1):
        e = tl.minimum(c0 + b * SUB + SUB - 1, T - 1)
        ge = tl.load(GC + (rgc + e) * D + offs_d, mask=dmask, other=0.0)
        xs = x * tl.exp(tl.where(blk[:, None] > b, gi - ge[None, :], float("-inf")))
        ys = y * tl.exp(tl.where(blk[:, None] == b, ge[None, :] - gi, float("-inf")))
        acc = tl.dot(xs, tl.trans(ys), acc, input_precision=DOT_PRECISION)
    for jj in range(SUB):
        j = blk * SUB + jj  # [C]: the key of each query row's own block
        tj = c0 + j
        yj = _rows(Y, ry, tj, tj < T, offs_d, dmask, D).to(tl.float32)
        gj = _rows(GC, rgc, tl.minimum(tj, T - 1), tj >= 0, offs_d, dmask, D)
        if STRICT:
            ok = offs_c > j
        else:
            ok = offs_c >= j
        val = _dsum(x * yj * tl.exp(tl.where(ok[:, None], gi - gj, float("-inf"))), 1)
        acc += tl.where(offs_c[None, :] == j[:, None], val[:, None], 0.0)
    return acc


@triton.jit
def _unit_lower_inverse(A, CHUNK: tl.constexpr, SUB: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(I + A)⁻¹ for a strictly lower-triangular A [C, C] (the UT transform's T, Yang et al. 2024, §3), by
    blocks of SUB rows, as flash-linear-attention's solve_tril: with Ad the diagonal blocks of A and Ao the
    rest, I + A = (I + Ad)(I + N), N = (I + Ad)⁻¹ Ao, so (I + A)⁻¹ = (I + N)⁻¹ (I + Ad)⁻¹.

    - (I + Ad)⁻¹ by forward substitution, the r-th row of every block at once (rows of lower offsets are
      final): SUB − 1 steps of one [C, C] product each, instead of C − 1 row-by-row steps;
    - N is strictly block-lower, so N^{C/SUB} = 0 and (I + N)⁻¹ = Σ_k (−N)^k exactly: C/SUB − 1 Horner steps
      X ← Tb − N X."""
    offs_c = tl.arange(0, CHUNK)
    eye = tl.where(offs_c[:, None] == offs_c[None, :], 1.0, 0.0)
    same = (offs_c[:, None] // SUB) == (offs_c[None, :] // SUB)
    Ad = tl.where(same, A, 0.0)
    Tb = eye
    for r in range(1, SUB):
        rows = (offs_c % SUB) == r
        step = eye - tl.dot(tl.where(rows[:, None], Ad, 0.0), Tb, input_precision=DOT_PRECISION)
        Tb = tl.where(rows[:, None], step, Tb)
    X = Tb
    if CHUNK > SUB:
        N = tl.dot(Tb, tl.where(same, 0.0, A), input_precision=DOT_PRECISION)
        for _ in tl.static_range(CHUNK // SUB - 1):
            X = Tb - tl.dot(N, X, input_precision=DOT_PRECISION)
    return X


@triton.jit
def _dchunk_prep_kernel(
    K, V, BETA, G, GC, AI, W, UT, CROW, CEND,  # core_abi.DELTA_CHUNK_PREP
    T, H, REP_K, REP_V, REP_B, REP_G,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_DK: tl.constexpr, SUB: tl.constexpr, G_MODE: tl.constexpr, DELTA: tl.constexpr,
    STORE_AI: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One chunk's per-chunk factors, grid (NT, B·H): Γ = cumsum of g within the chunk (GC [B, H, T] or
    [B, H, T, D], float32); with DELTA, A, Tinv = (I + A)⁻¹ (AI [B, H, T, C], stored under STORE_AI),
    W = Tinv diag(β)(K ⊙ e^Γ) (W [B, H, T, D]) and Ũ = Tinv diag(β) V (UT [B, H, T, E]).

    K [B, H/REP_K, T, D], V [B, H/REP_V, T, E], BETA [B, H/REP_B, T], G [B, H/REP_G, T(, D)] (any float
    dtype: β and g are never rounded to the inputs' dtype). Products of two input tiles (K Kᵀ) run in the
    input dtype; products with float32 factors at DOT_PRECISION. Per-channel gates (G_MODE 2) work on
    BLOCK_DK key channels at a time (Γ, A's share, W), which bounds the live [C, BLOCK_DK] tiles."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    dmask = offs_d < D
    emask = offs_e < E
    c0, tn = _chunk_span(CROW, CEND, c, T, CHUNK, VARLEN)
    if VARLEN:  # a packed batch's padding slot (a batch has none: no test in its code)
        if c0 >= tn:
            return
    t = c0 + offs_c
    tm = t < tn
    ro = bh.to(tl.int64) * T  # this state head's rows of the outputs
    rk = _head_row(bh, H, REP_K, T)
    rg = _head_row(bh, H, REP_G, T)
    gam = offs_c * 0.0
    if G_MODE == 1:
        gam = _dcumsum(tl.load(G + rg + t, mask=tm, other=0.0).to(tl.float32))
        tl.store(GC + ro + t, gam, mask=tm)
    if DELTA:
        beta = tl.load(BETA + _head_row(bh, H, REP_B, T) + t, mask=tm, other=0.0).to(tl.float32)
        if G_MODE == 2:
            # Per D-block (the cumsum runs down each channel on its own): Γ, stored and read back by the
            # diagonal sub-blocks of `_gram_channel`, then that block's share of A.
            A = tl.full((CHUNK, CHUNK), 0.0, tl.float32)
            for d0 in tl.static_range(0, BLOCK_D, BLOCK_DK):
                od = d0 + tl.arange(0, BLOCK_DK)
                dm = od < D
                gam2 = _dcumsum(_rows(G, rg, t, tm, od, dm, D).to(tl.float32))
                tl.store(GC + (ro + t[:, None]) * D + od[None, :], gam2, mask=tm[:, None] & dm[None, :])
                tl.debug_barrier()
                kf = _rows(K, rk, t, tm, od, dm, D).to(tl.float32)
                A = _gram_channel(
                    kf, gam2, kf, K, GC, rk, ro, c0, tn, od, dm, A, D, CHUNK, SUB, True, DOT_PRECISION
                )
        else:
            Kn = _rows(K, rk, t, tm, offs_d, dmask, D)
            # two input tiles: the input dtype (ieee for fp32 inputs), fp32 accumulation
            kk = tl.dot(Kn, tl.trans(Kn), input_precision=DOT_PRECISION)
            if G_MODE == 1:
                A = kk * _decay(gam, True, CHUNK)
            else:
                A = tl.where(offs_c[:, None] > offs_c[None, :], kk, 0.0)
        Tinv = _unit_lower_inverse(beta[:, None] * A, CHUNK, SUB, DOT_PRECISION)
        if STORE_AI:
            tl.store(AI + (ro + t[:, None]) * CHUNK + offs_c[None, :], Tinv, mask=tm[:, None])
        if G_MODE == 2:
            for d0 in tl.static_range(0, BLOCK_D, BLOCK_DK):
                od = d0 + tl.arange(0, BLOCK_DK)
                dm = od < D
                gam2 = _rows(GC, ro, tl.minimum(t, tn - 1), t >= 0, od, dm, D)
                kb = _rows(K, rk, t, tm, od, dm, D).to(tl.float32) * tl.exp(gam2)
                w = tl.dot(Tinv, beta[:, None] * kb, input_precision=DOT_PRECISION)
                tl.store(W + (ro + t[:, None]) * D + od[None, :], w, mask=tm[:, None] & dm[None, :])
        else:
            kb = Kn.to(tl.float32)
            if G_MODE == 1:
                kb = kb * tl.exp(gam)[:, None]
            w = tl.dot(Tinv, beta[:, None] * kb, input_precision=DOT_PRECISION)
            tl.store(W + (ro + t[:, None]) * D + offs_d[None, :], w, mask=tm[:, None] & dmask[None, :])
        vb = beta[:, None] * _rows(V, _head_row(bh, H, REP_V, T), t, tm, offs_e, emask, E).to(tl.float32)
        ut = tl.dot(Tinv, vb, input_precision=DOT_PRECISION)
        tl.store(UT + (ro + t[:, None]) * E + offs_e[None, :], ut, mask=tm[:, None] & emask[None, :])
    elif G_MODE == 2:
        gam2 = _dcumsum(_rows(G, rg, t, tm, offs_d, dmask, D).to(tl.float32))
        tl.store(GC + (ro + t[:, None]) * D + offs_d[None, :], gam2, mask=tm[:, None] & dmask[None, :])


@triton.jit
def _dchunk_state_kernel(
    K, V, W, UT, GC, S0, HS, U, SN, CU, CO,  # core_abi.DELTA_CHUNK_STATE
    T, H, NT, REP_K, REP_V,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
    G_MODE: tl.constexpr, DELTA: tl.constexpr, HAS_S0: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The sequential pass over chunks, grid (E-blocks, B·H; packed: nseq·H, `_seq_span`): one program carries BLOCK_E rows of one head's
    state (rows of S evolve independently). Per chunk: HS[c] = S (the entering state, [B, H, NT, E, D]);
    with DELTA the pseudo-values U = Ũ − W Sᵀ (U [B, H, T, E]; Yang et al. 2024, §3: u_i = β_i(v_i −
    S_{i−1} Diag(α_i) k_i)), else U = V; then S ← S Diag(e^{Γ_last}) + Uᵀ (K ⊙ e^{Γ_last − Γ}). SN: the
    final state. Everything else of the chunk is left to the parallel kernels, so this loop is two
    [C, D] × [D, BE]-sized tensor-core products per chunk."""
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
    if HAS_S0:  # S0 and SN: one state per program (batch or sequence, head)
        S = tl.load(S0 + pid.to(tl.int64) * E * D + s_off, mask=s_msk, other=0.0).to(tl.float32)
    else:
        S = tl.full((BLOCK_E, BLOCK_D), 0.0, tl.float32)
    ro = bh.to(tl.int64) * T
    rk = _head_row(bh, H, REP_K, T)
    rv = _head_row(bh, H, REP_V, T)
    for i in range(0, nc):
        c = cfirst + i
        c0 = row0 + i * CHUNK
        tl.store(HS + (bh.to(tl.int64) * NT + c) * E * D + s_off, S, mask=s_msk)
        t = c0 + offs_c
        tm = t < tn
        if DELTA:
            w = _rows(W, ro, t, tm, offs_d, dmask, D)
            u = _rows(UT, ro, t, tm, offs_e, emask, E) - tl.dot(w, tl.trans(S), input_precision=DOT_PRECISION)
            tl.store(U + (ro + t[:, None]) * E + offs_e[None, :], u, mask=tm[:, None] & emask[None, :])
        else:
            u = _rows(V, rv, t, tm, offs_e, emask, E)
        k = _rows(K, rk, t, tm, offs_d, dmask, D)
        last = tl.minimum(c0 + CHUNK - 1, tn - 1)  # Γ_last: Γ of the chunk's last real token
        if G_MODE == 1:
            gl = tl.load(GC + ro + last)
            gam = tl.load(GC + ro + tl.minimum(t, tn - 1))
            kd = k.to(tl.float32) * tl.exp(gl - gam)[:, None]
            S = S * tl.exp(gl)
            S = tl.dot(tl.trans(u.to(tl.float32)), kd, S, input_precision=DOT_PRECISION)
        elif G_MODE == 2:
            gl = tl.load(GC + (ro + last) * D + offs_d, mask=dmask, other=0.0)
            gam = _rows(GC, ro, tl.minimum(t, tn - 1), t >= 0, offs_d, dmask, D)
            kd = k.to(tl.float32) * tl.exp(gl[None, :] - gam)
            S = S * tl.exp(gl)[None, :]
            S = tl.dot(tl.trans(u.to(tl.float32)), kd, S, input_precision=DOT_PRECISION)
        elif DELTA:
            S = tl.dot(tl.trans(u), k.to(tl.float32), S, input_precision=DOT_PRECISION)
        else:
            S = tl.dot(tl.trans(u), k, S, input_precision=DOT_PRECISION)  # two input tiles: the input dtype
    tl.store(SN + pid.to(tl.int64) * E * D + s_off, S, mask=s_msk)


@triton.jit
def _dchunk_out_kernel(
    Q, K, V, U, GC, HS, OUT, CROW, CEND,  # core_abi.DELTA_CHUNK_OUT
    T, H, NT, REP_Q, REP_K, REP_V,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_DK: tl.constexpr, SUB: tl.constexpr, G_MODE: tl.constexpr, DELTA: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """O = (Q ⊙ e^Γ) Sᵀ + P U for one chunk and BLOCK_E value channels, grid (NT, B·H, E-blocks), with S the
    chunk's entering state (HS), U the pseudo-values (DELTA) or V, and P_ij = ⟨q_i, k_j⟩_Γ on j ≤ i
    (`_decay` for a scalar gate, `_gram_channel` per channel). OUT [B, H, T, E] float32."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    pid_e = tl.program_id(2)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    dmask = offs_d < D
    emask = offs_e < E
    c0, tn = _chunk_span(CROW, CEND, c, T, CHUNK, VARLEN)
    if VARLEN:  # a packed batch's padding slot (a batch has none: no test in its code)
        if c0 >= tn:
            return
    t = c0 + offs_c
    tm = t < tn
    ro = bh.to(tl.int64) * T
    rk = _head_row(bh, H, REP_K, T)
    rq = _head_row(bh, H, REP_Q, T)
    hs0 = (bh.to(tl.int64) * NT + c) * E * D  # the chunk's entering state in HS
    # The inter-chunk term first, so that the state tile is dead before the intra-chunk product starts
    # (register pressure on sm_90 at D = 128).
    if G_MODE == 2:
        # Per D-block (a key channel's terms are independent), so that few [C, BDK] tiles are live at once.
        out = tl.full((CHUNK, BLOCK_E), 0.0, tl.float32)
        P = tl.full((CHUNK, CHUNK), 0.0, tl.float32)
        for d0 in tl.static_range(0, BLOCK_D, BLOCK_DK):
            od = d0 + tl.arange(0, BLOCK_DK)
            dm = od < D
            qf = _rows(Q, rq, t, tm, od, dm, D).to(tl.float32)
            gam = _rows(GC, ro, tl.minimum(t, tn - 1), t >= 0, od, dm, D)
            Sd = tl.load(HS + hs0 + offs_e[:, None] * D + od[None, :], mask=emask[:, None] & dm[None, :])
            out = tl.dot(qf * tl.exp(gam), tl.trans(Sd), out, input_precision=DOT_PRECISION)
            kf = _rows(K, rk, t, tm, od, dm, D).to(tl.float32)
            P = _gram_channel(
                qf, gam, kf, K, GC, rk, ro, c0, tn, od, dm, P, D, CHUNK, SUB, False, DOT_PRECISION
            )
    else:
        Qn = _rows(Q, rq, t, tm, offs_d, dmask, D)
        S = tl.load(HS + hs0 + offs_e[:, None] * D + offs_d[None, :], mask=emask[:, None] & dmask[None, :])
        if G_MODE == 1:
            gam = tl.load(GC + ro + tl.minimum(t, tn - 1))
            out = tl.dot(Qn.to(tl.float32) * tl.exp(gam)[:, None], tl.trans(S), input_precision=DOT_PRECISION)
        else:
            out = tl.dot(Qn.to(tl.float32), tl.trans(S), input_precision=DOT_PRECISION)
        Kn = _rows(K, rk, t, tm, offs_d, dmask, D)
        qk = tl.dot(Qn, tl.trans(Kn), input_precision=DOT_PRECISION)  # the input dtype, fp32 accumulation
        if G_MODE == 1:
            P = qk * _decay(gam, False, CHUNK)
        else:
            P = tl.where(offs_c[:, None] >= offs_c[None, :], qk, 0.0)
    if DELTA:
        u = _rows(U, ro, t, tm, offs_e, emask, E)
    else:
        u = _rows(V, _head_row(bh, H, REP_V, T), t, tm, offs_e, emask, E).to(tl.float32)
    out = tl.dot(P, u, out, input_precision=DOT_PRECISION)
    tl.store(OUT + (ro + t[:, None]) * E + offs_e[None, :], out, mask=tm[:, None] & emask[None, :])
