"""sm_90 registers and spills of the varlen and paged forms of every example spec's kernels (static data, made
on a CPU by the ahead-of-time compile: Triton's full pipeline to a cubin, no GPU).

    python benchmarks/aot_forms.py --json benchmarks/results/aot_sm90_forms-DATE.json
    python benchmarks/aot_forms.py --forms shift --json benchmarks/results/aot_sm90_shift-DATE.json

The varlen form (`_VARLEN`): all five kernels; the paged form (`_PAGED`): the forward and split-KV forward, for
the specs whose queries have their own length symbol (those that get `NAME_paged`), plus the bottom-right
aligned specs of attnc/integrations/specs. Default schedules, fp16 at D = 64 and bf16 at D = 128. Exits 1 when
a kernel fails to compile or spills.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch
    import triton
    from attnc.codegen.triton.aot import AOTCompileError, KernelReport, compile_reports
    from attnc.codegen.triton.inspect import Target, jobs
    from attnc.dsl.ir import Op, Role
    from attnc.dsl.lower import compile_to_ir

    from attnc import codegen
    from attnc.runtime.triton import _triton_kernels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--forms",
        default="varlen,paged",
        help="comma-separated: varlen, paged, shift (context parallelism's global positions: all five kernels)",
    )
    args = ap.parse_args()
    chosen = set(args.forms.split(","))
    specs = [
        *sorted((ROOT / "examples" / "specs").glob("*.attn")),
        *sorted((ROOT / "attnc" / "integrations" / "specs").glob("*.attn")),
    ]
    runs, labels = [], []
    with tempfile.TemporaryDirectory() as cache:
        for path in specs:
            mod = codegen.compile_file(path, cache_dir=Path(cache))
            kernels = _triton_kernels(mod.__file__, interpret=False)
            att = compile_to_ir(path.read_text(), path.name).attentions[0]
            q = next(p for p in att.tensors if p.role is Role.Q)
            k = next(p for p in att.tensors if p.role is Role.K)
            paged = q.shape[2].op is Op.SIZE and k.shape[2].op is Op.SIZE and q.shape[2] != k.shape[2]
            for dtype, width in (("fp16", 64), ("bf16", 128)):
                forms = [("varlen", Target(90, dtype, width, varlen=True))] if "varlen" in chosen else []
                if paged and "paged" in chosen:
                    forms.append(("paged", Target(90, dtype, width, ("fwd", "fwd_split"), paged=True)))
                if "shift" in chosen:
                    forms.append(("shift", Target(90, dtype, width, shift=True)))
                for form, target in forms:
                    js = jobs(att, kernels, target)
                    runs += js
                    labels += [(f"{path.parent.name}/{path.stem}", form, dtype, width)] * len(js)
        reports = compile_reports(runs, max_workers=args.workers, raise_on_error=False)
    rows, bad = [], 0
    for (spec, form, dtype, width), r in zip(labels, reports, strict=True):
        if isinstance(r, AOTCompileError):
            bad += 1
            rows.append(
                {"spec": spec, "form": form, "dtype": dtype, "head_dim": width, "error": str(r)[:500]}
            )
            continue
        assert isinstance(r, KernelReport)
        bad += bool(r.spill_bytes)
        rows.append(
            {
                "spec": spec,
                "form": form,
                "dtype": dtype,
                "head_dim": width,
                "kernel": r.name,
                "config": r.config,
                "registers": r.registers,
                "spill_bytes": r.spill_bytes,
                "wgmma": r.uses_wgmma,
            }
        )
    out = {
        "what": f"sm_90 registers/spills of the {args.forms} kernel forms (ahead-of-time compile on a CPU)",
        "date": datetime.date.today().isoformat(),
        "device": "none (CPU-side compile for sm_90: triton.compile + ptxas)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "kernels": len(rows),
        "failing_or_spilling": bad,
        "max_registers": max((r.get("registers", 0) for r in rows), default=0),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"{len(rows)} kernels, {bad} failing or spilling, max {out['max_registers']} registers -> {args.json}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
