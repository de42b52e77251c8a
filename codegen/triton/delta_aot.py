"""Ahead-of-time compile jobs for the delta-rule family's core kernels (attnc/runtime/delta_kernels.py).

The kernels are the runtime library's, typed from their launch signatures (attnc/runtime/core_abi.py) as the
generated kernels are (`KernelSignature.compile_args`), at the runtime's default schedule. `jobs` gives either
what one state block selects (its DeltaPlan: gate shape, delta rule or general DPLR) or, with no plan, the widest
variant of each kernel (`every_variant`: each gate mode and rank-1 combination the API can select).
`varlen=True` gives the same jobs for the packed variable-length kernels (`*_varlen_kernel`,
core_abi.DELTA_VARLEN: the same constexprs and launch options); the chunkwise (WY) backward has no packed form
and is left out.
"""

from __future__ import annotations

from attnc.dsl.analysis.recurrence import DeltaPlan, GateShape, PlanKind

from attnc.runtime import core_abi, delta
from attnc.runtime.signature import KernelSignature

from .aot import CompileJob

# The kernels' G_MODE constexpr: no gate, one log-gate per token, one per key channel (runtime `_g_mode`).
G_MODE = {GateShape.NONE: 0, GateShape.SCALAR: 1, GateShape.CHANNEL: 2}


# Each batched kernel's packed counterpart (NAME_varlen of a state block).
_VARLEN = {
    core_abi.DELTA_RECURRENT_FWD.name: core_abi.DELTA_RECURRENT_FWD_VARLEN,
    core_abi.DELTA_RECURRENT_BWD.name: core_abi.DELTA_RECURRENT_BWD_VARLEN,
    core_abi.DELTA_CHUNK_FWD.name: core_abi.DELTA_CHUNK_FWD_VARLEN,
}


def jobs(
    cc: int,
    dtype: str,
    head_dim: int,
    plan: DeltaPlan | None = None,
    *,
    every_variant: bool = False,
    varlen: bool = False,
) -> list[CompileJob]:
    """Compile jobs at D = E = head_dim. With `plan`: the kernels that block launches (the recurrent forward and
    backward of its gate mode; for the delta rule with no gate or a scalar one, also the chunked forward and the
    chunked path's backward). Without: the widest variant of each kernel (per-channel gate and rank-1 part, the
    scalar-gate backward the chunked path uses, both chunk kernels), or every variant. `varlen`: the packed
    kernels of the same variants instead (no chunkwise backward: the packed chunked path's is the recurrent one)."""
    kern = delta._kernels(interpret=False)
    D = E = head_dim
    cfg = delta.default_config(D, E)
    shape = {
        "D": D,
        "E": E,
        "BLOCK_D": delta._next_pow2(D),
        "BLOCK_E": min(cfg.block_e, delta._next_pow2(E)),
    }
    run = {"cc": cc, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

    def job(sig: KernelSignature, constexprs: dict[str, object]) -> CompileJob:
        sig = _VARLEN[sig.name] if varlen else sig
        types, values = sig.compile_args(dtype, {**shape, **constexprs})
        return CompileJob(getattr(kern, sig.name), types, values, **run)

    chunked: list[bool] = []  # HAS_G of the chunk kernels to compile
    if plan is not None:
        gm = G_MODE[plan.gate]
        fwd_modes = [(gm, True)]  # the delta rule runs as DPLR with a = α k: always a rank-1 part
        bwd_modes = [(gm, True, cfg.ckpt)]
        if plan.kind is PlanKind.DELTA and plan.gate is not GateShape.CHANNEL:
            chunked = [plan.gate is GateShape.SCALAR]
            bwd_modes.append((gm, True, cfg.chunk))
    else:
        fwd_modes = [(2, True)] + ([(0, True), (1, True), (2, False)] if every_variant else [])
        # (gate mode, rank-1, checkpoint interval): the recurrent path's, and the chunked path's (its chunk)
        bwd_modes = [(2, True, cfg.ckpt), (1, True, cfg.chunk)]
        if every_variant:
            bwd_modes += [
                (0, True, cfg.ckpt),
                (1, True, cfg.ckpt),
                (2, False, cfg.ckpt),
                (0, True, cfg.chunk),
            ]
        chunked = [True, False] if every_variant else [True]
    bwd_modes = list(dict.fromkeys(bwd_modes))  # the checkpoint interval may equal the chunk
    flags = {"HAS_S0": True, "STORE_CKPT": True}
    out = [
        job(core_abi.DELTA_RECURRENT_FWD, {"G_MODE": gm, "HAS_RANK1": r1, **flags, "CKPT": cfg.ckpt})
        for gm, r1 in fwd_modes
    ]
    out += [
        job(core_abi.DELTA_RECURRENT_BWD, {"G_MODE": gm, "HAS_RANK1": r1, "HAS_DSN": True, "CKPT": ckpt})
        for gm, r1, ckpt in bwd_modes
    ]
    for has_g in chunked:
        chunk = {"CHUNK": cfg.chunk, "HAS_G": has_g, "DOT_PRECISION": "tf32"}
        out.append(job(core_abi.DELTA_CHUNK_FWD, {**chunk, **flags}))
        if plan is None and not varlen:  # the chunkwise (WY) backward is opt-in (DeltaConfig.wy_backward)
            out.append(job(core_abi.DELTA_CHUNK_BWD, {**chunk, "HAS_DSN": True}))
    return out


__all__ = ["G_MODE", "jobs"]
