"""Packed variable-length batches of the linear family: `NAME_linear_varlen(q, k, v, *aux, cu_seqlens=...)`.

Oracles: separate per-sequence calls of the batched `NAME_linear` (reference backend, float64 where it matters),
and for retention the token-by-token recurrence S_t = γ S_{t−1} + k_t v_tᵀ, o_t = q_t S_t (RetNet eq. 1–2) written
here. Tolerances: float32 1e-4 relative to the output's scale (gradients 1e-4 likewise), float16 2e-2.
The Triton kernels run under the interpreter on CPU tensors.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import attnc

from .conftest import SPECS

os.environ.setdefault("TRITON_INTERPRET", "1")

LINEAR_SPECS = ("lightning", "retention", "linear_elu", "linear_bidir", "gated_linear")
NORM_SUM = {"linear_elu", "linear_bidir"}
CAUSAL = {"lightning", "retention", "linear_elu", "gated_linear", "gqa_lin"}
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}
D = E = 16

GQA_SPEC = """
attention gqa_lin(q: [B, H, N, D], k: [B, G, N, D], v: [B, G, N, E], decay: [H]) {
    feature q = elu(q) + 1
    feature k = elu(k) + 1
    score = dot(q, k) * exp(-decay[h] * (i - j))
    mask  = j <= i
    norm  = none
}
"""


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = {s: attnc.compile(str(SPECS / f"{s}.attn")) for s in LINEAR_SPECS}
    path = tmp_path_factory.mktemp("gqa") / "gqa_lin.attn"
    path.write_text(GQA_SPEC)
    out["gqa_lin"] = attnc.compile(str(path))
    return out


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(spec: str, lens: list[int], H: int, G: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = torch.randn(T, H, D, generator=gen).to(dtype)
    k = torch.randn(T, G, D, generator=gen).to(dtype)
    v = torch.randn(T, G, E, generator=gen).to(dtype)
    aux: list[torch.Tensor] = []
    if spec in ("lightning", "gqa_lin"):
        aux = [torch.rand(H, generator=gen) * 0.3]
    elif spec == "retention":
        aux = [1 - torch.rand(H, generator=gen) * 0.2]
    elif spec == "gated_linear":  # the cumulative log-decay, per sequence, packed [total, H]
        gates = F.logsigmoid(torch.randn(T, H, generator=gen) + 2)
        aux = [torch.cat([c.cumsum(0) for c in gates.split(lens)]) if T else gates]
    width = E + 1 if spec in NORM_SUM else E
    s0 = torch.rand(len(lens), H, D, width, generator=gen) * 0.1
    return q, k, v, aux, s0


def _per_sequence(mod, spec, q, k, v, aux, s0, lens, algorithm, kinds):
    """The oracle: the batched NAME_linear once per sequence ([1, H, n, ...]), states stacked."""
    lin = getattr(mod, f"{spec}_linear")
    outs, states, a = [], [], 0
    for s, n in enumerate(lens):
        if n == 0:
            states.append(s0[s])
            a += n
            continue
        one = [x[a : a + n].transpose(0, 1)[None] for x in (q, k, v)]
        one += [
            x[a : a + n].transpose(0, 1)[None] if kind == "tok" else x
            for x, kind in zip(aux, kinds, strict=True)
        ]
        o, st = lin(
            *one, algorithm=algorithm, backend="reference", initial_state=s0[s : s + 1], return_state=True
        )
        outs.append(o[0].transpose(0, 1))
        states.append(st[0])
        a += n
    return torch.cat(outs), torch.stack(states)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    scale = max(want.abs().max().item(), 1.0)
    assert (got.double() - want.double()).abs().max().item() <= tol * scale


CASES = [
    pytest.param(
        spec,
        alg,
        backend,
        lens,
        H,
        G,
        id=f"{spec}-{alg}-{backend}-lens{'_'.join(map(str, lens))}-H{H}G{G}-fp32",
    )
    for spec in (*LINEAR_SPECS, "gqa_lin")
    for alg in (("chunk", "recurrent") if spec in CAUSAL else ("chunk",))
    for backend in ("triton", "reference")
    for lens, H, G in (([0, 1, 37, 64, 5], 2, 2), ([70], 4, 4 if spec != "gqa_lin" else 2))
    if backend == "triton" or (alg == "chunk" and lens == [70])
]


@pytest.mark.parametrize(("spec", "algorithm", "backend", "lens", "H", "G"), CASES)
def test_varlen_matches_per_sequence_calls(modules, spec, algorithm, backend, lens, H, G) -> None:
    mod = modules[spec]
    q, k, v, aux, s0 = _inputs(spec, lens, H, G if spec == "gqa_lin" else H, torch.float32)
    kinds = ["tok" if spec == "gated_linear" else None for _ in aux]
    fn = getattr(mod, f"{spec}_linear_varlen")
    o, st = fn(
        q,
        k,
        v,
        *aux,
        cu_seqlens=_cu(lens),
        algorithm=algorithm,
        backend=backend,
        initial_state=s0,
        return_state=True,
    )
    want_o, want_st = _per_sequence(mod, spec, q, k, v, aux, s0, lens, algorithm, kinds)
    assert o.shape == (sum(lens), H, E) and st.shape == s0.shape
    _close(o, want_o, TOL[torch.float32])
    _close(st, want_st, TOL[torch.float32])
    # without a state, max_seqlen given (no host synchronisation on the triton path)
    o2 = fn(q, k, v, *aux, cu_seqlens=_cu(lens), max_seqlen=max(lens), algorithm=algorithm, backend=backend)
    s_zero = torch.zeros_like(s0)
    want_o2, _ = _per_sequence(mod, spec, q, k, v, aux, s_zero, lens, algorithm, kinds)
    _close(o2, want_o2, TOL[torch.float32])


@pytest.mark.parametrize("algorithm", ["chunk", "recurrent"])
def test_retention_varlen_matches_the_token_recurrence(modules, algorithm) -> None:
    lens = [0, 1, 37, 64, 5]
    H = 2
    q, k, v, (gamma,), s0 = _inputs("retention", lens, H, H, torch.float32, seed=3)
    o, st = modules["retention"].retention_linear_varlen(
        q, k, v, gamma, cu_seqlens=_cu(lens), algorithm=algorithm, initial_state=s0, return_state=True
    )
    want = torch.zeros(sum(lens), H, E, dtype=torch.float64)
    states = []
    a = 0
    for s, n in enumerate(lens):
        S = s0[s].double()
        for t in range(a, a + n):  # S_t = γ S_{t−1} + k_t v_tᵀ, o_t = (q_t D^-½) S_t
            S = gamma.double()[:, None, None] * S + k[t].double()[:, :, None] * v[t].double()[:, None, :]
            want[t] = torch.einsum("hd,hde->he", q[t].double() * D**-0.5, S)
        states.append(S)
        a += n
    _close(o, want, TOL[torch.float32])
    _close(st, torch.stack(states), TOL[torch.float32])


@pytest.mark.parametrize(
    ("spec", "algorithm"),
    [("gated_linear", "chunk"), ("gated_linear", "recurrent"), ("linear_elu", "chunk"), ("gqa_lin", "chunk")],
    ids=lambda x: x,
)
def test_varlen_gradients_match_per_sequence_calls(modules, spec, algorithm) -> None:
    lens = [0, 1, 37, 5] if spec != "gqa_lin" else [3, 40]
    H, G = (4, 2) if spec == "gqa_lin" else (2, 2)
    mod = modules[spec]
    q, k, v, aux, s0 = _inputs(spec, lens, H, G, torch.float32, seed=1)
    kinds = ["tok" if spec == "gated_linear" else None for _ in aux]
    leaves = [q, k, v, s0, *(aux if spec == "gated_linear" else [])]
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(sum(lens), H, E, generator=gen)
    ws = torch.randn(s0.shape, generator=gen)

    def grads(run):
        xs = [
            x.detach().double().requires_grad_(True) if run == "oracle" else x.detach().requires_grad_(True)
            for x in leaves
        ]
        qq, kk, vv, ss, *rest = xs
        aux_ = rest if spec == "gated_linear" else [a.double() if run == "oracle" else a for a in aux]
        if run == "oracle":
            o, st = _per_sequence(mod, spec, qq, kk, vv, aux_, ss, lens, algorithm, kinds)
        else:
            o, st = getattr(mod, f"{spec}_linear_varlen")(
                qq,
                kk,
                vv,
                *aux_,
                cu_seqlens=_cu(lens),
                algorithm=algorithm,
                initial_state=ss,
                return_state=True,
            )
        loss = (o * w.to(o.dtype)).sum() + (st * ws.to(st.dtype)).sum()
        return torch.autograd.grad(loss, xs)

    for got, want in zip(grads("triton"), grads("oracle"), strict=True):
        _close(got, want, TOL[torch.float32])


def test_varlen_fp16_forward(modules) -> None:
    lens = [0, 1, 37, 64, 5]
    q, k, v, aux, s0 = _inputs("lightning", lens, 2, 2, torch.float16)
    o = modules["lightning"].lightning_linear_varlen(q, k, v, *aux, cu_seqlens=_cu(lens))
    want, _ = _per_sequence(
        modules["lightning"],
        "lightning",
        q.float(),
        k.float(),
        v.float(),
        aux,
        torch.zeros_like(s0),
        lens,
        "chunk",
        [None],
    )
    assert o.dtype is torch.float16
    _close(o.float(), want, TOL[torch.float16])


def test_varlen_bad_inputs(modules) -> None:
    mod = modules["gated_linear"]
    lens = [3, 5]
    q, k, v, (g,), _ = _inputs("gated_linear", lens, 2, 2, torch.float32)
    fn = mod.gated_linear_linear_varlen
    with pytest.raises(ValueError, match="cu_seqlens: expected an int32 tensor"):
        fn(q, k, v, g, cu_seqlens=_cu(lens).long())
    with pytest.raises(
        ValueError, match="cu_seqlens: offsets must start at 0, never decrease and end at the packed length 8"
    ):
        fn(q, k, v, g, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"g: expected shape \[total, H\]"):
        fn(q, k, v, g[:, :1], cu_seqlens=_cu(lens))
    with pytest.raises(ValueError, match="initial_state"):
        fn(q, k, v, g, cu_seqlens=_cu(lens), initial_state=torch.zeros(3, 2, D, E))
    with pytest.raises(ValueError, match=r"gated_linear_varlen\(\.\.\., algorithm='parallel'\)"):
        fn(q, k, v, g, cu_seqlens=_cu(lens), algorithm="parallel")
