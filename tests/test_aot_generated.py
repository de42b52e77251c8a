"""GPU-readiness without a GPU: every kernel of every example spec compiles ahead of time for NVIDIA targets
(Triton's full pipeline to PTX and cubin), and the default schedules do not spill registers on sm_90.

The interpreter that runs the kernels in CI accepts kernels the GPU compiler rejects; this catches them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from attnc.codegen.triton.aot import AOTCompileError, KernelReport, compile_reports, format_table
from attnc.codegen.triton.inspect import CI_TARGETS, all_jobs
from attnc.dsl.lower import compile_to_ir

from attnc import codegen
from attnc.runtime.triton import _triton_kernels

from .conftest import SPECS

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[KernelReport | AOTCompileError]:
    cache = tmp_path_factory.mktemp("aot-cache")
    jobs = []
    for path in sorted(SPECS.glob("*.attn")):
        mod = codegen.compile_file(path, cache_dir=cache)
        kernels = _triton_kernels(mod.__file__, interpret=False)
        jobs += all_jobs(compile_to_ir(path.read_text(), path.name).attentions, kernels, CI_TARGETS)
    return compile_reports(jobs, max_workers=2, raise_on_error=False)


def test_every_kernel_compiles_for_sm90_and_sm80(reports: list[KernelReport | AOTCompileError]) -> None:
    failures = [str(r) for r in reports if isinstance(r, AOTCompileError)]
    assert not failures, "\n\n".join(failures)
    ok = [r for r in reports if isinstance(r, KernelReport)]
    print("\n" + format_table(ok))  # the per-kernel report: `pytest -s` shows it
    n_specs = len(list(SPECS.glob("*.attn")))
    assert len(ok) == n_specs * sum(len(t.kernels) for t in CI_TARGETS)


def test_default_schedules_do_not_spill_on_sm90(reports: list[KernelReport | AOTCompileError]) -> None:
    spilling = [
        f"{r.name} {r.target} {r.config}: {r.spill_bytes} B"
        for r in reports
        if isinstance(r, KernelReport) and r.target == "sm_90" and r.spill_bytes
    ]
    assert not spilling, "\n".join(spilling)


def test_sm90_forward_kernels_use_wgmma(reports: list[KernelReport | AOTCompileError]) -> None:
    # The one-pass forward (the split-KV forward has 16-row tiles, below a warpgroup MMA's 64).
    fwd = [
        r
        for r in reports
        if isinstance(r, KernelReport) and r.target == "sm_90" and r.name.endswith("_fwd_kernel")
    ]
    assert fwd and all(r.uses_wgmma for r in fwd), [r.name for r in fwd if not r.uses_wgmma]
    assert not any(r.uses_wgmma for r in reports if isinstance(r, KernelReport) and r.target == "sm_80")


def test_attnc_inspect_prints_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from attnc.cli import main

    assert (
        main(["inspect", str(SPECS / "causal.attn"), "--cc", "90", "--dtype", "fp16", "--head-dim", "64"])
        == 0
    )
    out = capsys.readouterr().out
    for kernel in ("_causal_fwd_kernel", "_causal_bwd_dkdv_kernel", "_causal_bwd_dq_kernel"):
        assert kernel in out
    assert "regs" in out and "spill" in out and "wgmma" in out
    assert "tma" in out and "sass/iter" in out  # the static loop cost (codegen/triton/sass.py)


def test_the_compile_models_the_launch_of_contiguous_inputs(tmp_path: Path) -> None:
    """CI compiles what a launch compiles (Target.launch): unit channel strides are constants and the other
    strides 16-divisible, as Triton's launcher specialises the runtime's contiguous q, k, v, o; arbitrary
    strides (`--any-strides`) cost registers (gathers instead of vector loads)."""
    from attnc.codegen.triton.inspect import Target, jobs

    path = SPECS / "causal.attn"
    kernels = _triton_kernels(codegen.compile_file(path, cache_dir=tmp_path).__file__, interpret=False)
    (att,) = compile_to_ir(path.read_text(), path.name).attentions
    (launch,) = jobs(att, kernels, Target(90, "fp16", 64, ("fwd",)))
    (anystrides,) = jobs(att, kernels, Target(90, "fp16", 64, ("fwd",), launch=False))
    assert launch.constexprs["_sq_d"] == 1 and "_sq_d" not in launch.signature
    assert "_sq_n" in set(launch.divisible_by_16 or ()) and anystrides.signature["_sq_d"] == "i32"
    fast, slow = compile_reports([launch, anystrides], max_workers=1)
    assert fast.registers < slow.registers and not fast.spill_bytes
