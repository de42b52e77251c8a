"""`NAME_paged`: decoding (M = 1, 7: the split-KV path) and chunked prefill (M = 20) over a paged KV cache,
on the reference and the Triton (interpreter) backends, for bottom-right aligned causal, sliding-window,
ALiBi and sink specs and the soft-capped example.

The cache is filled by `PagedKVCache` from a shuffled free list (non-contiguous pages), with lengths that are
no multiple of the page size, one sequence shorter than M, and one sequence whose first pages are another's
(a shared prefix). Each result is checked against the same operator on that sequence's contiguous keys and
values (the tensors the test appended, kept aside) and against a float64 softmax written here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from attnc.codegen.triton.aot import AOTCompileError, KernelReport, compile_reports
from attnc.codegen.triton.inspect import Target, jobs
from attnc.dsl.lower import compile_to_ir

import attnc
from attnc.runtime import PagedKVCache, visit_probe
from attnc.runtime.triton import _triton_kernels

from .test_reference_oracles import Tol, assert_close

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "attnc" / "integrations" / "specs"
SINK = """
attention sink_decode(q: [B, H, M, D], k: [B, G, N, D], v: [B, G, N, D], sinks: [H]) {
    score = dot(q, k) * D ** -0.5
    mask  = j <= i + N - M
    norm  = softmax(sink = sinks[h])
}
"""
TOL = Tol(5e-5, 5e-5)
H, G, D = 4, 2, 16
LENS = (37, 5, 300)  # then sequence 3: sequence 2's first two pages, and 20 keys of its own (300: splits)
PAGE = 16


@dataclass(frozen=True)
class Spec:
    name: str
    source: Callable[[], str]
    # (scores [H, M, n] float64, sequence length n, query rows M, aux) -> (scores, visible, sink logits)
    oracle: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    aux: Callable[[torch.Generator], dict[str, object]] = lambda g: {}


def _past(M: int, n: int) -> torch.Tensor:
    """How far key j lies behind query i when the M queries are the sequence's last positions."""
    return torch.arange(M).view(M, 1) + n - M - torch.arange(n).view(1, n)


def _causal(s, n, M, a):  # type: ignore[no-untyped-def]
    return s, _past(M, n) >= 0, None


def _window(s, n, M, a):  # type: ignore[no-untyped-def]
    p = _past(M, n)
    return s, (p >= 0) & (p < a["W"]), None


def _alibi(s, n, M, a):  # type: ignore[no-untyped-def]
    p = _past(M, n)
    return s - a["slopes"].double().view(-1, 1, 1) * p, p >= 0, None


def _sink(s, n, M, a):  # type: ignore[no-untyped-def]
    return s, _past(M, n) >= 0, a["sinks"].double()


def _softcap(s, n, M, a):  # type: ignore[no-untyped-def]
    return a["cap"] * torch.tanh(s / a["cap"]), torch.ones(M, n, dtype=torch.bool), None


SPECS = {
    "causal": Spec("causal", lambda: (HF / "causal.attn").read_text(), _causal),
    "sliding_window": Spec(
        "sliding_window", lambda: (HF / "sliding_window.attn").read_text(), _window, lambda g: {"W": 24}
    ),
    "alibi": Spec(
        "alibi",
        lambda: (HF / "alibi.attn").read_text(),
        _alibi,
        lambda g: {"slopes": torch.rand(H, generator=g)},
    ),
    "sink_decode": Spec("sink_decode", lambda: SINK, _sink, lambda g: {"sinks": torch.randn(H, generator=g)}),
    "softcap": Spec(
        "softcap",
        lambda: (ROOT / "examples" / "specs" / "softcap.attn").read_text(),
        _softcap,
        lambda g: {"cap": 2.0},
    ),
}


def _module(spec: Spec, tmp: Path):  # type: ignore[no-untyped-def]
    return attnc.compile(spec.source(), cache_dir=tmp)


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("paged")
    return {name: _module(s, cache) for name, s in SPECS.items()}


def _cache(heads_v: int) -> tuple[PagedKVCache, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The cache, and each sequence's keys and values as the test appended them ([G, n, D], [G, n, E])."""
    g = torch.Generator().manual_seed(7)
    B = len(LENS) + 1
    cache = PagedKVCache(B, 40, PAGE, G, D, heads_v, max_pages=20, generator=g)
    kept = []
    for b, n in enumerate(LENS):
        k, v = torch.randn(G, n, D, generator=g), torch.randn(G, n, heads_v, generator=g)
        new_k = torch.zeros(B, G, n, D).index_copy(0, torch.tensor([b]), k[None])
        new_v = torch.zeros(B, G, n, heads_v).index_copy(0, torch.tensor([b]), v[None])
        cache.append(new_k, new_v, lengths=[n if x == b else 0 for x in range(B)])
        kept.append((k, v))
    cache.share_prefix(2, 3, 2 * PAGE)
    k, v = torch.randn(G, 20, D, generator=g), torch.randn(G, 20, heads_v, generator=g)
    cache.append(
        torch.zeros(B, G, 20, D).index_copy(0, torch.tensor([3]), k[None]),
        torch.zeros(B, G, 20, heads_v).index_copy(0, torch.tensor([3]), v[None]),
        lengths=[0, 0, 0, 20],
    )
    shared = kept[2]
    kept.append((torch.cat([shared[0][:, : 2 * PAGE], k], 1), torch.cat([shared[1][:, : 2 * PAGE], v], 1)))
    return cache, kept


def _oracle(
    spec: Spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, aux: dict[str, object]
) -> torch.Tensor:
    """Float64 softmax attention of one sequence: q [H, M, D], k [G, n, D], v [G, n, E] -> [H, M, E]."""
    M, n = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(H // G, 0)
    vv = v.double().repeat_interleave(H // G, 0)
    s = q.double() @ kk.transpose(1, 2) / math.sqrt(D)
    s, visible, sink = spec.oracle(s, n, M, aux)
    s = s.masked_fill(~visible, float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink.view(-1, 1, 1).expand(H, M, 1)], dim=2)
    top = s.amax(-1, keepdim=True).clamp(min=-1e300)
    p = torch.exp(s - top)
    p = torch.where(torch.isfinite(s), p, 0.0)
    den = p.sum(-1, keepdim=True)
    out = (p[..., :n] @ vv) / torch.where(den == 0, 1.0, den)
    return out


CASES = [
    pytest.param(name, M, backend, id=f"{name}-M{M}-{backend}")
    for name in SPECS
    for M in (1, 7, 20)
    for backend in ("reference", "triton")
]


@pytest.mark.parametrize(("name", "M", "backend"), CASES)
def test_paged_matches_the_contiguous_operator_and_the_formula(
    name: str, M: int, backend: str, modules
) -> None:  # type: ignore[no-untyped-def]
    spec, mod = SPECS[name], modules[name]
    E = D
    cache, kept = _cache(E)
    g = torch.Generator().manual_seed(M)
    B = len(kept)
    q = torch.randn(B, H if name != "softcap" else G, M, D, generator=g)
    aux = spec.aux(g)
    fn = getattr(mod, f"{spec.name}_paged")
    with visit_probe() as probe:
        o = fn(
            q,
            cache.k_pages,
            cache.v_pages,
            **aux,
            block_table=cache.block_table,
            seq_lens=cache.seq_lens,
            backend=backend,
        )
    if backend == "triton":  # decoding shapes take the split-KV forward, longer query blocks the one-pass one
        assert ("fwd_split" in probe) == (M <= 16), sorted(probe)
    assert o.shape == (B, q.shape[1], M, E) and o.isfinite().all()
    for b, (k, v) in enumerate(kept):
        if name == "softcap":  # no grouped heads in this spec: k, v with q's heads
            k, v = k.repeat_interleave(q.shape[1] // G, 0), v.repeat_interleave(q.shape[1] // G, 0)
        alone = getattr(mod, spec.name)(q[b : b + 1], k[None], v[None], **aux, backend=backend)
        assert_close(o[b : b + 1], alone, TOL, f"{name} seq {b} vs the contiguous operator")
        if name != "softcap":
            assert_close(o[b].double(), _oracle(spec, q[b], k, v, aux), TOL, f"{name} seq {b} vs the formula")


def test_paged_softcap_against_the_formula(modules) -> None:  # type: ignore[no-untyped-def]
    """The soft-capped example has k, v with q's heads: its own page layout (G = H)."""
    mod = modules["softcap"]
    g = torch.Generator().manual_seed(3)
    cache = PagedKVCache(2, 8, PAGE, H, D, generator=g)
    ks, vs = torch.randn(2, H, 40, D, generator=g), torch.randn(2, H, 40, D, generator=g)
    cache.append(ks, vs, lengths=[40, 9])
    q = torch.randn(2, H, 3, D, generator=g)
    for backend in ("reference", "triton"):
        o = mod.softcap_paged(
            q,
            cache.k_pages,
            cache.v_pages,
            2.0,
            block_table=cache.block_table,
            seq_lens=cache.seq_lens,
            backend=backend,
        )
        for b, n in enumerate((40, 9)):
            k, v = ks[b, :, :n], vs[b, :, :n]
            s = q[b].double() @ k.double().transpose(1, 2) / math.sqrt(D)
            want = torch.softmax(2.0 * torch.tanh(s / 2.0), -1) @ v.double()
            assert_close(o[b].double(), want, TOL, f"softcap-{backend} seq {b}")


def test_paged_operators_refuse_bad_input(modules) -> None:  # type: ignore[no-untyped-def]
    mod = modules["causal"]
    cache, _ = _cache(D)
    q = torch.randn(4, H, 1, D)
    kw = {"block_table": cache.block_table, "seq_lens": cache.seq_lens}
    with pytest.raises(ValueError, match="no backward"):
        mod.causal_paged(q.requires_grad_(), cache.k_pages, cache.v_pages, **kw)
    q = q.detach()
    with pytest.raises(ValueError, match="multiple of 16"):
        mod.causal_paged(q, cache.k_pages[:, :8], cache.v_pages[:, :8], **kw)
    with pytest.raises(ValueError, match="block_table: expected an int32 tensor"):
        mod.causal_paged(
            q, cache.k_pages, cache.v_pages, block_table=cache.block_table.long(), seq_lens=cache.seq_lens
        )
    too_long = cache.seq_lens.clone()
    too_long[0] = 10_000
    with pytest.raises(ValueError, match="seq_lens: each length"):
        mod.causal_paged(q, cache.k_pages, cache.v_pages, block_table=cache.block_table, seq_lens=too_long)
    with pytest.raises(ValueError, match="max_seqlen_k: 3 is below"):
        mod.causal_paged(q, cache.k_pages, cache.v_pages, **kw, max_seqlen_k=3)
    bad = cache.block_table.clone()
    bad[0, 0] = 999
    with pytest.raises(ValueError, match="block_table: the pages"):
        mod.causal_paged(q, cache.k_pages, cache.v_pages, block_table=bad, seq_lens=cache.seq_lens)


def test_paged_and_varlen_kernels_compile_for_sm90_without_spills(tmp_path: Path) -> None:
    """The paged forward and split-KV forward, and every varlen kernel, through Triton's full pipeline for
    sm_90 at the default schedules (fp16 D = 64, bf16 D = 128): no spills."""
    runs = []
    for spec, path in ((SPECS["alibi"], HF / "alibi.attn"), (SPECS["causal"], HF / "causal.attn")):
        mod = attnc.compile(spec.source(), cache_dir=tmp_path)
        kernels = _triton_kernels(mod.__file__, interpret=False)
        att = compile_to_ir(path.read_text(), path.name).attentions[0]
        for dtype, width in (("fp16", 64), ("bf16", 128)):
            runs += jobs(att, kernels, Target(90, dtype, width, ("fwd", "fwd_split"), paged=True))
    path = ROOT / "examples" / "specs" / "document.attn"
    mod = attnc.compile(path, cache_dir=tmp_path)
    att = compile_to_ir(path.read_text(), path.name).attentions[0]
    runs += jobs(att, _triton_kernels(mod.__file__, interpret=False), Target(90, "fp16", 64, varlen=True))
    reports = compile_reports(runs, max_workers=2, raise_on_error=False)
    failures = [str(r) for r in reports if isinstance(r, AOTCompileError)]
    assert not failures, "\n\n".join(failures)
    spilling = [
        f"{r.name} {r.config}: {r.spill_bytes} B"
        for r in reports
        if isinstance(r, KernelReport) and r.spill_bytes
    ]
    assert not spilling, "\n".join(spilling)
    assert len(reports) == 2 * 2 * 2 + 5
