"""A resource model per GPU generation: which schedules cannot launch or would spill, before anything runs.

Two limits decide most of a FlashAttention-style space:

- shared memory: the launch asks for the staged operand tiles; more than the block may opt into
  (`MAX_SHARED_BYTES`) fails with OutOfResources at load time;
- registers: a thread holds its share of the fp32 accumulators and score tiles; past 255 registers `ptxas`
  spills to local memory, which costs more than any tile size gains.

The estimates are calibrated against `ptxas -v` for the generated kernels (Triton 3.9, sm_90 and sm_80), and
`tests/test_autotune_resource.py` compares the model's verdict with `compile_report` for a handful of configs:
an estimate that drifts from the compiler is caught there, and `autotune.prescreen` compiles the survivors for
the real numbers. The model only has to be right about the verdict, not the byte count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from attnc.codegen.triton.aot import MAX_SHARED_BYTES, MAX_THREADS_PER_BLOCK

from .space import Candidate, KernelKind, KernelSpace, Problem

__all__ = ["ARCHS", "Estimate", "GpuArch", "RegModel", "Verdict", "arch_for", "estimate", "prune", "verdict"]


@dataclass(frozen=True)
class RegModel:
    """Registers per thread ~ base + sum(coefficient * elements per thread), least squares over `ptxas -v`
    of the generated kernels on sm_90 (fp16, D = 64, every tile and warp count of the space). The score tile
    and the streamed operand cost most: wgmma keeps score fragments and their softmax live together."""

    base: float
    acc: float  # fp32 accumulator elements (o; dk and dv; dq)
    score: float  # score-tile elements (s; and dp in the backward)
    streamed: float  # operand tile streamed by the inner loop (K / V; Q / dO)
    resident: float  # operand tile resident across the loop (Q; K and V)


# Verdicts against the compiler (spills or not). Forward: refitted over 78 configs of the causal forward
# (tiles 16-128, 2-8 warps, 1-2 stages; sm_90, fp16, D = 64, any strides) once the value tile's load moved
# next to its product (codegen/triton/norms.py): 74 agree (the previous model: 70). The misses sit at the
# limit (64 x 64 on 4 warps: 255 registers, no spill) or off the trend (32 x 128 on 8 warps spills 56 bytes).
# At D = E, the accumulator and the resident q tile are the same size: one term (acc) carries both.
_FWD_REGS = RegModel(base=114.0, acc=1.5, score=0.3, streamed=2.6, resident=0.0)
# dQ: the earlier shared fit (then forward 25 of 26 configs agreed, dK/dV and dQ 127 of 130); not refitted.
_BWD_REGS = RegModel(base=120.0, acc=0.6, score=1.6, streamed=1.45, resident=0.36)
# dK/dV on its own since dO streams in the inputs' dtype and wide key tiles run keys as rows
# (codegen/triton/kernels.py, KEY_ROWS): refitted over 38 configs (tiles 16-128, 2-8 warps; sm_90, fp16,
# D = 64, any strides), all 38 verdicts right (the shared model: 32). K and V stay in shared memory (no
# resident term); the accumulators and the streamed q / dO tiles dominate.
_DKDV_REGS = RegModel(base=100.0, acc=1.0, score=0.4, streamed=1.8, resident=0.0)


def _reg_models() -> dict[KernelKind, RegModel]:
    return {
        KernelKind.FWD: _FWD_REGS,
        KernelKind.FWD_SPLIT: _FWD_REGS,
        KernelKind.DKDV: _DKDV_REGS,
        KernelKind.DQ: _BWD_REGS,
    }


@dataclass(frozen=True)
class GpuArch:
    """The limits of one GPU generation that a schedule must respect, and its register model per kernel
    kind (a kind without one uses the forward's)."""

    cc: int
    name: str
    max_shared_bytes: int  # per block, opt-in maximum
    max_registers_per_thread: int = 255
    registers_per_sm: int = 65536
    max_threads_per_block: int = MAX_THREADS_PER_BLOCK
    reg_models: Mapping[KernelKind, RegModel] = field(default_factory=_reg_models)
    # Whether Triton 3.9 warp-specialises the attention kernels' key loops here (`_WS`). sm_100: yes (AOT:
    # causal forward, D = 64, 128 x 128 on 8 warps compiles to 16 warps, 128 registers, no spill). sm_90:
    # no; with two key loops in a kernel (the lean one and the boundary one) the compiler fails an MLIR
    # dominance assertion on 4 warps and leaves the loops unpartitioned on 8.
    warp_specialize: bool = False

    def regs(self, kind: KernelKind) -> RegModel:
        return self.reg_models.get(kind, _FWD_REGS)


ARCHS: dict[int, GpuArch] = {
    # Before sm_90 (mma.sync, no wgmma) the same coefficients: uncalibrated there, hence prescreen.
    80: GpuArch(80, "Ampere (A100)", MAX_SHARED_BYTES[80]),
    86: GpuArch(86, "Ampere (RTX 30, A10)", MAX_SHARED_BYTES[86]),
    89: GpuArch(89, "Ada (L4, RTX 40)", MAX_SHARED_BYTES[89]),
    90: GpuArch(90, "Hopper (H100, H200)", MAX_SHARED_BYTES[90]),
    # The register model is sm_90's (uncalibrated on sm_100; the prescreen's compile checks it).
    100: GpuArch(100, "Blackwell (B200)", MAX_SHARED_BYTES[100], warp_specialize=True),
    120: GpuArch(120, "Blackwell (RTX 50)", MAX_SHARED_BYTES[120]),
}


def arch_for(cc: int) -> GpuArch:
    """The closest known generation at or below `cc` (a newer GPU is at least as capable)."""
    known = [c for c in sorted(ARCHS) if c <= cc]
    if not known:
        raise ValueError(f"no resource model for compute capability {cc} (known: {sorted(ARCHS)})")
    return ARCHS[known[-1]]


@dataclass(frozen=True)
class Estimate:
    shared_bytes: int
    registers: int
    threads: int


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # empty when ok
    estimate: Estimate


def estimate(c: Candidate, p: Problem, arch: GpuArch) -> Estimate:
    """Shared memory and registers per thread of candidate `c` for kernel `c.kind`.

    Shared memory, as measured on sm_90: the resident and the streamed operand tiles, plus the probability
    tile when it is too short for a register-sourced wgmma (fewer than 64 rows). `num_stages` changes
    nothing in these kernels (their masked loops are not software-pipelined), so it is not in the model;
    should codegen start pipelining them, the comparison with the compiler in the tests fails first.
    """
    if c.kind is KernelKind.LIN_CHUNK:
        return _lin_estimate(c, p)
    bm, bn, warps = c["block_m"], c["block_n"], c["num_warps"]
    D, E, nbytes = p.head_dim, p.v_dim, p.dtype.bytes
    threads = 32 * warps
    if c.kind in (KernelKind.FWD, KernelKind.FWD_SPLIT):  # the split kernel is the forward's key loop
        resident, streamed, acc, scores, rows = bm * D, bn * max(D, E), bm * E, bm * bn, bm
    elif c.kind is KernelKind.DKDV:
        resident, streamed, acc, scores, rows = bn * (D + E), bm * max(D, E), bn * (D + E), 2 * bm * bn, bn
    else:  # DQ
        resident, streamed, acc, scores, rows = bm * (D + E), bn * max(D, E), bm * D, 2 * bm * bn, bm
    if c.kind is KernelKind.DKDV:
        # Q and dO both stream, and the transposed probability tile goes through shared memory (measured,
        # sm_90: within 25% over the space; the verdict only matters near the limit).
        shared = nbytes * (bm * (D + E) + bn * (D + E) + bm * bn)
    else:
        p_tile = bm * bn if arch.cc >= 90 and rows < 64 else 0
        shared = nbytes * (resident + streamed + p_tile)
    wide = nbytes / 2  # fp32 operands take twice the registers of fp16 ones
    m = arch.regs(c.kind)
    regs = (
        m.base
        + (m.acc * acc + m.score * scores + wide * (m.streamed * streamed + m.resident * resident)) / threads
    )
    return Estimate(shared, round(regs), threads)


def _lin_estimate(c: Candidate, p: Problem) -> Estimate:
    """The chunked linear forward's output kernel, the larger of its two: q~ and k~ tiles (C x D), the state
    block (D x block_v) and v (C x block_v) through shared memory; the C x C intra-chunk product, the C x block_v
    accumulator and the q~ tile in registers. Uncalibrated (a coarse screen): `attnc tune --prescreen` gives
    the compiler's word."""
    C, bv, threads = c["chunk"], min(c["block_v"], p.v_dim), 32 * c["num_warps"]
    D, nbytes = max(16, 1 << (p.head_dim - 1).bit_length()), p.dtype.bytes
    shared = nbytes * (2 * C * D + D * bv + C * bv)
    regs = 32 + (C * C + C * bv + C * D * nbytes / 2) / threads
    return Estimate(shared, round(regs), threads)


def verdict(c: Candidate, p: Problem, arch: GpuArch) -> Verdict:
    """Whether `c` fits `arch`: within shared memory, threads per block, and registers (no spills)."""
    est = estimate(c, p, arch)
    if c.get("warp_specialize") and not arch.warp_specialize:
        return Verdict(
            False, f"warp specialisation: Triton does not partition these key loops on sm_{arch.cc}", est
        )
    if est.threads > arch.max_threads_per_block:
        return Verdict(False, f"{est.threads} threads exceed {arch.max_threads_per_block} per block", est)
    if est.shared_bytes > arch.max_shared_bytes:
        return Verdict(
            False,
            f"shared memory: ~{est.shared_bytes} B needed, {arch.max_shared_bytes} B per block on sm_{arch.cc}",
            est,
        )
    if est.registers > arch.max_registers_per_thread:
        return Verdict(
            False,
            f"registers: ~{est.registers} per thread > {arch.max_registers_per_thread} (would spill)",
            est,
        )
    return Verdict(True, "", est)


def prune(space: KernelSpace, arch: GpuArch) -> tuple[list[Candidate], dict[Candidate, str]]:
    """The admissible candidates that fit `arch` (the default always kept: it is the fallback anyway), and
    why each other candidate of the product was dropped."""
    p = space.problem
    kept: list[Candidate] = []
    dropped: dict[Candidate, str] = {}
    for c in space.candidates():
        v = verdict(c, p, arch)
        if v.ok or c == space.default:
            kept.append(c)
        else:
            dropped[c] = v.reason
    return kept, dropped
