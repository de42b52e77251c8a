"""One strategy per norm kind: what each normalisation contributes to the kernels.

A kernel asks its attention's strategy instead of branching on the norm:
- `update`: the forward's per-tile step, from the score tile `s` (with `valid`) and the value tile `v` to the
  running statistics `m_i`, `l_i` and the accumulator `acc` (FlashAttention-2's online softmax, Alg. 1). It
  places the value tile's load (`load_v`) right before the second product, after the weights: loaded before
  them, the tile is held in registers across the softmax (sm_90, 128 x 128 tiles at D = 64 on 4 warps: 32
  registers a thread, 672 spill bytes; placed late, it streams from shared memory into the wgmma);
- `finish`: from the statistics of a whole key range to `o` and the row statistic `stat` saved for the
  backward (the softmax's log-sum-exp, the sum's normaliser); the sink logit joins here, once;
- `partial` and `merge`: a split-KV partial of a key range and how the combine folds partials (FlashDecoding);
- `weights`, `dscore`, `row_extras`, `dot_type`, `dv_weights`: the backward's p, dS, extra row values and the
  operand type of its products.

Statements are built from templates (`codegen.emit.statement_from_string`); expressions of the spec (bias, sink,
eps) come from the kernel writer (`w.expr`), so uniform sub-expressions stay hoisted once per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnc.dsl.ir import Attention, NormKind
from attnc.dsl.scope import Root

from ..emit import statement_from_string as S

if TYPE_CHECKING:
    import ast

    from .kernels import KernelWriter

LOG2E = 1.4426950408889634
_L2E = repr(LOG2E)


class NormStrategy:
    """The plain sums Σ p·v of the unnormalised norms (none), shared by the others where they agree."""

    kind: NormKind = NormKind.NONE
    dot_type = "q.dtype"  # the backward's product operands: the input dtype (tensor cores, few registers)
    dv_weights = "p"  # dV = (weights)ᵀ dO
    row_extra_names: tuple[str, ...] = ()  # what `row_extras` defines

    def __init__(self, att: Attention) -> None:
        self.att = att

    # ---- forward ------------------------------------------------------------------------------------------

    def weights_fwd(self, w: KernelWriter, L: list[ast.stmt]) -> None:
        L += S("p = s")

    def update(self, w: KernelWriter, L: list[ast.stmt], load_v: list[ast.stmt]) -> None:
        self.weights_fwd(w, L)
        L += load_v
        # Unnormalised weights can be large: keep them in float32 for the second product.
        L += S("acc += tl.dot(p, v.to(tl.float32), input_precision=_DOT_PRECISION)")

    def finish(self, w: KernelWriter, L: list[ast.stmt]) -> None:
        L += S("o = acc\nstat = l_i")

    def partial(self, L: list[ast.stmt]) -> None:
        L += S("o_s = acc\nl_s = l_i")

    def merge(self, L: list[ast.stmt]) -> None:
        L += S(
            """
            l_i += tl.load(_LPART + part, mask=i < _M, other=0.0)
            acc += o_s
            """
        )

    # ---- backward -----------------------------------------------------------------------------------------

    def row_extras(self, L: list[ast.stmt]) -> None:
        """Values per row that the backward's loop reads besides stat and delta."""

    def weights(self, w: KernelWriter, L: list[ast.stmt]) -> None:
        """p: the weight of each (i, j) in o_i = Σ_j p_ij v_j, recomputed from the forward's row statistics."""
        L += S("p = s")

    def dscore(self, L: list[ast.stmt]) -> None:
        """ds = ∂loss/∂s from p, dp = dO·vᵀ and the row statistics."""
        L += S("ds = tl.where(valid, dp, 0.0)")


class NoNorm(NormStrategy):
    kind = NormKind.NONE
    # Unnormalised weights (norm = none) can exceed float16: the backward's products stay in float32.
    dot_type = "tl.float32"


class SumNorm(NormStrategy):
    """o = Σ s·v / (Σ s + eps)."""

    kind = NormKind.SUM
    dv_weights = "p * stat_inv"  # p is scaled by the row normaliser (o = Σ p v / stat)
    row_extra_names = ("stat_inv",)

    def update(self, w: KernelWriter, L: list[ast.stmt], load_v: list[ast.stmt]) -> None:
        self.weights_fwd(w, L)
        L += S("l_i += tl.reduce(p, 1, tl.standard._sum_combine, keep_dims=True)")
        L += load_v
        L += S("acc += tl.dot(p, v.to(tl.float32), input_precision=_DOT_PRECISION)")

    def finish(self, w: KernelWriter, L: list[ast.stmt]) -> None:
        eps = "0.0" if self.att.norm.eps is None else w.expr(self.att.norm.eps, w.row_names(Root.EPS), L)
        L += S(
            """
            stat = l_i + {eps}
            alive = stat != 0
            o = tl.where(alive, acc / tl.where(alive, stat, 1.0), 0.0)
            """,
            eps=eps,
        )

    def row_extras(self, L: list[ast.stmt]) -> None:
        # The reciprocal once per row, multiplied per element: an IEEE division per (i, j) held registers
        # (linear_bidir's dQ, sm_90, fp16, D = 64: 128 with the division, 125 without).
        L += S("stat_inv = 1.0 / tl.where(stat != 0, stat, 1.0)")

    def dscore(self, L: list[ast.stmt]) -> None:
        L += S("ds = tl.where(valid, (dp - delta) * stat_inv, 0.0)")


class SigmoidNorm(NormStrategy):
    """o = Σ sigmoid(s + bias)·v (Ramapuram et al., 2024)."""

    kind = NormKind.SIGMOID

    def weights_fwd(self, w: KernelWriter, L: list[ast.stmt]) -> None:
        self.weights(w, L)

    def weights(self, w: KernelWriter, L: list[ast.stmt]) -> None:
        bias = "0.0" if self.att.norm.bias is None else w.expr(self.att.norm.bias, w.pair_names(Root.BIAS), L)
        L += S("p = tl.where(valid, 1.0 / (1.0 + tl.exp(-(s + {bias}))), 0.0)", bias=bias)

    def dscore(self, L: list[ast.stmt]) -> None:
        L += S("ds = tl.where(valid, dp * p * (1.0 - p), 0.0)")


class SoftmaxNorm(NormStrategy):
    """The online softmax in base 2, log2(e) folded into the score (FlashAttention-2, Alg. 1): the kernels
    evaluate `s2`, the score times log2(e), directly."""

    kind = NormKind.SOFTMAX
    row_extra_names = ("stat2",)

    def update(self, w: KernelWriter, L: list[ast.stmt], load_v: list[ast.stmt]) -> None:
        L += S(
            """
            m_new = tl.maximum(m_i, tl.reduce(s2, 1, tl.standard._elementwise_max, keep_dims=True))
            m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s2 - m_safe)
            l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine, keep_dims=True)
            """
        )
        L += load_v
        L += S(
            """
            acc = acc * alpha + tl.dot(p.to(v.dtype), v, input_precision=_DOT_PRECISION)
            m_i = m_new
            """
        )

    def sink(self, w: KernelWriter, L: list[ast.stmt]) -> None:
        """The sink logit: one more column of the softmax, with no value (it only takes weight)."""

    def finish(self, w: KernelWriter, L: list[ast.stmt]) -> None:
        # A row is empty only when no key took weight (l = 0: o = 0, LSE = -inf). A NaN or ±Inf score makes
        # l (or m) NaN: the test is `l == 0`, not `l > 0`, so that NaN reaches o and the LSE as on the
        # reference instead of turning into a plausible empty row.
        self.sink(w, L)
        L += S(
            f"""
            m_safe = tl.where(m_i == float('-inf'), 0.0, m_i)
            dead = l_i == 0
            o = tl.where(dead, 0.0, acc / tl.where(dead, 1.0, l_i))
            stat = tl.where(dead, float('-inf'), (m_safe + tl.log2(tl.where(dead, 1.0, l_i))) / {_L2E})
            """
        )

    def partial(self, L: list[ast.stmt]) -> None:
        """The normalised o_s = acc_s / l_s and lse2_s = m_s + log2(l_s) (-inf: no visible key)."""
        L += S(
            """
            dead = l_i == 0
            m_safe = tl.where(m_i == float('-inf'), 0.0, m_i)
            o_s = tl.where(dead, 0.0, acc / tl.where(dead, 1.0, l_i))
            l_s = tl.where(dead, float('-inf'), m_safe + tl.log2(tl.where(dead, 1.0, l_i)))
            """
        )

    def merge(self, L: list[ast.stmt]) -> None:
        """Log-sum-exp weighting: m = max_s lse2_s, l = Σ_s 2^(lse2_s - m), acc = Σ_s 2^(lse2_s - m) o_s."""
        L += S(
            """
            l_s = tl.load(_LPART + part, mask=i < _M, other=float('-inf'))
            m_new = tl.maximum(m_i, l_s)
            m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            w = tl.exp2(l_s - m_safe)
            l_i = l_i * alpha + w
            acc = acc * alpha + w * o_s
            m_i = m_new
            """
        )

    def weights(self, w: KernelWriter, L: list[ast.stmt]) -> None:
        # s2: the score in base 2 (the kernel writer's `log2_score`), stat2 = stat·log2(e) once per row.
        L += S("p = tl.where(valid, tl.exp2(s2 - stat2), 0.0)")

    def row_extras(self, L: list[ast.stmt]) -> None:
        # A row with no visible key has stat = -inf: 0 there, so that s2 - stat2 stays -inf (not NaN).
        L += S(f"stat2 = tl.where(stat == float('-inf'), 0.0, stat * {_L2E})")

    def dscore(self, L: list[ast.stmt]) -> None:
        L += S("ds = p * (dp - delta)")


class SinkSoftmaxNorm(SoftmaxNorm):
    """Softmax with a sink logit per row (gpt-oss; Xiao et al., 2024): it joins the normaliser once, at the
    end of the key range (in the combine for a split forward, so it counts once)."""

    def sink(self, w: KernelWriter, L: list[ast.stmt]) -> None:
        assert self.att.norm.sink is not None
        sink = w.expr(self.att.norm.sink, w.row_names(Root.SINK), L)
        L += S(
            f"""
            sink2 = {{sink}} * {_L2E} + tl.full([_BLOCK_M, 1], 0.0, tl.float32)
            m_f = tl.maximum(m_i, sink2)
            m_safe = tl.where(m_f == float('-inf'), 0.0, m_f)
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.exp2(sink2 - m_safe)
            acc = acc * alpha
            m_i = m_f
            """,
            sink=sink,
        )


def norm_strategy(att: Attention) -> NormStrategy:
    kind = att.norm.kind
    if kind is NormKind.SOFTMAX:
        return SinkSoftmaxNorm(att) if att.norm.sink is not None else SoftmaxNorm(att)
    return {NormKind.SIGMOID: SigmoidNorm, NormKind.SUM: SumNorm, NormKind.NONE: NoNorm}[kind](att)
