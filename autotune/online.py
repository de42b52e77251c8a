"""`ATTNC_AUTOTUNE=1`: a generated module tunes a key it has no config for, on its first call.

`attnc.compile` (and the zoo) install this hook in the modules they load when the variable is set
(codegen sits below the autotuner and installs nothing; without the variable they import nothing of it); the runtime
calls it once per untuned (kernel, key) and memoises the answer, so each key is tuned at most once per
process, and the result lands in the default storage and the exported table, so at most once per machine.
Without the variable nothing is installed and the runtime never tunes.

The hook measures on the call's own q, k, v, so it tunes specs whose other parameters all have defaults
(no auxiliary tensors); for the others it warns once and keeps the heuristic default (run `attnc tune`).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["ONLINE_TRIALS", "install"]

ONLINE_TRIALS = 12  # a first call should not take minutes: a short study, seeded with the default


@dataclass
class _Hook:
    module: ModuleType
    storage: Any = None
    n_trials: int = ONLINE_TRIALS
    _warned: set[str] = field(default_factory=set)

    def __call__(self, key_text: str, kernel: str, q: Any, k: Any, v: Any, heavy: int = 0) -> Any:
        """Tune on a helper thread: the runtime calls this from inside a custom op's implementation, below
        the autograd dispatch key (thread-local), where the backward kernels could not be measured."""
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(self._tune, key_text, q, k, v, heavy).result()

    def _tune(self, key_text: str, q: Any, k: Any, v: Any, heavy: int) -> Any:
        from .key import TuningKey
        from .measure import KernelObjective
        from .resource import arch_for
        from .search import tune
        from .space import space_for
        from .store import export_table, open_storage

        key = TuningKey.from_text(key_text, heavy)
        fn = getattr(self.module, f"{key.attention}_triton")
        extra = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.name not in ("q", "k", "v")
            and p.default is inspect.Parameter.empty
            and p.kind is not p.KEYWORD_ONLY
        ]
        if extra:
            if key.attention not in self._warned:
                self._warned.add(key.attention)
                warnings.warn(
                    f"attnc: ATTNC_AUTOTUNE cannot tune {key.attention!r} on first call (it takes "
                    f"{', '.join(extra)}); run `attnc tune` for it. Using the default schedule.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return None
        inputs = {"q": q.detach(), "k": k.detach(), "v": v.detach()}
        storage = self.storage if self.storage is not None else open_storage(None)
        self.storage = storage
        objective = KernelObjective(self.module, key.attention, key.kernel, inputs, key.dtype)
        space = space_for(key.kernel, key.problem())
        result = tune(
            key,
            space,
            objective,
            storage=storage,
            n_trials=self.n_trials,
            arch=arch_for(key.cc) if q.is_cuda else None,
        )
        export_table(storage)
        return result.best.as_dict() if result.best is not None else None


def install(module: ModuleType, *, storage: Any = None, n_trials: int = ONLINE_TRIALS) -> ModuleType:
    """Let `module` tune untuned keys on first call (effective only while ATTNC_AUTOTUNE=1), through the
    runtime's hook API. Returns the module."""
    from attnc.runtime import set_autotune_hook

    set_autotune_hook(module, _Hook(module, storage, n_trials))
    return module
