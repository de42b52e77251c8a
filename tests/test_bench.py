"""benchmarks/bench.py: the FLOP convention, the variants' mask bookkeeping, the results file and plot, and the
whole script on CPU (correctness preflight under the Triton interpreter + codegen timing, no GPU timings)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench.py"
CPU_RUN_LIMIT_S = 60


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("attnc_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_flop_convention(bench: ModuleType) -> None:
    B, H, N, D = 16, 32, 1024, 64
    full = 4 * B * H * N * N * D
    flops = bench.attention_flops
    assert flops(B, H, N, N, D, causal=False, backward=False) == full
    assert flops(B, H, N, N, D, causal=True, backward=False) == full / 2
    assert flops(B, H, N, N, D, causal=False, backward=True) == 3.5 * full
    assert flops(B, H, N, N, D, causal=True, backward=True) == 1.75 * full
    # M != N and a value width E of its own: 2*B*H*M*N*(D + E).
    assert flops(2, 3, 5, 7, 16, causal=False, backward=False, E=32) == 2 * 2 * 3 * 5 * 7 * (16 + 32)
    # The benchmark's shapes keep the work per forward constant: B*N = 16k, H*D = 2048.
    per_shape = {
        flops(bench.TOKENS // n, bench.HIDDEN // d, n, n, d, causal=False, backward=False) / n
        for n in (1024, 4096, 16384)
        for d in (64, 128)
    }
    assert per_shape == {4 * bench.TOKENS * bench.HIDDEN}
    assert bench.tflops(2e12, 1000.0) == pytest.approx(2.0)
    # Causal-like variants are the halved ones, and only those.
    halved = {name for name, v in bench.VARIANTS.items() if v.causal}
    assert halved == {"causal", "alibi", "sliding_window", "prefix_lm", "document"}


@pytest.mark.parametrize(
    "variant", ["causal", "full", "alibi", "sliding_window", "softcap", "prefix_lm", "document"]
)
@pytest.mark.parametrize("small", [True, False])
def test_visible_counts_match_the_flex_mask(bench: ModuleType, variant: str, small: bool) -> None:
    """row_visible (for visible_fraction) counts exactly the pairs FlexAttention's mask_mod keeps."""
    N = 2048 if not small else 128
    p = bench.make_problem(variant, 2, 4, N, "cpu", small=small)
    i, j = torch.arange(N).view(N, 1), torch.arange(N).view(1, N)
    dense = torch.ones(N, N, dtype=torch.bool) if p.mask_mod is None else p.mask_mod(torch.tensor(0), 0, i, j)
    assert torch.equal(dense.expand(N, N).sum(-1), p.row_visible)
    if variant == "sliding_window":
        assert p.scalars["W"] == (N // 4 if small else 1024)


def test_results_file_is_replaced_atomically(bench: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    res = bench.Results(path, {"records": []})
    for n in range(3):
        res.add("records", {"n": n, "ms": float("nan") if n == 2 else 1.0})
        assert json.loads(path.read_text())["records"][-1]["n"] == n
    assert json.loads(path.read_text())["records"][2]["ms"] == "nan"  # strict JSON: no NaN token
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def _fake_results() -> dict[str, Any]:
    records = []
    for impl, speed in (("attnc", 1.2), ("flex", 1.0), ("sdpa_flash", 1.1)):
        for pass_ in ("fwd", "fwd+bwd"):
            for D in (64, 128):
                for N in (1024, 4096, 16384):
                    records.append(
                        {"variant": "causal", "impl": impl, "pass": pass_, "D": D, "N": N, "status": "ok"}
                        | {"tflops": 300 * speed + N / 1024, "ms": 1.0 / speed}
                    )
    records.append({"variant": "alibi", "impl": "flex", "pass": "fwd", "D": 64, "N": 1024, "status": "ok"})
    records[-1] |= {"tflops": 250.0, "ms": 1.0}
    return {
        "device": {"name": "Test GPU"},
        "date": "2000-01-01",
        "config": {"variants": ["causal", "alibi"], "dims": [64, 128], "seqs": [1024, 4096, 16384]},
        "records": records,
    }


def test_plot_only_redraws_the_png(bench: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "2000-01-01-test-gpu.json"
    path.write_text(json.dumps(_fake_results()))
    assert bench.main(["--plot-only", str(path)]) == 0
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, png.name]


def test_cpu_run(tmp_path: Path) -> None:
    """The whole script as a user runs it, on a machine without a GPU (hidden from it if there is one)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=CPU_RUN_LIMIT_S,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < CPU_RUN_LIMIT_S
    assert "GPU timings need a GPU" in proc.stdout

    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert files[0].name == f"{data['date']}-cpu.json"
    for field in ("device", "torch", "triton", "date", "config", "message"):
        assert data[field], field
    assert data["device"]["name"]
    assert data["torch"] == torch.__version__
    assert data["gpu"] is False
    assert data["finished"] is True
    assert "GPU timings need a GPU" in data["message"]
    assert data["records"] == []

    variants = set(data["config"]["variants"])
    assert variants == {"causal", "full", "alibi", "sliding_window", "softcap", "prefix_lm", "document"}
    assert {c["variant"] for c in data["codegen"]} == variants
    assert all(c["codegen_s"] > 0 for c in data["codegen"])
    pre = data["preflight"]
    assert pre and all(r["passed"] is True and r["status"] == "pass" for r in pre), [
        r for r in pre if not r.get("passed")
    ]
    # Our kernels (forward, LSE, gradients) for every variant; FlexAttention for every variant; SDPA where it
    # expresses the variant.
    # ... and the learned-input training cases (issue 11): attnc's gradients of the learned tensor too.
    learned = {"learned:alibi_slopes", "learned:t5_table", "learned:sinks", "learned:moh_gate"}
    assert {r["variant"] for r in pre if r["impl"] == "attnc"} == variants | learned
    assert all(
        {"o", "lse", "dq", "dk", "dv"} <= r["max_rel_err"].keys()
        for r in pre
        if r["impl"] == "attnc" and r["variant"] in variants
    )
    assert variants <= {r["variant"] for r in pre if r["impl"] == "flex"} <= variants | learned
    assert {r["variant"] for r in pre if r["impl"] == "sdpa"} == {"causal", "full"}
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_keeps_complete_groups_only(bench: ModuleType) -> None:
    opts = bench.BenchOptions(warmup_ms=1, rep_ms=1, impls=("attnc", "flex"), passes=("fwd", "fwd+bwd"))

    def rec(variant: str, N: int, impl: str | None, pass_: str | None, status: str = "ok") -> dict[str, Any]:
        return {"variant": variant, "D": 64, "N": N, "impl": impl, "pass": pass_, "status": status, "run": 0}

    complete = [rec("causal", 1024, i, p) for i in ("attnc", "flex") for p in ("fwd", "fwd+bwd")]
    partial = [rec("causal", 4096, "attnc", "fwd"), rec("causal", 4096, "flex", "fwd")]  # cut off mid-shape
    skipped = [rec("alibi", 1024, None, None, "skipped")]
    meta = {"torch": "t", "triton": "tr", "device": {"name": "GPU"}, "git_commit": "c"}
    old = {
        **meta,
        "runs": [{"argv": []}],
        "config": {
            "variants": ["causal", "alibi"],
            "dims": [64],
            "seqs": [1024, 4096],
            "variant_settings": {},
        },
        "records": [*complete, *partial, *skipped],
        "preflight": [{"run": 0}],
    }
    new = {
        **meta,
        "runs": [{"argv": ["--resume"]}],
        "config": {"variants": ["causal"], "dims": [64, 128], "seqs": [1024], "variant_settings": {}},
        "records": [],
        "preflight": [],
    }
    data, done = bench.resume_from(old, new, opts)
    assert done == {("causal", 64, 1024)}
    assert data["records"] == complete
    assert len(data["runs"]) == 2 and data["preflight"] == [{"run": 0}]
    assert data["config"]["variants"] == ["causal", "alibi"] and data["config"]["dims"] == [64, 128]
    with pytest.raises(SystemExit, match="torch"):
        bench.resume_from({**old, "torch": "other"}, new, opts)
