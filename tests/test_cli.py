"""The attnc command line: exit codes 0 / 1 (spec error) / 2 (usage), no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from attnc.cli import main

from .conftest import SPECS


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "attnc", *args], capture_output=True, text=True)


def test_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", *map(str, sorted(SPECS.glob("*.attn")))]) == 0
    out = capsys.readouterr().out
    assert "alibi.attn: ok (alibi)" in out


def test_check_spec_error_exit_1_with_caret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.attn"
    bad.write_text(
        "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], slopes: [H]) {\n"
        "    score = dot(q, k) + slope[h]\n"
        "}\n"
    )
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:25: error: unknown tensor 'slope'" in err
    assert "hint: did you mean 'slopes'?" in err
    assert "Traceback" not in err


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run().returncode == 2
    assert run("frobnicate").returncode == 2
    res = run("check", str(tmp_path / "missing.attn"))
    assert res.returncode == 2 and "no such file" in res.stderr and "Traceback" not in res.stderr
    binary = tmp_path / "bin.attn"
    binary.write_bytes(b"\xff\xfe\x00attention")
    res = run("check", str(binary))
    assert res.returncode == 2 and "UTF-8" in res.stderr


@pytest.mark.slow  # a subprocess per subcommand (~20 s); test_usage_errors_exit_2 covers the parser
def test_help_everywhere() -> None:
    for args in ([], ["check"], ["codegen"], ["show-ir"]):
        res = run(*args, "--help")
        assert res.returncode == 0 and "usage: attnc" in res.stdout


def test_codegen_writes_importable_modules(tmp_path: Path) -> None:
    res = run("codegen", str(SPECS / "alibi.attn"), str(SPECS / "sink.attn"), "-o", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["alibi.py", "alibi_triton.py", "sink.py", "sink_triton.py"]
    code = (
        "import torch, alibi; q = torch.randn(1, 2, 5, 8); "
        "print(alibi.alibi(q, q, q, torch.zeros(2)).shape, alibi.alibi_reference.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "out", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 2, 5, 8]) alibi_reference" in out.stdout


def test_codegen_target_reference_writes_no_kernels(tmp_path: Path) -> None:
    res = run("codegen", str(SPECS / "alibi.attn"), "-o", str(tmp_path), "--target", "reference")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alibi.py"]


def test_show_ir(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show-ir", str(SPECS / "t5_bias.attn")]) == 0
    out = capsys.readouterr().out
    assert "attention t5_bias" in out
    assert "load 'bias'" in out and "min(max((j - i), -R), R) + R" in out
    assert main(["show-ir", str(SPECS / "t5_bias.attn"), "--name", "nope"]) == 2
