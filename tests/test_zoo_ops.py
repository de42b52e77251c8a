"""Every zoo operator against an implementation written here from its paper's equations.

For each variant the generated operator runs on the reference backend (float64, a moderate shape, tolerance
1e-9) and on the Triton backend under the interpreter (float32, the smallest shape, tolerances below), and its
output and the gradients of q, k, v and every float auxiliary tensor are compared with the oracle's
(float64 autograd). The oracles never use attnc: plain torch with explicit masks, biases, gathers, loops or
renormalised probabilities, or `scaled_dot_product_attention` with an explicit mask. Shapes cover GQA, MQA,
cross/decoding lengths (M < N) and odd sizes pairwise rather than as a cross product.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from attnc.zoo import ops
from torch import Tensor

from attnc import zoo

F64 = torch.float64
Args = dict[str, object]


@dataclass(frozen=True)
class Tol:
    atol: float  # relative to max(1, max |expected|)
    rtol: float


# float64 reference vs float64 oracle: only summation order differs. Triton fp32 (interpreter) vs the float64
# oracle: measured worst ~3e-6 forward, ~2e-5 on gradients.
TOL = {
    "reference": {"fwd": Tol(1e-9, 1e-9), "grad": Tol(1e-8, 1e-8)},
    "triton": {"fwd": Tol(5e-5, 5e-5), "grad": Tol(2e-4, 2e-4)},
}


def assert_close(actual: Tensor, expected: Tensor, tol: Tol, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected, actual = expected.detach().to(F64), actual.detach().to(F64)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, atol=tol.atol * scale, rtol=tol.rtol, msg=lambda m: f"{what}: {m}"
    )


# --------------------------------------------------------------------------------------------------------------
# Oracle building blocks (no attnc)


def expand_kv(t: Tensor, heads: int) -> Tensor:
    """GQA (Ainslie et al. 2023): query head h reads key/value head h // (H / G)."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def logits(a: Args) -> Tensor:
    q, k = a["q"], a["k"]
    assert isinstance(q, Tensor) and isinstance(k, Tensor)
    return q @ expand_kv(k, q.shape[1]).transpose(-1, -2) / math.sqrt(q.shape[-1])


def softmax_attend(a: Args, s: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Softmax over the allowed keys (every test row has at least one), then the weighted sum of values."""
    if allowed is not None:
        assert allowed.any(-1).all(), "oracle inputs must not have fully-masked rows"
        s = s.masked_fill(~allowed, float("-inf"))
    v = a["v"]
    assert isinstance(v, Tensor)
    return s.softmax(-1) @ expand_kv(v, s.shape[1])


def bottom_right_causal(M: int, N: int) -> Tensor:
    """The last M of N positions attend to themselves and the past: SDPA's is_causal shifted to the end."""
    return torch.ones(M, N, dtype=torch.bool).tril(diagonal=N - M)


def query_positions(M: int, N: int) -> Tensor:
    return torch.arange(N - M, N)


def t5_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5's unidirectional `_relative_position_bucket` (Raffel et al. 2020; the reference implementation)."""
    n = torch.clamp(-relative_position, min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return torch.where(is_small, n, large)


def natten_window_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    """NATTEN's `get_window_start` (Hassani et al., the CPU reference of neighbourhood attention)."""
    neighborhood_size = kernel_size // 2
    if dilation <= 1:
        return max(index - neighborhood_size, 0) + (index + neighborhood_size >= length) * (
            length - index - neighborhood_size - 1
        )
    ni = index - neighborhood_size * dilation
    if ni < 0:
        return index % dilation
    if index + neighborhood_size * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * neighborhood_size * dilation
        return a + imodd - kernel_size * dilation
    return ni


def natten_neighbours(index: int, length: int, kernel_size: int, dilation: int) -> list[int]:
    start = natten_window_start(index, length, kernel_size, dilation)
    return [start + t * dilation for t in range(kernel_size)]


# --------------------------------------------------------------------------------------------------------------
# Cases: inputs and oracles per variant


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    G: int
    M: int
    N: int
    D: int = 16

    @property
    def id(self) -> str:
        return f"B{self.B}-H{self.H}-G{self.G}-M{self.M}-N{self.N}-D{self.D}"


@dataclass(frozen=True)
class Case:
    name: str
    spec: str  # zoo/specs/<spec>.attn
    make_aux: Callable[[Shape, torch.Generator], Args]  # auxiliary inputs and scalars, in call order
    oracle: Callable[[Args], Tensor]
    ref_shape: Shape
    triton_shape: Shape
    softmax: bool = True
    op: str | None = None  # the attention block, when not named like the spec


def _rand(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def _no_aux(s: Shape, g: torch.Generator) -> Args:
    return {}


def _full(a: Args) -> Tensor:
    q, k, v = (a[n] for n in "qkv")
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # type: ignore[arg-type]


def _causal(a: Args) -> Tensor:
    q, k, v = (a[n] for n in "qkv")
    M, N = q.shape[2], k.shape[2]  # type: ignore[union-attr]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right_causal(M, N), enable_gqa=True)  # type: ignore[arg-type]


def _alibi(a: Args) -> Tensor:
    s = logits(a)
    M, N = s.shape[-2:]
    # Press et al. sec. 3: softmax(q_i K^T + m * [-(i-1), ..., -2, -1, 0]) over the causal keys.
    distance = query_positions(M, N)[:, None] - torch.arange(N)[None, :]
    bias = -a["slopes"][:, None, None] * distance  # type: ignore[index]
    return softmax_attend(a, s + bias, bottom_right_causal(M, N))


def _softcap(a: Args) -> Tensor:
    cap = a["cap"]
    s = logits(a)
    return softmax_attend(a, cap * torch.tanh(s / cap), bottom_right_causal(*s.shape[-2:]))  # type: ignore[operator]


def _sliding_window(a: Args) -> Tensor:
    s = logits(a)
    M, N = s.shape[-2:]
    W = int(a["W"])  # type: ignore[call-overload]
    band = bottom_right_causal(M, N) & ~torch.ones(M, N, dtype=torch.bool).tril(diagonal=N - M - W)
    return softmax_attend(a, s, band)


def _sink(a: Args) -> Tensor:
    # The sink is one more logit per head whose value vector is zero (Xiao et al. 2024 sec. 3.3).
    s = logits(a)
    B, H, M, N = s.shape
    s = s.masked_fill(~bottom_right_causal(M, N), float("-inf"))
    sink = a["sinks"][None, :, None, None].expand(B, H, M, 1)  # type: ignore[index]
    p = torch.cat([s, sink], dim=-1).softmax(-1)[..., :N]
    return p @ expand_kv(a["v"], H)  # type: ignore[arg-type]


def _streaming(a: Args) -> Tensor:
    s = logits(a)
    M, N = s.shape[-2:]
    S, W = int(a["S"]), int(a["W"])  # type: ignore[call-overload]
    allowed = torch.zeros(M, N, dtype=torch.bool)
    for r, pos in enumerate(query_positions(M, N).tolist()):
        keep = set(range(min(S, pos + 1))) | set(range(max(0, pos - W + 1), pos + 1))
        allowed[r, sorted(keep)] = True
    return softmax_attend(a, s, allowed)


def _renormalised(a: Args, column: str, factor: str) -> Tensor:
    """ACT (Yu et al. 2024 sec. 4): scale the attention probabilities of the marked columns by alpha[h],
    then renormalise each row, A'_ij = A_ij w_j / sum_k A_ik w_k."""
    s = logits(a)
    M, N = s.shape[-2:]
    p = s.masked_fill(~bottom_right_causal(M, N), float("-inf")).softmax(-1)
    marked = a[column][:, None, None, :]  # type: ignore[index]
    w = torch.where(marked, a[factor][None, :, None, None], torch.ones((), dtype=F64))  # type: ignore[index]
    p = p * w
    p = p / p.sum(-1, keepdim=True)
    return p @ expand_kv(a["v"], s.shape[1])  # type: ignore[arg-type]


def _t5(a: Args) -> Tensor:
    s = logits(a)
    M, N = s.shape[-2:]
    bias_table = a["bias"]
    relative = torch.arange(N)[None, :] - query_positions(M, N)[:, None]  # memory - context
    buckets = t5_bucket(relative, bias_table.shape[1], int(a["MAXD"]))  # type: ignore[union-attr, call-overload]
    bias = bias_table[:, buckets]  # type: ignore[index]
    return softmax_attend(a, s + bias, bottom_right_causal(M, N))


def _relpos_clipped(a: Args) -> Tensor:
    s = logits(a)
    M, N = s.shape[-2:]
    R = int(a["R"])  # type: ignore[call-overload]
    # Shaw et al. eq. 3: a_ij = w_clip(j - i, k); here one learned scalar per head and clipped distance.
    idx = (torch.arange(N)[None, :] - torch.arange(M)[:, None]).clamp(-R, R) + R
    return softmax_attend(a, s + a["table"][:, idx], None)  # type: ignore[index]


def _prefix_lm(a: Args) -> Tensor:
    s = logits(a)
    M, N = s.shape[-2:]
    P = int(a["P"])  # type: ignore[call-overload]
    allowed = bottom_right_causal(M, N).clone()
    allowed[:, :P] = True  # the prefix is visible to everyone
    return softmax_attend(a, s, allowed)


def _document(a: Args) -> Tensor:
    s = logits(a)
    M, N = s.shape[-2:]
    doc = a["doc"]
    same = doc[:, N - M :, None] == doc[:, None, :]  # type: ignore[index]
    return softmax_attend(a, s, (same & bottom_right_causal(M, N))[:, None])


def _neighbourhood_1d(a: Args) -> Tensor:
    s = logits(a)
    N = s.shape[-1]
    K, dil = int(a["K"]), int(a["dil"])  # type: ignore[call-overload]
    allowed = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        allowed[i, natten_neighbours(i, N, K, dil)] = True
    return softmax_attend(a, s, allowed)


def _neighbourhood_2d(a: Args) -> Tensor:
    s = logits(a)
    N = s.shape[-1]
    width = int(a["width"])  # type: ignore[call-overload]
    rows = N // width
    allowed = torch.zeros(N, N, dtype=torch.bool)
    for y in range(rows):
        for x in range(width):
            ys = natten_neighbours(y, rows, int(a["KH"]), int(a.get("DH", 1)))  # type: ignore[call-overload]
            xs = natten_neighbours(x, width, int(a["KW"]), int(a.get("DW", 1)))  # type: ignore[call-overload]
            for yy in ys:
                allowed[y * width + x, [yy * width + xx for xx in xs]] = True
    return softmax_attend(a, s, allowed)


def _mixformer(a: Args) -> Tensor:
    s = logits(a)
    N = s.shape[-1]
    T = int(a["T"])  # type: ignore[call-overload]
    allowed = torch.ones(N, N, dtype=torch.bool)
    allowed[:T, T:] = False  # templates do not see the search region (Cui et al. 2022 fig. 2)
    return softmax_attend(a, s, allowed)


def _segments(a: Args) -> Tensor:
    s = logits(a)
    seg = a["seg"]
    B, N = seg.shape  # type: ignore[union-attr]
    allowed = torch.zeros(B, N, N, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            mine = int(seg[b, i])  # type: ignore[index]
            allowed[b, i] = (seg[b] == mine) | (seg[b] == 0)  # type: ignore[index]
    return softmax_attend(a, s, allowed[:, None])


def _sigmoid(a: Args) -> Tensor:
    s = logits(a)
    M, N = s.shape[-2:]
    # Ramapuram et al. eq. 2: SigmoidAttn(X) = sigma(Q K^T / sqrt(d) + b) V, here restricted to the causal keys.
    w = torch.sigmoid(s + a["offset"]) * bottom_right_causal(M, N)  # type: ignore[operator]
    return w @ expand_kv(a["v"], s.shape[1])  # type: ignore[arg-type]


def _moh(a: Args) -> Tensor:
    return _causal(a) * a["gate"][..., None]  # type: ignore[index]


def _lofit(a: Args) -> Tensor:
    return _causal(a) + a["offset"][None, :, None, :]  # type: ignore[index]


def _perturbation(a: Args) -> Tensor:
    return softmax_attend(a, logits(a) + a["eps"], None)  # type: ignore[operator]


def _biformer(a: Args) -> Tensor:
    """Zhu et al. 2023 eq. 4: gather the key/value tokens of each region's routed regions, then attend."""
    q, k, v, route = a["q"], a["k"], a["v"], a["route"]
    R = int(a["R"])  # type: ignore[call-overload]
    B, H, N, _ = q.shape  # type: ignore[union-attr]
    k, v = expand_kv(k, H), expand_kv(v, H)  # type: ignore[arg-type]
    out = torch.zeros(B, H, N, v.shape[-1], dtype=F64)
    for b in range(B):
        for r in range(N // R):
            keys = torch.cat(
                [torch.arange(t * R, (t + 1) * R) for t in route[b, r].nonzero().flatten().tolist()]
            )  # type: ignore[index]
            rows = slice(r * R, (r + 1) * R)
            p = (q[b, :, rows] @ k[b][:, keys].transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # type: ignore[index, union-attr]
            out[b, :, rows] = p @ v[b][:, keys]
    return out


def _topk_retrieval(a: Args) -> Tensor:
    """Each query attends to the tokens of its retrieved blocks and of the local window, causally."""
    q, k, v, sel = a["q"], a["k"], a["v"], a["sel"]
    L, W = int(a["L"]), int(a["W"])  # type: ignore[call-overload]
    B, H, M, _ = q.shape  # type: ignore[union-attr]
    N = k.shape[2]  # type: ignore[union-attr]
    k, v = expand_kv(k, H), expand_kv(v, H)  # type: ignore[arg-type]
    out = torch.zeros(B, H, M, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(H):
            for r, pos in enumerate(query_positions(M, N).tolist()):
                keys = set(range(max(0, pos - W + 1), pos + 1))
                for blk in sel[b, h, r].nonzero().flatten().tolist():  # type: ignore[index]
                    keys |= {j for j in range(blk * L, min(N, (blk + 1) * L)) if j <= pos}
                idx = torch.tensor(sorted(keys))
                p = (q[b, h, r] @ k[b, h, idx].T / math.sqrt(q.shape[-1])).softmax(-1)  # type: ignore[index, union-attr]
                out[b, h, r] = p @ v[b, h, idx]
    return out


def _target(a: Args) -> Tensor:
    """Target attention over each user's valid history: softmax(q K[:len]^T / sqrt(d)) V[:len]."""
    q, k, v, lens = a["q"], a["k"], a["v"], a["lens"]
    out = []
    for b in range(q.shape[0]):  # type: ignore[union-attr]
        n = int(lens[b])  # type: ignore[index]
        out.append(F.scaled_dot_product_attention(q[b], k[b, :, :n], v[b, :, :n]))  # type: ignore[index]
    return torch.stack(out)


def _aux_alibi(s: Shape, g: torch.Generator) -> Args:
    return {"slopes": torch.rand(s.H, generator=g, dtype=F64)}


def _aux_calibration(s: Shape, g: torch.Generator) -> Args:
    marked = torch.rand(s.B, s.N, generator=g) < 0.3
    marked[:, 0] = True
    return {"alpha": 0.2 + torch.rand(s.H, generator=g, dtype=F64), "is_sink": marked}


def _aux_image(s: Shape, g: torch.Generator) -> Args:
    image = torch.zeros(s.B, s.N, dtype=torch.bool)
    image[:, 2 : 2 + s.N // 2] = True
    return {"weight": 0.3 + 2 * torch.rand(s.H, generator=g, dtype=F64), "is_image": image}


def _aux_document(s: Shape, g: torch.Generator) -> Args:
    lengths = torch.randint(1, max(2, s.N // 3), (s.B, s.N), generator=g)
    doc = torch.stack([torch.repeat_interleave(torch.arange(s.N), lengths[b])[: s.N] for b in range(s.B)])
    return {"doc": doc.to(torch.int32)}


def _aux_segments(s: Shape, g: torch.Generator) -> Args:
    return {"seg": torch.randint(0, 3, (s.B, s.N), generator=g)}


def _aux_route(s: Shape, g: torch.Generator, regions: int = 4, top_k: int = 2) -> Args:
    scores = torch.rand(s.B, regions, regions, generator=g)
    route = torch.zeros(s.B, regions, regions, dtype=torch.bool).scatter(
        -1, scores.topk(top_k, -1).indices, True
    )
    return {"route": route, "R": s.N // regions}


def _aux_topk(s: Shape, g: torch.Generator, L: int = 8, top_k: int = 2) -> Args:
    nb = -(-s.N // L)
    scores = torch.rand(s.B, s.H, s.M, nb, generator=g)
    sel = torch.zeros(s.B, s.H, s.M, nb, dtype=torch.bool).scatter(-1, scores.topk(top_k, -1).indices, True)
    return {"sel": sel, "L": L, "W": 5}


# Reference shapes: moderate, with GQA/MQA and M < N where the spec allows; Triton shapes: the smallest.
REF_SQ = Shape(2, 4, 2, 37, 37)
TRI_SQ = Shape(1, 2, 1, 24, 24)
REF_DEC = Shape(2, 4, 1, 5, 41)  # MQA, decoding five tokens against 41 keys (bottom-right)
TRI_DEC = Shape(1, 2, 2, 1, 29)

CASES: list[Case] = [
    Case("full", "full", _no_aux, _full, Shape(2, 4, 2, 19, 33, D=24), Shape(1, 2, 1, 9, 17)),
    Case("causal", "causal", _no_aux, _causal, REF_DEC, TRI_DEC),
    Case("alibi", "alibi", _aux_alibi, _alibi, REF_SQ, TRI_DEC),
    Case("softcap", "softcap", lambda s, g: {"cap": 0.7}, _softcap, REF_DEC, TRI_SQ),
    Case("sliding_window", "sliding_window", lambda s, g: {"W": 6}, _sliding_window, REF_DEC, TRI_SQ),
    Case("sink", "sink", lambda s, g: {"sinks": _rand(g, s.H)}, _sink, REF_SQ, TRI_DEC),
    Case("streaming_llm", "streaming_llm", lambda s, g: {"S": 3, "W": 5}, _streaming, REF_DEC, TRI_SQ),
    Case("calibration", "calibration", _aux_calibration, lambda a: _renormalised(a, "is_sink", "alpha"), REF_SQ, TRI_SQ),
    Case("image_reweight", "image_reweight", _aux_image, lambda a: _renormalised(a, "is_image", "weight"), REF_DEC, TRI_SQ),
    Case("t5_bias", "t5_bias", lambda s, g: {"bias": _rand(g, s.H, 8), "MAXD": 20}, _t5, Shape(2, 4, 2, 40, 40), Shape(1, 2, 1, 30, 30)),
    Case("relpos_clipped", "relpos_clipped", lambda s, g: {"table": _rand(g, s.H, 2 * 5 + 1), "R": 5}, _relpos_clipped, Shape(2, 4, 4, 17, 29), TRI_SQ),
    Case("prefix_lm", "prefix_lm", lambda s, g: {"P": 7}, _prefix_lm, REF_SQ, TRI_SQ),
    Case("document", "document", _aux_document, _document, REF_DEC, TRI_SQ),
    Case("neighborhood_1d", "neighborhood_1d", lambda s, g: {"K": 5, "dil": 1}, _neighbourhood_1d, REF_SQ, TRI_SQ),
    Case("neighborhood_1d_dilated", "neighborhood_1d", lambda s, g: {"K": 3, "dil": 3}, _neighbourhood_1d, Shape(1, 2, 1, 31, 31), TRI_SQ),
    Case("neighborhood_2d", "neighborhood_2d", lambda s, g: {"width": 6, "KH": 3, "KW": 5}, _neighbourhood_2d, Shape(2, 4, 2, 42, 42), TRI_SQ),
    Case("neighborhood_2d_dilated", "neighborhood_2d_dilated", lambda s, g: {"width": 8, "KH": 3, "KW": 3, "DH": 2, "DW": 2}, _neighbourhood_2d, Shape(1, 2, 2, 56, 56), Shape(1, 2, 1, 48, 48)),
    Case("mixformer", "mixformer", lambda s, g: {"T": 9}, _mixformer, REF_SQ, TRI_SQ),
    Case("segment_isolation", "segment_isolation", _aux_segments, _segments, REF_SQ, TRI_SQ),
    Case("sigmoid", "sigmoid_attn", lambda s, g: {"offset": -math.log(64)}, _sigmoid, REF_DEC, TRI_SQ, softmax=False),
    Case("moh", "moh", lambda s, g: {"gate": torch.rand(s.B, s.H, s.M, generator=g, dtype=F64)}, _moh, REF_DEC, TRI_SQ),
    Case("lofit", "lofit", lambda s, g: {"offset": _rand(g, s.H, s.D)}, _lofit, REF_SQ, TRI_DEC),
    Case("perturbation", "perturbation", lambda s, g: {"eps": _rand(g, s.B, s.H, s.M, s.N)}, _perturbation, Shape(2, 4, 2, 13, 27), Shape(1, 2, 1, 9, 17)),
    Case("biformer", "biformer", _aux_route, _biformer, Shape(2, 4, 2, 32, 32), Shape(1, 2, 1, 32, 32)),
    Case("topk_retrieval", "topk_retrieval", _aux_topk, _topk_retrieval, Shape(2, 4, 2, 3, 45), Shape(1, 2, 1, 1, 37)),
    Case("target_attention", "target_attention", lambda s, g: {"lens": torch.tensor([s.N, 5][: s.B])}, _target, Shape(2, 2, 2, 1, 40), Shape(1, 2, 2, 1, 33)),
    Case("agent_aggregate", "agent", _no_aux, _full, Shape(2, 4, 4, 4, 36), Shape(1, 2, 2, 4, 16), op="agent_aggregate"),
    Case("agent_broadcast", "agent", _no_aux, _full, Shape(2, 4, 4, 36, 9), Shape(1, 2, 2, 16, 4), op="agent_broadcast"),
]  # fmt: skip


def make_args(case: Case, shape: Shape, dtype: torch.dtype) -> tuple[Args, Args]:
    """(inputs for the operator in `dtype`, the same values in float64 for the oracle), float leaves."""
    g = torch.Generator().manual_seed(0)
    base: Args = {
        "q": _rand(g, shape.B, shape.H, shape.M, shape.D),
        "k": _rand(g, shape.B, shape.G, shape.N, shape.D),
        "v": _rand(g, shape.B, shape.G, shape.N, shape.D),
        **case.make_aux(shape, g),
    }
    rounded = {
        n: x.to(dtype).to(F64) if isinstance(x, Tensor) and x.is_floating_point() else x
        for n, x in base.items()
    }

    def leaves(d: torch.dtype) -> Args:
        out: Args = {}
        for n, x in rounded.items():
            if isinstance(x, Tensor) and x.is_floating_point():
                x = x.to(d).requires_grad_()
            out[n] = x
        return out

    return leaves(dtype), leaves(F64)


def float_leaves(args: Args) -> list[str]:
    return [n for n, x in args.items() if isinstance(x, Tensor) and x.requires_grad]


def _params() -> list[object]:
    out = []
    for case in CASES:
        name = case.name
        out.append(pytest.param(case, "reference", id=f"{name}-reference-fp64-{case.ref_shape.id}"))
        # Planning this spec's Triton tiles takes about a minute (docs/zoo.md): run with -m slow.
        marks = [pytest.mark.slow] if case.spec == "neighborhood_2d_dilated" else []
        out.append(pytest.param(case, "triton", id=f"{name}-triton-fp32-{case.triton_shape.id}", marks=marks))
    return out


@pytest.mark.parametrize(("case", "backend"), _params())
def test_operator_matches_paper(case: Case, backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    shape, dtype = (case.ref_shape, F64) if backend == "reference" else (case.triton_shape, torch.float32)
    args, ref = make_args(case, shape, dtype)
    fn = ops.op(case.spec, case.op)
    o = fn(*args.values(), backend=backend)
    expected = case.oracle(ref)
    tol = TOL[backend]
    assert o.dtype == dtype and o.isfinite().all()
    assert_close(o, expected, tol["fwd"], f"{case.name} forward")
    names = float_leaves(args)
    weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = torch.autograd.grad((o * weights.to(dtype)).sum(), [args[n] for n in names])  # type: ignore[misc]
    want = torch.autograd.grad((expected * weights).sum(), [ref[n] for n in names])  # type: ignore[misc]
    for n, g_, w in zip(names, got, want, strict=True):
        assert g_.isfinite().all(), f"{case.name}: non-finite d{n}"
        assert_close(g_, w, tol["grad"], f"{case.name} d{n}")
    if case.softmax and backend == "reference":
        _, lse = fn(*args.values(), backend=backend, return_lse=True)
        assert lse.shape == o.shape[:-1] and lse.isfinite().all()


def test_every_zoo_spec_has_an_operator_test() -> None:
    """Every softmax / routing / two-stage variant (the linear family is tested in test_zoo_linear.py)."""
    tested = {c.spec for c in CASES}
    assert tested == {v.spec for v in zoo.VARIANTS if v.family is not zoo.Family.LINEAR}
    assert {c.op for c in CASES if c.spec == "agent"} == {"agent_aggregate", "agent_broadcast"}


def test_natten_oracle_matches_the_papers_window_rule() -> None:
    """The oracle's window: kernel_size keys, centred where it fits, shifted at the borders, same residue."""
    assert natten_neighbours(0, 10, 3, 1) == [0, 1, 2]
    assert natten_neighbours(5, 10, 3, 1) == [4, 5, 6]
    assert natten_neighbours(9, 10, 3, 1) == [7, 8, 9]
    assert natten_neighbours(1, 12, 3, 2) == [1, 3, 5]
    assert natten_neighbours(10, 12, 3, 2) == [6, 8, 10]
    for n, ksz, dil in [(31, 3, 3), (12, 3, 2), (13, 5, 2)]:
        for i in range(n):
            nb = natten_neighbours(i, n, ksz, dil)
            assert i in nb and len(set(nb)) == ksz and all(0 <= j < n and j % dil == i % dil for j in nb), (
                i,
                nb,
            )
