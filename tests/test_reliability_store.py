"""Issue 16, tuning store: a journal whose last record was cut off (a worker killed mid-write) keeps working.

Before the fix, the partial last line was left in place ("a write in progress"), the next record was appended
onto it, and the journal had a corrupt record in its middle: the next open moved the whole file aside.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from attnc.autotune.key import DeviceInfo, TuningKey
from attnc.autotune.measure import SyntheticObjective, bowl
from attnc.autotune.search import SamplerKind, tune
from attnc.autotune.space import DType, KernelKind, Problem, space_for
from attnc.autotune.store import best_entries, open_storage

DEVICE = DeviceInfo("synthetic GPU", 90, "3.9.0", "2.13.0")
PROBLEM = Problem(64, 64, DType.FP16, 2048, 2048)
OPTIMUM = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}


def _key(name: str) -> TuningKey:
    return TuningKey.make(name, KernelKind.FWD, "0123456789abcdef", DEVICE, PROBLEM)


def _tune(storage: object, n_trials: int, seed: int) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tune(
            _key("torn"),
            space_for(KernelKind.FWD, PROBLEM),
            SyntheticObjective(bowl(OPTIMUM)),
            storage=storage,
            n_trials=n_trials,
            sampler=SamplerKind.RANDOM,
            seed=seed,
        )
    return res.measured


def _records(path: Path) -> list[dict]:
    """Every line of the journal, each of which must be one complete JSON record."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the journal ends inside a record"
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize("cut", [1, 7, "half"], ids=["newline-only", "7-bytes", "half-a-record"])
def test_torn_final_record_is_discarded_before_appending(tmp_path: Path, cut: int | str) -> None:
    path = tmp_path / "journal.log"
    assert _tune(str(path), 4, seed=0) == 4
    lines = path.read_bytes().splitlines(keepends=True)
    last = lines[-1]
    n_cut = len(last) // 2 if cut == "half" else int(cut)
    path.write_bytes(b"".join(lines[:-1]) + last[: len(last) - n_cut])  # the last write was interrupted

    # Opening is not alarmed (the partial line could be a write in progress)...
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        storage = open_storage(str(path))
    # ...but the first append, under the journal's lock, drops the torn part first.
    with pytest.warns(RuntimeWarning, match="torn record"):
        storage._backend.append_logs(
            [{"op_code": 0, "worker_id": "x", "study_name": "other", "directions": [1]}]
        )
    records = _records(path)
    # A record that lost only its newline is completed; a torn one is dropped. Then the new one follows.
    assert len(records) == len(lines) + (1 if cut == 1 else 0)
    assert records[: len(lines) - 1] == [json.loads(x) for x in lines[:-1]]
    assert records[-1]["study_name"] == "other"

    # Tuning goes on in the same journal, and a fresh reader sees no corruption (no warning at all).
    assert _tune(str(path), 6, seed=1) >= 1
    _records(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (entry,) = [e for e in best_entries(open_storage(str(path))) if e.key == _key("torn")]
    assert entry.trials >= 4
    assert not list(tmp_path.glob("journal.log.corrupt-*")), "nothing had to be moved aside"


def test_complete_journal_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    _tune(str(path), 3, seed=0)
    before = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn-record warning for a journal that ends with a newline
        storage = open_storage(str(path))
        storage._backend.append_logs([{"op_code": 0, "worker_id": "x", "study_name": "b", "directions": [1]}])
    assert path.read_bytes().startswith(before)
