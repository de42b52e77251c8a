"""`attnc inspect --config` (compile at any schedule) and `--form` (the varlen and paged kernel forms)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from attnc.codegen.triton.inspect import parse_config, parse_configs

from attnc.runtime.triton import _KernelConfig

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_a_schedule_names_every_kernel_or_one_and_later_keys_win() -> None:
    assert parse_config("BLOCK_M=128,warps=8") == {
        k: {"block_m": 128, "num_warps": 8} for k in ("fwd", "bwd_dkdv", "bwd_dq", "fwd_split", "fwd_combine")
    }
    got = parse_configs(["BLOCK_M=128,BLOCK_N=64,warps=8,stages=3", "dq:BLOCK_M=64"], head_dim=128)
    assert got["fwd"] == _KernelConfig(128, 64, 8, 3)
    assert got["bwd_dq"] == _KernelConfig(64, 64, 8, 3)  # its own BLOCK_M, the rest from the first


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("BLOCK_M=24", "power of two, at least 16"),
        ("fwd:warps=3", "warps must be"),
        ("stages=0", "stages must be at least 1"),
        ("bwd:BLOCK_M=64", "unknown kernel 'bwd'"),
        ("BLOCK_K=64", "KEY=VALUE with KEY one of"),
        ("BLOCK_M=big", "is not an integer"),
        ("fwd:", "at least one of"),
    ],
)
def test_a_bad_schedule_is_refused_with_what_is_wrong(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_config(text)


def _inspect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "attnc", "inspect", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def test_inspect_compiles_at_the_given_schedule_and_form() -> None:
    run = _inspect("examples/specs/decode.attn", "--form", "paged", "--config", "fwd:BLOCK_M=128,warps=8")
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("_decode_")]
    assert [r.split()[0] for r in rows] == ["_decode_fwd_kernel", "_decode_fwd_split_kernel"]
    fwd = rows[0]
    assert "_BLOCK_M=128" in fwd and "_PAGED=True" in fwd and fwd.split()[2] == "8"
    assert "_BLOCK_M=16" in rows[1]  # the split forward keeps its default (decoding) schedule
    bad = _inspect("examples/specs/decode.attn", "--config", "dq:BLOCK_M=24")
    assert bad.returncode != 0 and "BLOCK_M must be a power of two" in bad.stderr


def test_no_aux_grads_compiles_the_backward_without_its_aux_gradient_code() -> None:
    """`--no-aux-grads`: the dQ kernel as a launch whose learned inputs need no gradient compiles it, the gate
    off and its aux-gradient buffers unbound (alibi's slopes gradient); the default keeps them."""
    from attnc.cli import inspect_jobs

    def dq(aux: bool):  # type: ignore[no-untyped-def]
        (job,) = [
            j
            for j in inspect_jobs(
                str(ROOT / "examples/specs/alibi.attn"), None, 90, "fp16", 64, aux_grads=aux
            )
            if j.fn.__name__ == "_alibi_bwd_dq_kernel"
        ]
        return job

    with_aux, without = dq(True), dq(False)
    assert with_aux.constexprs["_AUX_GRAD"] is True and "_GA0" in with_aux.signature
    assert without.constexprs["_AUX_GRAD"] is False and "_GA0" not in without.signature
    run = _inspect("examples/specs/alibi.attn", "--no-aux-grads")
    assert run.returncode == 0, run.stderr
    (row,) = [line for line in run.stdout.splitlines() if line.startswith("_alibi_bwd_dq_kernel")]
    assert "_AUX_GRAD=False" in row
