"""The static loop-cost report of `attnc inspect` (codegen/triton/sass.py): SASS instructions per key-loop
iteration, read from the AOT cubin with the triton wheel's nvdisasm, and the `tma` column.

The compiles here are small: one generated forward kernel for sm_90 and two tiny hand-written kernels.
"""

from __future__ import annotations

from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from attnc.codegen.triton import aot, sass  # noqa: E402
from attnc.codegen.triton.aot import KernelReport, compile_report, compile_reports, format_table  # noqa: E402
from attnc.codegen.triton.inspect import Target, jobs  # noqa: E402
from attnc.dsl.lower import compile_to_ir  # noqa: E402

from attnc import codegen  # noqa: E402
from attnc.runtime.triton import _triton_kernels  # noqa: E402

from .conftest import SPECS  # noqa: E402


@triton.jit
def tma_scale(X, Y, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """Tensor descriptors (Triton 3.x): on sm_90 their loads and stores are TMA, `cp.async.bulk.tensor`."""
    xd = tl.make_tensor_descriptor(X, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    yd = tl.make_tensor_descriptor(Y, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    row = tl.program_id(0) * BM
    yd.store([row, 0], xd.load([row, 0]) * 2)


@triton.jit
def pointer_scale(X, Y, n, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + r, tl.load(X + r, mask=r < n) * 2, mask=r < n)


TMA_SIG = {"X": "*fp16", "Y": "*fp16", "M": "i32", "N": "i32"}


@pytest.fixture(scope="module")
def causal_fwd(tmp_path_factory: pytest.TempPathFactory) -> KernelReport:
    """The causal spec's one-pass forward at its default schedule, sm_90, fp16, D = 64."""
    path = SPECS / "causal.attn"
    mod = codegen.compile_file(path, cache_dir=tmp_path_factory.mktemp("sass-cache"))
    kernels = _triton_kernels(mod.__file__, interpret=False)
    (att,) = compile_to_ir(path.read_text(), path.name).attentions
    # Pointer loads (tma=False): the loop structure pinned here is that of the masked loads; the descriptor
    # path is tests/test_tma.py's.
    (rep,) = compile_reports(jobs(att, kernels, Target(90, "fp16", 64, ("fwd",), tma=False)), max_workers=1)
    return rep


def test_causal_forward_key_loop_is_isolated(causal_fwd: KernelReport) -> None:
    assert causal_fwd.uses_wgmma and causal_fwd.sass_scope == "loop", causal_fwd.sass_note
    # Two key loops: the interior tiles' (EDGE = LEAN: no bounds, no mask) and the boundary tiles'. The
    # interior one is much the smaller (353 vs 978 instructions when written); the headline is the larger.
    lean, edge = sorted(causal_fwd.sass_loops)
    assert len(causal_fwd.sass_loops) == 2 and lean < 0.6 * edge, causal_fwd.sass_loops
    n, total = causal_fwd.sass_instructions, causal_fwd.sass_total
    assert n == edge and total is not None and 0 < n < total
    row = format_table([causal_fwd]).splitlines()[2].split()
    assert row[7:10] == ["yes", "no", f"{lean},{edge}"]  # wgmma, tma, sass/iter (each key loop)


def test_pointer_loads_are_not_tma(causal_fwd: KernelReport) -> None:
    assert not causal_fwd.uses_tma
    assert "cp.async.bulk.tensor" not in causal_fwd.ptx


@pytest.mark.skipif(
    not hasattr(tl, "make_tensor_descriptor"), reason="this Triton has no device-side tensor descriptors"
)
def test_tensor_descriptors_compile_to_tma_on_sm90() -> None:
    rep = compile_report(tma_scale, TMA_SIG, {"BM": 64, "BN": 64}, cc=90)
    assert rep.uses_tma
    assert rep.sass_scope == "kernel" and rep.sass_loops == ()  # no loop, no MMA: the whole kernel
    assert rep.sass_instructions == rep.sass_total and rep.sass_total > 0
    header, _, row = format_table([rep]).splitlines()
    assert header.split()[10:12] == ["tma", "sass/iter"]  # "smem B" and "spill B" are two words each
    assert row.split()[8:11] == ["yes", str(rep.sass_total), "(kernel)"]


def test_missing_disassembler_shows_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    def nothing() -> tuple[str, str]:
        raise sass.DisassemblerNotFoundError("no nvdisasm or cuobjdump (test)")

    monkeypatch.setattr(sass, "find_disassembler", nothing)
    rep = compile_report(pointer_scale, {"X": "*fp32", "Y": "*fp32", "n": "i32"}, {"BLOCK": 128}, cc=90)
    assert rep.registers > 0 and rep.cubin  # the rest of the report stands
    assert rep.sass_scope == "" and rep.sass_instructions is None and "nvdisasm" in rep.sass_note
    assert aot.sass_cell(rep) == "-"
    assert format_table([rep]).splitlines()[2].split()[8:10] == ["no", "-"]


def test_disassembler_lookup_uses_the_triton_wheel() -> None:
    tool, path = sass.find_disassembler()
    assert tool in ("nvdisasm", "cuobjdump") and Path(path).is_file()


# A hand-made listing in nvdisasm's format: an outer loop (.L_x_0) around two key loops, the second with a
# forward branch inside its body and an out-of-line block (.L_x_9) placed after the kernel's EXIT that jumps
# back into it; then the trap self-branch and alignment NOPs.
LISTING = """
//--------------------- .text.k --------------------------
k:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   IADD3 R1, R1, 0x1, RZ ;
.L_x_1:
        /*0020*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;
        /*0030*/                   ISETP.GE.AND P0, PT, R1, R2, PT ;
        /*0040*/              @!P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0050*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0060*/               @P1 BRA `(.L_x_3) ;
        /*0070*/                   FMUL R4, R4, R5 ;
.L_x_3:
        /*0080*/               @P2 BRA `(.L_x_9) ;
.L_x_4:
        /*0090*/                   FADD R4, R4, R5 ;
        /*00a0*/              @!P3 BRA `(.L_x_2) ;
        /*00b0*/              @!P4 BRA `(.L_x_0) ;
        /*00c0*/                   EXIT ;
.L_x_9:
        /*00d0*/                   MUFU.EX2 R4, R4 ;
        /*00e0*/                   BRA `(.L_x_4) ;
.L_x_5:
        /*00f0*/                   BRA `(.L_x_5);
        /*0100*/                   NOP;
        /*0110*/                   NOP;
"""


def test_listing_loops_innermost_with_mma() -> None:
    cost = sass.loop_cost_of_listing(LISTING, "k")
    # .L_x_1: 0x20-0x40 (3); .L_x_2: 0x50-0xa0 (6) plus the out-of-line 0xd0-0xe0 (2); the outer .L_x_0 loop
    # holds both and is not innermost.
    assert cost == sass.SassCost("loop", (3, 8), 15)
    assert cost.instructions == 8


def test_listing_in_cuobjdump_format() -> None:
    """cuobjdump prints hex targets and encoding comments; the same loops come out."""
    text = "\n".join(ln for ln in LISTING.splitlines() if not ln.strip().startswith(".L_x_"))
    for label, address in {
        "0": 0x10,
        "1": 0x20,
        "2": 0x50,
        "3": 0x80,
        "4": 0x90,
        "9": 0xD0,
        "5": 0xF0,
    }.items():
        text = text.replace(f"`(.L_x_{label})", hex(address))
    text = text.replace("//--------------------- .text.k --------------------------", "\t\tFunction : k")
    text = "\n".join(
        f"{ln}  /* 0x000fe20000000a00 */\n    /* 0x0000000000000000 */" if "/*0" in ln else ln
        for ln in text.splitlines()
    )
    assert sass.loop_cost_of_listing(text, "k") == sass.SassCost("loop", (3, 8), 15)


def test_listing_without_loops_counts_the_kernel() -> None:
    text = "        /*0000*/  S2R R0, SR_TID.X ;\n        /*0010*/  EXIT ;\n.L_x_0:\n        /*0020*/  BRA `(.L_x_0);\n"
    assert sass.loop_cost_of_listing(text) == sass.SassCost("kernel", (), 2)
