"""Every linear-family core kernel compiles ahead of time for sm_90 (fp16 at head dim 64, bf16 at 128 and 256) with
the runtime's default schedule and does not spill: what the interpreter cannot check, on a CPU machine. The packed
variable-length kernels (`*_varlen_kernel`) are compiled in the same pool, at head dims 64 and 128."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from attnc.codegen.triton.aot import AOTCompileError, KernelReport, compile_reports
from attnc.codegen.triton.linear_aot import VARIANTS, jobs

from attnc.runtime.core_abi import LINEAR_VARLEN

# The varlen kernels' head dims (and dtypes, as the batched jobs'): one pool compiles both families.
VARLEN_DIMS = (("fp16", 64), ("bf16", 128))


@pytest.fixture(scope="module")
def reports() -> list[KernelReport | AOTCompileError]:
    return compile_reports(
        jobs(90, "fp16", 64)
        + jobs(90, "bf16", 128)
        + jobs(90, "bf16", 256)
        + [j for dtype, d in VARLEN_DIMS for j in jobs(90, dtype, d, varlen=True)],
        max_workers=2,
        raise_on_error=False,
    )


def test_every_linear_kernel_compiles_for_sm90(reports: list[KernelReport | AOTCompileError]) -> None:
    failed = [str(r) for r in reports if not isinstance(r, KernelReport)]
    assert not failed, "\n".join(failed)
    causal = sum(v.causal for v in VARIANTS)
    # five chunk kernels, plus the recurrent one: batched at three head dims, varlen at two
    assert len(reports) == (3 + len(VARLEN_DIMS)) * (5 * len(VARIANTS) + causal)


def test_linear_kernels_do_not_spill_on_sm90(reports: list[KernelReport | AOTCompileError]) -> None:
    spills = [
        f"{r.name} {dict(r.constexprs)}: {r.spill_bytes} B"
        for r in reports
        if isinstance(r, KernelReport) and r.spill_bytes
    ]
    assert not spills, "\n".join(spills)


def test_chunk_kernels_use_wgmma(reports: list[KernelReport | AOTCompileError]) -> None:
    """Up to head dim 128 the chunk kernels' products run on Hopper's warpgroup MMA (the recurrent kernel has
    no matrix product; at 256 the 16-row chunks are below wgmma's 64-row tiles and use mma.sync)."""
    no_wgmma = [
        r.name
        for r in reports
        if isinstance(r, KernelReport)
        and not r.name.startswith("_lin_recurrent")
        and dict(r.constexprs)["D"] <= 128
        and not r.uses_wgmma
    ]
    assert not no_wgmma, no_wgmma


def test_varlen_kernels_compile_for_sm90_without_spills(
    reports: list[KernelReport | AOTCompileError], record_property: Callable[[str, object], None]
) -> None:
    """Each packed variable-length kernel, for every variant at head dims 64 and 128: compiled, 0 spilled bytes;
    the registers are recorded (junit properties `regs:<kernel> <constexprs>`)."""
    names = {sig.name for sig in LINEAR_VARLEN}
    varlen = [r for r in reports if isinstance(r, KernelReport) and r.name in names]
    failed = [str(r) for r in reports if isinstance(r, AOTCompileError) and r.kernel in names]
    assert not failed, "\n".join(failed)
    causal = sum(v.causal for v in VARIANTS)
    assert len(varlen) == len(VARLEN_DIMS) * (5 * len(VARIANTS) + causal)
    assert {r.name for r in varlen} == names
    assert {dict(r.constexprs)["D"] for r in varlen} == {d for _, d in VARLEN_DIMS}
    for r in varlen:
        record_property(f"regs:{r.name} {r.config}", r.registers)
    spills = [f"{r.name} {r.config}: {r.spill_bytes} B" for r in varlen if r.spill_bytes]
    assert not spills, "\n".join(spills)


@pytest.mark.slow  # the core's compiles are covered above; this checks the CLI's table (~25 s of CI time)
def test_attnc_inspect_includes_the_linear_core(capsys: pytest.CaptureFixture[str]) -> None:
    from attnc.cli import main

    from .conftest import SPECS

    argv = ["inspect", str(SPECS / "linear_elu.attn"), "--cc", "90", "--dtype", "fp16", "--head-dim", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for kernel in (
        "_linear_elu_fwd_kernel",
        "_lin_fwd_state_kernel",
        "_lin_fwd_out_kernel",
        "_lin_recurrent_kernel",
    ):
        assert kernel in out
