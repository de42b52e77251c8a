"""The sampler benchmark's replay, on a synthetic ground truth: fractions of the true best per budget."""

from __future__ import annotations

import json

import pytest
from attnc.autotune.benchmark import (
    TableObjective,
    format_reports,
    ground_truth,
    load_truth,
    main,
    replay,
    save_truth,
)
from attnc.autotune.measure import SyntheticObjective, TrialFailure, bowl
from attnc.autotune.resource import ARCHS
from attnc.autotune.search import SamplerKind
from attnc.autotune.space import DType, KernelKind, Problem, space_for

PROBLEM = Problem(64, 64, DType.FP16, 1024, 1024)
OPTIMUM = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}


def test_replay_reports_best_so_far_fractions(tmp_path):
    space = space_for(KernelKind.FWD, PROBLEM)
    truth = ground_truth(space, SyntheticObjective(bowl(OPTIMUM)), ARCHS[90])
    assert min(t for t in truth.values() if t is not None) == 1.0
    n = len(truth)
    reports = replay(space, truth, [SamplerKind.RANDOM, SamplerKind.GRID], seeds=2, budgets=(1, 5, n))
    for r in reports:
        fr = r.fraction_of_best
        assert 0 < fr[1] <= fr[5] <= fr[n] == 1.0, r  # best so far only improves; the whole space finds it
        assert r.found_best[n] == 1.0
    assert "random" in format_reports(reports)
    # The JSON round trip and the command line.
    path = tmp_path / "truth.json"
    save_truth(truth, path, {"D": 64, "dtype": "float16", "M": 1024, "N": 1024})
    assert load_truth(path)[0] == truth
    out = tmp_path / "samplers.json"
    assert main(["replay", str(path), "--samplers", "random", "--seeds", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["reports"][0]["sampler"] == "random"


def test_table_objective_fails_configs_outside_the_truth():
    space = space_for(KernelKind.FWD, PROBLEM)
    obj = TableObjective({space.default: 2.0})
    assert obj.measure(space.default).time_ms == 2.0
    with pytest.raises(TrialFailure, match="infeasible"):
        obj.measure(space.candidates()[1])
