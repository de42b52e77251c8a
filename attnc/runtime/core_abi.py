"""The signatures of the runtime's own Triton kernels: the linear family's core (linear_kernels.py) and the
delta rule (delta_kernels.py), one `KernelSignature` each.

Those kernels are written by hand, not generated, so their `def`s spell their parameters once more; a test
holds each `def` to its signature here (names, order, constexpr annotations). Everything else derives from
these objects: the launchers bind their arguments by group and name (`launch_core`), and the ahead-of-time compile
types the runtime parameters and checks the constexprs (`KernelSignature.compile_args`). Groups:

    io          pointers: q, k, v (and the delta rule's rank-1 factors and beta) in the input dtype, the rest
                float32
    extents     the ints (sequence length, heads, head-sharing ratios, chunk or checkpoint counts)
    constexprs  head dims, tile sizes, chunk, switches and the dot precision

This module imports only the signature data: the standalone module's vendored runtime carries it too.
"""

from __future__ import annotations

from collections.abc import Mapping

from .signature import INPUT, Group, KernelSignature, ParamGroup, constexpr_group, i32, pointer


def _core_signature(name: str, io: str, inputs: str, ints: str, constexprs: str) -> KernelSignature:
    """A signature from its groups' names (space-separated): the pointers (those named in `inputs` in the
    input dtype, the others float32), the ints, the constexprs."""
    dtypes = {n: INPUT for n in inputs.split()} | {
        n: "i32" for n in ("CU", "CO", "CROW", "CEND")
    }  # packed batches' offsets
    return KernelSignature(
        name,
        (
            ParamGroup(Group.IO, tuple(pointer(n, dtypes.get(n, "fp32")) for n in io.split())),
            ParamGroup(Group.EXTENTS, tuple(i32(n) for n in ints.split())),
            constexpr_group(tuple(constexprs.split())),
        ),
    )


# ---- the linear family's core ----------------------------------------------------------------------------

_QKV = "QT KT V"  # q~, k~ (feature-mapped, scaled) and v: the input dtype
_LIN_INTS = "N NH REP_K REP_V NC"
_LIN_CHUNK = "D E CHUNK BLOCK_D BLOCK_V CAUSAL HAS_DECAY NORM_SUM DOT_PRECISION"  # the per-chunk kernels
_LIN_PASS = "D E CHUNK BLOCK_K BLOCK_V HAS_DECAY {} NORM_SUM DOT_PRECISION"  # the sequential state passes

LIN_FWD_STATE = _core_signature(
    "_lin_fwd_state_kernel", "KT V GL GS S0 Z0 HS ZS", _QKV, _LIN_INTS, _LIN_PASS.format("HAS_S0")
)
LIN_FWD_OUT = _core_signature("_lin_fwd_out_kernel", f"{_QKV} GL HS ZS OUT DEN", _QKV, _LIN_INTS, _LIN_CHUNK)
LIN_BWD_DSTATE = _core_signature(
    "_lin_bwd_dstate_kernel", "QT DO DDEN GL GS DSO DZO DHS DZS", _QKV, "N NH NC", _LIN_PASS.format("HAS_DSO")
)
LIN_BWD_DQ = _core_signature("_lin_bwd_dq_kernel", f"{_QKV} DO DDEN GL HS ZS DQ", _QKV, _LIN_INTS, _LIN_CHUNK)
LIN_BWD_DKV = _core_signature(
    "_lin_bwd_dkv_kernel", f"{_QKV} DO DDEN GL GS DHS DZS DK DV", _QKV, _LIN_INTS, _LIN_CHUNK
)
LIN_RECURRENT = _core_signature(
    "_lin_recurrent_kernel",
    f"{_QKV} GSTEP S0 Z0 OUT DEN SO ZO",
    _QKV,
    "N NH REP_K REP_V",
    "D E BLOCK_D BLOCK_V HAS_DECAY HAS_S0 NORM_SUM",
)

# Packed variable-length batches: the same kernels over [H, total, ...] rows, each program one sequence's
# (CU: int32 offsets [nseq + 1], CO: the first slot of each sequence's state stack [nseq]); a chunk's decay
# step is read from GL at its last row, so they take no GS.
_LIN_SEQS = "CU CO"
LIN_FWD_STATE_VARLEN = _core_signature(
    "_lin_fwd_state_varlen_kernel",
    f"KT V GL S0 Z0 HS ZS {_LIN_SEQS}",
    _QKV,
    _LIN_INTS,
    _LIN_PASS.format("HAS_S0"),
)
LIN_FWD_OUT_VARLEN = _core_signature(
    "_lin_fwd_out_varlen_kernel", f"{_QKV} GL HS ZS OUT DEN {_LIN_SEQS}", _QKV, _LIN_INTS, _LIN_CHUNK
)
LIN_BWD_DSTATE_VARLEN = _core_signature(
    "_lin_bwd_dstate_varlen_kernel",
    f"QT DO DDEN GL DSO DZO DHS DZS {_LIN_SEQS}",
    _QKV,
    "N NH NC",
    _LIN_PASS.format("HAS_DSO"),
)
LIN_BWD_DQ_VARLEN = _core_signature(
    "_lin_bwd_dq_varlen_kernel", f"{_QKV} DO DDEN GL HS ZS DQ {_LIN_SEQS}", _QKV, _LIN_INTS, _LIN_CHUNK
)
LIN_BWD_DKV_VARLEN = _core_signature(
    "_lin_bwd_dkv_varlen_kernel", f"{_QKV} DO DDEN GL DHS DZS DK DV {_LIN_SEQS}", _QKV, _LIN_INTS, _LIN_CHUNK
)
LIN_RECURRENT_VARLEN = _core_signature(
    "_lin_recurrent_varlen_kernel",
    f"{_QKV} GSTEP S0 Z0 OUT DEN SO ZO CU",
    _QKV,
    "N NH REP_K REP_V",
    "D E BLOCK_D BLOCK_V HAS_DECAY HAS_S0 NORM_SUM",
)
LINEAR_VARLEN = (
    LIN_FWD_STATE_VARLEN,
    LIN_FWD_OUT_VARLEN,
    LIN_BWD_DSTATE_VARLEN,
    LIN_BWD_DQ_VARLEN,
    LIN_BWD_DKV_VARLEN,
    LIN_RECURRENT_VARLEN,
)
LINEAR_CORE = (
    LIN_FWD_STATE,
    LIN_FWD_OUT,
    LIN_BWD_DSTATE,
    LIN_BWD_DQ,
    LIN_BWD_DKV,
    LIN_RECURRENT,
    *LINEAR_VARLEN,
)

# ---- the delta rule ----------------------------------------------------------------------------------------

_DPLR_IN = "Q K V RA RB"  # q, k, v and the rank-1 factors a, b: the input dtype; the gate G is float32
_DELTA_IN = "Q K V BETA"
_DELTA_REPS = "REP_Q REP_K REP_V"

DELTA_RECURRENT_FWD = _core_signature(
    "_delta_recurrent_fwd_kernel",
    "Q K V G RA RB S0 OUT SN HS",
    _DPLR_IN,
    f"T H {_DELTA_REPS} REP_G REP_R NCK",
    "D E BLOCK_D BLOCK_E G_MODE HAS_RANK1 HAS_S0 STORE_CKPT CKPT",
)
DELTA_RECURRENT_BWD = _core_signature(
    "_delta_recurrent_bwd_kernel",
    "Q K V G RA RB HS DO DSN SCR DQ DK DV DG DA DB DS0",
    _DPLR_IN,
    f"T H NBH {_DELTA_REPS} REP_G REP_R NCK",
    "D E BLOCK_D BLOCK_E G_MODE HAS_RANK1 HAS_DSN CKPT",
)
# ---- the chunk-parallel delta-rule backward (delta_chunk_bwd_kernels.py) -----------------------------------
# Parallel over chunks except the one state pass (DSTATE); G_MODE 0/1/2 and DELTA are constexprs. The
# forward's intermediates (GC, AI, W, U, HS: delta_chunk_design.md) and the scratch products (PM, KM, DPM)
# and partial gradients between the kernels are float32; q, k, v and beta in the input dtype.
_CBWD_INTS = f"T H NT {_DELTA_REPS} REP_B"
_CBWD_CONST = "D E {} BLOCK_E CHUNK SUB G_MODE DELTA VARLEN"
DELTA_CBWD_INTRA = _core_signature(
    "_delta_cbwd_intra_kernel",
    "Q K V U GC DO PM KM DPM DU DGS CROW CEND",
    "Q K V",
    _CBWD_INTS,
    f"{_CBWD_CONST.format('BLOCK_D')} DOT_PRECISION",
)
DELTA_CBWD_DSTATE = _core_signature(
    "_delta_cbwd_dstate_kernel",
    "Q K W GC DO DSN DU DHS DS0 CU CO",
    "Q K",
    _CBWD_INTS,
    f"{_CBWD_CONST.format('BLOCK_D')} HAS_DSN DOT_PRECISION",
)
DELTA_CBWD_DQKW = _core_signature(
    "_delta_cbwd_dqkw_kernel",
    "Q K V U GC HS DO DU DHS DPM DQ DK DW DGK CROW CEND",
    "Q K V",
    _CBWD_INTS,
    f"{_CBWD_CONST.format('BLOCK_K')} DOT_PRECISION",
)
DELTA_CBWD_WY = _core_signature(
    "_delta_cbwd_wy_kernel",
    "K V BETA GC AI DU DW KM PM DK DGK DGS DV DBETA DG CROW CEND",
    "K V BETA",
    f"T H NT NK {_DELTA_REPS} REP_B",
    f"{_CBWD_CONST.format('BLOCK_K')} DOT_PRECISION",
)
DELTA_CHUNK_BWD_KERNELS = (DELTA_CBWD_INTRA, DELTA_CBWD_DSTATE, DELTA_CBWD_DQKW, DELTA_CBWD_WY)

# Packed variable-length batches (NAME_varlen of a state block): the same kernels over [1, H, total, ...] rows,
# one program per (E-block, sequence, head) walking only its sequence (CU: int32 offsets [nseq + 1], CO: int32
# [nseq], the first slot of each sequence's stored states in its head's NCK slots). The chunk-parallel
# kernels below take packed batches through their VARLEN constexpr and a chunk table instead (CROW / CEND:
# each slot's first row and its sequence's end, int32; CU / CO in their sequential passes).
_DELTA_SEQS = "CU CO"
DELTA_RECURRENT_FWD_VARLEN = _core_signature(
    "_delta_recurrent_fwd_varlen_kernel",
    f"Q K V G RA RB S0 OUT SN HS {_DELTA_SEQS}",
    _DPLR_IN,
    f"T H {_DELTA_REPS} REP_G REP_R NCK",
    "D E BLOCK_D BLOCK_E G_MODE HAS_RANK1 HAS_S0 STORE_CKPT CKPT",
)
DELTA_RECURRENT_BWD_VARLEN = _core_signature(
    "_delta_recurrent_bwd_varlen_kernel",
    f"Q K V G RA RB HS DO DSN SCR DQ DK DV DG DA DB DS0 {_DELTA_SEQS}",
    _DPLR_IN,
    f"T H NBH {_DELTA_REPS} REP_G REP_R NCK",
    "D E BLOCK_D BLOCK_E G_MODE HAS_RANK1 HAS_DSN CKPT",
)
DELTA_VARLEN = (DELTA_RECURRENT_FWD_VARLEN, DELTA_RECURRENT_BWD_VARLEN)
DELTA_KERNELS = (DELTA_RECURRENT_FWD, DELTA_RECURRENT_BWD, *DELTA_VARLEN)

# ---- the delta rule, chunk-parallel forward (delta_chunk_kernels.py) ------------------------------------------
# Issue 12's decomposition: per-chunk factors in parallel over (chunk, head), one sequential state pass, the
# outputs in parallel again. Pointers: q, k, v and beta in the input dtype; the gate G and every intermediate
# (GC, AI, W, UT, HS, U, O, SN) float32. They live in their own kernels file, so they are not in
# DELTA_KERNELS (whose defs test_kernel_structure holds to delta_kernels.py); DELTA_CHUNK_PARALLEL lists them.

DELTA_CHUNK_PREP = _core_signature(
    "_dchunk_prep_kernel",
    "K V BETA G GC AI W UT CROW CEND",
    "K V BETA",
    "T H REP_K REP_V REP_B REP_G",
    "D E BLOCK_D BLOCK_E CHUNK BLOCK_DK SUB G_MODE DELTA STORE_AI VARLEN DOT_PRECISION",
)
DELTA_CHUNK_STATE = _core_signature(
    "_dchunk_state_kernel",
    "K V W UT GC S0 HS U SN CU CO",
    "K V",
    "T H NT REP_K REP_V",
    "D E BLOCK_D BLOCK_E CHUNK G_MODE DELTA HAS_S0 VARLEN DOT_PRECISION",
)
DELTA_CHUNK_OUT = _core_signature(
    "_dchunk_out_kernel",
    "Q K V U GC HS OUT CROW CEND",
    "Q K V",
    "T H NT REP_Q REP_K REP_V",
    "D E BLOCK_D BLOCK_E CHUNK BLOCK_DK SUB G_MODE DELTA VARLEN DOT_PRECISION",
)
DELTA_CHUNK_PARALLEL = (DELTA_CHUNK_PREP, DELTA_CHUNK_STATE, DELTA_CHUNK_OUT)


def launch_core(
    kernels: object,
    sig: KernelSignature,
    grid: tuple[int, ...],
    io: Mapping[str, object],
    extents: Mapping[str, object],
    constexprs: Mapping[str, object],
    **options: int,
) -> None:
    """Launch `sig`'s kernel from the loaded `kernels` module on `grid`, its arguments bound by name
    (`options`: num_warps, num_stages)."""
    bound = sig.bind(io=io, extents=extents, constexprs=constexprs)
    getattr(kernels, sig.name)[grid](**bound, **options)
