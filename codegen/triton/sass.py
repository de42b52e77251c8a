"""A static measure of loop cost: the SASS instructions of a kernel's key loop, read from its cubin.

The cubin that `aot.compile_report` builds is disassembled with `nvdisasm` (or `cuobjdump -sass`), both shipped
in the triton wheel beside `ptxas`. From the listing we rebuild the control-flow graph (basic blocks split at
labels and branches), find the loops (a branch to an earlier address is a back edge; its natural loop is every
block that reaches the branch without passing the target), and keep the innermost loops that hold a matrix
instruction (HGMMA on sm_90, HMMA on sm_80, any `*MMA` opcode): the key loops of an attention kernel. Their
size, every block of the body counted once whichever path a tile takes, is the number `attnc inspect` prints
as `sass/iter`. A kernel without such a loop (the split combine, a kernel with no `tl.dot`) reports its whole
instruction count instead, marked as scope "kernel".

This parses a tool's output, not generated source: the listing format is nvdisasm's (labels `.L_x_N:`,
branch targets `` `(.L_x_N) ``) or cuobjdump's (targets as hex addresses).

    from attnc.codegen.triton.sass import loop_cost
    cost = loop_cost(report.cubin, report.name)   # SassCost(scope="loop", loops=(1523,), total=2690)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DisassemblerNotFoundError",
    "SassCost",
    "SassInstruction",
    "disassemble",
    "find_disassembler",
    "loop_cost",
    "loop_cost_of_listing",
    "parse_listing",
]


class DisassemblerNotFoundError(RuntimeError):
    """Neither `nvdisasm` nor `cuobjdump`: the triton wheel ships both under triton/backends/nvidia/bin."""


@dataclass(frozen=True)
class SassInstruction:
    address: int
    opcode: str  # with modifiers, e.g. "HGMMA.64x64x16.F32"; the guard predicate is in `predicated`
    predicated: bool
    target: int | None  # a branch's target address, when the listing names one


@dataclass(frozen=True)
class SassCost:
    """Instruction counts of one kernel. `scope` is "loop" when key loops were found (`loops`: the size of
    each innermost loop holding an MMA, in address order), else "kernel" (`loops` is empty)."""

    scope: str
    loops: tuple[int, ...]
    total: int  # the whole kernel, without the alignment padding after its last instruction

    @property
    def instructions(self) -> int:
        """The headline figure: the largest key loop (the one a boundary/interior split leaves heaviest), or the
        whole kernel when no loop was isolated."""
        return max(self.loops) if self.loops else self.total


# ---------------------------------------------------------------------------------------------- the tools


def find_disassembler() -> tuple[str, str]:
    """("nvdisasm" | "cuobjdump", path): the triton wheel's copy first (beside its ptxas, as `find_ptxas`
    finds it), else one on PATH (a CUDA toolkit). Raises DisassemblerNotFoundError."""
    dirs: list[Path] = []
    try:
        import triton

        dirs.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin")
    except ImportError:  # no triton: a toolkit on PATH may still have the tools
        pass
    for tool in ("nvdisasm", "cuobjdump"):
        for d in dirs:
            if (d / tool).is_file():
                return tool, str(d / tool)
        found = shutil.which(tool)
        if found:
            return tool, found
    where = f" (looked in {dirs[0]} and on PATH)" if dirs else " (on PATH)"
    raise DisassemblerNotFoundError(f"no nvdisasm or cuobjdump{where}; the SASS counts are left out")


def disassemble(cubin: bytes, tool: tuple[str, str] | None = None) -> str:
    """The SASS listing of `cubin` (nvdisasm -c, or cuobjdump -sass). Raises DisassemblerNotFoundError, or
    RuntimeError when the tool fails on the binary."""
    kind, exe = tool or find_disassembler()
    with tempfile.TemporaryDirectory(prefix="attnc-sass-") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        cmd = [exe, "-c", str(path)] if kind == "nvdisasm" else [exe, "-sass", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------- parsing

# nvdisasm:  `//--------------------- .text.NAME ----`; cuobjdump: `Function : NAME`
_FUNCTION = re.compile(r"^\s*(?://-+\s*\.text\.(\S+)\s*-*|Function\s*:\s*(\S+))\s*$", re.M)
# `/*0a10*/  @!P0 BRA `(.L_x_2) ;` - the address has no spaces inside the comment, which tells it from the
# encoding comments (`/* 0x000f... */`) that cuobjdump prints beside and below each instruction.
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_GUARD = re.compile(r"^@!?U?P[T0-9]+\s+")
_LABEL_TARGET = re.compile(r"`\((\.L\w+)\)")
_HEX_TARGET = re.compile(r"\b0x([0-9a-fA-F]+)\s*$")
_BRANCHES = {"BRA", "BRX", "JMP", "JMX"}
_ENDS = {"EXIT", "RET", "BRX", "JMX", "KILL"}  # unguarded, control does not fall through


def _function_text(listing: str, entry: str | None) -> str:
    heads = list(_FUNCTION.finditer(listing))
    if not heads:
        return listing
    texts = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(listing)
        texts[m.group(1) or m.group(2)] = listing[m.end() : end]
    if entry is not None and entry in texts:
        return texts[entry]
    if len(texts) == 1:
        return next(iter(texts.values()))
    raise ValueError(f"several functions in the listing ({', '.join(texts)}); name the entry")


def parse_listing(listing: str, entry: str | None = None) -> list[SassInstruction]:
    """The instructions of `entry` (or of the listing's only function), in address order."""
    text = _function_text(listing, entry)
    labels: dict[str, int] = {}
    pending: list[str] = []
    raw: list[tuple[int, str]] = []
    for line in text.splitlines():
        lm = _LABEL.match(line)
        if lm:
            pending.append(lm.group(1))
            continue
        im = _INSTRUCTION.match(line)
        if im:
            addr = int(im.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending.clear()
            raw.append((addr, im.group(2)))
    out = []
    for addr, body in raw:
        guard = _GUARD.match(body)
        rest = body[guard.end() :] if guard else body
        opcode = rest.split(maxsplit=1)[0] if rest else ""
        target = None
        if opcode.split(".")[0] in _BRANCHES:
            lt = _LABEL_TARGET.search(rest)
            ht = _HEX_TARGET.search(rest)
            target = labels.get(lt.group(1)) if lt else int(ht.group(1), 16) if ht else None
        out.append(SassInstruction(addr, opcode, guard is not None, target))
    return out


# ---------------------------------------------------------------------------------------------- loops


def _is_mma(opcode: str) -> bool:
    return opcode.split(".")[0].endswith("MMA")  # HMMA, HGMMA, IMMA, DMMA, QGMMA, UTCHMMA (sm_100), ...


def _blocks(ins: Sequence[SassInstruction]) -> tuple[list[tuple[int, int]], list[set[int]]]:
    """Basic blocks as [start, end) index ranges, and each block's successors (block indices)."""
    index = {x.address: i for i, x in enumerate(ins)}
    leaders = {0}
    for i, x in enumerate(ins):
        base = x.opcode.split(".")[0]
        if base in _BRANCHES or base in _ENDS:
            leaders.add(i + 1)
        if x.target is not None and x.target in index:
            leaders.add(index[x.target])
    starts = sorted(s for s in leaders if s < len(ins))
    ranges = [(s, e) for s, e in zip(starts, [*starts[1:], len(ins)], strict=True)]
    block_of = {s: b for b, (s, _) in enumerate(ranges)}
    succ: list[set[int]] = []
    for b, (_, e) in enumerate(ranges):
        last = ins[e - 1]
        base = last.opcode.split(".")[0]
        nxt: set[int] = set()
        if last.target is not None and last.target in index:
            nxt.add(block_of[index[last.target]])
        stops = base in _ENDS or (base in _BRANCHES and not last.predicated)
        if not stops and b + 1 < len(ranges):
            nxt.add(b + 1)
        succ.append(nxt)
    return ranges, succ


def _natural_loops(succ: Sequence[set[int]]) -> list[set[int]]:
    """One block set per loop header: blocks that reach a back edge's source without passing its header.
    A back edge is an edge to the same or an earlier block: ptxas lays a loop's header before its body."""
    pred: list[set[int]] = [set() for _ in succ]
    for b, ss in enumerate(succ):
        for s in ss:
            pred[s].add(b)
    loops: dict[int, set[int]] = {}
    for src, ss in enumerate(succ):
        for head in ss:
            if head > src:
                continue
            body = loops.setdefault(head, {head})
            stack = [src]
            while stack:
                b = stack.pop()
                if b not in body:
                    body.add(b)
                    stack.extend(pred[b])
    return list(loops.values())


def _padding_free_count(ins: Sequence[SassInstruction]) -> int:
    """Instructions up to the last real one: the listing ends in a self-branch trap and NOP alignment."""
    n = len(ins)
    while n and (ins[n - 1].opcode.startswith("NOP") or ins[n - 1].target == ins[n - 1].address):
        n -= 1
    return n


def loop_cost_of_listing(listing: str, entry: str | None = None) -> SassCost:
    ins = parse_listing(listing, entry)
    total = _padding_free_count(ins)
    if not ins:
        return SassCost("kernel", (), 0)
    ranges, succ = _blocks(ins)
    size = [e - s for s, e in ranges]
    has_mma = [any(_is_mma(x.opcode) for x in ins[s:e]) for s, e in ranges]
    mma_loops = [body for body in _natural_loops(succ) if any(has_mma[b] for b in body)]
    # innermost: no other MMA loop nested inside (an outer loop over query tiles, say, wraps the key loop)
    inner = [a for a in mma_loops if not any(b < a for b in mma_loops)]
    inner.sort(key=min)
    loops = tuple(sum(size[b] for b in body) for body in inner)
    return SassCost("loop" if loops else "kernel", loops, total)


def loop_cost(cubin: bytes, entry: str | None = None, tool: tuple[str, str] | None = None) -> SassCost:
    """Disassemble `cubin` and measure its key loops. Raises DisassemblerNotFoundError without a tool."""
    return loop_cost_of_listing(disassemble(cubin, tool), entry)
