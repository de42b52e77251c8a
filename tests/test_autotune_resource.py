"""The resource model: it rejects configs over a GPU's limits, and its verdicts agree with the compiler's
(`compile_report` on sm_90, the truth the model is calibrated against)."""

from __future__ import annotations

import pytest
from attnc.autotune.resource import ARCHS, arch_for, estimate, prune, verdict
from attnc.autotune.space import Candidate, DType, KernelKind, Problem, space_for

from .conftest import SPECS


def _c(kind: KernelKind, bm: int, bn: int, warps: int, stages: int) -> Candidate:
    return Candidate.of(kind, {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages})


def test_rejects_shared_memory_over_the_limit():
    """256 x 256 tiles at D = 128 need ~128 KiB: over an sm_86 block's 99 KiB, within an H100's 227 KiB."""
    p = Problem(128, 128, DType.BF16, 4096, 4096)
    c = _c(KernelKind.FWD, 256, 256, 8, 1)
    assert estimate(c, p, ARCHS[86]).shared_bytes > ARCHS[86].max_shared_bytes
    v = verdict(c, p, ARCHS[86])
    assert not v.ok and v.reason.startswith("shared memory")
    assert estimate(c, p, ARCHS[90]).shared_bytes <= ARCHS[90].max_shared_bytes


def test_rejects_threads_and_registers_over_the_limit():
    p = Problem(64, 64, DType.FP16, 4096, 4096)
    assert verdict(_c(KernelKind.FWD, 64, 64, 64, 2), p, ARCHS[90]).reason.startswith("2048 threads")
    v = verdict(_c(KernelKind.FWD, 128, 128, 4, 2), p, ARCHS[90])
    assert not v.ok and "would spill" in v.reason
    # fp32 operands take more registers than fp16 ones at the same tiles.
    p32 = Problem(64, 64, DType.FP32, 4096, 4096)
    c = _c(KernelKind.FWD, 64, 64, 4, 2)
    assert estimate(c, p32, ARCHS[90]).registers > estimate(c, p, ARCHS[90]).registers


def test_arch_for_picks_the_generation_at_or_below():
    assert arch_for(90).cc == 90 and arch_for(103).cc == 100 and arch_for(87).cc == 86
    with pytest.raises(ValueError, match="no resource model"):
        arch_for(70)


def test_prune_keeps_the_default_and_drops_with_reasons():
    for kind in KernelKind:
        space = space_for(kind, Problem(64, 64, DType.FP16, 4096, 4096))
        kept, dropped = prune(space, ARCHS[90])
        assert kept[0] == space.default
        assert dropped and all(r for r in dropped.values())
        assert len(kept) + len(dropped) == len(space.candidates())


# Configs on both sides of the register limit, from the calibration sets: (kind, bm, bn, warps, stages).
AGAINST_COMPILER = [
    (KernelKind.FWD, 64, 64, 4, 2),
    (KernelKind.FWD, 64, 32, 8, 1),
    (KernelKind.FWD, 32, 64, 4, 1),
    (KernelKind.FWD, 128, 64, 4, 2),
    (KernelKind.FWD, 32, 128, 4, 1),
    (KernelKind.FWD, 16, 128, 2, 1),
    (KernelKind.DKDV, 16, 64, 4, 1),
    (KernelKind.DKDV, 64, 32, 4, 1),
    (KernelKind.DKDV, 32, 32, 2, 1),
    (KernelKind.DKDV, 64, 64, 4, 1),
]


def test_model_verdicts_agree_with_compile_report(compiled):
    """Compile a handful of configs of the causal forward and dK/dV kernels for sm_90 (no GPU needed) and
    compare: the model says "fits" exactly where the compiler produces a binary that does not spill."""
    pytest.importorskip("triton")
    from attnc.autotune.prescreen import compile_job
    from attnc.codegen.triton.aot import AOTCompileError, compile_reports
    from attnc.dsl.lower import compile_to_ir

    from attnc.runtime.triton import _triton_kernels

    spec = SPECS / "causal.attn"
    att = compile_to_ir(spec.read_text(), str(spec)).attentions[0]
    kernels = _triton_kernels(compiled("causal").__file__, interpret=False)
    p = Problem(64, 64, DType.FP16, 4096, 4096)
    cands = [_c(*cfg) for cfg in AGAINST_COMPILER]
    jobs = [compile_job(att, kernels, c, 90, DType.FP16, 64) for c in cands]
    reports = compile_reports(jobs, max_workers=2, raise_on_error=False)
    verdicts = [verdict(c, p, ARCHS[90]) for c in cands]
    assert any(v.ok for v in verdicts) and any(not v.ok for v in verdicts), "both sides must be tested"
    for c, v, rep in zip(cands, verdicts, reports, strict=True):
        truth = not isinstance(rep, AOTCompileError) and rep.spill_bytes == 0
        detail = rep if isinstance(rep, AOTCompileError) else f"regs={rep.registers} spill={rep.spill_bytes}"
        assert v.ok == truth, f"{c}: model says {v.ok} ({v.estimate}), compiler: {detail}"
        if not isinstance(rep, AOTCompileError) and c.kind is KernelKind.FWD:
            est = v.estimate.shared_bytes
            assert abs(est - rep.shared_bytes) <= 0.25 * rep.shared_bytes, (
                f"{c}: smem {est} vs {rep.shared_bytes}"
            )
