"""The zoo's catalogue and layers: every layer runs forward and backward, and the layers that do more than
call one operator (BiFormer routing, Agent Attention, MoH routing, top-k retrieval, DARE target attention)
match implementations written here from their papers, using the layer's own weights."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from attnc.zoo import layers as L
from attnc.zoo.layers.routing import retrieval_selection
from attnc.zoo.layers.softmax import alibi_slopes, moh_gates
from attnc.zoo.ops import SPEC_DIR
from torch import Tensor

from attnc import zoo

F64 = torch.float64


def test_list_names_every_variant_once_sorted() -> None:
    names = zoo.list()
    assert names == sorted(names) and len(set(names)) == len(names) == len(zoo.VARIANTS)
    assert {"causal", "alibi", "biformer", "agent", "neighborhood_2d", "target_attention"} <= set(names)
    assert zoo.list("routing") == ["biformer", "target_attention", "topk_retrieval"]
    assert zoo.list(zoo.Family.TWO_STAGE) == ["agent"]


def test_every_spec_file_belongs_to_a_variant() -> None:
    specs = {v.spec for v in zoo.VARIANTS}
    assert len(specs) == len(zoo.VARIANTS) and specs == {p.stem for p in SPEC_DIR.glob("*.attn")}
    for v in zoo.VARIANTS:
        assert v.spec_file.is_file() and zoo.get(v.name) is v.layer


def test_unknown_variant_suggests_a_name() -> None:
    with pytest.raises(KeyError, match="did you mean 'alibi'"):
        zoo.get("albi")


@pytest.mark.parametrize("name", zoo.list())
def test_layer_docstring_cites_a_paper(name: str) -> None:
    doc = zoo.get(name).__doc__ or ""
    assert re.search(r"(19|20)\d\d", doc), f"{name}: the layer docstring cites no paper"
    assert re.search(r"(19|20)\d\d", zoo.variant(name).paper)


def _context(name: str, B: int, N: int, grid: tuple[int, int]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {
        "neighborhood_2d": {"grid": grid},
        "neighborhood_2d_dilated": {"grid": grid},
        "biformer": {"grid": grid},
        "agent": {"grid": grid},
        "image_reweight": {"is_image": torch.arange(N).expand(B, N) < N // 2},
        "mixformer": {"templates": 4},
        "segment_isolation": {"seg": torch.randint(0, 3, (B, N), generator=g)},
    }.get(name, {})


_KWARGS: dict[str, dict[str, Any]] = {
    "neighborhood_1d": {"kernel_size": 3},
    "neighborhood_2d": {"kernel_size": 3},
    "neighborhood_2d_dilated": {"kernel_size": 3, "dilation": 2},
    "biformer": {"regions": 2, "top_k": 2},
    "agent": {"agents": 4},
    "sliding_window": {"window": 4},
    "streaming_llm": {"sink_tokens": 2, "window": 4},
    "topk_retrieval": {"block": 4, "top_k": 1, "window": 4},
    "moh": {"shared_heads": 1, "top_k": 2},
}


# The linear family's layers are tested in test_zoo_linear.py.
SELF_ATTENTION = [
    v.name for v in zoo.VARIANTS if v.family is not zoo.Family.LINEAR and v.name != "target_attention"
]


@pytest.mark.parametrize("name", sorted(SELF_ATTENTION))
def test_layer_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    B, grid = 2, (6, 6)
    N = grid[0] * grid[1]
    kv_heads = 4 if name == "agent" else 2
    layer = zoo.get(name)(32, 4, kv_heads=kv_heads, **_KWARGS.get(name, {}))
    x = torch.randn(B, N, 32, requires_grad=True)
    y = layer(x, **_context(name, B, N, grid))
    assert y.shape == x.shape and y.isfinite().all()
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), f"{name}: no gradient for {pname}"


def test_layers_reject_unknown_arguments() -> None:
    with pytest.raises(TypeError):
        L.CausalAttention(16, 2)(torch.randn(1, 4, 16), doc=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(TypeError):
        L.AgentAttention(16, 2, agents=4)(torch.randn(1, 16, 16), grid=(4, 4), rope=None)


def test_neighbourhood_layers_refuse_windows_larger_than_the_input() -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        L.Neighborhood1DAttention(16, 2, kernel_size=5, dilation=2)(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="dilated window"):
        L.DilatedNeighborhood2DAttention(16, 2, kernel_size=3, dilation=2)(
            torch.randn(1, 20, 16), grid=(4, 5)
        )


def test_alibi_slopes_are_the_papers() -> None:
    """Press et al. sec. 3: for 8 heads the slopes are 1/2, 1/4, ..., 1/256."""
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0**-k for k in range(1, 9)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([2.0**-k for k in (2, 4, 6, 8)]))
    assert alibi_slopes(6).shape == (6,)


def test_moh_gates_keep_shared_plus_top_k_heads() -> None:
    """MoH eq. 5-6: shared heads always on with weights alpha1 * softmax, exactly top-k routed heads on with
    alpha2 * (their softmax over all routed heads), [alpha1, alpha2] = softmax(mix logits)."""
    g = torch.Generator().manual_seed(0)
    shared, routed, mix = (
        torch.randn(3, 5, 2, generator=g),
        torch.randn(3, 5, 6, generator=g),
        torch.randn(3, 5, 2, generator=g),
    )
    gates = moh_gates(shared, routed, mix, 3)
    alpha = mix.softmax(-1)
    torch.testing.assert_close(gates[..., :2], alpha[..., :1] * shared.softmax(-1))
    p = routed.softmax(-1)
    kth = p.sort(-1, descending=True).values[..., 2:3]
    torch.testing.assert_close(gates[..., 2:], torch.where(p >= kth, alpha[..., 1:] * p, torch.zeros(())))
    assert gates.shape == (3, 5, 8)
    assert (gates[..., :2] > 0).all()
    assert ((gates[..., 2:] > 0).sum(-1) == 3).all()


def test_retrieval_selects_only_complete_past_blocks() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 1, 23, 8, generator=g)
    sel = retrieval_selection(q, k, block=4, top_k=2)
    assert sel.shape == (1, 2, 3, 6)
    for r, pos in enumerate(range(20, 23)):
        chosen = sel[0, :, r].nonzero()[:, 1]
        assert ((chosen + 1) * 4 - 1 <= pos).all() and (sel[0, :, r].sum(-1) <= 2).all()
    # The top-scoring complete block is the one with the largest q . mean(k).
    means = k[0, 0, :20].view(5, 4, 8).mean(1)
    best = (q[0, 0, 0] @ means.T).argmax()
    assert sel[0, 0, 0, best]


def test_biformer_matches_gather_implementation() -> None:
    """Zhu et al. 2023 sec. 3.2 written out: partition into regions, region-level mean queries/keys (eq. 2),
    top-k routing (eq. 3), gather the routed regions' keys/values and attend (eq. 4), plus LCE(V)."""
    torch.manual_seed(0)
    S, topk, rows, width, C, H = 2, 2, 4, 6, 16, 2
    layer = L.BiFormerAttention(C, H, regions=S, top_k=topk).double()
    x = torch.randn(2, rows * width, C, dtype=F64)
    got = layer(x, grid=(rows, width))

    img = x.view(2, rows, width, C)
    rh, rw = rows // S, width // S
    regions = img.view(2, S, rh, S, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(2, S * S, rh * rw, C)
    q, k, v = layer.q_proj(regions), layer.k_proj(regions), layer.v_proj(regions)
    a_r = q.mean(2) @ k.mean(2).transpose(-1, -2)
    idx = a_r.topk(topk, dim=-1).indices  # [2, S*S, topk]
    out = torch.zeros_like(q)
    for b in range(2):
        for r in range(S * S):
            kg = torch.cat([k[b, t] for t in idx[b, r]])  # gathered routed tokens
            vg = torch.cat([v[b, t] for t in idx[b, r]])
            qh = q[b, r].view(-1, H, C // H).transpose(0, 1)
            kh, vh = (t.view(-1, H, C // H).transpose(0, 1) for t in (kg, vg))
            p = (qh @ kh.transpose(-1, -2) / math.sqrt(C // H)).softmax(-1)
            out[b, r] = (p @ vh).transpose(0, 1).reshape(-1, C)
    out_img = out.view(2, S, S, rh, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(2, rows, width, C)
    v_img = v.view(2, S, S, rh, rw, C).permute(0, 5, 1, 3, 2, 4).reshape(2, C, rows, width)
    lce = layer.lce(v_img).permute(0, 2, 3, 1)
    want = layer.out_proj((out_img + lce).reshape(2, rows * width, C))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_agent_attention_matches_paper_equations() -> None:
    """Han et al. 2024 eq. 3-5: O = sigma(Q A^T) sigma(A K^T) V + DWC(V), A = pool(Q), per head."""
    torch.manual_seed(0)
    rows, width, C, H = 4, 4, 16, 2
    layer = L.AgentAttention(C, H, agents=4).double()
    x = torch.randn(2, rows * width, C, dtype=F64)
    got = layer(x, grid=(rows, width))
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    a = F.avg_pool2d(q.transpose(1, 2).reshape(2, C, rows, width), 2).flatten(2).transpose(1, 2)  # 2x2 agents
    d = C // H

    def heads(t: Tensor) -> Tensor:
        return t.view(2, -1, H, d).transpose(1, 2)

    qh, kh, vh, ah = heads(q), heads(k), heads(v), heads(a)
    agent_v = (ah @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ vh
    o = (qh @ ah.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ agent_v
    o = o.transpose(1, 2).reshape(2, -1, C)
    dwc = F.conv2d(
        v.transpose(1, 2).reshape(2, C, rows, width), layer.dwc.weight, layer.dwc.bias, padding=1, groups=C
    )
    want = layer.out_proj(o + dwc.flatten(2).transpose(1, 2))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_target_attention_matches_masked_softmax_over_history() -> None:
    torch.manual_seed(0)
    layer = L.TargetAttention(att_dim=8, repr_dim=12, heads=2).double()
    target, hist_att, hist_repr = (
        torch.randn(3, 8, dtype=F64),
        torch.randn(3, 10, 8, dtype=F64),
        torch.randn(3, 10, 12, dtype=F64),
    )
    lens = torch.tensor([10, 4, 1])
    got = layer(target, hist_att, hist_repr, lens)
    for b in range(3):
        n = int(lens[b])
        q = layer.q_proj(target[b]).view(2, 1, 4)
        k = layer.k_proj(hist_att[b, :n]).view(n, 2, 4).transpose(0, 1)
        v = layer.v_proj(hist_repr[b, :n]).view(n, 2, 6).transpose(0, 1)
        p = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)
        want = layer.out_proj((p @ v).reshape(12))
        torch.testing.assert_close(got[b], want, atol=1e-10, rtol=1e-10)
    # The representation embeddings get no gradient through the scores, only through the values.
    hist_repr.requires_grad_()
    layer(target, hist_att, hist_repr, lens).sum().backward()
    assert hist_repr.grad is not None and (hist_repr.grad[1, 4:] == 0).all()


def test_perturbation_gradient_gives_an_ascent_direction() -> None:
    """Attention-AT: the gradient w.r.t. the logit perturbation points uphill for the loss."""
    torch.manual_seed(0)
    layer = L.PerturbedAttention(16, 2).double()
    x = torch.randn(1, 6, 16, dtype=F64)
    delta = torch.zeros(1, 2, 6, 6, dtype=F64, requires_grad=True)
    loss = layer(x, delta=delta).square().sum()
    (g,) = torch.autograd.grad(loss, [delta])
    step = 1e-3 * g / g.norm()
    assert layer(x, delta=step).square().sum() > loss
    assert torch.equal(layer(x), layer(x, delta=torch.zeros_like(delta)))


def test_layer_runs_the_triton_kernels() -> None:
    pytest.importorskip("triton")
    torch.manual_seed(0)
    layer = L.ALiBiAttention(32, 2, kv_heads=1)
    x = torch.randn(1, 12, 32)
    torch.testing.assert_close(
        layer(x, backend="triton"), layer(x, backend="reference"), atol=1e-5, rtol=1e-5
    )


def test_layer_forward_compiles_fullgraph() -> None:
    """After one eager call has generated the operator, torch.compile traces the layer without a break (the
    generated op is a custom op). Compiled *backward* is not covered: see docs/zoo.md."""
    torch.manual_seed(0)
    layer = L.MoHAttention(32, 4, kv_heads=2, shared_heads=1, top_k=2)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        eager = layer(x)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


def test_biformer_routes_through_the_block_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """With regions of whole kernel blocks (R = 64 tokens) the layer hands the routed regions to the kernels
    as a runtime block layout; the Triton result (visiting routed regions only) equals the reference."""
    from attnc.zoo import ops
    from attnc.zoo.layers.routing import BiFormerAttention

    torch.manual_seed(0)
    layer = BiFormerAttention(32, 2, regions=2, top_k=2)
    x = torch.randn(1, 256, 32)
    seen = []
    real = ops.Operator.__call__
    monkeypatch.setattr(
        ops.Operator, "__call__", lambda self, *a, **kw: seen.append(kw) or real(self, *a, **kw)
    )
    want = layer(x, grid=(16, 16), backend="reference")
    got = layer(x, grid=(16, 16), backend="triton")
    layout = seen[-1]["block_layout"]
    assert layout is not None and layout.q_block == layout.kv_block == 64
    assert layout.kv_indices.shape == (1, 1, 4, 2) and bool((layout.kv_counts == 2).all())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
