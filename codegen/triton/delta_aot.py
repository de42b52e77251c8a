"""Ahead-of-time compile jobs for the delta-rule family's core kernels (attnc/runtime/delta_kernels.py).

The kernels are the runtime library's, typed from their launch signatures (attnc/runtime/core_abi.py) as the
generated kernels are (`KernelSignature.compile_args`), at the runtime's default schedule. `jobs` gives either
what one state block selects (its DeltaPlan: gate shape, delta rule or general DPLR) or, with no plan, the widest
variant of each kernel (`every_variant`: each gate mode and rank-1 combination the API can select).
`varlen=True` gives the same jobs for packed variable-length batches: the recurrent `*_varlen_kernel`s
(core_abi.DELTA_VARLEN: the same constexprs and launch options) and the chunk-parallel kernels with
VARLEN = True (their chunk-table form).
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
    backward of its gate mode; the chunk-parallel forward and backward for the delta rule, every gate form,
    and for a transition without a rank-1 part). Without: the widest variant of each kernel (per-channel gate
    and rank-1 part; the chunk-parallel kernels of KDA, Gated DeltaNet and GLA), or every variant. `varlen`:
    the packed forms of the same kernels."""
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

    parallel: list[tuple[int, bool]] = []  # (G_MODE, DELTA) of the chunk-parallel kernels
    if plan is not None:
        gm = G_MODE[plan.gate]
        fwd_modes = [(gm, True)]  # the delta rule runs as DPLR with a = α k: always a rank-1 part
        if plan.kind is PlanKind.DELTA:
            parallel = [(gm, True)]
        elif (
            plan.a is None
        ):  # no rank-1 part: GLA (or plain linear attention), chunked without the delta rule
            fwd_modes = [(gm, False)]
            parallel = [(gm, False)]
    else:
        fwd_modes = [(2, True)] + ([(0, True), (1, True), (2, False)] if every_variant else [])
        parallel = [(2, True), (1, True), (2, False)]
        if every_variant:
            parallel += [(0, True), (1, False), (0, False)]
    flags = {"HAS_S0": True, "STORE_CKPT": True}
    out = [
        job(core_abi.DELTA_RECURRENT_FWD, {"G_MODE": gm, "HAS_RANK1": r1, **flags, "CKPT": cfg.ckpt})
        for gm, r1 in fwd_modes
    ]
    out += [
        job(core_abi.DELTA_RECURRENT_BWD, {"G_MODE": gm, "HAS_RANK1": r1, "HAS_DSN": True, "CKPT": cfg.ckpt})
        for gm, r1 in fwd_modes
    ]
    out += chunk_forward_jobs(cc, dtype, head_dim, parallel, cfg.chunk, varlen=varlen)
    out += chunk_backward_jobs(cc, dtype, head_dim, parallel, cfg.chunk, varlen=varlen)
    return out


def chunk_forward_jobs(
    cc: int,
    dtype: str,
    head_dim: int,
    variants: list[tuple[int, bool]],
    chunk: int = 64,
    *,
    varlen: bool = False,
) -> list[CompileJob]:
    """Jobs of every chunk-parallel forward kernel (delta_chunk.py) a (G_MODE, DELTA) variant launches, at
    the default schedule, D = E = head_dim, bound as `chunk_forward` binds them (16-bit inputs: tf32);
    `varlen`: their packed form (VARLEN, the chunk table)."""
    from attnc.runtime import delta_chunk as dc

    kern = dc._kernels(interpret=False)
    cfg = dc.default_chunk_config(head_dim, head_dim)
    bd = dc._next_pow2(head_dim)
    out = []
    for gm, delta_rule in variants:
        common = {
            "D": head_dim,
            "E": head_dim,
            "BLOCK_D": bd,
            "CHUNK": chunk,
            "G_MODE": gm,
            "DELTA": delta_rule,
            "VARLEN": varlen,
        }
        common["DOT_PRECISION"] = "tf32"
        per_chunk = {"BLOCK_DK": min(cfg.block_dk, bd), "SUB": cfg.sub}
        specs = []
        if delta_rule or gm:  # linear attention without gate or delta rule has nothing to prepare
            specs.append(
                (core_abi.DELTA_CHUNK_PREP, {**per_chunk, "BLOCK_E": bd, "STORE_AI": True}, cfg.warps_prep)
            )
        bes = cfg.block_e_state_channel if (gm == 2 and delta_rule) else cfg.block_e_state
        specs.append((core_abi.DELTA_CHUNK_STATE, {"BLOCK_E": min(bes, bd), "HAS_S0": True}, cfg.warps_state))
        specs.append(
            (core_abi.DELTA_CHUNK_OUT, {**per_chunk, "BLOCK_E": min(cfg.block_e_out, bd)}, cfg.warps_out)
        )
        out += _bind(kern, specs, dtype, common, cc, cfg.stages)
    return out


def chunk_backward_jobs(
    cc: int,
    dtype: str,
    head_dim: int,
    variants: list[tuple[int, bool]],
    chunk: int = 64,
    *,
    varlen: bool = False,
) -> list[CompileJob]:
    """Jobs of every chunk-parallel backward kernel (delta_chunk_bwd.py) of each (G_MODE, DELTA) variant at
    the default schedule, D = E = head_dim (`varlen`: their packed form)."""
    from attnc.runtime import delta_chunk_bwd as cb

    kern = cb._kernels(interpret=False)
    D = E = head_dim
    out = []
    for gm, delta_rule in variants:
        sch = cb.default_schedule(D, E, gm)
        base = {
            "D": D,
            "E": E,
            "CHUNK": chunk,
            "SUB": sch.sub,
            "G_MODE": gm,
            "DELTA": delta_rule,
            "VARLEN": varlen,
        }
        prec = {"DOT_PRECISION": "tf32"}
        forms = [
            (
                core_abi.DELTA_CBWD_INTRA,
                {"BLOCK_D": cb.intra_block_d(sch, D, gm), "BLOCK_E": sch.block_e, **prec},
                sch.warps_intra,
            ),
            (
                core_abi.DELTA_CBWD_DSTATE,
                {"BLOCK_D": D, "BLOCK_E": sch.block_e_state, "HAS_DSN": True, **prec},
                sch.warps_state,
            ),
            (
                core_abi.DELTA_CBWD_DQKW,
                {"BLOCK_K": sch.block_k, "BLOCK_E": sch.block_e, **prec},
                sch.warps_dqkw,
            ),
        ]
        if delta_rule or gm:
            forms.append(
                (
                    core_abi.DELTA_CBWD_WY,
                    {"BLOCK_K": sch.block_k_wy, "BLOCK_E": sch.block_e, **prec},
                    sch.warps_wy,
                )
            )
        out += _bind(kern, forms, dtype, base, cc, sch.num_stages)
    return out


def _bind(
    kern: object,
    forms: list[tuple[KernelSignature, dict[str, object], int]],
    dtype: str,
    common: dict[str, object],
    cc: int,
    stages: int,
) -> list[CompileJob]:
    """A job per (signature, its own constexprs, num_warps), typed from the signature at `dtype`."""
    out = []
    for sig, extra, warps in forms:
        types, values = sig.compile_args(dtype, {**common, **extra})
        out.append(
            CompileJob(getattr(kern, sig.name), types, values, cc=cc, num_warps=warps, num_stages=stages)
        )
    return out


__all__ = ["G_MODE", "chunk_backward_jobs", "chunk_forward_jobs", "jobs"]
