"""`attnc tune`: the CPU message, a plumbing run under the interpreter (progress, summary, plot, export),
`--show`, `--prescreen` (AOT compiles, no GPU) and usage errors."""

from __future__ import annotations

import json

import pytest
import torch

from attnc.cli import main

from .conftest import SPECS

pytest.importorskip("triton")

SPEC = str(SPECS / "causal.attn")
TINY = ["--shapes", "1,1,32,32", "--head-dim", "16", "--dtype", "fp32"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ATTNC_TUNED_CONFIGS", raising=False)
    return tmp_path / "cache"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_tune_on_a_cpu_says_timing_needs_a_gpu(cache, capsys):
    assert main(["tune", SPEC, *TINY]) == 2
    err = capsys.readouterr().err
    assert "timing needs a CUDA GPU" in err and "--prescreen" in err


def test_tune_cpu_plumbing_run_then_show(cache, tmp_path, capsys):
    png = tmp_path / "study.png"
    argv = ["tune", SPEC, *TINY, "--cpu", "--trials", "3", "--seed", "0", "--plot", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "3/3 best" in out.err, "progress: trial k/N and the best so far"
    assert "causal     fwd" in out.out and "speed-up" in out.out
    assert png.stat().st_size > 1000
    table = json.loads((cache / "tune" / "best.json").read_text())
    (key,) = table["configs"]
    assert key.startswith("attn=causal|kernel=fwd|") and "|gpu=cpu|" in key and "|M=32|N=32" in key
    assert main(["tune", "--show"]) == 0
    shown = capsys.readouterr().out
    assert "causal" in shown and "3+0 failed" in shown
    # Rerun: the study already holds its 3 measurements, so nothing is measured again.
    assert main(argv) == 0
    assert "0/3" not in capsys.readouterr().err


def test_show_with_nothing_tuned(cache, capsys):
    assert main(["tune", "--show"]) == 0
    assert "nothing tuned" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tune"], "give a SPEC"),
        (["tune", "missing.attn"], "no such file"),
        (["tune", SPEC, "--shapes", "1,2,3", "--cpu"], "--shapes takes"),
        (["tune", SPEC, "--kernels", "fwd,bogus", "--cpu"], "--kernels takes"),
        (["tune", SPEC, "--size", "W", "--cpu"], "--size takes"),
        (["tune", SPEC, "--name", "nope", "--cpu"], "no attention named"),
    ],
)
def test_usage_errors(cache, capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_prescreen_compiles_the_pruned_space_without_a_gpu(cache, capsys):
    argv = [
        "tune",
        SPEC,
        "--shapes",
        "32",
        "--head-dim",
        "16",
        "--dtype",
        "fp16",
        "--prescreen",
        "--cc",
        "90",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kept by the resource model" in out and "(default)" in out
    assert "compiled configs are viable on Hopper" in out
    assert (cache / "tune" / "aot.json").exists(), "compiles are cached"
    entries = json.loads((cache / "tune" / "aot.json").read_text())
    assert entries and all(e["compiled"] for e in entries.values())


def test_docs_python_example_runs(cache):
    """docs/autotune.md's Python example, as written (its CPU branch here)."""
    import re
    import warnings

    from .conftest import REPO

    text = (REPO / "docs" / "autotune.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "docs/autotune.md", "exec"), {"__name__": "docs_example"})
    assert (cache / "tune" / "best.json").exists()
