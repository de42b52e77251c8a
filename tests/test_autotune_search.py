"""The search itself, on deterministic synthetic objectives: optimum within budget, failures recorded with
their reason, no config measured twice, the default first, the space registry and the tuning key."""

from __future__ import annotations

import warnings

import pytest
from attnc.autotune.key import DeviceInfo, TuningKey
from attnc.autotune.measure import FailReason, SyntheticObjective, TrialFailure, bowl
from attnc.autotune.resource import ARCHS, prune
from attnc.autotune.search import SamplerKind, tune
from attnc.autotune.space import (
    SPACES,
    Candidate,
    DType,
    KernelKind,
    Problem,
    bucket,
    register,
    space_for,
)

DEVICE = DeviceInfo("synthetic GPU", 90, "3.9.0", "2.13.0")
PROBLEM = Problem(64, 64, DType.FP16, 4096, 4096)
OPTIMUM = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "warp_specialize": 0}


def _key(name: str, kind: KernelKind = KernelKind.FWD, problem: Problem = PROBLEM) -> TuningKey:
    return TuningKey.make(name, kind, "0123456789abcdef", DEVICE, problem)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=Warning)  # optuna's ExperimentalWarning for GP / group TPE
        yield


def test_search_finds_the_known_optimum_within_budget(tmp_path):
    space = space_for(KernelKind.FWD, PROBLEM)
    optimum = Candidate.of(KernelKind.FWD, OPTIMUM)
    assert optimum in prune(space, ARCHS[90])[0], "the optimum must survive the resource model"
    obj = SyntheticObjective(bowl(OPTIMUM))
    res = tune(_key("opt"), space, obj, storage=str(tmp_path / "j.log"), n_trials=30, seed=0, arch=ARCHS[90])
    assert res.best == optimum
    assert res.best_ms == pytest.approx(1.0)
    assert res.measured == 30
    assert obj.calls[0] == space.default, "the heuristic default is measured first"
    assert len(set(obj.calls)) == len(obj.calls), "no config measured twice"
    assert res.default_ms is not None and res.default_ms > res.best_ms


def test_failed_trials_keep_their_reason_and_the_study_goes_on(tmp_path):
    space = space_for(KernelKind.FWD, PROBLEM)
    fn = bowl(OPTIMUM)

    def flaky(c: Candidate) -> float:
        if c["block_n"] == 16:
            raise TrialFailure(FailReason.COMPILE, "synthetic: rejected by the compiler")
        if c["block_m"] == 16:
            raise TrialFailure(FailReason.OOM, "synthetic: out of memory")
        return fn(c)

    obj = SyntheticObjective(flaky)
    res = tune(
        _key("flaky"),
        space,
        obj,
        storage=str(tmp_path / "j.log"),
        n_trials=40,
        sampler=SamplerKind.RANDOM,
        seed=3,
    )
    assert res.measured == 40
    failed = res.failed
    assert failed, "the random sampler must hit a failing config in 40 trials"
    for r in failed:
        assert r.reason.startswith(("compile: synthetic", "out of memory: synthetic")), r.reason
    assert all(r.time_ms is None for r in failed)
    assert res.best is not None and res.best["block_n"] != 16 and res.best["block_m"] != 16


def test_accuracy_gate_failure_is_recorded(tmp_path):
    """A candidate whose output is wrong never becomes the best, however fast."""
    space = space_for(KernelKind.FWD, PROBLEM)
    wrong = Candidate.of(KernelKind.FWD, OPTIMUM)
    obj = SyntheticObjective(bowl(OPTIMUM), wrong=frozenset({wrong}))
    res = tune(_key("gate"), space, obj, storage=str(tmp_path / "j.log"), n_trials=35, seed=0, arch=ARCHS[90])
    rejected = [r for r in res.failed if r.config == OPTIMUM]
    assert rejected and rejected[0].reason.startswith("accuracy")
    assert res.best != wrong


def test_grid_stops_when_the_pruned_space_is_measured(tmp_path):
    """A small problem (32-long sequences) has few admissible configs: the study measures each exactly once
    and stops, though the budget is larger."""
    small = Problem(16, 16, DType.FP32, 32, 32)
    space = space_for(KernelKind.FWD, small)
    feasible = [c for c in space.candidates()]
    obj = SyntheticObjective(lambda c: float(c["block_m"] + c["num_warps"] + c["num_stages"]))
    res = tune(
        _key("grid", problem=small),
        space,
        obj,
        storage=str(tmp_path / "j.log"),
        n_trials=500,
        sampler=SamplerKind.GRID,
        seed=0,
    )
    assert sorted(obj.calls) == sorted(feasible)
    assert res.measured == len(feasible)
    pruned = [r for r in res.records if r.state == "PRUNED"]
    assert all(r.reason.startswith(("infeasible", "duplicate")) for r in pruned)


def test_study_resumes_without_remeasuring(tmp_path):
    space = space_for(KernelKind.FWD, PROBLEM)
    store = str(tmp_path / "j.log")
    first = SyntheticObjective(bowl(OPTIMUM))
    tune(_key("resume"), space, first, storage=store, n_trials=6, seed=0, arch=ARCHS[90])
    again = SyntheticObjective(bowl(OPTIMUM))
    res = tune(_key("resume"), space, again, storage=store, n_trials=10, seed=1, arch=ARCHS[90])
    assert len(again.calls) == 4, "the budget counts the measurements already stored"
    assert not set(again.calls) & set(first.calls)
    assert res.measured == 10


def test_space_registry_one_entry_per_kind():
    assert set(SPACES) == set(KernelKind)
    with pytest.raises(ValueError, match="registered already"):
        register(KernelKind.FWD)(lambda p: space_for(KernelKind.FWD, p))
    for kind in KernelKind:
        for p in (
            PROBLEM,
            Problem(128, 128, DType.BF16, 100, 3000),
            Problem(256, 256, DType.FP32, 4096, 4096, True),
        ):
            space = space_for(kind, p)
            cands = space.candidates()
            assert cands[0] == space.default
            assert len(set(cands)) == len(cands)
            for c in cands[1:]:
                if kind is KernelKind.LIN_CHUNK:  # one sequence: the chunk stays within its bucket
                    assert c["chunk"] <= bucket(p.kv_len)
                else:
                    assert c["block_m"] <= bucket(p.q_len) and c["block_n"] <= bucket(p.kv_len)
                assert set(c.as_dict()) == set(space.names())


def test_space_violation_names_the_rule():
    space = space_for(KernelKind.FWD, Problem(64, 64, DType.FP16, 64, 64))
    too_long = Candidate.of(KernelKind.FWD, {"block_m": 128, "block_n": 32, "num_warps": 4, "num_stages": 2})
    assert "query bucket 64" in (space.violation(too_long) or "")
    idle = Candidate.of(KernelKind.FWD, {"block_m": 16, "block_n": 16, "num_warps": 8, "num_stages": 2})
    assert "warps have work" in (space.violation(idle) or "")
    odd = Candidate.of(KernelKind.FWD, {"block_m": 48, "block_n": 32, "num_warps": 4, "num_stages": 2})
    assert "block_m=48" in (space.violation(odd) or "")


def test_key_changes_with_every_field():
    base = _key("k")
    text = base.text()
    assert "|N=4096" in text and "|gpu=synthetic GPU|cc=90|" in text
    others = [
        TuningKey.make("k", KernelKind.DQ, "0123456789abcdef", DEVICE, PROBLEM),
        TuningKey.make("k", KernelKind.FWD, "fedcba9876543210", DEVICE, PROBLEM),
        TuningKey.make(
            "k", KernelKind.FWD, "0123456789abcdef", DeviceInfo("H200", 90, "3.9.0", "2.13.0"), PROBLEM
        ),
        TuningKey.make(
            "k",
            KernelKind.FWD,
            "0123456789abcdef",
            DeviceInfo("synthetic GPU", 90, "3.6.0", "2.13.0"),
            PROBLEM,
        ),
        TuningKey.make(
            "k",
            KernelKind.FWD,
            "0123456789abcdef",
            DeviceInfo("synthetic GPU", 90, "3.9.0", "2.11.0"),
            PROBLEM,
        ),
        TuningKey.make(
            "k", KernelKind.FWD, "0123456789abcdef", DEVICE, Problem(64, 64, DType.BF16, 4096, 4096)
        ),
        TuningKey.make(
            "k", KernelKind.FWD, "0123456789abcdef", DEVICE, Problem(128, 64, DType.FP16, 4096, 4096)
        ),
        TuningKey.make(
            "k", KernelKind.FWD, "0123456789abcdef", DEVICE, Problem(64, 64, DType.FP16, 4097, 4096)
        ),
    ]
    assert len({base.text(), *(o.text() for o in others)}) == len(others) + 1
    assert len({base.study_name(), *(o.study_name() for o in others)}) == len(others) + 1
    same_bucket = TuningKey.make(
        "k", KernelKind.FWD, "0123456789abcdef", DEVICE, Problem(64, 64, DType.FP16, 3000, 2049)
    )
    assert same_bucket.text() == text
    assert TuningKey.from_json(base.to_json()) == base


@pytest.mark.parametrize(("n", "b"), [(1, 16), (16, 16), (17, 32), (4096, 4096), (4097, 8192)])
def test_bucket_is_the_next_power_of_two(n, b):
    assert bucket(n) == b
