"""`NAME_varlen`: packed variable-length batches (FlashAttention's `cu_seqlens` convention) for every
example spec, on the reference and the Triton (interpreter) backends.

The oracle is independent of the generated code: each sequence is cut out of the packed inputs (in the test,
below) and given to the float64 oracles of tests/test_reference_oracles.py (the paper's formula, and SDPA
with an explicit mask or bias where the spec has one, e.g. the plain causal case), and the per-sequence
results are packed again. Gradients flow through those cuts back to the same packed leaves, so q, k, v and
every float auxiliary tensor (packed per token, per sequence, or global) are checked as well. The varlen
output also matches separate per-sequence calls of the batched operator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from attnc.dsl.ir import Op, Role, TensorParam
from attnc.dsl.lower import compile_to_ir

from .test_reference_oracles import (
    F64,
    SPEC_DIR,
    SPECS,
    Case,
    Tol,
    _is_float,
    assert_close,
    make_args,
    oracles,
)

pytest.importorskip("triton")

FWD_TOL = {torch.float32: Tol(5e-5, 5e-5)}
GRAD_TOL = {torch.float32: Tol(1e-4, 1e-4)}


@dataclass(frozen=True)
class Lens:
    q: tuple[int, ...]
    k: tuple[int, ...]

    def __str__(self) -> str:
        same = self.q == self.k
        return "lens" + "_".join(map(str, self.q)) + ("" if same else "-k" + "_".join(map(str, self.k)))


# 1 to 5 sequences, with empty and length-1 ones and lengths that are no multiple of a tile.
SELF = (Lens((5,), (5,)), Lens((0, 1, 37, 20, 5), (0, 1, 37, 20, 5)))
CROSS = (
    Lens((3, 0, 1, 17, 9), (20, 4, 0, 33, 1)),
    # Decoding shapes (at most 16 query rows, long key ranges): the split-KV forward and its combine.
    Lens((1, 7, 0, 16), (300, 40, 5, 290)),
)


def _axes(spec: str) -> dict[str, tuple[str | None, ...]]:
    """Per auxiliary tensor, what each axis is: 'b' (the sequence), 'q' / 'k' (a position in q's / k's
    sequence) or None, from the spec's declared shapes."""
    att = compile_to_ir((SPEC_DIR / f"{spec}.attn").read_text(), f"{spec}.attn").attentions[0]
    q = next(p for p in att.tensors if p.role is Role.Q)
    k = next(p for p in att.tensors if p.role is Role.K)
    kinds = {str(q.shape[0].attr): "b", str(k.shape[2].attr): "k", str(q.shape[2].attr): "q"}
    return {
        p.name: tuple(kinds.get(str(d.attr)) if d.op is Op.SIZE else None for d in p.shape)
        for p in att.params
        if isinstance(p, TensorParam) and p.role not in (Role.Q, Role.K, Role.V)
    }


def _per_token(ax: tuple[str | None, ...]) -> int | None:
    """The position axis of a tensor the varlen form takes packed ([B, H, N] -> [total, H]), else None."""
    seq = [a for a, kind in enumerate(ax) if kind in ("q", "k")]
    return seq[0] if len(ax) >= 2 and ax[0] == "b" and len(seq) == 1 and "b" not in ax[1:] else None


def _offsets(lens: tuple[int, ...]) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _packed_inputs(spec: str, lens: Lens, seed: int = 0) -> tuple[dict[str, object], dict[str, object]]:
    """The varlen arguments (float64, packed where the convention packs) and the batched arguments they
    came from (B = number of sequences, lengths = the longest)."""
    info = SPECS[spec]
    H = 4 if info.gqa else 2
    case = Case(spec, max(lens.q), max(lens.k), B=len(lens.q), H=H, dtype=F64)
    full = make_args(case)
    axes = _axes(spec)
    oq, ok = _offsets(lens.q), _offsets(lens.k)
    packed: dict[str, object] = {}
    for name, a in full.items():
        if name in ("q", "k", "v"):
            ls = lens.q if name == "q" else lens.k
            packed[name] = torch.cat([a[s, :, : ls[s]].transpose(0, 1) for s in range(len(ls))])
        elif name in axes and (axis := _per_token(axes[name])) is not None:
            ls = lens.q if axes[name][axis] == "q" else lens.k
            packed[name] = torch.cat([a[s].movedim(axis - 1, 0)[: ls[s]] for s in range(len(ls))])
        else:
            packed[name] = a
    assert (oq[-1], ok[-1]) == (packed["q"].shape[0], packed["k"].shape[0])  # type: ignore[union-attr]
    return packed, full


def _sequence(spec: str, packed: dict[str, object], lens: Lens, s: int) -> dict[str, object]:
    """Sequence s cut out of the packed arguments, as a batched call of one sequence (differentiable)."""
    axes = _axes(spec)
    oq, ok = _offsets(lens.q), _offsets(lens.k)
    size = {"q": lens.q[s], "k": lens.k[s]}
    out: dict[str, object] = {}
    for name, a in packed.items():
        if name in ("q", "k", "v"):
            lo, hi = (oq[s], oq[s + 1]) if name == "q" else (ok[s], ok[s + 1])
            out[name] = a[lo:hi].transpose(0, 1).unsqueeze(0)  # type: ignore[index]
        elif name in axes and (axis := _per_token(axes[name])) is not None:
            lo, hi = (oq[s], oq[s + 1]) if axes[name][axis] == "q" else (ok[s], ok[s + 1])
            out[name] = a[lo:hi].movedim(0, axis - 1).unsqueeze(0)  # type: ignore[index]
        elif name in axes:
            t = a
            for dim, kind in enumerate(axes[name]):
                if kind == "b":
                    t = t.narrow(dim, s, 1)  # type: ignore[union-attr]
                elif kind is not None:
                    t = t.narrow(dim, 0, size[kind])  # type: ignore[union-attr]
            out[name] = t
        else:
            out[name] = a
    return out


def _leaves(args: dict[str, object], dtype: torch.dtype) -> dict[str, object]:
    return {n: a.detach().to(dtype).requires_grad_() if _is_float(a) else a for n, a in args.items()}


def _cases() -> list[object]:
    out = []
    for spec, info in SPECS.items():
        for lens in CROSS if info.cross else SELF:
            for backend in ("reference", "triton"):
                gqa = "-GQA" if info.gqa else ""
                out.append(pytest.param(spec, lens, backend, id=f"{spec}-{lens}{gqa}-{backend}-fp32"))
    return out


@pytest.mark.parametrize(("spec", "lens", "backend"), _cases())
def test_varlen_matches_the_oracles_per_sequence(
    spec: str, lens: Lens, backend: str, compiled: Callable[[str], ModuleType]
) -> None:
    info = SPECS[spec]
    dtype = torch.float32
    packed, _ = _packed_inputs(spec, lens)
    # The inputs rounded to the test dtype once; the oracles see exactly those values in float64.
    packed = {n: a.to(dtype).to(F64) if _is_float(a) else a for n, a in packed.items()}
    args, ref = _leaves(packed, dtype), _leaves(packed, F64)
    mod = compiled(spec)
    cu_q = torch.tensor(_offsets(lens.q), dtype=torch.int32)
    cu_k = None if lens.q == lens.k and not info.cross else torch.tensor(_offsets(lens.k), dtype=torch.int32)
    fn = getattr(mod, f"{spec}_varlen")
    kw = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "backend": backend}
    if info.softmax:
        o, lse = fn(*args.values(), return_lse=True, **kw)
    else:
        o, lse = fn(*args.values(), **kw), None
    assert o.dtype == dtype and o.isfinite().all()
    H, E = packed["q"].shape[1], packed["v"].shape[2]  # type: ignore[union-attr]
    assert o.shape == (sum(lens.q), H, E)
    weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    names = [n for n, a in args.items() if _is_float(a)]
    got = torch.autograd.grad((o * weights.to(dtype)).sum(), [args[n] for n in names], allow_unused=True)
    oq = _offsets(lens.q)
    for oname, oracle in oracles(info, autograd_only=True).items():
        rows, stats = [], []
        for s in range(len(lens.q)):
            if lens.q[s] == 0:
                continue
            seq = _sequence(spec, ref, lens, s)
            rows.append(oracle(seq)[0].transpose(0, 1))
            if lse is not None and oname == "naive":
                stats.append(info.naive(seq)[1][0].transpose(0, 1))  # type: ignore[index]
        expected = torch.cat(rows)
        assert_close(o, expected, FWD_TOL[dtype], f"{spec}-{lens} forward vs {oname}")
        want = torch.autograd.grad((expected * weights).sum(), [ref[n] for n in names], allow_unused=True)
        for n, g, w in zip(names, got, want, strict=True):
            g = torch.zeros_like(args[n]) if g is None else g  # type: ignore[arg-type]
            w = torch.zeros_like(ref[n]) if w is None else w  # type: ignore[arg-type]
            assert g.isfinite().all(), f"{n}: non-finite gradient"
            assert_close(g, w, GRAD_TOL[dtype], f"{spec}-{lens} d{n} vs {oname}")
        if stats:
            want_lse = torch.cat(stats).detach()
            dead = want_lse == float("-inf")
            assert lse is not None and lse.shape == (oq[-1], H)
            assert (lse[dead] == float("-inf")).all()
            assert_close(lse[~dead], want_lse[~dead], FWD_TOL[dtype], f"{spec}-{lens} lse")
    # And as separate per-sequence calls of the batched operator.
    with torch.no_grad():
        for s in range(len(lens.q)):
            if lens.q[s] == 0:
                continue
            seq = _sequence(spec, args, lens, s)
            alone = getattr(mod, spec)(*seq.values(), backend=backend)
            assert_close(o[oq[s] : oq[s + 1]], alone[0].transpose(0, 1), FWD_TOL[dtype], f"{spec} seq {s}")


def test_the_documented_snippets_run(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """README's varlen/paged section and docs/serving.md, run as written (from the repository root)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    readme = (
        (root / "README.md").read_text().split("## Packed variable-length batches", 1)[1].split("\n## ", 1)[0]
    )
    docs = (root / "docs" / "serving.md").read_text()
    for where, text in (("README.md", readme), ("docs/serving.md", docs)):
        blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
        assert blocks, where
        env: dict[str, object] = {}
        for block in blocks:
            exec(compile(block, where, "exec"), env)


def test_varlen_refuses_bad_input(compiled: Callable[[str], ModuleType]) -> None:
    """Each wrong offsets table, length or packed tensor is a ValueError naming the parameter."""
    mod = compiled("moh_gate")
    q = k = v = torch.randn(10, 2, 16)
    gate = torch.rand(10, 2)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    ok = mod.moh_gate_varlen(q, k, v, gate, cu_seqlens_q=cu)
    assert ok.shape == (10, 2, 16)
    cases = [
        ({"cu_seqlens_q": cu.long()}, gate, "cu_seqlens_q: expected an int32 tensor"),
        ({"cu_seqlens_q": torch.tensor([0, 4, 9], dtype=torch.int32)}, gate, "end at the packed length 10"),
        ({"cu_seqlens_q": torch.tensor([0, 6, 4, 10], dtype=torch.int32)}, gate, "never decrease"),
        ({"cu_seqlens_q": torch.tensor([1, 4, 10], dtype=torch.int32)}, gate, "start at 0"),
        ({"cu_seqlens_q": cu, "max_seqlen_q": 3}, gate, "below the longest sequence, 6"),
        ({"cu_seqlens_q": cu}, torch.rand(9, 2), r"gate: expected shape \[total_q, H\]"),
        ({"cu_seqlens_q": cu}, torch.rand(10, 2, 1), r"gate: expected a 2-d tensor"),
        (
            {"cu_seqlens_q": cu, "cu_seqlens_k": torch.tensor([0, 5, 10], dtype=torch.int32)},
            gate,
            "cu_seqlens_k must equal cu_seqlens_q",
        ),
    ]
    for kw, g, match in cases:
        with pytest.raises(ValueError, match=match):
            mod.moh_gate_varlen(q, k, v, g, **kw)
    with pytest.raises(ValueError, match=r"q: expected a packed tensor of shape \[total_q, H, D\]"):
        mod.moh_gate_varlen(q[None], k, v, gate, cu_seqlens_q=cu)
    cross = compiled("cross")
    with pytest.raises(ValueError, match="cu_seqlens_k: cross has separate query and key lengths"):
        cross.cross_varlen(q, k, torch.randn(10, 2, 8), cu_seqlens_q=cu)
    prefix = compiled("prefix_lm")  # P: int = 16, a constant default: fine per sequence
    assert prefix.prefix_lm_varlen(q, k, v, cu_seqlens_q=cu).shape == (10, 2, 16)


def test_a_default_that_reads_a_length_must_be_passed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`W: int = N // 2` differs per sequence: the varlen form asks for W instead of guessing one."""
    import attnc

    mod = attnc.compile(
        "attention half(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D], W: int = N // 2) {\n"
        "    score = dot(q, k) * D ** -0.5\n    mask = j <= i and i - j < W\n}\n",
        cache_dir=tmp_path,
    )
    q = torch.randn(12, 2, 16)
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="W: its default reads a sequence length"):
        mod.half_varlen(q, q, q, cu_seqlens_q=cu)
    o = mod.half_varlen(q, q, q, 3, cu_seqlens_q=cu, backend="triton")
    for lo, hi in ((0, 4), (4, 12)):
        s = q[lo:hi].transpose(0, 1)
        want = mod.half(s[None], s[None], s[None], 3)[0].transpose(0, 1)
        assert_close(o[lo:hi], want, FWD_TOL[torch.float32], "half")


def test_varlen_traces_whole_under_torch_compile(compiled: Callable[[str], ModuleType]) -> None:
    """With the max_seqlens given nothing reads the offsets on the host: fullgraph=True traces the call (the
    custom op's fake gives the packed shapes); without them the call says what it needs."""
    mod = compiled("alibi")
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q = torch.randn(12, 2, 16)
    slopes = torch.rand(2)
    eager = mod.alibi_varlen(q, q, q, slopes, cu_seqlens_q=cu, cu_seqlens_k=cu)
    torch._dynamo.reset()
    traced = torch.compile(
        lambda q, cu: mod.alibi_varlen(
            q, q, q, slopes, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7, max_seqlen_k=7
        ),
        fullgraph=True,
        backend="aot_eager",
    )
    assert_close(traced(q, cu), eager, FWD_TOL[torch.float32], "alibi_varlen under torch.compile")
    torch._dynamo.reset()
    missing = torch.compile(
        lambda q, cu: mod.alibi_varlen(q, q, q, slopes, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7),
        fullgraph=True,
        backend="aot_eager",
    )
    with pytest.raises(Exception, match=r"max_seqlen_k: required under torch\.compile"):
        missing(q, cu)
