"""Measuring a candidate: the objective a study minimises, and the accuracy gate in front of it.

An `Objective` turns a `Candidate` into a `Measurement` (milliseconds, every repetition kept) or raises
`TrialFailure` with a typed reason, which the study records as a failed trial and goes on. Two objectives:

- `KernelObjective`: the generated kernel itself. On a GPU it times with `triton.testing.do_bench` (warm-up,
  L2 flush, median of repetitions); on the CPU it runs under the Triton interpreter with a wall clock, which
  exercises the plumbing but says nothing about GPU speed. Before timing, its accuracy gate compares the
  candidate's output (or gradients, for the backward kernels) with the spec's PyTorch reference: a schedule
  that computes something else is rejected however fast it is (Helion's gate).
- `SyntheticObjective`: a deterministic function of the config, for tests of the search itself.

The backward kernels are timed as the whole backward pass with only the tuned kernel's config varied: the
other kernel's time is a constant offset, so the argmin is the same.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from .space import Candidate, DType, KernelKind

__all__ = [
    "TOLERANCE",
    "FailReason",
    "KernelObjective",
    "Measurement",
    "Objective",
    "SyntheticObjective",
    "TrialFailure",
    "bowl",
    "classify",
    "make_inputs",
]

# The accuracy gate's tolerance per dtype: max |candidate - reference| / max(1, max |reference|).
TOLERANCE: dict[DType, float] = {DType.FP16: 2e-2, DType.BF16: 6e-2, DType.FP32: 1e-4}


class FailReason(enum.Enum):
    """Why a trial has no time; stored on the failed trial (user attr `reason`)."""

    INFEASIBLE = "infeasible"  # outside the space or over the resource model: never launched
    COMPILE = "compile"  # the compiler rejected the config
    LAUNCH = "launch"  # the launch failed (out of resources, illegal config)
    OOM = "out of memory"
    TIMEOUT = "timeout"
    ACCURACY = "accuracy"  # output disagrees with the reference
    ERROR = "error"  # anything else the objective raised


class TrialFailure(Exception):
    def __init__(self, reason: FailReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


@dataclass(frozen=True)
class Measurement:
    time_ms: float  # what the study minimises: the median of `timings_ms`
    timings_ms: tuple[float, ...] = ()
    error: float | None = None  # the accuracy gate's relative error, when it ran


class Objective(Protocol):
    """What a study measures. `measure` raises TrialFailure for a config that cannot be measured."""

    def measure(self, c: Candidate) -> Measurement: ...


def classify(err: BaseException) -> TrialFailure:
    """Map an exception from compiling or launching a kernel to a TrialFailure with its reason."""
    if isinstance(err, TrialFailure):
        return err
    name = type(err).__name__
    text = f"{name}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:500]
    low = f"{name} {err}".lower()
    if "outofmemory" in low.replace(" ", "") or "out of memory" in low:
        return TrialFailure(FailReason.OOM, text)
    if "outofresources" in low.replace(" ", "") or "out of resource" in low:
        return TrialFailure(FailReason.LAUNCH, text)
    if "compil" in name.lower() or "compil" in low:
        return TrialFailure(FailReason.COMPILE, text)
    if isinstance(err, RuntimeError | ValueError):
        return TrialFailure(FailReason.LAUNCH, text)
    return TrialFailure(FailReason.ERROR, text)


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise TrialFailure(TIMEOUT) if the block runs past `seconds` (SIGALRM: main thread on POSIX only;
    elsewhere the time is checked after the fact)."""
    if not seconds or seconds <= 0:
        yield
        return
    use_alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    start = time.perf_counter()

    def on_alarm(signum: int, frame: Any) -> None:
        raise TrialFailure(FailReason.TIMEOUT, f"ran past the {seconds:g} s trial limit")

    old = signal.signal(signal.SIGALRM, on_alarm) if use_alarm else None
    if use_alarm:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    if time.perf_counter() - start > seconds:
        raise TrialFailure(FailReason.TIMEOUT, f"took {time.perf_counter() - start:.1f} s > {seconds:g} s")


# ------------------------------------------------------------------------------------------------ synthetic


@dataclass
class SyntheticObjective:
    """A deterministic objective over configs (tests, and benchmarks of the samplers themselves).

    `fn(candidate) -> milliseconds`; raising TrialFailure marks a config as failing. With `log`, every
    measurement appends one JSON line `{"pid", "config"}`: what the concurrency tests count to prove that no
    config was measured twice across processes.
    """

    fn: Callable[[Candidate], float]
    log: Path | None = None
    wrong: frozenset[Candidate] = frozenset()  # configs whose "output" is wrong: the gate must reject them
    calls: list[Candidate] = field(default_factory=list)

    def measure(self, c: Candidate) -> Measurement:
        self.calls.append(c)
        if self.log is not None:
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"pid": os.getpid(), "config": c.as_dict()}) + "\n")
        if c in self.wrong:
            raise TrialFailure(FailReason.ACCURACY, "synthetic: wrong output by construction")
        t = float(self.fn(c))
        return Measurement(t, (t,))


def bowl(optimum: Mapping[str, int], base_ms: float = 1.0) -> Callable[[Candidate], float]:
    """A smooth synthetic landscape with its unique minimum `base_ms` at `optimum` (log2 distance per
    parameter, of 1 + the value: flags are 0 or 1), the shape tile-size landscapes roughly have."""

    def fn(c: Candidate) -> float:
        d = sum((math.log2(1 + c[k]) - math.log2(1 + v)) ** 2 for k, v in optimum.items())
        return base_ms * (1.0 + 0.25 * d)

    return fn


# ------------------------------------------------------------------------------------------------ kernels


def make_inputs(
    att: Any,
    *,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    v_dim: int | None = None,
    dtype: Any,
    device: Any,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for the attention's generated functions: random q, k, v (and float auxiliary
    tensors), zeros for int tensors (always in range as an index), True for bool tensors. Size symbols
    bind from the layout (B, H, M, N, D, E; key/value heads default to H) and `sizes`; scalars keep their
    defaults unless `sizes` names them."""
    import torch
    from attnc.dsl.ir import DType as IrDType
    from attnc.dsl.ir import Op, TensorParam

    lay = att.layout
    bound: dict[str, int] = {}
    for node, value in (
        (lay.batch, batch),
        (lay.heads, heads),
        (lay.q_len, q_len),
        (lay.kv_len, kv_len),
        (lay.head_dim, head_dim),
        (lay.v_dim, v_dim or head_dim),
        (lay.kv_heads, heads),
    ):
        if node.op is Op.SIZE:
            name = str(node.attr)
            if name in bound and bound[name] != value and node is not lay.kv_heads:
                raise ValueError(
                    f"{att.name}: {name} spans two axes of different lengths ({bound[name]}, {value}); "
                    "this spec needs equal lengths there"
                )
            bound.setdefault(name, value)
    bound.update(sizes or {})
    for p in att.params:  # scalars: a given value, else the default (an expression of sizes)
        if not isinstance(p, TensorParam) and p.name not in bound and p.default is not None:
            with contextlib.suppress(Exception):
                bound[p.name] = _evaluate(p.default, bound)
    gen = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = {}
    for p in att.params:
        if not isinstance(p, TensorParam):
            if p.name in (sizes or {}):
                kwargs[p.name] = (sizes or {})[p.name]
            elif p.default is None:
                raise ValueError(f"{att.name}: scalar {p.name!r} has no default; give it with --size")
            continue
        shape = []
        for d in p.shape:
            if d.op is Op.CONST:
                shape.append(int(d.attr))
            elif d.op is Op.SIZE and str(d.attr) in bound:
                shape.append(bound[str(d.attr)])
            else:
                try:
                    shape.append(int(_evaluate(d, bound)))
                except Exception:
                    raise ValueError(
                        f"{att.name}: cannot size {p.name!r} (dimension {d}); give its symbols with --size"
                    ) from None
        # The declared width where there is one (`int32`, `float16`, ...), else int64 / float32.
        exact = {"float": torch.float32, "int": torch.int64}.get(p.type.value) or getattr(torch, p.type.value)
        if p.name in ("q", "k", "v"):
            t = torch.randn(shape, generator=gen).to(dtype)
        elif p.type.kind is IrDType.FLOAT:
            t = (torch.randn(shape, generator=gen) * 0.1).to(exact)
        elif p.type.kind is IrDType.BOOL:
            t = torch.ones(shape, dtype=torch.bool)
        else:
            t = torch.zeros(shape, dtype=exact)
        kwargs[p.name] = t.to(device)
    return kwargs


def _evaluate(node: Any, bound: Mapping[str, int]) -> Any:
    """A shape or default expression of size symbols and int scalars, with the symbols bound: the code the
    generated module itself evaluates (codegen's emitter), not spec text."""
    from attnc.codegen.reference import dim_code

    return eval(dim_code(node), {"math": math, "__builtins__": {}}, dict(bound))


@dataclass
class KernelObjective:
    """Time one kernel of a generated module for one problem, behind the accuracy gate.

    `module` is a generated module (`codegen.compile_file`); the candidate reaches the kernel through the
    runtime's forced-config probe (`attnc.runtime.forced_configs`), the same path a tuned config takes.
    """

    module: ModuleType
    attention: str
    kind: KernelKind
    inputs: dict[str, Any]
    dtype: DType
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    gate: bool = True
    _reference: tuple[Any, ...] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind is KernelKind.FWD_SPLIT and self.inputs["q"].shape[2] > 16:
            raise ValueError(
                f"fwd_split tunes decoding shapes (at most 16 query rows), got M = {self.inputs['q'].shape[2]}"
            )

    @property
    def on_gpu(self) -> bool:
        return bool(self.inputs["q"].is_cuda)

    def _fn(self) -> Callable[..., Any]:
        if self.kind is KernelKind.LIN_CHUNK:
            import functools

            linear = getattr(self.module, f"{self.attention}_linear")
            return functools.partial(linear, algorithm="chunk", backend="triton")
        return getattr(self.module, f"{self.attention}_triton")

    def _grad_inputs(self) -> dict[str, Any]:
        return {
            k: (v.detach().clone().requires_grad_(True) if k in ("q", "k", "v") else v)
            for k, v in self.inputs.items()
        }

    def _outputs(self, fn: Callable[..., Any], upcast: bool) -> tuple[Any, ...]:
        """What the gate compares: o for the forward; (dq,) or (dk, dv) for the backward kernels."""
        import torch

        if self.kind in (KernelKind.FWD, KernelKind.LIN_CHUNK, KernelKind.FWD_SPLIT):
            kw = {k: (v.double() if upcast and k in ("q", "k", "v") else v) for k, v in self.inputs.items()}
            with torch.no_grad():
                return (fn(**kw).float(),)
        kw = self._grad_inputs()
        if upcast:
            kw = {
                k: (v.detach().double().requires_grad_(True) if k in ("q", "k", "v") else v)
                for k, v in kw.items()
            }
        o = fn(**kw)
        do = torch.ones_like(o)
        names = ("q",) if self.kind is KernelKind.DQ else ("k", "v")
        grads = torch.autograd.grad(o, [kw[n] for n in names], do)
        return tuple(g.float() for g in grads)

    def _forced(self, c: Candidate) -> contextlib.AbstractContextManager[None]:
        from attnc.runtime import forced_configs
        from attnc.runtime.linear import _LinConfig
        from attnc.runtime.triton import _KernelConfig

        cfg_type = _LinConfig if self.kind is KernelKind.LIN_CHUNK else _KernelConfig
        cfg = cfg_type(**{k: v for k, v in c.as_dict().items() if k in cfg_type._fields})
        return forced_configs(self.module, {self.kind.value: cfg})

    def accuracy(self, c: Candidate) -> float:
        """The candidate's relative error against the spec's reference (float64 on the CPU)."""
        if self._reference is None:
            ref_fn = getattr(self.module, f"{self.attention}_reference")
            self._reference = self._outputs(ref_fn, upcast=not self.on_gpu)
        with self._forced(c):
            got = self._outputs(self._fn(), upcast=False)
        err = 0.0
        for a, b in zip(got, self._reference, strict=True):
            scale = max(1.0, float(b.abs().max()))
            err = max(err, float((a - b).abs().max()) / scale)
        return err

    def measure(self, c: Candidate) -> Measurement:
        """Gate, then time. Raises TrialFailure for the candidate's own failures; a ValueError when the
        reference itself rejects the inputs (a problem with the inputs, not with the config)."""
        if self.gate and self._reference is None:
            ref_fn = getattr(self.module, f"{self.attention}_reference")
            self._reference = self._outputs(ref_fn, upcast=not self.on_gpu)
        error = None
        try:
            if self.gate:
                error = self.accuracy(c)
                tol = TOLERANCE[self.dtype]
                if not error <= tol:  # NaN fails too
                    raise TrialFailure(FailReason.ACCURACY, f"relative error {error:.3g} > {tol:g}")
            with self._forced(c):
                times = self._time()
        except TrialFailure:
            raise
        except Exception as err:  # compile, launch, OOM: recorded as a failed trial, the study goes on
            raise classify(err) from err
        return Measurement(statistics.median(times), tuple(times), error)

    def _time(self) -> list[float]:
        import torch

        fn = self._fn()
        if self.kind in (KernelKind.FWD, KernelKind.LIN_CHUNK, KernelKind.FWD_SPLIT):

            def run() -> Any:
                with torch.no_grad():
                    return fn(**self.inputs)

        else:
            kw = self._grad_inputs()
            o = fn(**kw)
            do = torch.ones_like(o)
            leaves = [kw["q"], kw["k"], kw["v"]]

            def run() -> Any:
                return torch.autograd.grad(o, leaves, do, retain_graph=True)

        if self.on_gpu:
            import triton.testing

            times = triton.testing.do_bench(run, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all")
            return [float(t) for t in times]
        run()  # the interpreter: one warm-up, then wall-clock repetitions (plumbing only)
        out = []
        for _ in range(2):
            t0 = time.perf_counter()
            run()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
