"""The linear family's chunked forward as an autotuner kernel kind ("lin_chunk"): its space starts from the
runtime default, a study over the real kernels (Triton interpreter, tiny shapes) runs behind the accuracy
gate, and a generated module picks the exported config up for the call's key without tuning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from attnc.autotune.key import TuningKey, current_device, kernel_hash
from attnc.autotune.measure import KernelObjective, SyntheticObjective, make_inputs
from attnc.autotune.prescreen import compile_job
from attnc.autotune.search import tune
from attnc.autotune.space import Candidate, DType, KernelKind, Problem, space_for
from attnc.autotune.store import export_table, open_storage
from attnc.dsl.lower import compile_to_ir

from attnc.runtime import linear as rt_linear
from attnc.runtime import reset_tuned
from attnc.runtime.linear import _lin_default_config

from .conftest import SPECS

pytest.importorskip("triton")

SPEC = SPECS / "lightning.attn"
PROBLEM = Problem(16, 16, DType.FP32, 96, 96)
TUNED = {"chunk": 32, "block_k": 16, "block_v": 16, "num_warps": 2, "num_stages": 1}


def _att():
    return compile_to_ir(SPEC.read_text(), str(SPEC)).attentions[0]


def _inputs():
    return make_inputs(
        _att(), batch=1, heads=2, q_len=96, kv_len=96, head_dim=16, dtype=torch.float32, device="cpu", seed=3
    )


def _key(mod) -> TuningKey:
    kfile = Path(mod.__file__).with_name(Path(mod.__file__).stem + "_triton.py")
    return TuningKey.make(
        "lightning", KernelKind.LIN_CHUNK, kernel_hash(kfile), current_device(False), PROBLEM
    )


def test_space_starts_from_the_runtime_default() -> None:
    for D in (16, 64, 128, 256):
        space = space_for(KernelKind.LIN_CHUNK, Problem(D, D, DType.BF16, 4096, 4096))
        cfg = _lin_default_config(D, D)
        assert space.default.as_dict() == {f: getattr(cfg, f) for f in cfg._fields}
        assert space.candidates()[0] == space.default
    short = space_for(KernelKind.LIN_CHUNK, Problem(64, 64, DType.BF16, 20, 20))
    assert all(c["chunk"] <= 32 for c in short.candidates()[1:])  # no chunk longer than the sequence bucket


def test_real_kernels_measure_behind_the_gate(compiled) -> None:
    mod = compiled("lightning")
    obj = KernelObjective(mod, "lightning", KernelKind.LIN_CHUNK, _inputs(), DType.FP32)
    m = obj.measure(Candidate.of(KernelKind.LIN_CHUNK, TUNED))
    assert m.error is not None and m.error < 1e-4 and m.time_ms > 0


def test_module_picks_up_a_tuned_linear_config(compiled, tmp_path, monkeypatch) -> None:
    mod = compiled("lightning")
    optimum = Candidate.of(KernelKind.LIN_CHUNK, TUNED)
    space = space_for(KernelKind.LIN_CHUNK, PROBLEM)
    assert optimum in space.candidates()
    obj = SyntheticObjective(lambda c: 1.0 if c == optimum else 2.0 + c["chunk"] / 64)
    store = tmp_path / "journal.log"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tune(_key(mod), space, obj, storage=str(store), n_trials=len(space.candidates()), seed=0)
    assert res.best == optimum
    table = export_table(open_storage(str(store)), tmp_path / "best.json")
    monkeypatch.setenv("ATTNC_TUNED_CONFIGS", str(table))
    reset_tuned()
    seen = []
    real = rt_linear._lin_forward
    monkeypatch.setattr(
        rt_linear, "_lin_forward", lambda kern, opts, *a: seen.append(opts.cfg) or real(kern, opts, *a)
    )
    inputs = _inputs()
    out = mod.lightning(**inputs, backend="triton", algorithm="chunk")
    assert seen and seen[-1]._asdict() == TUNED
    want = mod.lightning_reference(**inputs)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)
    reset_tuned()


def test_prescreen_compiles_a_linear_candidate() -> None:
    from attnc.codegen.triton.aot import compile_report

    job = compile_job(_att(), None, Candidate.of(KernelKind.LIN_CHUNK, TUNED), 90, DType.BF16, 64)
    report = compile_report(job.fn, job.signature, job.constexprs, **job.kwargs())
    assert report.spill_bytes == 0 and dict(report.constexprs)["CHUNK"] == 32


def test_attnc_tune_lin_chunk_on_the_cpu(tmp_path, monkeypatch, capsys) -> None:
    """`attnc tune SPEC --kernels lin_chunk --cpu`: a plumbing run over the real kernels, exported under the
    key that the generated NAME_linear looks up."""
    import json

    from attnc.cli import main

    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ATTNC_TUNED_CONFIGS", raising=False)
    argv = ["tune", str(SPEC), "--shapes", "1,2,64,64", "--head-dim", "16", "--dtype", "fp32"]
    assert main([*argv, "--kernels", "lin_chunk", "--cpu", "--trials", "2", "--seed", "0"]) == 0
    assert "lin_chunk" in capsys.readouterr().out
    table = json.loads((tmp_path / "cache" / "tune" / "best.json").read_text())
    (key,) = table["configs"]
    assert key.startswith("attn=lightning|kernel=lin_chunk|") and "|M=64|N=64" in key
    assert set(table["configs"][key]["config"]) >= {"chunk", "block_k", "block_v", "num_warps", "num_stages"}
