"""The search: one optuna study per tuning key, shared by every process that tunes that key.

Each study starts from the runtime's heuristic default (enqueued as the first trial, so the tuned config is
never slower than the untuned one by more than noise) and then asks its sampler — TPE (default), GP, random or
grid — for candidates. Per candidate:

1. outside the space or over the resource model (`resource.py`): recorded as a *pruned* trial with the reason
   and never launched (pruned, not failed, so TPE counts it among the bad configs and steers away);
2. already measured, or being measured by another worker: pruned as a duplicate (below);
3. measured by the objective (accuracy gate, then timing). A compile error, launch error, out-of-memory,
   timeout or wrong output is a *failed* trial with its reason; the study goes on.

No config is measured twice, across processes and machines: a worker first writes the trial's params and a
`ready` mark to the storage, then looks for another trial with the same params that is complete, failed, or
running and ready. Any hit and it yields. Of two workers racing on one config, the later to become ready
sees the other; if both see each other, both yield and the config is simply not measured in this round.

`n_trials` is the study's budget of measurements in total, whichever worker makes them, so two workers with
`n_trials=20` measure 20 configs together. Every trial (timings of every repetition included) stays in the
storage (TVM MetaSchedule's database keeps every candidate, not only the winner).
"""

from __future__ import annotations

import dataclasses
import enum
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .key import TuningKey
from .measure import FailReason, Measurement, Objective, TrialFailure, deadline
from .resource import GpuArch, verdict
from .space import Candidate, KernelSpace
from .store import KEY_ATTR, KEY_TEXT_ATTR, fail_running, open_storage

__all__ = ["SamplerKind", "TrialRecord", "TuneResult", "make_sampler", "study_records", "tune"]

READY = "attnc_ready"


class SamplerKind(enum.Enum):
    TPE = "tpe"
    GP = "gp"
    RANDOM = "random"
    GRID = "grid"


def make_sampler(kind: SamplerKind, space: KernelSpace, seed: int | None = None) -> Any:
    import optuna

    if kind is SamplerKind.TPE:
        # Few startup trials: the space is small and the enqueued default already is one.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True, group=True)
    if kind is SamplerKind.GP:
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)
    if kind is SamplerKind.RANDOM:
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler({p.name: list(p.choices) for p in space.params}, seed=seed)


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the storage holds it: the config, its state, its time or why it has none."""

    number: int
    config: dict[str, int]
    state: str  # "COMPLETE" | "FAIL" | "PRUNED" | "RUNNING" | "WAITING"
    time_ms: float | None
    reason: str  # failed / pruned trials: "compile: ...", "duplicate of #3", "infeasible: ..."
    timings_ms: tuple[float, ...] = ()
    is_default: bool = False


@dataclass(frozen=True)
class TuneResult:
    key: TuningKey
    study_name: str
    best: Candidate | None
    best_ms: float | None
    default_ms: float | None
    records: tuple[TrialRecord, ...] = field(repr=False)

    @property
    def measured(self) -> int:
        return sum(1 for r in self.records if r.state in ("COMPLETE", "FAIL"))

    @property
    def failed(self) -> list[TrialRecord]:
        return [r for r in self.records if r.state == "FAIL"]


Progress = Callable[[int, int, "float | None", "dict[str, int] | None"], None]


def tune(
    key: TuningKey,
    space: KernelSpace,
    objective: Objective,
    *,
    storage: Any = None,
    n_trials: int = 25,
    timeout: float | None = None,
    trial_timeout: float | None = None,
    sampler: SamplerKind = SamplerKind.GP,
    seed: int | None = None,
    arch: GpuArch | None = None,
    progress: Progress | None = None,
) -> TuneResult:
    """Tune `key` until its study holds `n_trials` measurements (from any worker), `timeout` seconds pass,
    or every admissible config is measured. `storage`: an optuna storage, a URL/path, or None (the default
    journal). `arch`: prune with the resource model for that GPU generation (None: structural rules only)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    feasible = [c for c in space.candidates() if _why_not(c, space, arch) is None]
    space = _fix_constant_params(space, feasible)
    if storage is None or isinstance(storage, str):
        storage = open_storage(storage)
    name = key.study_name()
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="minimize",
        sampler=make_sampler(sampler, space, seed),
        load_if_exists=True,
    )
    if KEY_ATTR not in study.user_attrs:
        study.set_user_attr(KEY_ATTR, key.to_json())
        study.set_user_attr(KEY_TEXT_ATTR, key.text())
    rng = random.Random(seed)
    if not any(t.params == space.default.as_dict() for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(space.default.as_dict(), user_attrs={"is_default": True})

    # A trial running for longer than any measurement may take belongs to a worker that died.
    fail_running(
        storage,
        "abandoned: its worker stopped without reporting",
        older_than=_stale_after(trial_timeout),
        study_id=study._study_id,
    )
    start = time.monotonic()
    attempts, limit = 0, 20 * n_trials + 4 * len(feasible) + 20
    while attempts < limit:
        trials = study.get_trials(deepcopy=False)
        done = _measured_or_in_flight(trials)
        if progress is not None:
            progress(min(len(done), n_trials), n_trials, *_best(trials))
        if len(done) >= n_trials or (timeout is not None and time.monotonic() - start >= timeout):
            break
        measured = {Candidate.of(space.kind, t.params) for t in done}
        todo = [c for c in feasible if c not in measured]
        if not todo:
            break  # the whole pruned space is measured
        attempts += 1
        trial = study.ask()
        params = {p.name: trial.suggest_categorical(p.name, list(p.choices)) for p in space.params}
        c = Candidate.of(space.kind, params)
        trial.set_user_attr("config", str(c))
        why = _why_not(c, space, arch)
        if why is not None:
            trial.set_user_attr("reason", f"{FailReason.INFEASIBLE.value}: {why}")
            study.tell(trial, state=TrialState.PRUNED)
            _enqueue_unmeasured(study, todo, rng)  # samplers that ignore pruned trials would repeat it
            continue
        trial.set_user_attr(READY, True)
        dup = _duplicate_of(study.get_trials(deepcopy=False), trial.number, trial.params)
        if dup is not None:
            trial.set_user_attr("reason", f"duplicate of #{dup}")
            study.tell(trial, state=TrialState.PRUNED)
            _enqueue_unmeasured(study, [x for x in todo if x != c], rng)
            continue
        try:
            with deadline(trial_timeout):
                m: Measurement = objective.measure(c)
        except TrialFailure as f:
            trial.set_user_attr("reason", f"{f.reason.value}: {f.detail}")
            study.tell(trial, state=TrialState.FAIL)
            continue
        trial.set_user_attr("timings_ms", list(m.timings_ms))
        if m.error is not None:
            trial.set_user_attr("error", m.error)
        study.tell(trial, m.time_ms)
    return result_of(study, key)


def _fix_constant_params(space: KernelSpace, feasible: list[Candidate]) -> KernelSpace:
    """The space with each parameter that takes one value over the feasible candidates fixed to it (e.g.
    `warp_specialize` where the GPU cannot partition the loops): the sampler then searches only what can
    vary, as it would without that parameter."""
    params = []
    for p in space.params:
        values = {c.get(p.name, p.default) for c in feasible}
        params.append(dataclasses.replace(p, choices=(values.pop(),)) if len(values) == 1 else p)
    return dataclasses.replace(space, params=tuple(params))


def _stale_after(trial_timeout: float | None) -> float:
    return max(3600.0, 4 * (trial_timeout or 0.0))


def _why_not(c: Candidate, space: KernelSpace, arch: GpuArch | None) -> str | None:
    why = space.violation(c)
    if why is None and arch is not None and c != space.default:
        v = verdict(c, space.problem, arch)
        if not v.ok:
            why = f"resource model (sm_{arch.cc}): {v.reason}"
    return why


def _measured_or_in_flight(trials: Sequence[Any]) -> list[Any]:
    from optuna.trial import TrialState

    return [
        t
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.FAIL)
        or (t.state is TrialState.RUNNING and t.user_attrs.get(READY))
    ]


def _duplicate_of(trials: Sequence[Any], number: int, params: dict[str, Any]) -> int | None:
    """Another trial with these params that was measured, failed, or is being measured (ready)."""
    from optuna.trial import TrialState

    for t in trials:
        if t.number == number or t.params != params:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.FAIL):
            return t.number
        if t.state is TrialState.RUNNING and t.user_attrs.get(READY):
            return t.number
    return None


def _enqueue_unmeasured(study: Any, todo: Sequence[Candidate], rng: random.Random) -> None:
    from optuna.trial import TrialState

    if not todo:
        return
    if any(t.state is TrialState.WAITING for t in study.get_trials(deepcopy=False)):
        return  # something is queued already
    study.enqueue_trial(rng.choice(list(todo)).as_dict())


def _best(trials: Sequence[Any]) -> tuple[float | None, dict[str, int] | None]:
    from optuna.trial import TrialState

    done = [t for t in trials if t.state is TrialState.COMPLETE and t.value is not None]
    if not done:
        return None, None
    b = min(done, key=lambda t: (t.value, t.number))
    return float(b.value), dict(b.params)


def study_records(study: Any) -> list[TrialRecord]:
    out = []
    for t in study.get_trials(deepcopy=False):
        out.append(
            TrialRecord(
                number=t.number,
                config={k: int(v) for k, v in t.params.items()},
                state=t.state.name,
                time_ms=float(t.value) if t.value is not None else None,
                reason=str(t.user_attrs.get("reason", "")),
                timings_ms=tuple(t.user_attrs.get("timings_ms", ())),
                is_default=bool(t.user_attrs.get("is_default", False)),
            )
        )
    return out


def result_of(study: Any, key: TuningKey) -> TuneResult:
    records = study_records(study)
    complete = [r for r in records if r.state == "COMPLETE" and r.time_ms is not None]
    best = min(complete, key=lambda r: (r.time_ms, r.number)) if complete else None
    default = [r.time_ms for r in complete if r.is_default]
    return TuneResult(
        key=key,
        study_name=study.study_name,
        best=Candidate.of(key.kernel, best.config) if best else None,
        best_ms=best.time_ms if best else None,
        default_ms=default[0] if default else None,
        records=tuple(records),
    )
