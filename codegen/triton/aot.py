"""Ahead-of-time compilation of Triton kernels for NVIDIA targets, on a machine without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs Triton's whole pipeline (TTIR, TTGIR,
LLVM IR, PTX, and `ptxas` to a cubin) without touching a driver. The interpreter that runs kernels on CPU tensors
accepts kernels that this pipeline rejects (`tl.dot` with K < 16, for one), so CI compiles every kernel this way
and reads what the GPU would get: shared memory, registers and spills, whether sm_90 code uses wgmma and TMA,
and the SASS instruction count of the key loop (sass.py, from the cubin disassembled with nvdisasm).

    from attnc.codegen.triton.aot import compile_report, format_table
    rep = compile_report(kernel, {"Q": "*fp16", "n": "i32", "scale": "fp32"}, {"BLOCK_M": 128}, cc=90)
    print(format_table([rep]))

Registers and spills come from the `ptxas -v` log of the very ptxas run that built the cubin (Triton prints it
when `knobs.nvidia.dump_ptxas_log` is set; we capture it), so they are the numbers of the binary a GPU would
load. Re-running ptxas by hand gives other numbers unless the binary and every flag match: Triton 3.9 uses the
legacy `ptxas` (CUDA 12.9) below sm_90 and `ptxas-blackwell` (CUDA 13.x) from sm_90 on, with
`--regAllocOptLevel=2`; `run_ptxas` mirrors that and is the fallback when no log was captured.

Nothing is cached on disk: each compile uses a private temporary Triton cache directory, removed afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "MAX_SHARED_BYTES",
    "AOTCompileError",
    "CompileJob",
    "KernelReport",
    "PtxasNotFoundError",
    "PtxasStats",
    "compile_report",
    "compile_reports",
    "find_ptxas",
    "format_table",
    "parse_ptxas_log",
    "run_ptxas",
    "sass_cell",
]

# Largest dynamic shared memory one block may opt into, by compute capability (CUDA programming guide,
# "Technical specifications per compute capability"). A launch asking for more fails with OutOfResources:
# Triton checks this only when it loads the binary on a device, so AOT compilation checks it here.
MAX_SHARED_BYTES: dict[int, int] = {
    70: 98304,
    75: 65536,
    80: 166912,
    86: 101376,
    87: 166912,
    89: 101376,
    90: 232448,
    100: 232448,
    103: 232448,
    120: 101376,
}
MAX_THREADS_PER_BLOCK = 1024


class AOTCompileError(RuntimeError):
    """A kernel that the GPU toolchain rejects for a target (or that could not be launched there)."""

    def __init__(self, kernel: str, target: str, message: str) -> None:
        self.kernel = kernel
        self.target = target
        self.compiler_message = message
        super().__init__(f"kernel {kernel!r} does not compile for {target}:\n{message}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across the process pool
        return (type(self), (self.kernel, self.target, self.compiler_message))


class PtxasNotFoundError(RuntimeError):
    """No usable `ptxas` binary: the triton wheel ships one under triton/backends/nvidia/bin."""


@dataclass(frozen=True)
class PtxasStats:
    """What `ptxas -v` says about one entry function."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame_bytes: int


@dataclass(frozen=True)
class KernelReport:
    """Resources of one kernel compiled for one target and launch configuration."""

    name: str
    target: str  # "sm_90", "sm_80"
    num_warps: int
    num_stages: int
    shared_bytes: int  # dynamic shared memory the launch requests (Triton's metadata)
    registers: int  # per thread
    spill_bytes: int  # spill stores + spill loads
    spill_stores: int
    spill_loads: int
    stack_frame_bytes: int
    uses_wgmma: bool  # `wgmma.mma_async` in the PTX (Hopper warpgroup MMA)
    constexprs: tuple[tuple[str, object], ...]  # sorted by name
    uses_tma: bool = False  # `cp.async.bulk.tensor` in the PTX (Hopper TMA loads/stores: tensor descriptors)
    # SASS instruction counts (sass.py): scope "loop" with the size of each innermost loop that holds an MMA
    # (the key loops), or "kernel" when no such loop exists; "" when the cubin could not be disassembled, and
    # then `sass_note` says why.
    sass_scope: str = ""
    sass_loops: tuple[int, ...] = ()
    sass_total: int | None = None  # the whole kernel
    sass_note: str = field(default="", compare=False)
    signature: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # runtime parameters, in order
    fp_fusion: bool = field(default=True, repr=False)  # Triton's enable_fp_fusion (ptxas --fmad)
    compile_seconds: float = field(default=0.0, compare=False)
    ptxas_log: str = field(default="", repr=False, compare=False)
    ptx: str = field(default="", repr=False, compare=False)
    cubin: bytes = field(default=b"", repr=False, compare=False)

    @property
    def cc(self) -> int:
        return int(self.target.removeprefix("sm_"))

    @property
    def sass_instructions(self) -> int | None:
        """SASS instructions of one key-loop iteration (the largest key loop, every path of its body counted
        once), or of the whole kernel when scope is "kernel"; None without a disassembler."""
        if not self.sass_scope:
            return None
        return max(self.sass_loops) if self.sass_loops else self.sass_total

    @property
    def config(self) -> str:
        """The constexprs as `NAME=value` words, e.g. `BLOCK_M=128 BLOCK_N=64 D=64`; parameters bound to None
        (argument groups the kernel was compiled without) are left out."""
        return " ".join(f"{k}={_show(v)}" for k, v in self.constexprs if v is not None)


@dataclass(frozen=True)
class CompileJob:
    """One `compile_report` call, for `compile_reports`. `fn` is a `@triton.jit` kernel."""

    fn: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, object] = field(default_factory=dict)
    cc: int = 90
    num_warps: int = 4
    num_stages: int = 2
    options: Mapping[str, object] | None = None
    divisible_by_16: Iterable[str] | None = None

    def kwargs(self) -> dict[str, Any]:
        return {
            "cc": self.cc,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "options": dict(self.options) if self.options else None,
            "divisible_by_16": None if self.divisible_by_16 is None else tuple(self.divisible_by_16),
        }


# ---------------------------------------------------------------------------------------------- ptxas


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
)
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str, entry: str | None = None) -> PtxasStats:
    """Registers and spills of `entry` (or of the only entry function) from a `ptxas -v` log.

    The log reads, per entry function ("ptxas" may be "ptxas-blackwell"):
        ptxas info    : Compiling entry function 'k' for 'sm_90a'
        ptxas info    : Function properties for k
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 168 registers, used 1 barriers, ...
    """
    sections: dict[str, str] = {}
    starts = list(_ENTRY.finditer(log))
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(log)
        sections[m.group(1)] = log[m.end() : end]
    if not sections:
        raise ValueError(f"no entry function in the ptxas log:\n{log}")
    if entry is None:
        if len(sections) != 1:
            raise ValueError(f"several entry functions in the ptxas log ({', '.join(sections)}); name one")
        entry = next(iter(sections))
    if entry not in sections:
        raise ValueError(f"entry function {entry!r} not in the ptxas log ({', '.join(sections)})")
    text = sections[entry]
    regs, props = _REGS.search(text), _PROPS.search(text)
    if regs is None or props is None:
        raise ValueError(f"cannot read registers/spills for {entry!r} from the ptxas log:\n{log}")
    stack, stores, loads = (int(g) for g in props.groups())
    return PtxasStats(int(regs.group(1)), stores, loads, stack)


def find_ptxas(cc: int) -> str:
    """The ptxas Triton itself uses for `cc` (3.9: `ptxas-blackwell` from sm_90 on, the legacy `ptxas` below;
    TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH override them). The two give different register and spill
    numbers for the same PTX, so reports use the one that builds the cubin."""
    from triton import knobs

    bindir = Path(knobs.__file__).parent / "backends" / "nvidia" / "bin"
    try:
        from triton.backends.nvidia import compiler as nv

        try:
            tool: Any = nv.get_ptxas(cc)
        except TypeError:  # triton 3.4: one ptxas for every target
            tool = nv.get_ptxas()
    except RuntimeError as e:  # "Cannot find ptxas..."
        raise PtxasNotFoundError(
            f"no usable ptxas for sm_{cc} ({e}); the triton wheel ships ptxas and ptxas-blackwell in {bindir}, "
            "or set TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH"
        ) from e
    path = getattr(tool, "path", None) or (tool[0] if isinstance(tool, tuple) else str(tool))
    if not Path(path).is_file():
        raise PtxasNotFoundError(f"ptxas for sm_{cc} not found at {path}")
    return path


def _ptxas_arch(cc: int) -> str:
    return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"  # as Triton's sm_arch_from_capability


def run_ptxas(
    ptx: str, cc: int, *, fmad: bool = True, extra_flags: Sequence[str] = (), ptxas: str | None = None
) -> str:
    """Assemble `ptx` with `ptxas -v` the way Triton 3.9's make_cubin does and return the log (stderr).

    `fmad` mirrors `enable_fp_fusion`. Raises AOTCompileError when ptxas rejects the PTX.
    """
    exe = ptxas or find_ptxas(cc)
    with tempfile.TemporaryDirectory(prefix="attnc-ptxas-") as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [exe, "-lineinfo", *([] if fmad else ["--fmad=false"]), "-v", "--regAllocOptLevel=2"]
        cmd += [
            *extra_flags,
            f"--gpu-name={_ptxas_arch(cc)}",
            str(src),
            "-o",
            str(Path(tmp) / "kernel.cubin"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        m = re.search(r"\.visible\s+\.entry\s+(\w+)", ptx)
        raise AOTCompileError(m.group(1) if m else "?", f"sm_{cc}", f"ptxas failed:\n{proc.stderr}")
    return proc.stderr


# ---------------------------------------------------------------------------------------------- compile


def _as_jit_function(fn: Any) -> Any:
    """The JITFunction behind `fn`: unwraps autotuner/heuristics wrappers, and rebuilds kernels that were
    defined in interpreter mode (TRITON_INTERPRET=1 makes `@triton.jit` return an InterpretedFunction)."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction) and seen < 8:
        if type(fn).__name__ == "InterpretedFunction":
            return _reload_without_interpreter(fn.fn)
        if not hasattr(fn, "fn"):
            break
        fn, seen = fn.fn, seen + 1
    if not isinstance(fn, JITFunction):
        raise TypeError(f"expected a @triton.jit kernel, got {type(fn).__name__}")
    return fn


def _reload_without_interpreter(pyfn: Any) -> Any:
    """Re-execute the kernel's source file with the interpreter off, so that the kernel and the jit helpers it
    calls are all JITFunctions (their globals would otherwise hold InterpretedFunctions)."""
    path = pyfn.__code__.co_filename
    if not Path(path).is_file() or "<locals>" in pyfn.__qualname__:
        raise TypeError(
            f"kernel {pyfn.__name__!r} was defined under TRITON_INTERPRET=1 and cannot be reloaded from "
            f"{path!r}; define it at module level in a file, or import it with the interpreter off"
        )
    mod = _load_file(path, f"_attnc_aot_{abs(hash(path))}")
    return _lookup(mod, pyfn.__qualname__)


def _load_file(path: str, name: str) -> ModuleType:
    """Execute a Python file as a private module (not registered in sys.modules) with the interpreter off."""
    from triton import knobs

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    with knobs.runtime.scope():
        knobs.runtime.interpret = False
        spec.loader.exec_module(mod)
    return mod


def _lookup(mod: ModuleType, qualname: str) -> Any:
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _python_function(fn: Any) -> Any:
    """The plain Python function under JITFunction / InterpretedFunction / Autotuner / Heuristics wrappers."""
    for _ in range(8):
        if not hasattr(fn, "fn"):
            break
        fn = fn.fn
    return fn


def _full_signature(
    fn: Any, signature: Mapping[str, str], constexprs: Mapping[str, object]
) -> dict[str, str]:
    """`signature` with "constexpr" filled in for the constexprs, checked against the kernel's parameters."""
    pyfn = _python_function(fn)
    kernel, names = pyfn.__name__, list(inspect.signature(pyfn).parameters)
    unknown = sorted((set(signature) | set(constexprs)) - set(names))
    if unknown:
        raise ValueError(
            f"{kernel}: no parameter named {', '.join(unknown)} (parameters: {', '.join(names)})"
        )
    both = sorted(set(signature) & set(constexprs))
    if any(signature[n] != "constexpr" for n in both):
        raise ValueError(f"{kernel}: {', '.join(both)} given both a runtime type and a constexpr value")
    sig = {n: ("constexpr" if n in constexprs else signature.get(n, "")) for n in names}
    missing = [n for n, t in sig.items() if not t or (t == "constexpr" and n not in constexprs)]
    if missing:
        raise ValueError(
            f"{kernel}: give a type (e.g. '*fp16', 'i32', 'fp32') or a constexpr value for {', '.join(missing)}"
        )
    return sig


def _show(v: object) -> str:
    if type(v).__name__ == "dtype":  # tl.float16 -> fp16
        return str(v)
    return repr(v)


def compile_report(
    fn: Any,
    signature: Mapping[str, str],
    constexprs: Mapping[str, object],
    *,
    cc: int = 90,
    num_warps: int = 4,
    num_stages: int = 2,
    options: Mapping[str, object] | None = None,
    divisible_by_16: Iterable[str] | None = None,
) -> KernelReport:
    """Compile `fn` for CUDA compute capability `cc` (no GPU needed) and report its resources.

    `signature` maps runtime parameters to Triton types ("*fp16", "*bf16", "*fp32", "i32", "i64", "fp32");
    constexpr parameters take their value from `constexprs` (their signature entry may be omitted).
    `divisible_by_16` names the parameters the launcher would specialise as 16-divisible; by default every
    pointer (torch allocations are 16-byte aligned, so that is what a GPU run compiles). `options` adds
    Triton compile options (e.g. `maxnreg`, `enable_fp_fusion`).

    Raises AOTCompileError (kernel name, target, compiler message) when any stage rejects the kernel, or
    when the launch would exceed the target's shared memory or threads per block.

    In a process where Triton was imported under TRITON_INTERPRET=1, Triton's own library functions (tl.sum,
    tl.max, ...) are interpreter objects the compiler cannot use, so the compile runs in a fresh process.
    """
    _full_signature(fn, signature, constexprs)  # mistakes and a missing ptxas are reported here, first
    find_ptxas(cc)
    if _interpreter_owns_triton():
        if _kernel_ref(fn) is None:
            raise TypeError(
                f"{getattr(fn, '__name__', fn)!r}: Triton was imported under TRITON_INTERPRET=1, so this kernel must "
                "compile in another process, which needs it defined at module level in a source file"
            )
        job = CompileJob(fn, signature, constexprs, cc, num_warps, num_stages, options, divisible_by_16)
        return compile_reports([job], max_workers=1)[0]
    return _compile_here(fn, signature, constexprs, cc, num_warps, num_stages, options, divisible_by_16)


def _interpreter_owns_triton() -> bool:
    """True when triton.language was imported in interpreter mode (its @jit helpers are not JITFunctions)."""
    import triton.language.standard as standard

    return type(standard.cdiv).__name__ != "JITFunction"


def _compile_here(
    fn: Any,
    signature: Mapping[str, str],
    constexprs: Mapping[str, object],
    cc: int,
    num_warps: int,
    num_stages: int,
    options: Mapping[str, object] | None,
    divisible_by_16: Iterable[str] | None,
) -> KernelReport:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _as_jit_function(fn)
    name, target = fn.__name__, f"sm_{cc}"
    sig = _full_signature(fn, signature, constexprs)
    aligned = (
        [n for n, t in sig.items() if t.startswith("*")] if divisible_by_16 is None else list(divisible_by_16)
    )
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    opts: dict[str, object] = {"num_warps": num_warps, "num_stages": num_stages, **(options or {})}

    t0 = time.perf_counter()
    out = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="attnc-aot-") as cache_dir, contextlib.ExitStack() as stack:
        for group in (knobs.cache, knobs.compilation, knobs.runtime, knobs.nvidia):
            stack.enter_context(group.scope())
        knobs.cache.dir = cache_dir
        knobs.compilation.always_compile = True
        knobs.runtime.interpret = False
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints its ptxas -v log; we read it from stdout
        # make_cubin leaves its .ptx temporary behind when ptxas fails: keep its temporaries in cache_dir
        stack.enter_context(_tempdir(cache_dir))
        try:
            src = ASTSource(fn, sig, dict(constexprs), attrs)
            with contextlib.redirect_stdout(out):  # also swallows the PTX Triton prints when ptxas fails
                kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
            ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
            meta = kernel.metadata
        except Exception as e:  # every stage has its own exception type; all mean "rejected"
            raise AOTCompileError(name, target, _compiler_message(e)) from e
    seconds = time.perf_counter() - t0

    entry = meta.name
    log = out.getvalue()
    if f"entry function '{entry}'" not in log:  # no log captured (other triton version): assemble again
        log = run_ptxas(ptx, cc, fmad=bool(meta.enable_fp_fusion), extra_flags=_ptx_options(meta))
    stats = parse_ptxas_log(log, entry)
    sass_fields = _sass_fields(cubin, entry)
    report = KernelReport(
        name=name,
        target=target,
        num_warps=meta.num_warps,
        num_stages=meta.num_stages,
        shared_bytes=int(meta.shared),
        registers=stats.registers,
        spill_bytes=stats.spill_stores + stats.spill_loads,
        spill_stores=stats.spill_stores,
        spill_loads=stats.spill_loads,
        stack_frame_bytes=stats.stack_frame_bytes,
        uses_wgmma="wgmma.mma_async" in ptx,
        constexprs=tuple(sorted(constexprs.items())),
        uses_tma="cp.async.bulk.tensor" in ptx,
        **sass_fields,
        signature=tuple((n, t) for n, t in sig.items() if t != "constexpr"),
        fp_fusion=bool(meta.enable_fp_fusion),
        compile_seconds=seconds,
        ptxas_log=log[log.find("ptxas") :] if "ptxas" in log else log,
        ptx=ptx,
        cubin=cubin,
    )
    _check_launch_limits(report)
    return report


def _sass_fields(cubin: bytes, entry: str) -> dict[str, Any]:
    """KernelReport's sass_* fields. A missing or failing disassembler costs the counts, not the report: the
    resources above come from ptxas and stand on their own."""
    from . import sass

    try:
        cost = sass.loop_cost(cubin, entry)
    except (sass.DisassemblerNotFoundError, RuntimeError, ValueError, OSError) as e:
        return {"sass_note": str(e)}
    return {"sass_scope": cost.scope, "sass_loops": cost.loops, "sass_total": cost.total}


@contextlib.contextmanager
def _tempdir(path: str) -> Iterator[None]:
    """Point `tempfile` at `path` for the duration (process-wide: compiles run one per process)."""
    saved = tempfile.tempdir
    tempfile.tempdir = path
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _ptx_options(meta: Any) -> list[str]:
    text = getattr(meta, "ptx_options", None)
    return text.split() if text else []


def _compiler_message(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text}"


def _check_launch_limits(r: KernelReport) -> None:
    limit = MAX_SHARED_BYTES.get(r.cc)
    if limit is not None and r.shared_bytes > limit:
        raise AOTCompileError(
            r.name,
            r.target,
            f"out of resource: shared memory, {r.shared_bytes} bytes requested, {limit} available on {r.target} "
            f"({r.config}, num_warps={r.num_warps}, num_stages={r.num_stages}); smaller tiles or fewer stages help",
        )
    if r.num_warps * 32 > MAX_THREADS_PER_BLOCK:
        raise AOTCompileError(
            r.name,
            r.target,
            f"out of resource: {r.num_warps} warps exceed {MAX_THREADS_PER_BLOCK} threads per block",
        )


# ---------------------------------------------------------------------------------------------- in parallel


@dataclass(frozen=True)
class _KernelRef:
    """How a worker process finds a kernel: by module name, else by executing its source file."""

    module: str
    path: str
    qualname: str


def _kernel_ref(fn: Any) -> _KernelRef | None:
    pyfn = _python_function(fn)
    if not hasattr(pyfn, "__code__"):
        return None
    path = pyfn.__code__.co_filename
    if "<locals>" in pyfn.__qualname__ or not Path(path).is_file():
        return None
    return _KernelRef(pyfn.__module__, path, pyfn.__qualname__)


def _resolve(ref: _KernelRef) -> Any:
    from triton import knobs

    knobs.runtime.interpret = False  # worker processes only: kernels imported from here on are JITFunctions
    try:
        mod = sys.modules.get(ref.module) or importlib.import_module(ref.module)
        obj = _lookup(mod, ref.qualname)
        if os.path.samefile(_as_jit_function(obj).fn.__code__.co_filename, ref.path):
            return obj
    except Exception:  # not importable under that name here (e.g. loaded from a file path): use the file
        pass
    return _lookup(_load_file(ref.path, f"_attnc_aot_{abs(hash(ref.path))}"), ref.qualname)


def _worker(
    ref: _KernelRef, signature: dict[str, str], constexprs: dict[str, object], kw: dict
) -> KernelReport:
    return compile_report(_resolve(ref), signature, constexprs, **kw)


def compile_reports(
    jobs: Sequence[CompileJob],
    max_workers: int | None = None,
    *,
    raise_on_error: bool = True,
    mp_context: str = "spawn",
) -> list[Any]:
    """`compile_report` for every job, in a pool of `max_workers` processes (default: CPU count).

    Results come in job order. With `raise_on_error` (default) the first failing job's AOTCompileError is
    raised once all jobs have finished; otherwise failures are returned in place as AOTCompileError objects.
    Workers are spawned (not forked: Triton and torch hold threads and locks), so kernels must be reachable
    by module name or source file; kernels defined inside functions compile in this process instead.
    """
    results: list[Any] = [None] * len(jobs)
    workers = min(max_workers or os.cpu_count() or 1, len(jobs))
    refs = [_kernel_ref(j.fn) for j in jobs]
    here = not _interpreter_owns_triton()
    local = [i for i, r in enumerate(refs) if r is None or (workers <= 1 and here)]
    remote = [i for i in range(len(jobs)) if i not in local]

    def run_local(i: int) -> None:
        j = jobs[i]
        try:
            results[i] = compile_report(j.fn, j.signature, j.constexprs, **j.kwargs())
        except AOTCompileError as e:
            results[i] = e

    if remote:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(mp_context)) as pool:
            # Workers start during submit and must import Triton with the interpreter off.
            with _environ("TRITON_INTERPRET", "0"):
                futures: dict[int, Future] = {
                    i: pool.submit(
                        _worker, refs[i], dict(jobs[i].signature), dict(jobs[i].constexprs), jobs[i].kwargs()
                    )
                    for i in remote
                }
            for i in local:  # meanwhile, in this process
                run_local(i)
            for i, fut in futures.items():
                try:
                    results[i] = fut.result()
                except AOTCompileError as e:
                    results[i] = e
                except BrokenProcessPool as e:
                    results[i] = AOTCompileError(
                        _job_name(jobs[i]), f"sm_{jobs[i].cc}", f"compiler process died: {e}"
                    )
    else:
        for i in local:
            run_local(i)

    if raise_on_error:
        for r in results:
            if isinstance(r, AOTCompileError):
                raise r
    return results


@contextlib.contextmanager
def _environ(key: str, value: str) -> Iterator[None]:
    saved = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved


def _job_name(job: CompileJob) -> str:
    return getattr(job.fn, "__name__", None) or type(job.fn).__name__


# ---------------------------------------------------------------------------------------------- report


def format_table(reports: Iterable[KernelReport]) -> str:
    """One line per kernel: name, target, warps, stages, smem, regs, spills, wgmma, tma, SASS instructions per
    key-loop iteration (`sass_cell`), constexprs."""
    header = (
        "kernel",
        "target",
        "warps",
        "stages",
        "smem B",
        "regs",
        "spill B",
        "wgmma",
        "tma",
        "sass/iter",
        "config",
    )
    rows = [
        (
            r.name,
            r.target,
            str(r.num_warps),
            str(r.num_stages),
            str(r.shared_bytes),
            str(r.registers),
            str(r.spill_bytes),
            "yes" if r.uses_wgmma else "no",
            "yes" if r.uses_tma else "no",
            sass_cell(r),
            r.config,
        )
        for r in reports
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    numeric = {2, 3, 4, 5, 6, 9}

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(w) if c in numeric else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def sass_cell(r: KernelReport) -> str:
    """`1519` (one key loop), `480,812` (several, in address order: e.g. boundary and interior tiles),
    `632 (kernel)` (no loop with an MMA: the whole kernel), `-` (not disassembled)."""
    if r.sass_scope == "loop":
        return ",".join(str(n) for n in r.sass_loops)
    if r.sass_scope == "kernel":
        return f"{r.sass_total} (kernel)"
    return "-"
