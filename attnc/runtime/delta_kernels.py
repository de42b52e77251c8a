"""Triton kernels of the delta-rule family (host side, math and conventions: attnc/runtime/delta.py, docs/delta.md).

Per (batch, head) a state S of shape [E, D] (rows: value channels, columns: key channels) evolves over tokens

    S_t = S_{t-1} · T_t + v_t k_tᵀ,    T_t = Diag(w_t) + a_t b_tᵀ,    w_t = exp(g_t),    o_t = S_t q_t

Every row of S evolves on its own (row e: s_t = T_tᵀ s_{t-1} + v_t[e] k_t), so every kernel splits E into
blocks (grid axis 0) and runs the rows of one block in one program; reductions over E (gradients of q, k, w,
a, b) are per-block partial sums that the host adds.

Kernels:
- `_delta_recurrent_fwd_kernel`: token by token, general form (w scalar, per-channel or absent; rank-1 part
  optional); optionally stores the state entering every CKPT-th token (checkpoints for the backward).
- `_delta_recurrent_bwd_kernel`: reverse-time recurrence of dS. Per checkpoint interval (last first) it
  recomputes the interval's states from the checkpoint into a per-program scratch buffer, then walks the
  interval backwards.
- `*_varlen_kernel`: the same on a packed batch (one program per (E-block, sequence, head) walking its
  sequence). The chunked algorithm, batched and packed, is the chunk-parallel kernels of
  delta_chunk_kernels.py / delta_chunk_bwd_kernels.py.

Builtins only (tl.reduce / tl.associative_scan with the standard combiners, tl.full): the kernels work in
whichever mode Triton was imported in, which the interpreter-based CPU tests rely on. State and every
accumulation are float32; inputs of any float dtype are converted on load.
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
def _head_rows(bh, H, T, REP_1, REP_2, REP_3, REP_4, REP_5):
    """`_head_row` of five inputs at once (each kernel reads five [B, H // REP, T, ...] inputs)."""
    return (
        _head_row(bh, H, REP_1, T),
        _head_row(bh, H, REP_2, T),
        _head_row(bh, H, REP_3, T),
        _head_row(bh, H, REP_4, T),
        _head_row(bh, H, REP_5, T),
    )


@triton.jit
def _delta_seq(CU, CO, T, H, NCK, CKPT: tl.constexpr, VARLEN: tl.constexpr):
    """A program's sequence. A batch (VARLEN False): state head bh = program_id(1) of [B, H, T, ...] inputs,
    one sequence of T tokens, NCK stored states per head. A packed batch: bh = s·H + h for sequence s (its
    states S0/SN/DS0 [nseq, H, E, D] are indexed by bh as a batch's), whose inputs [1, H/REP, total, ...] hold
    every sequence of a head in one row block: sequence s starts at row CU[s] and has CU[s+1] − CU[s] tokens;
    its stored states (one per CKPT tokens) start at slot CO[s] of its head's NCK slots. Returns the index the
    input rows derive from (`_head_rows`: b = 0 in a packed batch), the first row, the length, the first
    stored-state slot and their count."""
    bh = tl.program_id(1)
    if VARLEN:
        s = bh // H
        hb = bh % H
        bos = tl.load(CU + s).to(tl.int64)
        n = (tl.load(CU + s + 1).to(tl.int64) - bos).to(tl.int32)
        hs0 = hb.to(tl.int64) * NCK + tl.load(CO + s).to(tl.int64)
        nck = (n + CKPT - 1) // CKPT  # not tl.cdiv: a jit function, which breaks across interpreter modes
    else:
        hb = bh
        bos = 0
        n = T
        hs0 = bh.to(tl.int64) * NCK
        nck = NCK
    return hb, bos, n, hs0, nck


@triton.jit
def _shift_rows(rq, rk, rv, rg, rr, bos):
    """Five inputs' row bases moved to a sequence's first row (bos = 0 in a batch)."""
    return rq + bos, rk + bos, rv + bos, rg + bos, rr + bos


@triton.jit
def _state_block(D, E, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """What every program works on: its state head bh (grid axis 1) and its rows of that head's [E, D] state
    (E-block: grid axis 0): the key and value offsets, their masks, and the block's offsets and mask in the
    row-major state."""
    pid_e = tl.program_id(0)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    dmask = offs_d < D
    emask = offs_e < E
    s_off = offs_e[:, None] * D + offs_d[None, :]
    s_msk = emask[:, None] & dmask[None, :]
    return bh, offs_d, offs_e, dmask, emask, s_off, s_msk


@triton.jit
def _state_in(S0, bh, s_off, s_msk, D, E, HAS_S0: tl.constexpr):
    """The state block a pass starts from: head bh's of S0 [B·H, E, D], or zeros."""
    if HAS_S0:
        S = tl.load(S0 + bh.to(tl.int64) * E * D + s_off, mask=s_msk, other=0.0).to(tl.float32)
    else:
        S = tl.full(s_off.shape, 0.0, tl.float32)
    return S


@triton.jit
def _load_vec(base, offs, mask):
    return tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_scalar(ptr, offs, mask):
    """*ptr as a float32 scalar (0 where mask[0] is false), read through lane 0 of a vector: under the
    interpreter a scalar load cannot take the Python-bool mask that a loop index gives."""
    return _dsum(tl.load(ptr + offs * 0, mask=(offs == 0) & mask, other=0.0).to(tl.float32), 0)


@triton.jit
def _load_gates(
    G, RA, RB, rg, rr, t, offs_d, vd, k, D, G_MODE: tl.constexpr, HAS_RANK1: tl.constexpr, TAIL: tl.constexpr
):
    """Token t's gate g and rank-1 factors a, b (vd: the lanes to read). The parts a variant lacks are
    placeholders (g = 0, a = b = k) that `_delta_step` does not read. TAIL: t may lie past T (its lanes are
    masked off), so a scalar gate is read through a vector lane (`_load_scalar`)."""
    g, a, b = 0.0, k, k
    if G_MODE == 1:
        if TAIL:
            g = _load_scalar(G + rg + t, offs_d, vd)
        else:
            g = tl.load(G + rg + t).to(tl.float32)
    elif G_MODE == 2:
        g = _load_vec(G + (rg + t) * D, offs_d, vd)
    if HAS_RANK1:
        a = _load_vec(RA + (rr + t) * D, offs_d, vd)
        b = _load_vec(RB + (rr + t) * D, offs_d, vd)
    return g, a, b


@triton.jit
def _gate(S, g, G_MODE: tl.constexpr):
    """S·Diag(w), w = e^g: one gate for every column (G_MODE 1), one per column (2), or none (0). The forward
    step and the backward's dS ← dS·Diag(w_t) share it."""
    if G_MODE == 1:
        S = S * tl.exp(g)
    elif G_MODE == 2:
        S = S * tl.exp(g)[None, :]
    return S


@triton.jit
def _delta_step(S, k, v, g, a, b, G_MODE: tl.constexpr, HAS_RANK1: tl.constexpr):
    """One token: S·(Diag(w) + a bᵀ) + v kᵀ for S [BE, BD], k/a/b [BD], v [BE], g a scalar or [BD]."""
    if HAS_RANK1:
        u = _dsum(S * a[None, :], 1)  # S_{t-1} a, [BE]
    S = _gate(S, g, G_MODE)
    if HAS_RANK1:
        S += u[:, None] * b[None, :]
    S += v[:, None] * k[None, :]
    return S


@triton.jit
def _delta_recurrent_fwd(
    Q, K, V, G, RA, RB, S0, OUT, SN, HS, CU, CO,
    T, H, REP_Q, REP_K, REP_V, REP_G, REP_R, NCK,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, G_MODE: tl.constexpr,
    HAS_RANK1: tl.constexpr, HAS_S0: tl.constexpr, STORE_CKPT: tl.constexpr, CKPT: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    """o_t = S_t q_t token by token. Q/K/RA/RB [B, H/REP, T, D], V [B, H/REP_V, T, E], G [B, H/REP_G, T(, D)]
    (log w), S0/SN [B, H, E, D] fp32, OUT [B, H, T, E] fp32, HS [B, H, NCK, E, D] fp32 (state before token
    c·CKPT). A packed batch (VARLEN, `_delta_seq`): B = 1 and T = total for the inputs and OUT, S0/SN
    [nseq, H, E, D], HS [H, NCK, E, D] (each sequence's states from slot CO[s])."""
    bh, offs_d, offs_e, dmask, emask, s_off, s_msk = _state_block(D, E, BLOCK_D, BLOCK_E)
    hb, bos, n, hs0, _ = _delta_seq(CU, CO, T, H, NCK, CKPT, VARLEN)
    S = _state_in(S0, bh, s_off, s_msk, D, E, HAS_S0)
    rq, rk, rv, rg, rr = _shift_rows(*_head_rows(hb, H, T, REP_Q, REP_K, REP_V, REP_G, REP_R), bos)
    orow = hb.to(tl.int64) * T + bos  # OUT's row of the sequence's first token
    for t in range(0, n):
        if STORE_CKPT:
            if t % CKPT == 0:
                tl.store(HS + (hs0 + t // CKPT) * E * D + s_off, S, mask=s_msk)
        k = _load_vec(K + (rk + t) * D, offs_d, dmask)
        v = _load_vec(V + (rv + t) * E, offs_e, emask)
        q = _load_vec(Q + (rq + t) * D, offs_d, dmask)
        g, a, b = _load_gates(G, RA, RB, rg, rr, t, offs_d, dmask, k, D, G_MODE, HAS_RANK1, False)
        S = _delta_step(S, k, v, g, a, b, G_MODE, HAS_RANK1)
        o = _dsum(S * q[None, :], 1)
        tl.store(OUT + (orow + t) * E + offs_e, o, mask=emask)
    tl.store(SN + bh.to(tl.int64) * E * D + s_off, S, mask=s_msk)


@triton.jit
def _delta_recurrent_fwd_kernel(
    Q, K, V, G, RA, RB, S0, OUT, SN, HS,  # core_abi.DELTA_RECURRENT_FWD
    T, H, REP_Q, REP_K, REP_V, REP_G, REP_R, NCK,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, G_MODE: tl.constexpr,
    HAS_RANK1: tl.constexpr, HAS_S0: tl.constexpr, STORE_CKPT: tl.constexpr, CKPT: tl.constexpr,
):  # fmt: skip
    """`_delta_recurrent_fwd` on a batch [B, H, T, ...]."""
    _delta_recurrent_fwd(
        Q, K, V, G, RA, RB, S0, OUT, SN, HS, Q, Q, T, H, REP_Q, REP_K, REP_V, REP_G, REP_R, NCK,
        D, E, BLOCK_D, BLOCK_E, G_MODE, HAS_RANK1, HAS_S0, STORE_CKPT, CKPT, VARLEN=False,
    )  # fmt: skip


@triton.jit
def _delta_recurrent_fwd_varlen_kernel(
    Q, K, V, G, RA, RB, S0, OUT, SN, HS, CU, CO,  # core_abi.DELTA_RECURRENT_FWD_VARLEN
    T, H, REP_Q, REP_K, REP_V, REP_G, REP_R, NCK,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, G_MODE: tl.constexpr,
    HAS_RANK1: tl.constexpr, HAS_S0: tl.constexpr, STORE_CKPT: tl.constexpr, CKPT: tl.constexpr,
):  # fmt: skip
    """`_delta_recurrent_fwd` on a packed batch: grid (E-blocks, nseq·H); T = total, NCK = slots per head."""
    _delta_recurrent_fwd(
        Q, K, V, G, RA, RB, S0, OUT, SN, HS, CU, CO, T, H, REP_Q, REP_K, REP_V, REP_G, REP_R, NCK,
        D, E, BLOCK_D, BLOCK_E, G_MODE, HAS_RANK1, HAS_S0, STORE_CKPT, CKPT, VARLEN=True,
    )  # fmt: skip


@triton.jit
def _delta_recurrent_bwd(
    Q, K, V, G, RA, RB, HS, DO, DSN, SCR, DQ, DK, DV, DG, DA, DB, DS0, CU, CO,
    T, H, NBH, REP_Q, REP_K, REP_V, REP_G, REP_R, NCK,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, G_MODE: tl.constexpr,
    HAS_RANK1: tl.constexpr, HAS_DSN: tl.constexpr, CKPT: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """Gradients by the reverse-time recurrence (per token t, last first, with dS = ∂L/∂S_t):

        dS  += do_t q_tᵀ;   dq_t = S_tᵀ do_t;   dv_t = dS k_t;   dk_t = dSᵀ v_t
        dw_t = Σ_e S_{t-1} ⊙ dS (dg_t = w_t ⊙ dw_t, summed over D for a scalar gate)
        u = S_{t-1} a_t:  db_t = dSᵀ u;   du = dS b_t;   da_t = S_{t-1}ᵀ du
        dS  ← dS·Diag(w_t) + du a_tᵀ   (= ∂L/∂S_{t-1})

    DO [B, H, T, E] fp32; DSN [B, H, E, D] (∂L/∂S_T); SCR [NE·B·H, CKPT, BLOCK_E, BLOCK_D] fp32 scratch.
    Outputs per state head: DV [B, H, T, E], DS0 [B, H, E, D]; partial over E-blocks (leading NE axis):
    DQ/DK/DA/DB [NE, B, H, T, D], DG [NE, B, H, T(, D)]. A packed batch (VARLEN, `_delta_seq`): B = 1 and
    T = total for the per-token tensors, DSN/DS0 [nseq, H, E, D], HS [H, NCK, E, D], NBH = nseq·H."""
    pid_e = tl.program_id(0)
    bh, offs_d, offs_e, dmask, emask, s_off, s_msk = _state_block(D, E, BLOCK_D, BLOCK_E)
    hb, bos, n, hs0, nck = _delta_seq(CU, CO, T, H, NCK, CKPT, VARLEN)
    scr_off = tl.arange(0, BLOCK_E)[:, None] * BLOCK_D + offs_d[None, :]
    scr = SCR + (pid_e.to(tl.int64) * NBH + bh) * CKPT * BLOCK_E * BLOCK_D
    # This program's rows of the partial outputs [NE, B, H, T, ...] (B = 1 in a packed batch).
    if VARLEN:
        prow = (pid_e.to(tl.int64) * H + hb) * T + bos
    else:
        prow = (pid_e.to(tl.int64) * NBH + bh) * T
    orow = hb.to(tl.int64) * T + bos  # DO's and DV's row of the sequence's first token
    dS = _state_in(DSN, bh, s_off, s_msk, D, E, HAS_DSN)
    rq, rk, rv, rg, rr = _shift_rows(*_head_rows(hb, H, T, REP_Q, REP_K, REP_V, REP_G, REP_R), bos)
    for ci in range(0, nck):
        c = nck - 1 - ci
        S = tl.load(HS + (hs0 + c) * E * D + s_off, mask=s_msk, other=0.0)
        # Recompute the interval's states; tokens past the end read zeros (w = 1, no write): the identity.
        for j in range(0, CKPT):
            t = c * CKPT + j
            vd = dmask & (offs_d * 0 + t < n)  # lanes of a token past the sequence's end read zeros
            ve = emask & (offs_e * 0 + t < n)
            tl.store(scr + j * BLOCK_E * BLOCK_D + scr_off, S)
            k = _load_vec(K + (rk + t) * D, offs_d, vd)
            v = _load_vec(V + (rv + t) * E, offs_e, ve)
            g, a, b = _load_gates(G, RA, RB, rg, rr, t, offs_d, vd, k, D, G_MODE, HAS_RANK1, True)
            S = _delta_step(S, k, v, g, a, b, G_MODE, HAS_RANK1)
        tl.debug_barrier()
        for jj in range(0, CKPT):
            j = CKPT - 1 - jj
            t = c * CKPT + j
            vd = dmask & (offs_d * 0 + t < n)  # lanes of a token past the sequence's end read zeros
            ve = emask & (offs_e * 0 + t < n)
            Sp = tl.load(scr + j * BLOCK_E * BLOCK_D + scr_off)  # S_{t-1}
            k = _load_vec(K + (rk + t) * D, offs_d, vd)
            v = _load_vec(V + (rv + t) * E, offs_e, ve)
            q = _load_vec(Q + (rq + t) * D, offs_d, vd)
            do = _load_vec(DO + (orow + t) * E, offs_e, ve)
            g, a, b = _load_gates(G, RA, RB, rg, rr, t, offs_d, vd, k, D, G_MODE, HAS_RANK1, True)
            St = _delta_step(Sp, k, v, g, a, b, G_MODE, HAS_RANK1)
            dS += do[:, None] * q[None, :]
            row = (prow + t) * D
            tl.store(DQ + row + offs_d, _dsum(St * do[:, None], 0), mask=vd)
            tl.store(DK + row + offs_d, _dsum(dS * v[:, None], 0), mask=vd)
            tl.store(DV + (orow + t) * E + offs_e, _dsum(dS * k[None, :], 1), mask=ve)
            if G_MODE == 1:
                dg = _dsum(_dsum(Sp * dS, 0), 0) * tl.exp(g)
                tl.store(DG + prow + t + offs_d * 0, dg + offs_d * 0.0, mask=(offs_d == 0) & vd)
            elif G_MODE == 2:
                dg = _dsum(Sp * dS, 0) * tl.exp(g)
                tl.store(DG + row + offs_d, dg, mask=vd)
            if HAS_RANK1:
                u = _dsum(Sp * a[None, :], 1)
                du = _dsum(dS * b[None, :], 1)
                tl.store(DB + row + offs_d, _dsum(dS * u[:, None], 0), mask=vd)
                tl.store(DA + row + offs_d, _dsum(Sp * du[:, None], 0), mask=vd)
            dS = _gate(dS, g, G_MODE)
            if HAS_RANK1:
                dS += du[:, None] * a[None, :]
        tl.debug_barrier()  # the next interval overwrites the scratch
    tl.store(DS0 + bh.to(tl.int64) * E * D + s_off, dS, mask=s_msk)


@triton.jit
def _delta_recurrent_bwd_kernel(
    Q, K, V, G, RA, RB, HS, DO, DSN, SCR, DQ, DK, DV, DG, DA, DB, DS0,  # core_abi.DELTA_RECURRENT_BWD
    T, H, NBH, REP_Q, REP_K, REP_V, REP_G, REP_R, NCK,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, G_MODE: tl.constexpr,
    HAS_RANK1: tl.constexpr, HAS_DSN: tl.constexpr, CKPT: tl.constexpr,
):  # fmt: skip
    """`_delta_recurrent_bwd` on a batch [B, H, T, ...]."""
    _delta_recurrent_bwd(
        Q, K, V, G, RA, RB, HS, DO, DSN, SCR, DQ, DK, DV, DG, DA, DB, DS0, Q, Q,
        T, H, NBH, REP_Q, REP_K, REP_V, REP_G, REP_R, NCK,
        D, E, BLOCK_D, BLOCK_E, G_MODE, HAS_RANK1, HAS_DSN, CKPT, VARLEN=False,
    )  # fmt: skip


@triton.jit
def _delta_recurrent_bwd_varlen_kernel(
    Q, K, V, G, RA, RB, HS, DO, DSN, SCR, DQ, DK, DV, DG, DA, DB, DS0, CU, CO,  # DELTA_RECURRENT_BWD_VARLEN
    T, H, NBH, REP_Q, REP_K, REP_V, REP_G, REP_R, NCK,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, G_MODE: tl.constexpr,
    HAS_RANK1: tl.constexpr, HAS_DSN: tl.constexpr, CKPT: tl.constexpr,
):  # fmt: skip
    """`_delta_recurrent_bwd` on a packed batch: grid (E-blocks, nseq·H); T = total, NCK = slots per head."""
    _delta_recurrent_bwd(
        Q, K, V, G, RA, RB, HS, DO, DSN, SCR, DQ, DK, DV, DG, DA, DB, DS0, CU, CO,
        T, H, NBH, REP_Q, REP_K, REP_V, REP_G, REP_R, NCK,
        D, E, BLOCK_D, BLOCK_E, G_MODE, HAS_RANK1, HAS_DSN, CKPT, VARLEN=True,
    )  # fmt: skip
