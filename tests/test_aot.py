"""Ahead-of-time compilation for NVIDIA targets on a CPU machine (codegen/triton/aot.py).

Nothing here needs a GPU: `triton.compile` with an explicit GPUTarget runs the whole pipeline to PTX and a cubin,
and the triton wheel ships ptxas. The kernels below are small and compile in about a second each.
"""

from __future__ import annotations

import pickle
import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from attnc.codegen.triton.aot import (  # noqa: E402
    MAX_SHARED_BYTES,
    AOTCompileError,
    CompileJob,
    KernelReport,
    PtxasNotFoundError,
    compile_report,
    compile_reports,
    format_table,
    parse_ptxas_log,
    run_ptxas,
)


@triton.jit
def flash_forward(
    Q,
    K,
    V,
    Out,
    LSE,
    seqlen_q,
    seqlen_k,
    stride_qm,
    stride_kn,
    stride_vn,
    stride_om,
    scale_log2e,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
):
    """One query tile against every key tile: online softmax in fp32 with exp2, log-sum-exp (base 2) out."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m[:, None] < seqlen_q
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols[:, None] < seqlen_k
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=col_ok, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=col_ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2e
        s = tl.where(cols[None, :] < seqlen_k, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=row_ok)
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=offs_m < seqlen_q)


# Checked with TRITON_INTERPRET=1 on CPU tensors (triton 3.9): this kernel runs and matches x @ y; the test
# below repeats that check. A non-power-of-2 tl.arange is no such example: the interpreter rejects it too.
@triton.jit
def small_dot(X, Y, Z):
    """8x8 tiles: the interpreter multiplies them fine; the GPU compiler wants K >= 16 for fp16 tl.dot."""
    r = tl.arange(0, 8)
    x = tl.load(X + r[:, None] * 8 + r[None, :])
    y = tl.load(Y + r[:, None] * 8 + r[None, :])
    tl.store(Z + r[:, None] * 8 + r[None, :], tl.dot(x, y))


@triton.jit
def wide_dot(A, B, C, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Both dot operands live in shared memory: 64x1024 + 1024x64 fp16 is 256 KiB, over any GPU's limit."""
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = tl.load(A + rm[:, None] * BK + rk[None, :])
    b = tl.load(B + rk[:, None] * BN + rn[None, :])
    tl.store(C + rm[:, None] * BN + rn[None, :], tl.dot(a, b))


@triton.jit
def bogus_asm(X, Y):
    """Inline PTX that ptxas does not know: passes every Triton stage, fails in the last one."""
    r = tl.arange(0, 128)
    y = tl.inline_asm_elementwise(
        "bogus.op.u32 $0, $1;", "=r,r", [tl.load(X + r)], dtype=tl.int32, is_pure=True, pack=1
    )
    tl.store(Y + r, y)


@triton.jit
def scale_by_two(X, Y, n, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + r, tl.load(X + r, mask=r < n) * 2, mask=r < n)


def fa_signature(dtype: str) -> dict[str, str]:
    ptrs = {name: f"*{dtype}" for name in ("Q", "K", "V", "Out")}
    ints = {
        name: "i32" for name in ("seqlen_q", "seqlen_k", "stride_qm", "stride_kn", "stride_vn", "stride_om")
    }
    return {**ptrs, "LSE": "*fp32", **ints, "scale_log2e": "fp32"}


def fa_job(
    cc: int, d: int, dtype: str, *, block_m: int = 128, block_n: int = 64, num_warps: int = 4
) -> CompileJob:
    return CompileJob(
        flash_forward,
        fa_signature(dtype),
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "D": d},
        cc=cc,
        num_warps=num_warps,
    )


# sm_90 and sm_80, at (D=64, fp16) and (D=128, bf16), 4 warps, BLOCK_M=128, BLOCK_N=64.
MATRIX = [(cc, d, dtype) for cc in (90, 80) for d, dtype in ((64, "fp16"), (128, "bf16"))]
_REPORTS: dict[tuple[int, int, str], KernelReport] = {}


def matrix_reports() -> dict[tuple[int, int, str], KernelReport]:
    """The four compiles, once per process, two at a time in worker processes."""
    if not _REPORTS:
        reports = compile_reports([fa_job(*key) for key in MATRIX], max_workers=2)
        _REPORTS.update(zip(MATRIX, reports, strict=True))
    return _REPORTS


def test_flash_forward_compiles_for_sm90_and_sm80():
    reports = matrix_reports()
    for (cc, d, dtype), r in reports.items():
        assert isinstance(r, KernelReport), (cc, d, dtype)
        assert (r.name, r.target, r.num_warps, r.num_stages) == ("flash_forward", f"sm_{cc}", 4, 2)
        assert dict(r.constexprs) == {"BLOCK_M": 128, "BLOCK_N": 64, "D": d}
        assert dict(r.signature)["Q"] == f"*{dtype}"
        assert r.registers > 0 and r.spill_bytes == r.spill_stores + r.spill_loads
        # q stays in registers; the K and V tiles are staged in shared memory, one buffer each per stage
        assert 2 * 64 * d * 2 <= r.shared_bytes <= MAX_SHARED_BYTES[cc], r
        assert r.cubin[:4] == b"\x7fELF" and ".entry flash_forward" in r.ptx
    table = format_table(reports.values())
    assert len(table.splitlines()) == 2 + len(MATRIX)
    assert "sm_80" in table and "BLOCK_M=128 BLOCK_N=64 D=128" in table


def test_wgmma_on_sm90_only():
    reports = matrix_reports()
    assert reports[90, 64, "fp16"].uses_wgmma  # Hopper's warpgroup MMA for a 128x64 tile with 4 warps
    assert reports[90, 128, "bf16"].uses_wgmma
    assert not reports[80, 64, "fp16"].uses_wgmma  # Ampere: mma.sync
    assert "mma.sync" in reports[80, 64, "fp16"].ptx


def test_default_config_has_no_spills_and_an_absurd_one_spills():
    good = matrix_reports()[90, 64, "fp16"]
    assert 0 < good.registers <= 255 and good.spill_bytes == 0, good
    # one warp holding a 64x64 fp32 score tile and a 64x64 accumulator: 255 registers are not enough
    bad = compile_report(
        flash_forward, fa_signature("fp16"), {"BLOCK_M": 64, "BLOCK_N": 64, "D": 64}, num_warps=1
    )
    assert bad.registers == 255 and bad.spill_stores > 0 and bad.spill_loads > 0, bad
    assert not bad.uses_wgmma  # wgmma needs a warpgroup (4 warps)


def _cubin_resources(cubin: bytes, tmp_path: Path) -> dict[str, int]:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


@pytest.mark.parametrize("key", [(90, 128, "bf16"), (80, 64, "fp16")])
def test_numbers_are_those_of_the_cubin(key, tmp_path):
    """Registers and stack read back from the cubin Triton built, and an independent ptxas run of the PTX,
    agree with the report. sm_80 catches using the wrong ptxas: ptxas-blackwell (CUDA 13) and the legacy
    ptxas (CUDA 12, the one Triton uses below sm_90) spill differently on the same PTX."""
    r = matrix_reports()[key]
    res = _cubin_resources(r.cubin, tmp_path)
    assert (res["REG"], res["STACK"]) == (r.registers, r.stack_frame_bytes), (res, r)
    again = parse_ptxas_log(run_ptxas(r.ptx, r.cc, fmad=r.fp_fusion))
    assert (again.registers, again.spill_stores, again.spill_loads) == (
        r.registers,
        r.spill_stores,
        r.spill_loads,
    )


def test_interpreter_accepts_what_the_gpu_compiler_rejects(capsys):
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    # Under the interpreter (what TRITON_INTERPRET=1 gives `@triton.jit`) the 8x8 product runs and is right.
    interpreted = InterpretedFunction(small_dot.fn)
    x, y = (torch.randn(8, 8, dtype=torch.float16) for _ in range(2))
    z = torch.empty(8, 8, dtype=torch.float32)
    interpreted[(1,)](x, y, z)
    torch.testing.assert_close(z, x.float() @ y.float(), atol=1e-2, rtol=1e-2)

    # The GPU compiler says no, for both targets; the interpreted kernel itself can be handed over.
    for fn, cc in ((small_dot, 90), (interpreted, 80)):
        with pytest.raises(AOTCompileError) as info:
            compile_report(fn, {"X": "*fp16", "Y": "*fp16", "Z": "*fp32"}, {}, cc=cc)
        err = info.value
        assert (err.kernel, err.target) == ("small_dot", f"sm_{cc}")
        assert "small_dot" in str(err) and f"sm_{cc}" in str(err) and "K >= 16" in str(err)
        again = pickle.loads(pickle.dumps(err))  # crosses the process pool intact
        assert (again.kernel, again.target, str(again)) == (err.kernel, err.target, str(err))


def test_shared_memory_over_the_limit_is_an_error():
    # The interpreter has no shared memory; on a GPU this launch fails with OutOfResources.
    with pytest.raises(
        AOTCompileError, match=r"(?s)wide_dot.*sm_90.*shared memory, 262144 bytes requested, 232448"
    ):
        compile_report(wide_dot, {"A": "*fp16", "B": "*fp16", "C": "*fp32"}, {"BM": 64, "BN": 64, "BK": 1024})


def test_ptxas_rejection_carries_its_message(capsys):
    with pytest.raises(AOTCompileError) as info:
        compile_report(bogus_asm, {"X": "*i32", "Y": "*i32"}, {}, cc=90)
    assert info.value.kernel == "bogus_asm"
    assert "Not a name of any known instruction: 'bogus'" in info.value.compiler_message
    assert ".visible .entry" not in capsys.readouterr().out  # Triton's dump of the whole PTX is swallowed


def test_kernel_defined_in_interpreter_mode_compiles():
    from triton.runtime.interpreter import InterpretedFunction

    r = compile_report(
        InterpretedFunction(scale_by_two.fn), {"X": "*fp32", "Y": "*fp32", "n": "i32"}, {"BLOCK": 1024}
    )
    assert (r.name, r.registers > 0, r.spill_bytes, r.shared_bytes) == ("scale_by_two", True, 0, 0)


def test_missing_ptxas_is_a_clear_error(monkeypatch):
    from triton import knobs

    monkeypatch.setattr(knobs.NvidiaTool, "from_path", staticmethod(lambda path: None))
    with pytest.raises(PtxasNotFoundError, match="ptxas"):
        compile_report(scale_by_two, {"X": "*fp32", "Y": "*fp32", "n": "i32"}, {"BLOCK": 1024}, cc=90)


def test_signature_mistakes_are_named():
    sig = {"X": "*fp32", "Y": "*fp32", "n": "i32"}
    with pytest.raises(ValueError, match="no parameter named BLOK"):
        compile_report(scale_by_two, sig, {"BLOK": 1024})
    with pytest.raises(ValueError, match="for n"):
        compile_report(scale_by_two, {"X": "*fp32", "Y": "*fp32"}, {"BLOCK": 1024})


def test_parse_ptxas_log_and_table():
    log = (
        "ptxas info    : Compiling entry function 'a' for 'sm_80'\n"
        "ptxas info    : Function properties for a\n"
        "    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers\n"
        "ptxas-blackwell info    : Compiling entry function 'b' for 'sm_90a'\n"
        "ptxas-blackwell info    : Function properties for b\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas-blackwell info    : Used 168 registers, used 1 barriers\n"
    )
    assert parse_ptxas_log(log, "a") == parse_ptxas_log(log.split("ptxas-blackwell")[0])
    a, b = parse_ptxas_log(log, "a"), parse_ptxas_log(log, "b")
    assert (a.registers, a.spill_stores, a.spill_loads, a.stack_frame_bytes) == (96, 12, 4, 8)
    assert (b.registers, b.spill_stores + b.spill_loads) == (168, 0)
    with pytest.raises(ValueError, match="several entry functions"):
        parse_ptxas_log(log)
    rep = KernelReport("k", "sm_90", 8, 3, 98304, 168, 16, 12, 4, 8, True, (("BLOCK_M", 128), ("D", 64)))
    header, rule, row = format_table([rep]).splitlines()
    assert header.split() == [
        "kernel",
        "target",
        "warps",
        "stages",
        "smem",
        "B",
        "regs",
        "spill",
        "B",
        "wgmma",
        "tma",
        "sass/iter",
        "config",
    ]
    # no sass_* fields (a report built by hand, or no disassembler): the count shows "-"
    assert row.split() == [
        "k",
        "sm_90",
        "8",
        "3",
        "98304",
        "168",
        "16",
        "yes",
        "no",
        "-",
        "BLOCK_M=128",
        "D=64",
    ]
    assert set(rule) == {"-", " "}
