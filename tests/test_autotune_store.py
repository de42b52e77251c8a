"""Storage: results survive a new process; two worker processes on the journal file and two on one real
PostgreSQL database tune one study together (every trial recorded once, no config measured twice); a
corrupt database is rebuilt with a warning; the exported best-config table.

Run as a script, this file is the worker those tests start: `python test_autotune_store.py worker ...`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import warnings
from collections import Counter
from pathlib import Path

import pytest
from attnc.autotune.key import DeviceInfo, TuningKey
from attnc.autotune.measure import SyntheticObjective, bowl
from attnc.autotune.resource import ARCHS
from attnc.autotune.search import SamplerKind, tune
from attnc.autotune.space import DType, KernelKind, Problem, space_for
from attnc.autotune.store import best_entries, export_table, load_table, open_storage

# The PostgreSQL test's server: .ci/run starts one and sets this; under CI=true its absence is a failure.
POSTGRES_URL = os.environ.get("ATTNC_TEST_POSTGRES_URL", "")
IN_CI = os.environ.get("CI", "").lower() == "true"

DEVICE = DeviceInfo("synthetic GPU", 90, "3.9.0", "2.13.0")
PROBLEM = Problem(64, 64, DType.FP16, 2048, 2048)
OPTIMUM = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "warp_specialize": 0}


def _key(name: str) -> TuningKey:
    return TuningKey.make(name, KernelKind.FWD, "0123456789abcdef", DEVICE, PROBLEM)


def _worker(storage: str, name: str, n_trials: int, log: str, seed: int, sampler: str = "random") -> None:
    """One tuning process: a synthetic objective that logs each measurement (pid, config) to `log` and takes
    0.2 s, like a short GPU measurement, so that concurrent workers overlap."""
    import time

    warnings.simplefilter("ignore")
    fn = bowl(OPTIMUM)

    def slow(c):
        time.sleep(0.2)
        return fn(c)

    obj = SyntheticObjective(slow, log=Path(log))
    tune(
        _key(name),
        space_for(KernelKind.FWD, PROBLEM),
        obj,
        storage=storage,
        n_trials=n_trials,
        sampler=SamplerKind(sampler),
        seed=seed,
        arch=ARCHS[90],
    )


def _run_workers(
    storage: str, name: str, n_trials: int, log: Path, workers: int = 2, sampler: str = "random"
):
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", storage, name, str(n_trials), str(log), str(seed), sampler],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in range(workers)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out


def _check_shared_study(storage: str, name: str, n_trials: int, log: Path, workers: int = 2) -> None:
    import optuna

    study = optuna.load_study(study_name=_key(name).study_name(), storage=open_storage(storage))
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "a trial recorded twice"
    measured = [t for t in trials if t.state.name in ("COMPLETE", "FAIL")]
    # Each worker stops once the study holds n_trials measurements; one may have started its last trial
    # just before the other's made the count.
    assert n_trials <= len(measured) <= n_trials + workers - 1
    configs = [tuple(sorted(t.params.items())) for t in measured]
    assert len(configs) == len(set(configs)), "a config measured twice"
    lines = [json.loads(s) for s in log.read_text().splitlines()]
    calls = Counter(tuple(sorted(rec["config"].items())) for rec in lines)
    assert max(calls.values()) == 1, f"the objective ran a config twice: {calls.most_common(3)}"
    assert set(calls) == set(configs), "every measurement is one recorded trial, and vice versa"
    assert len({rec["pid"] for rec in lines}) == workers, "both workers measured"
    assert not any(t.state.name == "RUNNING" for t in trials)


def test_two_processes_share_one_study_on_the_journal(tmp_path):
    store = str(tmp_path / "journal.log")
    log = tmp_path / "calls.jsonl"
    _run_workers(store, "journal2", 24, log)
    _check_shared_study(store, "journal2", 24, log)


@pytest.fixture
def postgres_url():
    """A fresh database on the test server (dropped afterwards)."""
    if not POSTGRES_URL:
        if IN_CI:
            pytest.fail("CI=true but ATTNC_TEST_POSTGRES_URL is unset: .ci/run must start PostgreSQL")
        pytest.skip("no PostgreSQL server: set ATTNC_TEST_POSTGRES_URL (.ci/run starts one)")
    psycopg = pytest.importorskip("psycopg") if not IN_CI else __import__("psycopg")
    try:
        admin = psycopg.connect(POSTGRES_URL, connect_timeout=10, autocommit=True)
    except psycopg.OperationalError as err:
        pytest.fail(f"ATTNC_TEST_POSTGRES_URL is set but the server cannot be reached: {err}")
    db = f"attnc_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {db}")
    base, _, _ = POSTGRES_URL.rpartition("/")
    try:
        yield f"{base}/{db}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.close()


def test_two_processes_share_one_study_on_postgresql(postgres_url, tmp_path):
    log = tmp_path / "calls.jsonl"
    _run_workers(postgres_url, "pg2", 24, log)
    _check_shared_study(postgres_url, "pg2", 24, log)
    entries = best_entries(open_storage(postgres_url))
    assert [e.key for e in entries] == [_key("pg2")]


def test_results_survive_a_new_process(tmp_path):
    store = str(tmp_path / "journal.log")
    log = tmp_path / "calls.jsonl"
    _run_workers(store, "survive", 8, log, workers=1)
    assert len(log.read_text().splitlines()) == 8
    # This process reads what the other wrote...
    (entry,) = best_entries(open_storage(store))
    assert entry.key == _key("survive") and entry.trials == 8
    # ...and a third process with the same budget measures nothing more.
    _run_workers(store, "survive", 8, log, workers=1)
    assert len(log.read_text().splitlines()) == 8


def _tuned_journal(path: Path, name: str, n: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tune(
            _key(name),
            space_for(KernelKind.FWD, PROBLEM),
            SyntheticObjective(bowl(OPTIMUM)),
            storage=str(path),
            n_trials=n,
            sampler=SamplerKind.RANDOM,
            seed=0,
        )


def test_corrupt_journal_is_rebuilt_with_a_warning(tmp_path):
    path = tmp_path / "journal.log"
    _tuned_journal(path, "corrupt", 5)
    data = path.read_bytes().splitlines(keepends=True)
    keep = len(data) // 2
    path.write_bytes(b"".join(data[:keep]) + b"\x00\x17 garbage {{ not json\n" + b"".join(data[keep:]))
    with pytest.warns(RuntimeWarning, match=r"journal .* is corrupt .*line"):
        storage = open_storage(str(path))
    assert list(tmp_path.glob("journal.log.corrupt-*")), "the corrupt file is kept aside"
    # The valid prefix survives and the study goes on in the rebuilt file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tune(
            _key("corrupt"),
            space_for(KernelKind.FWD, PROBLEM),
            SyntheticObjective(bowl(OPTIMUM)),
            storage=storage,
            n_trials=6,
            sampler=SamplerKind.RANDOM,
            seed=1,
        )
    assert res.measured == 6
    open_storage(str(path))  # and it reads cleanly afterwards (no warning: filterwarnings=error below)


def test_unreadable_journal_is_started_afresh(tmp_path):
    path = tmp_path / "journal.log"
    path.write_bytes(os.urandom(300) + b"\n")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        storage = open_storage(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tune(
            _key("fresh"),
            space_for(KernelKind.FWD, PROBLEM),
            SyntheticObjective(bowl(OPTIMUM)),
            storage=storage,
            n_trials=3,
            sampler=SamplerKind.RANDOM,
            seed=0,
        )
    assert res.measured == 3


def test_corrupt_sqlite_is_rebuilt_with_a_warning(tmp_path):
    db = tmp_path / "tune.db"
    db.write_bytes(b"this is not a database" * 200)
    with pytest.warns(RuntimeWarning, match="tuning database .* is corrupt"):
        storage = open_storage(f"sqlite:///{db}")
    assert storage.get_all_studies() == []
    assert list(tmp_path.glob("tune.db.corrupt-*"))


def test_unreachable_server_is_an_error_not_a_rebuild():
    with pytest.raises(RuntimeError, match="cannot open tuning storage"):
        open_storage("postgresql://nobody@127.0.0.1:9/none?connect_timeout=2")


def test_exported_table_round_trips_and_merges(tmp_path):
    store = tmp_path / "journal.log"
    _tuned_journal(store, "export", 4)
    table = tmp_path / "best.json"
    table.write_text(
        json.dumps(
            {
                "format": "attnc-tuned-configs",
                "version": 1,
                "configs": {"other|key": {"config": {"block_m": 16}}},
            }
        )
    )
    export_table(open_storage(str(store)), table)
    configs = load_table(table)
    assert set(configs) == {"other|key", _key("export").text()}, "other tables' entries stay"
    entry = configs[_key("export").text()]
    assert set(entry["config"]) == {"block_m", "block_n", "num_warps", "num_stages", "warp_specialize"}
    assert entry["trials"] == 4 and entry["time_ms"] > 0


def test_unreadable_table_warns_and_reads_empty(tmp_path):
    bad = tmp_path / "best.json"
    bad.write_text("{ not json")
    with pytest.warns(RuntimeWarning, match="ignoring tuned-config table"):
        assert load_table(bad) == {}


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    storage_, name_, n_, log_, seed_, sampler_ = sys.argv[2:8]
    _worker(storage_, name_, int(n_), log_, int(seed_), sampler_)
