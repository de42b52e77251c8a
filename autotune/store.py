"""Where studies live, and the plain best-config table the runtime reads.

Storage (optuna's own, so every trial's params, timings and failure reasons are kept, not only the winner):

- the default, `<cache dir>/tune/journal.log`: optuna's journal file storage. Appends under a file lock, so
  several local processes can tune one study together; SQLite through the RDB storage serialises writers
  on one database lock and fails them under contention, which is why it is not the default.
- `postgresql://user@host/db` (or any SQLAlchemy URL, e.g. `sqlite:///path.db`): optuna's RDB storage; with
  PostgreSQL several machines share one study (optuna's distributed mode).
- a path ending in `.log` / `.journal`: a journal file there.

A corrupt journal or SQLite file is reported with a warning, moved aside (`<name>.corrupt-<time>`) and
rebuilt, from the valid prefix of the journal where there is one: tuning never crashes on a bad cache file.
A journal whose last record was cut off (a writer killed mid-write) has that partial line discarded, under
the journal's lock, before anything is appended: otherwise the next record would be glued onto it and
corrupt the journal in the middle.

The runtime never imports optuna: `export_table` writes the best config of every study to a JSON file
(`<cache dir>/tune/best.json` by default) that generated modules read once.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnc.settings import settings

from .key import TuningKey

__all__ = [
    "TABLE_FORMAT",
    "StorageKind",
    "StorageSpec",
    "TunedEntry",
    "best_entries",
    "export_table",
    "load_table",
    "open_storage",
    "resolve",
]

TABLE_FORMAT = "attnc-tuned-configs"
TABLE_VERSION = 1
KEY_ATTR = "attnc_key"  # study user attr: TuningKey.to_json()
KEY_TEXT_ATTR = "attnc_key_text"


class StorageKind(enum.Enum):
    JOURNAL = "journal"
    RDB = "rdb"


@dataclass(frozen=True)
class StorageSpec:
    """A storage location as the user gave it, resolved: the kind, the URL optuna gets, the file (if any)."""

    kind: StorageKind
    url: str
    path: Path | None

    def __str__(self) -> str:
        return str(self.path) if self.kind is StorageKind.JOURNAL else _redact(self.url)


def _redact(url: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db` for messages."""
    head, sep, tail = url.partition("://")
    if not sep or "@" not in tail:
        return url
    cred, _, rest = tail.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{head}://{user}{':***' if ':' in cred else ''}@{rest}"


def resolve(url: str | os.PathLike[str] | None) -> StorageSpec:
    """None -> the default journal under the cache dir; a URL with `://` -> RDB; any other text -> a journal
    file at that path."""
    if url is None or str(url) == "":
        path = settings().tune_dir / "journal.log"
        return StorageSpec(StorageKind.JOURNAL, str(path), path)
    text = str(url)
    if "://" in text:
        if text.startswith("sqlite:///"):
            return StorageSpec(StorageKind.RDB, text, Path(text.removeprefix("sqlite:///")))
        return StorageSpec(StorageKind.RDB, text, None)
    path = Path(text).expanduser()
    return StorageSpec(StorageKind.JOURNAL, str(path), path)


def open_storage(url: str | os.PathLike[str] | None = None) -> Any:
    """An optuna storage for `url` (see `resolve`). A corrupt file is moved aside and rebuilt, with a
    warning; a server that cannot be reached raises (that is not corruption, and rebuilding would lose
    nothing but hide the error)."""
    spec = resolve(url)
    if spec.kind is StorageKind.JOURNAL:
        assert spec.path is not None
        return _open_journal(spec.path)
    return _open_rdb(spec)


def _open_journal(path: Path) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    bad = _journal_corruption(path)
    if bad is not None:
        good_lines, why = bad
        aside = _move_aside(path)
        if good_lines:
            path.write_bytes(b"".join(good_lines))
        warnings.warn(
            f"attnc: tuning journal {path} is corrupt ({why}); moved it to {aside.name} and rebuilt it "
            f"from its {len(good_lines)} valid leading records",
            RuntimeWarning,
            stacklevel=3,
        )
    try:
        storage = JournalStorage(JournalFileBackend(str(path), lock_obj=_tail_healing_lock(path)))
        if bad is not None:
            fail_running(storage, "interrupted: its end was lost with the corrupt part of the journal")
        return storage
    except Exception as err:  # what the check above missed: start from nothing rather than crash
        aside = _move_aside(path)
        warnings.warn(
            f"attnc: tuning journal {path} is unreadable ({type(err).__name__}: {err}); moved it to "
            f"{aside.name} and started a new one",
            RuntimeWarning,
            stacklevel=3,
        )
        return JournalStorage(JournalFileBackend(str(path), lock_obj=_tail_healing_lock(path)))


@functools.cache
def _tail_healing_lock_class() -> type:
    from optuna.storages.journal import JournalFileSymlinkLock

    class TailHealingLock(JournalFileSymlinkLock):
        """optuna's default journal lock (the same lock file, so plain optuna writers exclude us too), which
        after acquiring repairs a torn last record. Holding the lock means no write is in progress, so a last
        line without its newline can only be the remains of a writer that died: appending after it would glue
        the next record onto it."""

        def __init__(self, path: Path) -> None:
            super().__init__(str(path))
            self._journal = path

        def acquire(self) -> bool:
            ok = super().acquire()
            try:
                _discard_torn_tail(self._journal)
            except BaseException:
                self.release()
                raise
            return ok

    return TailHealingLock


def _tail_healing_lock(path: Path) -> Any:
    """The journal's lock (the class is built on first use: optuna is imported lazily)."""
    return _tail_healing_lock_class()(path)


def _discard_torn_tail(path: Path) -> None:
    """Make `path` end with a newline: a last line that is a whole record missing only its newline gets it
    (nothing of it is lost); anything else after the last newline is dropped."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan back for the last newline in blocks (a torn record is at most one record long).
        end, keep = size, 0
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            nl = f.read(end - start).rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        f.seek(keep)
        tail = f.read()
        if _is_record(tail):
            f.write(b"\n")
            what = "completed it (only its newline was missing)"
        else:
            f.truncate(keep)
            what = f"discarded its {size - keep} bytes"
        f.flush()
        os.fsync(f.fileno())
    warnings.warn(
        f"attnc: tuning journal {path} ended with a torn record (an interrupted write); {what} before "
        "appending",
        RuntimeWarning,
        stacklevel=2,
    )


def _is_record(line: bytes) -> bool:
    try:
        rec = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(rec, dict) and "op_code" in rec


def fail_running(
    storage: Any, reason: str, older_than: float | None = None, study_id: int | None = None
) -> int:
    """Mark RUNNING trials (all, or those started more than `older_than` seconds ago) as failed with
    `reason`: their worker is gone, and a running trial holds its config and a share of the budget."""
    import datetime

    from optuna.trial import TrialState

    now = datetime.datetime.now()
    count = 0
    ids = [study_id] if study_id is not None else [st._study_id for st in storage.get_all_studies()]
    for sid in ids:
        for t in storage.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING,)):
            if (
                older_than is not None
                and t.datetime_start
                and (now - t.datetime_start).total_seconds() < older_than
            ):
                continue
            storage.set_trial_user_attr(t._trial_id, "reason", reason)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            count += 1
    return count


def _journal_corruption(path: Path) -> tuple[list[bytes], str] | None:
    """None when every complete line of the journal is a JSON object; else the valid leading lines and what
    is wrong. A last line without its newline is a write in progress (optuna skips it), not corruption."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        return [], f"unreadable: {err.strerror or err}"
    lines = data.splitlines(keepends=True)
    good: list[bytes] = []
    for n, line in enumerate(lines, 1):
        if not line.endswith(b"\n"):
            break
        try:
            rec = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            return good, f"line {n} is not a JSON record"
        if not isinstance(rec, dict) or "op_code" not in rec:
            return good, f"line {n} is not an optuna journal record"
        good.append(line)
    return None


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        path.replace(aside)
    except FileNotFoundError:
        pass
    return aside


def _open_rdb(spec: StorageSpec) -> Any:
    import optuna
    from sqlalchemy.exc import DatabaseError, OperationalError

    def attempt() -> Any:
        storage = optuna.storages.RDBStorage(_driver_url(spec.url), engine_kwargs=_engine_kwargs(spec.url))
        storage.get_all_studies()  # touches the schema: a corrupt file fails here, not mid-study
        return storage

    if spec.path is not None:
        spec.path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for retry in range(5):
            try:
                return attempt()
            except DatabaseError as err:
                # Workers opening a fresh database together race to create optuna's schema; the loser
                # finds it made by the winner on the next try.
                text = str(err).lower()
                if retry == 4 or ("already exists" not in text and "duplicate key" not in text):
                    raise
                time.sleep(0.2 * (retry + 1))
        raise AssertionError("unreachable")
    except (DatabaseError, OperationalError) as err:
        if spec.path is None or not spec.path.exists() or not _looks_corrupt(err):
            raise RuntimeError(f"attnc: cannot open tuning storage {spec}: {err.orig or err}") from None
        aside = _move_aside(spec.path)
        warnings.warn(
            f"attnc: tuning database {spec.path} is corrupt ({err.orig or err}); moved it to {aside.name} "
            "and started a new one",
            RuntimeWarning,
            stacklevel=3,
        )
        return attempt()


def _driver_url(url: str) -> str:
    """`postgresql://` means psycopg (3) to SQLAlchemy 2.1; fall back to psycopg2 where only it is installed."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def _looks_corrupt(err: Exception) -> bool:
    text = str(err).lower()
    return any(s in text for s in ("not a database", "malformed", "corrupt", "file is encrypted"))


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True}
    return {}


# ------------------------------------------------------------------------------------------ best configs


@dataclass(frozen=True)
class TunedEntry:
    """The best measured config of one study, as the runtime table holds it."""

    key: TuningKey
    config: dict[str, int]
    time_ms: float
    default_ms: float | None  # the heuristic default's time in the same study, when it was measured
    trials: int  # measured (complete) trials
    failed: int
    study: str


def best_entries(storage: Any) -> list[TunedEntry]:
    """One entry per attnc study in `storage` that has at least one complete trial."""
    import optuna
    from optuna.trial import TrialState

    out = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        key_json = summary.user_attrs.get(KEY_ATTR)
        if key_json is None:
            continue  # not ours
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state is TrialState.COMPLETE and t.value is not None]
        if not done:
            continue
        best = min(done, key=lambda t: (t.value, t.number))
        default = [t.value for t in done if t.user_attrs.get("is_default")]
        out.append(
            TunedEntry(
                key=TuningKey.from_json(key_json),
                config={k: int(v) for k, v in best.params.items()},
                time_ms=float(best.value),
                default_ms=float(default[0]) if default else None,
                trials=len(done),
                failed=sum(1 for t in trials if t.state is TrialState.FAIL),
                study=summary.study_name,
            )
        )
    return sorted(out, key=lambda e: e.key.text())


def table_json(entries: list[TunedEntry]) -> dict[str, Any]:
    return {
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "configs": {
            e.key.text(): {
                "config": e.config,
                "time_ms": e.time_ms,
                "default_ms": e.default_ms,
                "trials": e.trials,
                "study": e.study,
            }
            for e in entries
        },
    }


def export_table(storage: Any, path: str | os.PathLike[str] | None = None) -> Path:
    """Write the best config of every study in `storage` to the JSON table the runtime reads (merged into
    an existing table: other storages' entries stay). Atomic: a reader sees the old or the new table."""
    dest = Path(path) if path is not None else settings().tuned_table
    table = table_json(best_entries(storage))
    old = load_table(dest) if dest.exists() else {}
    merged = {**old, **table["configs"]}
    table["configs"] = dict(sorted(merged.items()))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def load_table(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """key text -> {"config": {...}, "time_ms": ...}; an unreadable table warns and reads as empty."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(f"not an {TABLE_FORMAT} table")
        configs = data["configs"]
        if not isinstance(configs, dict):
            raise ValueError("'configs' is not an object")
        return configs
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, AttributeError) as err:
        warnings.warn(f"attnc: ignoring tuned-config table {path}: {err}", RuntimeWarning, stacklevel=2)
        return {}


def load_any(source: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """A best-config table from a JSON table file, or exported on the fly from a storage (journal file or
    URL): what `attnc codegen --tuned-from` accepts."""
    text = str(source)
    if text.endswith(".json"):
        if not Path(text).is_file():
            raise FileNotFoundError(f"{text}: no such tuned-config table")
        return load_table(text)
    spec = resolve(text)
    if spec.path is not None and not spec.path.exists():
        raise FileNotFoundError(f"{text}: no such tuning database")
    return table_json(best_entries(open_storage(text)))["configs"]
