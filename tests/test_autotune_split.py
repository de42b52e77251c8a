"""The split-KV decoding forward as an autotuner kernel kind ("fwd_split"): the space starts from the
runtime's choice, a forced candidate reaches the split kernels behind the accuracy gate (interpreter, tiny
decode shapes), and an exported config's number of splits is what the generated module then launches."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from attnc.autotune.key import TuningKey, current_device, kernel_hash
from attnc.autotune.measure import KernelObjective, SyntheticObjective, make_inputs
from attnc.autotune.search import tune
from attnc.autotune.space import Candidate, DType, KernelKind, Problem, space_for
from attnc.autotune.store import export_table, open_storage
from attnc.dsl.lower import compile_to_ir

from attnc.runtime import reset_tuned
from attnc.runtime import triton as rt_triton

from .conftest import SPECS

pytest.importorskip("triton")

SPEC = SPECS / "decode.attn"
PROBLEM = Problem(16, 16, DType.FP32, 4, 256)
TUNED = {"block_m": 16, "block_n": 32, "num_warps": 2, "num_stages": 1, "num_splits": 2}


def _inputs(q_len: int = 4):
    att = compile_to_ir(SPEC.read_text(), str(SPEC)).attentions[0]
    return make_inputs(
        att, batch=1, heads=2, q_len=q_len, kv_len=256, head_dim=16, dtype=torch.float32, device="cpu", seed=2
    )


def _spy(mod, monkeypatch) -> list:
    seen: list = []
    real = rt_triton._split_forward
    monkeypatch.setattr(
        rt_triton, "_split_forward", lambda spec, cfg, *a: seen.append(cfg) or real(spec, cfg, *a)
    )
    return seen


def test_space_starts_from_the_runtime_choice() -> None:
    from attnc.runtime.triton import _default_split_config

    space = space_for(KernelKind.FWD_SPLIT, Problem(128, 128, DType.BF16, 1, 16384))
    cfg = _default_split_config(128, 128, 0)
    d = space.default.as_dict()
    assert (d["block_m"], d["block_n"], d["num_warps"], d["num_stages"]) == tuple(cfg)[:4]
    assert d["num_splits"] == min(64, -(-16384 // cfg.block_n) // 4)
    for c in space.candidates()[1:]:
        assert c["num_splits"] <= -(-16384 // c["block_n"])


def test_forced_candidate_runs_the_split_kernels(compiled, monkeypatch) -> None:
    mod = compiled("decode")
    seen = _spy(mod, monkeypatch)
    obj = KernelObjective(mod, "decode", KernelKind.FWD_SPLIT, _inputs(), DType.FP32)
    m = obj.measure(Candidate.of(KernelKind.FWD_SPLIT, TUNED))
    assert m.error is not None and m.error < 1e-5
    assert seen and seen[-1].num_splits == 2 and seen[-1].block_n == 32
    with pytest.raises(ValueError, match="decoding shapes"):
        KernelObjective(mod, "decode", KernelKind.FWD_SPLIT, _inputs(q_len=32), DType.FP32)


def test_module_launches_the_tuned_number_of_splits(compiled, tmp_path, monkeypatch) -> None:
    mod = compiled("decode")
    kfile = Path(mod.__file__).with_name(Path(mod.__file__).stem + "_triton.py")
    key = TuningKey.make("decode", KernelKind.FWD_SPLIT, kernel_hash(kfile), current_device(False), PROBLEM)
    space = space_for(KernelKind.FWD_SPLIT, PROBLEM)
    optimum = Candidate.of(KernelKind.FWD_SPLIT, TUNED)
    assert optimum in space.candidates()
    obj = SyntheticObjective(lambda c: 1.0 if c == optimum else 2.0 + c["num_splits"])
    store = tmp_path / "journal.log"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tune(key, space, obj, storage=str(store), n_trials=len(space.candidates()), seed=0)
    assert res.best == optimum
    monkeypatch.setenv(
        "ATTNC_TUNED_CONFIGS", str(export_table(open_storage(str(store)), tmp_path / "t.json"))
    )
    reset_tuned()
    seen = _spy(mod, monkeypatch)
    inputs = _inputs()
    out = mod.decode(**inputs, backend="triton")
    assert seen and seen[-1].num_splits == 2 and seen[-1].block_n == 32
    torch.testing.assert_close(out, mod.decode_reference(**inputs), atol=1e-5, rtol=1e-5)
    reset_tuned()
