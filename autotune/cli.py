"""`attnc tune`: tune a spec's kernels, pre-screen a space on the CPU, or show what is tuned.

    attnc tune examples/specs/causal.attn --shapes 4096 --dtype bf16 --head-dim 128 --trials 25
    attnc tune examples/specs/causal.attn --shapes 4096 --head-dim 128 --prescreen --cc 90   # no GPU needed
    attnc tune --show

Wired into codegen/cli.py by `add_parser`; optuna is imported only when a command needs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .space import DType, KernelKind, Problem, bucket

EXIT_OK, EXIT_SPEC, EXIT_USAGE = 0, 1, 2

__all__ = ["Shape", "add_parser", "parse_shape", "run"]


@dataclass(frozen=True)
class Shape:
    """One problem shape: batch, query heads, query length M, key length N."""

    batch: int
    heads: int
    q_len: int
    kv_len: int

    def __str__(self) -> str:
        return f"B{self.batch}-H{self.heads}-M{self.q_len}-N{self.kv_len}"


def parse_shape(text: str, batch: int, heads: int) -> Shape:
    """`N` (M = N), `M,N`, or `B,H,M,N`."""
    try:
        nums = [int(x) for x in text.replace("x", ",").split(",")]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = [batch, heads, nums[0], nums[0]]
    elif len(nums) == 2:
        nums = [batch, heads, *nums]
    if len(nums) != 4 or min(nums) < 1:
        raise ValueError(f"--shapes takes N, M,N or B,H,M,N with positive integers, got {text!r}")
    return Shape(*nums)


def add_parser(sub: Any) -> None:
    t = sub.add_parser(
        "tune",
        help="autotune the Triton kernels' schedules (GPU), pre-screen them (CPU), or show what is tuned",
        description="Tune each kernel of a spec with an optuna study per tuning key; results are stored "
        "(--storage) and exported to the best-config table that generated modules read.",
    )
    t.add_argument("spec", nargs="?", metavar="SPEC")
    t.add_argument("--name", help="only this attention block")
    t.add_argument("--shapes", nargs="+", default=["4096"], metavar="SHAPE", help="N, M,N or B,H,M,N")
    t.add_argument("--batch", type=int, default=4, help="B when a shape gives only lengths (default 4)")
    t.add_argument("--heads", type=int, default=16, help="H when a shape gives only lengths (default 16)")
    t.add_argument("--dtype", default="bf16", choices=["fp16", "bf16", "fp32"])
    t.add_argument("--head-dim", type=int, default=64, help="D (default 64)")
    t.add_argument("--v-dim", type=int, default=None, help="E (default: D)")
    t.add_argument(
        "--kernels",
        default="fwd",
        help="comma-separated kernel kinds to tune: fwd, dkdv, dq, fwd_split (decoding, M <= 16), "
        "lin_chunk (linear-form specs) (default: fwd)",
    )
    t.add_argument("--size", action="append", default=[], metavar="NAME=V", help="other size symbols/scalars")
    t.add_argument("--trials", type=int, default=25, help="measurements per study, all workers together")
    t.add_argument("--timeout", type=float, default=None, metavar="S", help="stop each study after S seconds")
    t.add_argument("--trial-timeout", type=float, default=60.0, metavar="S", help="fail a trial after S s")
    t.add_argument("--storage", default=None, metavar="URL", help="postgresql://..., a journal file path")
    t.add_argument("--sampler", default="gp", choices=["gp", "tpe", "random", "grid"])
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--export", default=None, metavar="JSON", help="best-config table (default: cache dir)")
    t.add_argument("--plot", default=None, metavar="PNG", help="draw the studies to a PNG")
    t.add_argument("--show", action="store_true", help="list the tuned keys in --storage and exit")
    t.add_argument("--prescreen", action="store_true", help="AOT-compile the pruned space (no GPU needed)")
    t.add_argument("--cc", type=int, default=90, help="compute capability for --prescreen (default 90)")
    t.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile processes for --prescreen")
    t.add_argument(
        "--cpu",
        action="store_true",
        help="time under the Triton interpreter on the CPU: exercises the plumbing; the timings mean nothing",
    )
    t.set_defaults(func=run)


class UsageError(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    try:
        if args.show:
            return show(args.storage)
        if args.spec is None:
            raise UsageError("give a SPEC to tune, or --show")
        return _tune(args)
    except UsageError as err:
        print(f"attnc: error: {err}", file=sys.stderr)
        return EXIT_USAGE


# ------------------------------------------------------------------------------------------------- show


def show(storage: str | None) -> int:
    from .store import best_entries, open_storage, resolve

    spec = resolve(storage)
    if spec.path is not None and not spec.path.exists():
        print(f"nothing tuned yet ({spec} does not exist)")
        return EXIT_OK
    entries = best_entries(open_storage(storage))
    if not entries:
        print(f"nothing tuned in {spec}")
        return EXIT_OK
    rows = [
        ("attention", "kernel", "dtype", "D", "M", "N", "gpu", "trials", "best ms", "vs default", "config")
    ]
    for e in entries:
        k = e.key
        gain = f"{e.default_ms / e.time_ms:.2f}x" if e.default_ms else "-"
        cfg = " ".join(f"{n}={v}" for n, v in sorted(e.config.items()))
        gpu = k.gpu if k.cc == 0 else f"{k.gpu} (sm_{k.cc})"
        rows.append(
            (
                k.attention,
                k.kernel.value,
                k.dtype.value,
                str(k.head_dim),
                str(k.q_bucket),
                str(k.kv_bucket),
                gpu,
                f"{e.trials}+{e.failed} failed",
                f"{e.time_ms:.4g}",
                gain,
                cfg,
            )
        )
    print(f"tuned in {spec}:")
    print(_table(rows))
    return EXIT_OK


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- tune


def _sizes(items: Sequence[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        try:
            out[name.strip()] = int(text)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise UsageError(f"--size takes NAME=INTEGER, got {item!r}")
    return out


def _kinds(text: str) -> list[KernelKind]:
    try:
        return [KernelKind(k.strip()) for k in text.split(",") if k.strip()]
    except ValueError:
        raise UsageError(
            f"--kernels takes fwd, dkdv, dq, fwd_split, lin_chunk (comma-separated), got {text!r}"
        ) from None


class ProgressBar:
    """`[k/N] best 0.412 ms (block_m=128 ...)` on one line of stderr (one line per update elsewhere)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, k: int, n: int, best_ms: float | None, best: dict[str, int] | None) -> None:
        width = 20
        filled = width * k // max(1, n)
        best_text = (
            "-" if best_ms is None else f"{best_ms:.4g} ms ({' '.join(f'{a}={b}' for a, b in best.items())})"
        )
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {k}/{n} best {best_text}"
        if line == self.last:
            return
        self.last = line
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.last:
            print(file=sys.stderr)


def _tune(args: argparse.Namespace) -> int:
    import torch
    from attnc.dsl.errors import SpecError
    from attnc.dsl.lower import compile_to_ir

    from attnc import codegen

    from .key import TuningKey, current_device, kernel_hash

    spec_path = Path(args.spec)
    if not spec_path.is_file():
        raise UsageError(f"{args.spec}: no such file")
    try:
        shapes = [parse_shape(s, args.batch, args.heads) for s in args.shapes]
        dtype = DType.parse(args.dtype)
    except ValueError as err:
        raise UsageError(str(err)) from None
    kinds = _kinds(args.kernels)
    sizes = _sizes(args.size)
    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu and not args.prescreen and not args.cpu:
        print(
            "attnc tune: timing needs a CUDA GPU, and this machine has none.\n"
            f"  --prescreen   compile the pruned space ahead of time for a GPU (--cc {args.cc}) and list the "
            "viable configs (no GPU needed)\n"
            "  --cpu         run the search under the Triton interpreter (plumbing only: the timings mean "
            "nothing for a GPU)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        source = spec_path.read_text(encoding="utf-8")
        program = compile_to_ir(source, str(spec_path))
        module = codegen.compile_source(source, str(spec_path))
    except SpecError as err:
        print(err.format(), file=sys.stderr)
        return EXIT_SPEC
    atts = [a for a in program.attentions if args.name in (None, a.name)]
    if not atts:
        raise UsageError(f"{args.spec}: no attention named {args.name!r}")
    kfile = Path(module.__file__).with_name(Path(module.__file__).stem + "_triton.py")
    kh = kernel_hash(kfile)
    D, E = args.head_dim, args.v_dim or args.head_dim
    if args.prescreen:
        return _prescreen(args, atts, module, kh, shapes, dtype, D, E, kinds)

    from attnc.runtime import reset_tuned

    from .measure import KernelObjective, make_inputs
    from .resource import arch_for
    from .search import SamplerKind, tune
    from .store import export_table, open_storage

    device = current_device(gpu)
    arch = arch_for(device.cc) if gpu else None
    storage = open_storage(args.storage)
    tdtype = getattr(torch, dtype.value)
    results = []
    from attnc.codegen.triton.kernels import KernelWriter

    for att in atts:
        heavy = KernelWriter(att).heavy
        for shape in shapes:
            try:
                inputs = make_inputs(
                    att,
                    batch=shape.batch,
                    heads=shape.heads,
                    q_len=shape.q_len,
                    kv_len=shape.kv_len,
                    head_dim=D,
                    v_dim=E,
                    dtype=tdtype,
                    device="cuda" if gpu else "cpu",
                    sizes=sizes,
                )
            except ValueError as err:
                raise UsageError(str(err)) from None
            problem = Problem(D, E, dtype, shape.q_len, shape.kv_len, heavy)
            for kind in kinds:
                from .space import space_for

                space = space_for(kind, problem)
                key = TuningKey.make(att.name, kind, kh, device, problem)
                objective = KernelObjective(module, att.name, kind, inputs, dtype)
                bar = ProgressBar(f"{att.name} {kind.value} {shape}")
                try:
                    res = tune(
                        key,
                        space,
                        objective,
                        storage=storage,
                        n_trials=args.trials,
                        timeout=args.timeout,
                        trial_timeout=args.trial_timeout,
                        sampler=SamplerKind(args.sampler),
                        seed=args.seed,
                        arch=arch,
                        progress=bar,
                    )
                except ValueError as err:  # the spec's own checks rejected the generated inputs
                    raise UsageError(f"cannot build inputs for {att.name}: {err}; see --size") from None
                finally:
                    bar.close()
                results.append((att.name, kind, shape, res))
    table = export_table(storage, args.export)
    reset_tuned()  # the new table reaches modules already loaded in this process
    print(_summary(results))
    print(f"best configs exported to {table}")
    if args.plot:
        from .plot import plot_studies

        print(f"plot: {plot_studies([r for *_, r in results], Path(args.plot))}")
    return EXIT_OK


def _summary(results: Sequence[tuple[str, KernelKind, Any, Any]]) -> str:
    rows = [
        ("attention", "kernel", "shape", "measured", "failed", "default ms", "best ms", "speed-up", "config")
    ]
    for name, kind, shape, r in results:
        best = "-" if r.best_ms is None else f"{r.best_ms:.4g}"
        default = "-" if r.default_ms is None else f"{r.default_ms:.4g}"
        gain = f"{r.default_ms / r.best_ms:.2f}x" if r.best_ms and r.default_ms else "-"
        rows.append(
            (
                name,
                kind.value,
                str(shape),
                str(r.measured),
                str(len(r.failed)),
                default,
                best,
                gain,
                str(r.best),
            )
        )
    lines = [_table(rows)]
    for name, kind, shape, r in results:
        for f in r.failed:
            lines.append(f"  failed: {name} {kind.value} {shape} #{f.number} {f.config}: {f.reason}")
    return "\n".join(lines)


def _prescreen(
    args: argparse.Namespace,
    atts: Sequence[Any],
    module: Any,
    kh: str,
    shapes: Sequence[Shape],
    dtype: DType,
    D: int,
    E: int,
    kinds: Sequence[KernelKind],
) -> int:
    from attnc.codegen.triton.kernels import KernelWriter

    from attnc.runtime.triton import _triton_kernels

    from .prescreen import prescreen
    from .resource import arch_for, prune
    from .space import space_for

    if D != E:
        raise UsageError("--prescreen compiles D = E only (as attnc inspect); drop --v-dim")
    try:
        arch = arch_for(args.cc)
    except ValueError as err:
        raise UsageError(str(err)) from None
    kernels = _triton_kernels(module.__file__, interpret=False)
    buckets = sorted({(bucket(s.q_len), bucket(s.kv_len)) for s in shapes})
    for att in atts:
        heavy = KernelWriter(att).heavy
        for m, n in buckets:
            for kind in kinds:
                space = space_for(kind, Problem(D, E, dtype, m, n, heavy))
                kept, _ = prune(space, arch)
                print(
                    f"{att.name} {kind.value} sm_{args.cc} {dtype.short} D={D} M~{m} N~{n}: "
                    f"{len(space.candidates())} admissible, {len(kept)} kept by the resource model; compiling"
                )
                rows = prescreen(att, kernels, kh, space, args.cc, jobs=args.jobs)
                viable = [r for r in rows if r.viable]
                table = [("config", "smem B", "regs", "spill B", "verdict")]
                for r in rows:
                    why = "viable" if r.viable else (r.error.splitlines()[0][:60] if r.error else "spills")
                    table.append(
                        (
                            str(r.candidate) + (" (default)" if r.candidate == space.default else ""),
                            str(r.shared_bytes if r.shared_bytes is not None else "-"),
                            str(r.registers if r.registers is not None else "-"),
                            str(r.spill_bytes if r.spill_bytes is not None else "-"),
                            why,
                        )
                    )
                print(_table(table))
                print(f"  {len(viable)} of {len(rows)} compiled configs are viable on {arch.name}\n")
    print("timing needs a GPU: run `attnc tune` there; compiled results are cached for it", file=sys.stderr)
    return EXIT_OK
