"""attnc demo (`make demo`): compile every spec in examples/specs, run it on the CPU and check it against an
independent oracle: torch's scaled_dot_product_attention with an explicit mask/bias, or the paper's formula.

Prints, per spec: codegen time (spec -> imported module), the oracle used, and the max abs error in float64.
Exits non-zero if any spec disagrees with its oracle.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from attnc import codegen

SPECS = Path(__file__).resolve().parent / "specs"
B, H, G, M, N, D = 2, 4, 2, 23, 41, 16
T = torch.float64
gen = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=T)


I = torch.arange(N)[:, None]  # noqa: E741 - query positions (self-attention, M == N)
J = torch.arange(N)[None, :]


def sdpa(q, k, v, bias=None, mask=None, scale=None) -> torch.Tensor:
    """SDPA with GQA expanded by hand; rows with no visible key are set to 0 (SDPA gives NaN there)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    attn = torch.zeros(q.shape[2], k.shape[2], dtype=T) if bias is None else bias
    if mask is not None:
        attn = attn.masked_fill(~mask, -math.inf)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=scale)
    if mask is not None:
        dead = ~mask.expand(*o.shape[:3], k.shape[2]).any(-1, keepdim=True)
        o = o.masked_fill(dead, 0.0)
    return o


def linear(q, k, v, scores_mul, norm_eps=None) -> torch.Tensor:
    """Linear attention (Katharopoulos et al. 2020, eq. 2): o_i = sum_j s_ij v_j [/ (sum_j s_ij + eps)]."""
    s = (q @ k.transpose(-1, -2)) * scores_mul
    o = s @ v
    return o if norm_eps is None else o / (s.sum(-1, keepdim=True) + norm_eps)


def case(name: str) -> tuple[tuple, dict, Callable[[], torch.Tensor], str]:
    q, k, v = rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)
    s = D**-0.5
    causal = J <= I
    if name == "alibi":
        slopes = rand(H)
        return (q, k, v, slopes), {}, lambda: sdpa(q, k, v, slopes[:, None, None] * (J - I), causal), "sdpa"
    if name == "causal":
        return (q, k, v), {}, lambda: sdpa(q, k, v, mask=causal), "sdpa"
    if name == "sliding_window":
        kg, vg = rand(B, G, N, D), rand(B, G, N, D)
        return (q, kg, vg, 8), {}, lambda: sdpa(q, kg, vg, mask=causal & (I - J < 8)), "sdpa (GQA)"
    if name == "softcap":
        return (q, k, v, 5.0), {}, lambda: torch.softmax(5 * torch.tanh(q @ k.mT * s / 5), -1) @ v, "formula"
    if name == "document":
        doc = torch.randint(0, 3, (B, N), generator=gen).sort(-1).values.to(torch.int32)
        m = (doc[:, None, :, None] == doc[:, None, None, :]) & causal
        return (q, k, v, doc), {}, lambda: sdpa(q, k, v, mask=m), "sdpa"
    if name == "t5_bias":
        table = rand(H, 2 * 4 + 1)
        return (q, k, v, table, 4), {}, lambda: sdpa(q, k, v, table[:, (J - I).clamp(-4, 4) + 4]), "sdpa"
    if name == "sink":
        sinks = rand(H)

        def oracle() -> torch.Tensor:  # the sink is an extra logit with no value (gpt-oss / StreamingLLM)
            sc = (q @ k.mT * s).masked_fill(~causal, -math.inf)
            sc = torch.cat([sc, sinks[:, None, None].expand(B, H, N, 1)], -1)
            return torch.softmax(sc, -1)[..., :-1] @ v

        return (q, k, v, sinks), {}, oracle, "formula"
    if name == "sigmoid_attn":
        return (
            (q, k, v),
            {},
            lambda: torch.sigmoid(q @ k.mT * s - math.log(N)) @ v,
            "formula (Ramapuram et al.)",
        )
    if name == "moh_gate":
        gate = rand(B, H, N)
        return (q, k, v, gate), {}, lambda: sdpa(q, k, v, mask=causal) * gate[..., None], "sdpa * gate"
    if name == "lightning":
        decay = rand(H).abs()
        mul = torch.exp(-decay[:, None, None] * (I - J)) * causal
        return (q, k, v, decay), {}, lambda: linear(F.elu(q) + 1, F.elu(k) + 1, v, mul), "formula"
    if name == "linear_elu":
        return (q, k, v), {}, lambda: linear(F.elu(q) + 1, F.elu(k) + 1, v, causal, 1e-6), "formula"
    if name == "retention":  # RetNet eq. 5, run here through the chunked linear form
        gamma = 1 - rand(H).abs() * 0.05
        mul = s * gamma[:, None, None] ** (I - J).clamp(min=0) * causal
        return (
            (q, k, v, gamma),
            {"algorithm": "chunk"},
            lambda: linear(q, k, v, mul),
            "formula (chunked form)",
        )
    if name == "gated_linear":
        g = F.logsigmoid(rand(B, H, N) + 2).cumsum(-1)
        mul = s * torch.exp((g[..., :, None] - g[..., None, :]).masked_fill(~causal, -math.inf))
        return (q, k, v, g), {"algorithm": "chunk"}, lambda: linear(q, k, v, mul), "formula (chunked form)"
    if name == "linear_bidir":
        return (q, k, v), {}, lambda: linear(F.elu(q) + 1, F.elu(k) + 1, v, 1.0, 1e-6), "formula"
    if name == "decay_abs":
        decay = rand(H).abs()
        mul = s * torch.exp(-decay[:, None, None] * (I - J).abs())
        return (q, k, v, decay), {}, lambda: linear(q, k, v, mul), "formula (kept quadratic)"
    if name == "cross":
        qm, ve = rand(B, H, M, D), rand(B, H, N, 24)
        return (qm, k, ve), {}, lambda: sdpa(qm, k, ve), "sdpa"
    if name == "decode":
        qm, kg, vg = rand(B, H, M, D), rand(B, G, N, D), rand(B, G, N, D)
        m = torch.arange(N)[None, :] <= torch.arange(M)[:, None] + N - M
        return (qm, kg, vg), {}, lambda: sdpa(qm, kg, vg, mask=m), "sdpa (bottom-right, GQA)"
    if name == "key_padding":
        lens = torch.tensor([0, 17])  # batch 0 is all padding: fully masked rows
        m = (torch.arange(N)[None, :] < lens[:, None])[:, None, None, :]
        return (q, k, v, lens), {}, lambda: sdpa(q, k, v, mask=m), "sdpa (dead rows = 0)"
    if name == "prefix_lm":
        return (q, k, v, 6), {}, lambda: sdpa(q, k, v, mask=causal | (J < 6)), "sdpa"
    if name == "chunked_local":
        return (q, k, v, 8), {}, lambda: sdpa(q, k, v, mask=(I // 8 == J // 8) & causal), "sdpa"
    if name == "relpos_table":
        table, dist = rand(H, 5), torch.randint(0, 5, (B, N, N), generator=gen)
        bias = table[torch.arange(H)[None, :, None, None], dist[:, None]]
        return (q, k, v, table, dist), {}, lambda: sdpa(q, k, v, bias, causal), "sdpa"
    if name == "head_offset":
        off = rand(H, D)
        return (q, k, v, off), {}, lambda: sdpa(q, k, v, mask=causal) + off[None, :, None, :], "sdpa + offset"
    raise KeyError(name)


def main() -> int:
    failures = 0
    print(f"{'spec':16} {'codegen':>9}  {'oracle':28} {'max |err|':>10}")
    for path in sorted(SPECS.glob("*.attn")):
        t0 = time.perf_counter()
        mod = codegen.compile_file(path)
        ms = (time.perf_counter() - t0) * 1e3
        name = path.stem
        args, kwargs, oracle, what = case(name)
        err = (getattr(mod, name)(*args, **kwargs) - oracle()).abs().max().item()
        ok = err < 1e-9
        failures += not ok
        print(f"{name:16} {ms:7.1f}ms  {what:28} {err:10.2e} {'ok' if ok else 'MISMATCH'}")
    print("all specs match their oracles" if not failures else f"{failures} spec(s) disagree")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
