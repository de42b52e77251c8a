"""The `attnc` command line: check | codegen | show-ir.

Exit codes: 0 success, 1 a spec error (printed as file:line:col with a caret), 2 a usage error (bad flags,
unreadable files). No Python traceback reaches the user; set ATTNC_DEBUG=1 to see one for internal errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from attnc.codegen.module import Target, module_name_for, render_all, standalone_files
from attnc.codegen.names import generated_names
from attnc.codegen.version import ATTNC_VERSION, LANGUAGE_VERSION
from attnc.dsl.analysis.linear import linear_form
from attnc.dsl.analysis.ranges import index_status
from attnc.dsl.analysis.tiles import plan_tiles
from attnc.dsl.errors import SpecError
from attnc.dsl.ir import Attention, Op, TensorParam, format_expr, linearize, walk
from attnc.dsl.lower import compile_to_ir
from attnc.settings import settings

if TYPE_CHECKING:
    from attnc.codegen.triton.aot import CompileJob

EXIT_OK, EXIT_SPEC, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(Exception):
    pass


def _read(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read ({err.strerror})") from None


PHASES = ("parse", "check", "lower", "plan", "emit", "import")


def phase_timings(source: str, filename: str) -> dict[str, float]:
    """Seconds per compile phase of one spec, each phase run on the previous one's result: parse (text ->
    AST), check (scopes and types of every block), lower (AST -> IR and the IR passes; lowering re-runs the
    cheap checks), plan (the tile plan of every masked block), emit (the module and kernels text, reusing the
    memoised plans) and import (executing the generated module). Raises SpecError."""
    import tempfile
    import time

    from attnc.codegen.module import load_module_file
    from attnc.dsl.analysis.tiles import plan_tiles
    from attnc.dsl.check import build_scope, check_body
    from attnc.dsl.lower import lower_file
    from attnc.dsl.parser import parse
    from attnc.dsl.passes import run_pipeline

    out: dict[str, float] = {}
    t = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[phase] = now - t
        t = now

    spec = parse(source, filename)
    lap("parse")
    try:
        for block in spec.attentions:
            build_scope(block)
            check_body(block)
    except SpecError as err:
        raise err.with_source(spec.filename, spec.source) from None
    lap("check")
    program = run_pipeline(lower_file(spec))
    lap("lower")
    for att in program.attentions:
        if att.mask is not None:
            plan_tiles(att)
    lap("plan")
    main_text, kernels_text = render_all(program, source, Target.ALL)
    lap("emit")
    with tempfile.TemporaryDirectory(prefix="attnc-timings-") as tmp:
        stem = module_name_for(filename)
        dest = Path(tmp) / f"{stem}.py"
        dest.write_text(main_text, encoding="utf-8")
        if kernels_text is not None:
            dest.with_name(f"{stem}_triton.py").write_text(kernels_text, encoding="utf-8")
        t = time.perf_counter()  # writing the files is not a compile phase
        mod_name = f"attnc_timings.{stem}"
        load_module_file(dest, mod_name)
        lap("import")
        sys.modules.pop(mod_name, None)
    return out


def _format_timings(t: dict[str, float]) -> str:
    parts = ", ".join(f"{p} {t[p] * 1000:.1f} ms" for p in PHASES)
    return f"  timings: {parts}; total {sum(t.values()) * 1000:.1f} ms"


def cmd_check(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.specs:
        try:
            source = _read(path)
            program = compile_to_ir(source, path)
            timings = phase_timings(source, path) if args.timings else None
        except SpecError as err:
            print(err.format(), file=sys.stderr)
            status = EXIT_SPEC
            continue
        names = ", ".join(a.name for a in (*program.attentions, *program.recurrences))
        if not args.quiet:
            print(f"{path}: ok ({names})")
        if timings is not None:
            print(_format_timings(timings))
    return status


def cmd_codegen(args: argparse.Namespace) -> int:
    out = Path(args.output)
    # The Triton kernels go in a file beside the main module, which imports them only when used.
    target = Target.REFERENCE if args.target == "reference" else Target.ALL
    status = EXIT_OK
    tuned = _tuned_table(args.tuned_from) if args.tuned_from else None
    for path in args.specs:
        try:
            source = _read(path)
            # A standalone module also defines the vendored runtime's names: no block may take one of them.
            generated = generated_names(standalone=True) if args.standalone else None
            program = compile_to_ir(source, path, generated=generated)
        except SpecError as err:
            print(err.format(), file=sys.stderr)
            status = EXIT_SPEC
            continue
        for att in program.attentions:
            lin = linear_form(att)
            if lin is not None and lin.form is None:
                print(
                    f"{path}: warning: {att.name}: no linear-time form ({lin.reason}); "
                    "using the quadratic kernels",
                    file=sys.stderr,
                )
        main, kernels = render_all(program, source, target, tuned, standalone=args.standalone)
        out.mkdir(parents=True, exist_ok=True)
        dest = out / f"{module_name_for(path)}.py"
        files = [(dest, main)]
        if kernels is not None:
            files.insert(0, (dest.with_name(dest.stem + "_triton.py"), kernels))
        if args.standalone:  # for state blocks, the delta runtime's kernels files (before the main module)
            files[:0] = [(dest.with_name(dest.stem + sfx), t) for sfx, t in standalone_files(program, target)]
        for file, text in files:
            tmp = file.with_suffix(".py.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(file)
        names = ", ".join(a.name for a in (*program.attentions, *program.recurrences))
        print(f"{path} -> {', '.join(str(f) for f, _ in reversed(files))} ({names})")
    return status


def _tuned_table(source: str) -> dict:
    """`--tuned-from`: a best-config table (JSON) or a tuning storage (journal file, database URL)."""
    from attnc.autotune.store import load_any

    try:
        return load_any(source)
    except (OSError, RuntimeError) as err:
        raise UsageError(f"--tuned-from {source}: {err}") from None


def show_attention(att: Attention) -> str:
    """A readable dump of one attention's IR: parameters, layout, then each root as SSA lines."""
    lines = [f"attention {att.name}"]
    for p in att.params:
        if isinstance(p, TensorParam):
            dims = ", ".join(format_expr(d) for d in p.shape)
            lines.append(f"  param {p.name}: [{dims}] {p.type.value} ({p.role.value})")
        else:
            default = "" if p.default is None else f" = {format_expr(p.default)}"
            lines.append(f"  param {p.name}: {p.dtype.value}{default} (runtime scalar)")
    lay = att.layout
    lines.append(
        "  layout: "
        + ", ".join(
            f"{k}={format_expr(getattr(lay, k))}"
            for k in ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim", "v_dim")
        )
    )
    lines.append(f"  norm: {att.norm.kind.value}")
    if att.mask is not None:
        plan = plan_tiles(att)
        if plan.fallback is not None:
            lines.append(f"  tile plan: fallback ({plan.fallback})")
        else:
            n_kv, n_q = len(plan.kv_intervals), len(plan.q_intervals)
            lines.append(
                f"  tile plan: {n_kv} key interval(s) per query tile, {n_q} query interval(s) per key tile"
            )
    lin = linear_form(att)
    if lin is not None:
        lines.append(f"  algorithm: {lin.summary}")
    for root_name, root in att.roots().items():
        lines.append(f"  {root_name}:")
        ids: dict[object, str] = {}
        for n in linearize([root]):
            ref = f"%{len(ids)}"
            ids[n] = ref
            args = ", ".join(ids[a] for a in n.args)
            attr = "" if n.attr is None else f" {getattr(n.attr, 'value', n.attr)!r}"
            lines.append(f"    {ref} = {n.op.value}{attr}({args}) : {n.dtype.value}")
        lines.append(f"    = {format_expr(root)}")
    loads = [n for n in walk(att.roots().values()) if n.op is Op.LOAD]
    if loads:
        lines.append("  index ranges (interval analysis over the whole iteration space):")
    for n in sorted(loads, key=format_expr):
        p = att.param(str(n.attr))
        assert isinstance(p, TensorParam)
        verdicts = [index_status(ix, ext, att.layout) for ix, ext in zip(n.args, p.shape, strict=True)]
        text = ", ".join("proven in range" if v == "in" else "checked at run time" for v in verdicts)
        lines.append(f"    {format_expr(n)}: {text}")
    return "\n".join(lines)


def _select(spec: str, name: str | None) -> list[Attention]:
    """The spec's attention blocks (or the one named); a SpecError reaches `main`, which prints it."""
    atts = [a for a in compile_to_ir(_read(spec), spec).attentions if name in (None, a.name)]
    if not atts:
        raise UsageError(f"{spec}: no attention named {name!r}")
    return atts


def cmd_show_ir(args: argparse.Namespace) -> int:
    program = compile_to_ir(_read(args.spec), args.spec)
    recs = [r for r in program.recurrences if args.name in (None, r.name)]
    atts = _select(args.spec, args.name) if program.attentions and (args.name is None or not recs) else []
    from attnc.dsl.analysis.recurrence import format_plan

    print("\n\n".join([*(show_attention(a) for a in atts), *(format_plan(r) for r in recs)]))
    return EXIT_OK


def cmd_show_mask(args: argparse.Namespace) -> int:
    """Draw the mask and the compiler's tile classification (skipped / full / partial) to a PNG."""
    import math

    from attnc.codegen.show_mask import render_mask_png
    from attnc.dsl.analysis.tiles import BindingError

    def int_pair(text: str, flag: str) -> tuple[int, int]:
        try:
            a, b = (int(x) for x in text.split(","))
        except ValueError:
            a = b = 0
        if a < 1 or b < 1:
            raise UsageError(f"{flag} takes two positive integers A,B (e.g. 1024,1024), got {text!r}")
        return a, b

    m, n = int_pair(args.shape, "--shape")
    block_m, block_n = int_pair(args.block, "--block")
    values: dict[str, int | float] = {}
    for item in args.scalar:
        name, sep, text = item.partition("=")
        name = name.strip()
        try:
            value: int | float = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = math.nan
        if not sep or not name or not math.isfinite(value):
            raise UsageError(f"--scalar takes NAME=NUMBER (e.g. W=64), got {item!r}")
        values[name] = value
    atts = _select(args.spec, args.name)
    if len(atts) > 1:
        names = ", ".join(a.name for a in atts)
        raise UsageError(f"{args.spec} has several attentions ({names}): pick one with --name")
    try:
        summary = render_mask_png(atts[0], m, n, values, block_m, block_n, args.output)
    except BindingError as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"{args.output}: cannot write ({err.strerror or err})") from None
    print(summary)
    return EXIT_OK


def inspect_jobs(
    spec: str,
    name: str | None,
    cc: int,
    dtype: str,
    head_dim: int,
    launch: bool = True,
    form: str = "batched",
    configs: dict | None = None,
    aux_grads: bool = True,
) -> list[CompileJob]:
    """The compile jobs of `attnc inspect SPEC`: every Triton kernel of the spec's blocks (or the one named) at
    the runtime's default schedules, the linear core's kernels for blocks with a linear form, and the delta-rule
    runtime's kernels for state blocks. `launch`: compile as a launch with the runtime's contiguous inputs
    does (`launch_specialised`), else for arbitrary strides. `form`: the attention kernels' batched form, or
    their varlen (`_VARLEN`) or paged (`_PAGED`: the forward kernels) form; `configs`: schedules per kernel
    kind (`--config`) instead of the defaults; `aux_grads`: the backward kernels with their auxiliary-gradient
    code (a launch whose learned inputs need a gradient), else without (`--no-aux-grads`).
    benchmarks/aot_loop_cost.py compiles the same jobs."""
    from attnc.codegen.module import compile_source
    from attnc.codegen.triton.inspect import Target, all_jobs
    from attnc.runtime.triton import _triton_kernels

    program = compile_to_ir(_read(spec), spec)
    recs = [r for r in program.recurrences if name in (None, r.name)]
    atts = _select(spec, name) if program.attentions and (name is None or not recs) else []
    kinds = ("fwd", "fwd_split") if form == "paged" else Target.kernels
    target = Target(
        cc, dtype, head_dim, kinds, launch=launch, varlen=form == "varlen", paged=form == "paged",
        shift=form == "shift", aux_grads=aux_grads,
    )  # fmt: skip
    jobs: list[CompileJob] = []
    if atts:
        kernels = _triton_kernels(compile_source(_read(spec), spec).__file__, interpret=False)
        jobs += all_jobs(atts, kernels, [target], configs=configs)
    if recs:  # state blocks launch the delta-rule runtime's kernels, in the variant their plan selects
        from attnc.codegen.triton import delta_aot
        from attnc.dsl.analysis.recurrence import analyse

        for rec in recs:
            jobs += delta_aot.jobs(cc, dtype, head_dim, analyse(rec))
    for att in atts:  # linear-form blocks also launch the linear core's kernels (their own variant)
        lin = linear_form(att)
        if lin is not None and lin.form is not None:
            from attnc.codegen.triton import linear_aot

            jobs += linear_aot.jobs(cc, dtype, head_dim, (linear_aot.variant_of(att),))
    return jobs


def cmd_inspect(args: argparse.Namespace) -> int:
    """Compile every Triton kernel of a spec ahead of time and print shared memory, registers, spills, wgmma,
    TMA and SASS instructions per key-loop iteration (the linear family's core kernels too, for blocks with a
    linear form)."""
    from attnc.codegen.triton.aot import AOTCompileError, compile_reports, format_table
    from attnc.codegen.triton.inspect import parse_configs

    try:
        configs = parse_configs(args.config or (), args.head_dim)
    except ValueError as err:
        raise UsageError(str(err)) from None
    jobs = inspect_jobs(
        args.spec,
        args.name,
        args.cc,
        args.dtype,
        args.head_dim,
        launch=not args.any_strides,
        form=args.form,
        configs=configs or None,
        aux_grads=not args.no_aux_grads,
    )
    reports = compile_reports(jobs, max_workers=args.jobs, raise_on_error=False)
    ok = [r for r in reports if not isinstance(r, AOTCompileError)]
    print(format_table(ok))
    notes = sorted({r.sass_note for r in ok if r.sass_note})
    for note in notes:  # e.g. no disassembler: the sass/iter column shows "-"; one line, not one per kernel
        print(f"attnc: sass/iter: {note}", file=sys.stderr)
    failed = [r for r in reports if isinstance(r, AOTCompileError)]
    for err in failed:
        print(f"attnc: {err}", file=sys.stderr)
    return EXIT_SPEC if failed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attnc",
        description="attnc: compile .attn attention specs to PyTorch (and, later, Triton) code.",
    )
    p.add_argument(
        "--version", action="version", version=f"attnc {ATTNC_VERSION} (language {LANGUAGE_VERSION})"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("check", help="parse and type-check specs; print diagnostics")
    c.add_argument("specs", nargs="+", metavar="SPEC")
    c.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    c.add_argument(
        "--timings",
        action="store_true",
        help="also compile each spec and print the time per phase (parse, check, lower, plan, emit, import)",
    )
    c.set_defaults(func=cmd_check)

    g = sub.add_parser("codegen", help="write an importable Python module per spec")
    g.add_argument("specs", nargs="+", metavar="SPEC")
    g.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    g.add_argument("--target", choices=["reference", "triton", "all"], default="all")
    g.add_argument(
        "--tuned-from", metavar="DB", help="bake tuned configs in (a best.json table, journal file or URL)"
    )
    g.add_argument(
        "--standalone",
        action="store_true",
        help="vendor the runtime library into the module: it then needs only torch (and triton for the kernels)",
    )
    g.set_defaults(func=cmd_codegen)

    s = sub.add_parser("show-ir", help="print the typed IR of a spec")
    s.add_argument("spec", metavar="SPEC")
    s.add_argument("--name", help="only this attention block")
    s.set_defaults(func=cmd_show_ir)

    sm = sub.add_parser("show-mask", help="draw a mask and the compiler's tile classification to a PNG")
    sm.add_argument("spec", metavar="SPEC")
    sm.add_argument("--name", help="the attention block (needed when the file has several)")
    sm.add_argument("--shape", required=True, metavar="M,N", help="query and key lengths")
    sm.add_argument(
        "--scalar",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a runtime scalar, or a size symbol the mask uses, e.g. W=64 (repeatable)",
    )
    sm.add_argument("--block", default="64,64", metavar="BM,BN", help="tile size (default: 64,64)")
    sm.add_argument("-o", "--output", required=True, metavar="PNG", help="where to write the picture")
    sm.set_defaults(func=cmd_show_mask)
    ins = sub.add_parser(
        "inspect", help="compile the Triton kernels ahead of time (no GPU needed); print their resources"
    )
    ins.add_argument("spec", metavar="SPEC")
    ins.add_argument("--name", help="only this attention block")
    ins.add_argument("--cc", type=int, default=90, choices=[80, 86, 89, 90, 100], help="compute capability")
    ins.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ins.add_argument("--head-dim", type=int, default=64, help="D (= E) to compile for")
    ins.add_argument(
        "--any-strides",
        action="store_true",
        help="compile for arbitrary strides (every stride an unknown int) instead of what a launch with the "
        "runtime's contiguous q, k, v, o compiles (unit channel strides constant, 16-divisible strides)",
    )
    ins.add_argument(
        "--form",
        default="batched",
        choices=["batched", "varlen", "paged", "shift"],
        help="the attention kernels' form: batched (default), varlen (NAME_varlen: packed sequences), paged "
        "(NAME_paged: the forward kernels over a paged KV cache) or shift (attnc.distributed's launches: "
        "global positions)",
    )
    ins.add_argument(
        "--config",
        action="append",
        metavar="[KIND:]KEY=V,...",
        help="compile at this schedule instead of the default: BLOCK_M, BLOCK_N, warps, stages, for every "
        "attention kernel or for one KIND (fwd, dkdv, dq, split, combine); repeatable, e.g. "
        "--config BLOCK_M=128,BLOCK_N=64,warps=8,stages=3 --config dq:BLOCK_M=64",
    )
    ins.add_argument(
        "--no-aux-grads",
        action="store_true",
        help="compile the backward kernels as a launch whose learned inputs need no gradient does: without "
        "their auxiliary-gradient code (the _AUX_GRAD gate off)",
    )
    ins.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile processes")
    ins.set_defaults(func=cmd_inspect)
    from attnc.autotune.cli import (
        add_parser as add_tune_parser,  # attnc tune: the autotuner (autotune/cli.py)
    )

    add_tune_parser(sub)
    from attnc.zoo.cli import add_parser as add_zoo_parser  # attnc zoo list|show: the model zoo (zoo/cli.py)

    add_zoo_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except UsageError as err:
        print(f"attnc: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SpecError as err:
        print(err.format(), file=sys.stderr)
        return EXIT_SPEC
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `attnc show-ir x.attn | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK
    except Exception as err:  # an attnc bug: report it without a traceback unless asked
        if settings().debug:
            raise
        print(f"attnc: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        print("attnc: please report this; rerun with ATTNC_DEBUG=1 for a traceback", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
