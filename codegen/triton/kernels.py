"""Writes the Triton module of an attention block: forward, dK/dV and dQ kernels, plus their launchers.

The forward kernel is FlashAttention-2's (Dao, 2023, Alg. 1): one program per (query tile, batch, head),
an online softmax over key tiles in float32 with exp2 (log2(e) folded into the score) and the log-sum-exp
written for the backward. The backward follows Alg. 2 split in two deterministic kernels: dK/dV (one program
per key tile and key/value head, looping over the query heads of its group, so GQA needs no atomics) and dQ
(one program per query tile and head). The score's derivative ∂s/∂(q·k) comes from `dsl.autodiff`.
Row reductions are `tl.reduce` with `tl.standard`'s own combine functions (what `tl.max`/`tl.sum` use):
the interpreter recognises them and reduces with numpy instead of calling the combine per element.
The norms: softmax (optionally with a sink logit), sigmoid(s + bias), none (Σ s·v) and sum (Σ s·v / Σ s).

Decoding shapes use a split-KV forward (FlashDecoding): a third grid axis splits the key range, each program
writes a float32 partial, and a combine kernel merges them and runs the forward's own epilogue. Every tile
loop also has a form (the `_LAYOUT` constexpr) that walks an explicit runtime block layout; in all forms the
loops visit only the tiles of the compile-time tile plan (`_expand_loops`) inside their range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sympy as sp
from attnc.dsl.analysis.tiles import plan_tiles
from attnc.dsl.autodiff import gradients
from attnc.dsl.ir import Attention, DType, Node, NormKind, Op, Var, uses_var, walk

from ..emit import Emitter
from . import tile_code
from .expr import TritonExprs, aux_name, leaf, scalar_name

LOG2E = 1.4426950408889634

# Kernel parameters shared by the kernels, in order. Sizes of the iteration space have internal names; the
# spec's own size symbols, scalars and hoisted uniforms are appended per attention.
_QKV_STRIDES = [f"_s{t}_{a}" for t in ("q", "k", "v", "o") for a in ("b", "h", "n", "d")]
_EXTENTS = ["_NH", "_NG", "_M", "_N", "_D", "_E"]
_CONSTEXPRS = ["_COUNT_VISITS", "_LAYOUT", "_BLOCK_M", "_BLOCK_N", "_BLOCK_D", "_BLOCK_E", "_DOT_PRECISION"]
# An explicit runtime block layout (routing-style variants): per (b, h, query block) a list of key blocks, and
# its transpose per (b, h, key block) for dK/dV; pointers, their strides and the block sizes. Read only when
# the `_LAYOUT` constexpr is set, so kernels launched without a layout compile exactly as before.
LAYOUT_POINTERS = ["_LKV_IDX", "_LKV_CNT", "_LQ_IDX", "_LQ_CNT"]
LAYOUT_INTS = [
    *(f"_slk_{a}" for a in "bhmk"),
    *(f"_slkc_{a}" for a in "bhm"),
    *(f"_slq_{a}" for a in "bhnk"),
    *(f"_slqc_{a}" for a in "bhn"),
    "_QBLK",
    "_KVBLK",
]
_LAYOUT_ARGS = [*LAYOUT_POINTERS, *LAYOUT_INTS]


@dataclass(frozen=True)
class KernelText:
    name: str
    params: list[str]  # the kernel's own leading parameters (tensors it reads and writes)
    body: list[str]


class KernelWriter:
    def __init__(self, att: Attention) -> None:
        self.att = att
        self.tx = TritonExprs(att)
        # One emitter for all kernels of the block, so uniform values get one name each (`_u<k>`).
        self.em: Emitter = self.tx.emitter(self.tx.load, leaf({}))
        self.counter = 0
        self.kv_intervals, self.q_intervals, self.full = _tile_code(att)
        self.summaries = summary_atoms(att)

    # ---- expression helpers -------------------------------------------------------------------------------

    def expr(self, root: Node, names: dict[str, str], out: list[str], indent: str) -> str:
        """Emit temporaries for `root` into `out`; return its expression."""
        self.em.leaf_code = leaf(names)
        self.counter += 1
        stmts, e = self.em.body(root, prefix=f"_t{self.counter}_")
        out += [indent + s for s in stmts]
        return e

    @property
    def uniforms(self) -> list[str]:
        return [v for v, _ in self.em.hoisted]

    @property
    def heavy(self) -> int:
        """How many more registers per tile the spec takes (0: none): 2 when the score or mask gathers a
        tensor per (i, j) pair or the mask has data-dependent per-tile summaries, 1 when only the weights stay
        in float32 (norm = none). Truthy for both; the default schedules narrow tiles by level."""
        roots = [r for r in (self.att.score, self.att.mask) if r is not None]
        gathers = summary_atoms(self.att) or any(
            n.op is Op.LOAD
            and any(uses_var(a, Var.I) for a in n.args)
            and any(uses_var(a, Var.J) for a in n.args)
            for n in walk(roots)
        )
        if gathers:
            return 2
        return 1 if self.att.norm.kind is NormKind.NONE else 0

    # ---- data-dependent masks: per-tile summaries (computed by a pre-pass on the device) -----------------------

    def summary_params(self) -> list[str]:
        return [
            f"_S{side}{bound}{n}"
            for n in range(len(self.summaries))
            for side in "QK"
            for bound in ("MIN", "MAX")
        ]

    def _own_summaries(self, side: str, row: str, tile: str) -> list[str]:
        """Load this program's own tile summaries (min/max of each summarised value over its tile)."""
        out = []
        for n in range(len(self.summaries)):
            for bound in ("min", "max"):
                ptr = f"_S{side.upper()}{bound.upper()}{n}"
                out.append(
                    f"    {side}{bound}{n} = tl.load({ptr} + {row}.to(tl.int64) * tl.num_programs(0) + {tile})"
                )
        return out

    def _summary_conditions(self) -> tuple[str | None, str | None]:
        """Conditions, inside the key loop (forward, dQ) and the query loop (dK/dV), that a tile can hold a
        visible pair: for each `A(i) == B(j)` conjunct, the tiles' [min, max] ranges of A and B overlap."""
        if not self.summaries:
            return None, None
        key_tile = "(b * _NG + hk).to(tl.int64) * ((_N + _BLOCK_N - 1) // _BLOCK_N) + start_n // _BLOCK_N"
        query_tile = "(b * _NH + h).to(tl.int64) * ((_M + _BLOCK_M - 1) // _BLOCK_M) + start_m // _BLOCK_M"
        in_key, in_query = [], []
        for n in range(len(self.summaries)):
            in_key.append(
                f"(qmax{n} >= tl.load(_SKMIN{n} + {key_tile})) & (tl.load(_SKMAX{n} + {key_tile}) >= qmin{n})"
            )
            in_query.append(
                f"(kmax{n} >= tl.load(_SQMIN{n} + {query_tile})) & (tl.load(_SQMAX{n} + {query_tile}) >= kmin{n})"
            )
        return " & ".join(f"({c})" for c in in_key), " & ".join(f"({c})" for c in in_query)

    def spec_args(self) -> list[str]:
        """Aux tensors (+ strides and extents), scalars, size symbols and uniforms, in a fixed order."""
        args: list[str] = []
        for p in self.att.aux_tensors:
            args.append(aux_name(p.name))
            args += [f"_s_{p.name}_{k}" for k in range(len(p.shape))]
            args += [f"_n_{p.name}_{k}" for k in range(len(p.shape))]
        args += [scalar_name(s.name) for s in self.att.scalars]
        args += self.size_symbols()
        return args

    def size_symbols(self) -> list[str]:
        seen: list[str] = []
        for p in self.att.tensors:
            for d in p.shape:
                for n in walk([d]):
                    if n.op is Op.SIZE and n.attr not in seen:
                        seen.append(str(n.attr))
        return seen

    # ---- shared tile code ---------------------------------------------------------------------------------

    def _score_block(self, out: list[str], ind: str, i: str, j: str) -> None:
        """qk -> valid (bool tile) and s (float32 tile, the score where valid)."""
        att = self.att
        names = {"b": "b", "h": "h", "hk": "hk", "i": i, "j": j}
        in_range = f"({i} < _M) & ({j} < _N)"
        if att.mask is None:
            out.append(f"{ind}valid = {in_range}")
        else:
            inner = ind
            if self.full is not None:
                # A tile the analysis proves fully visible skips the mask arithmetic.
                out.append(f"{ind}if {self.full}:")
                out.append(f"{ind}    valid = {in_range}")
                out.append(f"{ind}else:")
                inner = ind + "    "
            m = self.expr(att.mask, names, out, inner)
            if not (uses_var(att.mask, Var.I) and uses_var(att.mask, Var.J)):
                # Broadcast to a tile first: the interpreter mis-types `tile_bool & scalar_bool`.
                m = f"(({m}).to(tl.int32) + 0 * {i} + 0 * {j}) != 0"
            out.append(f"{inner}valid = {in_range} & ({m})")
        s = self.expr(att.score, names, out, ind)
        out.append(f"{ind}s = tl.where(valid, {s}, 0.0)")

    def _feature(
        self, root: Node | None, tensor: str, names: dict[str, str], out: list[str], ind: str
    ) -> None:
        if root is None:
            return
        e = self.expr(root, names, out, ind)
        out.append(f"{ind}{tensor}f = ({e}).to({tensor}.dtype)")

    # ---- forward ------------------------------------------------------------------------------------------

    def _query_tile_prologue(self) -> list[str]:
        """Program ids of a (query tile, batch, head) program, its offsets, and its q tile."""
        return [
            "    pid_m = tl.program_id(0)",
            "    pid_bh = tl.program_id(1)",
            "    b = pid_bh // _NH",
            "    h = pid_bh % _NH",
            "    hk = h // (_NH // _NG)",
            "    offs_m = pid_m * _BLOCK_M + tl.arange(0, _BLOCK_M)",
            "    offs_d = tl.arange(0, _BLOCK_D)",
            "    offs_e = tl.arange(0, _BLOCK_E)",
            "    i = offs_m[:, None]",
            "    q = tl.load(_Q + b.to(tl.int64) * _sq_b + h.to(tl.int64) * _sq_h + i * _sq_n"
            " + offs_d[None, :] * _sq_d, mask=(i < _M) & (offs_d[None, :] < _D), other=0.0)",
        ]

    def _forward_loop(self, L: list[str], key_range: tuple[str, str]) -> None:
        """The forward up to the end of its key loop over `key_range` (all keys, or one split's): q tile,
        running statistics (m_i, l_i, acc) and the online softmax / sigmoid / sum accumulation."""
        att = self.att
        kind = att.norm.kind
        ind = "    "
        L += self._query_tile_prologue()
        self._feature(
            att.feature_q,
            "q",
            {"b": "b", "h": "h", "hk": "hk", "i": "i", "d": "offs_d[None, :]", "q": "q.to(tl.float32)"},
            L,
            ind,
        )
        qname = "qf" if att.feature_q is not None else "q"
        L.append("    k_base = _K + b.to(tl.int64) * _sk_b + hk.to(tl.int64) * _sk_h")
        L.append("    v_base = _V + b.to(tl.int64) * _sv_b + hk.to(tl.int64) * _sv_h")
        L.append("    m_i = tl.full([_BLOCK_M, 1], float('-inf'), tl.float32)")
        L.append("    l_i = tl.full([_BLOCK_M, 1], 0.0, tl.float32)")
        L.append("    acc = tl.full([_BLOCK_M, _BLOCK_E], 0.0, tl.float32)")
        L.append("    m0 = pid_m * _BLOCK_M")
        L += self._own_summaries("q", "pid_bh", "pid_m")
        L.append("    visits = pid_m * 0")
        L.append(f"    for start_n in range({key_range[0]}, {key_range[1]}, _BLOCK_N):")
        ind = "        "
        L.append(f"{ind}n0 = start_n")
        L.append(f"{ind}visits += 1")
        L.append(f"{ind}offs_n = start_n + tl.arange(0, _BLOCK_N)")
        L.append(f"{ind}j = offs_n[None, :]")
        L.append(
            f"{ind}kt = tl.load(k_base + offs_n[None, :] * _sk_n + offs_d[:, None] * _sk_d,"
            " mask=(offs_n[None, :] < _N) & (offs_d[:, None] < _D), other=0.0)"
        )
        self._feature(
            att.feature_k,
            "kt",
            {"b": "b", "hk": "hk", "j": "offs_n[None, :]", "d": "offs_d[:, None]", "k": "kt.to(tl.float32)"},
            L,
            ind,
        )
        kname = "ktf" if att.feature_k is not None else "kt"
        L.append(f"{ind}qk = tl.dot({qname}, {kname}, input_precision=_DOT_PRECISION)")
        self._score_block(L, ind, "i", "j")
        L.append(
            f"{ind}v = tl.load(v_base + offs_n[:, None] * _sv_n + offs_e[None, :] * _sv_d,"
            " mask=(offs_n[:, None] < _N) & (offs_e[None, :] < _E), other=0.0)"
        )
        if kind is NormKind.SOFTMAX:
            L.append(f"{ind}s2 = tl.where(valid, s * {LOG2E!r}, float('-inf'))")
            L.append(
                f"{ind}m_new = tl.maximum(m_i, tl.reduce(s2, 1, tl.standard._elementwise_max, keep_dims=True))"
            )
            L.append(f"{ind}m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)")
            L.append(f"{ind}alpha = tl.exp2(m_i - m_safe)")
            L.append(f"{ind}p = tl.exp2(s2 - m_safe)")
            L.append(f"{ind}l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine, keep_dims=True)")
            L.append(f"{ind}acc = acc * alpha + tl.dot(p.to(v.dtype), v, input_precision=_DOT_PRECISION)")
            L.append(f"{ind}m_i = m_new")
        else:
            if kind is NormKind.SIGMOID:
                bias = "0.0"
                if att.norm.bias is not None:
                    bias = self.expr(
                        att.norm.bias, {"b": "b", "h": "h", "hk": "hk", "i": "i", "j": "j"}, L, ind
                    )
                L.append(f"{ind}p = tl.where(valid, 1.0 / (1.0 + tl.exp(-(s + {bias}))), 0.0)")
            else:
                L.append(f"{ind}p = s")
            if kind is NormKind.SUM:
                L.append(f"{ind}l_i += tl.reduce(p, 1, tl.standard._sum_combine, keep_dims=True)")
            # Unnormalised weights can be large: keep them in float32 for the second product.
            L.append(f"{ind}acc += tl.dot(p, v.to(tl.float32), input_precision=_DOT_PRECISION)")

    def _forward_epilogue(self, L: list[str]) -> None:
        """From the running statistics (m_i, l_i, acc) of a whole key range to o and the row statistic: the
        sink logit, the normalisation, the output epilogue and the stores. Shared by the one-pass forward and
        the split-KV combine, so both paths end in the very same code."""
        att = self.att
        kind = att.norm.kind
        ind = "    "
        row = {"b": "b", "h": "h", "hk": "hk", "i": "i"}
        if kind is NormKind.SOFTMAX:
            if att.norm.sink is not None:
                sink = self.expr(att.norm.sink, row, L, ind)
                L.append(f"    sink2 = ({sink}) * {LOG2E!r} + tl.full([_BLOCK_M, 1], 0.0, tl.float32)")
                L.append("    m_f = tl.maximum(m_i, sink2)")
                L.append("    m_safe = tl.where(m_f == float('-inf'), 0.0, m_f)")
                L.append("    alpha = tl.exp2(m_i - m_safe)")
                L.append("    l_i = l_i * alpha + tl.exp2(sink2 - m_safe)")
                L.append("    acc = acc * alpha")
                L.append("    m_i = m_f")
            L.append("    m_safe = tl.where(m_i == float('-inf'), 0.0, m_i)")
            L.append("    alive = l_i > 0")
            L.append("    o = tl.where(alive, acc / tl.where(alive, l_i, 1.0), 0.0)")
            L.append(
                f"    stat = tl.where(alive, (m_safe + tl.log2(tl.where(alive, l_i, 1.0))) / {LOG2E!r},"
                " float('-inf'))"
            )
        elif kind is NormKind.SUM:
            eps = "0.0"
            if att.norm.eps is not None:
                eps = self.expr(att.norm.eps, row, L, ind)
            L.append(f"    stat = l_i + ({eps})")
            L.append("    alive = stat != 0")
            L.append("    o = tl.where(alive, acc / tl.where(alive, stat, 1.0), 0.0)")
        else:
            L.append("    o = acc")
            L.append("    stat = l_i")
        L.append(
            "    o_off = b.to(tl.int64) * _so_b + h.to(tl.int64) * _so_h + i * _so_n + offs_e[None, :] * _so_d"
        )
        L.append("    o_mask = (i < _M) & (offs_e[None, :] < _E)")
        if att.output is not None:
            L.append("    tl.store(_ORAW + o_off, o, mask=o_mask)")
            out = self.expr(att.output, {**row, "e": "offs_e[None, :]", "o": "o"}, L, ind)
            L.append(f"    o = {out}")
        L.append("    tl.store(_O + o_off, o.to(_O.dtype.element_ty), mask=o_mask)")
        L.append("    tl.store(_STAT + pid_bh.to(tl.int64) * _M + i, stat, mask=i < _M)")

    def forward(self) -> KernelText:
        nm = self.att.name
        L: list[str] = []
        self._forward_loop(L, ("0", "_N"))
        self._forward_epilogue(L)
        L.append("    if _COUNT_VISITS:")
        L.append("        tl.store(_VISITS + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m, visits)")
        return KernelText(f"_{nm}_fwd_kernel", ["_Q", "_K", "_V", "_O", "_ORAW", "_STAT"], L)

    # ---- split-KV forward for decoding shapes (FlashDecoding: Dao, Haziza, Massa, Sizov, 2023) ---------------

    def forward_split(self) -> KernelText:
        """Program (query tile, batch·head, split) runs the forward over the keys [split_lo, split_hi) only, the
        split's range intersected with the tile plan, and writes a float32 partial: for softmax the normalised
        o_s = acc_s / l_s and lse2_s = m_s + log2(l_s) (-inf for a split without a visible key), otherwise the
        plain sums acc_s and l_s. Partials are [B·H, S, M, E] and [B·H, S, M], contiguous. The sink, the
        normalisation and the epilogue wait for the combine, so the sink counts once."""
        att, nm = self.att, self.att.name
        L: list[str] = []
        self._forward_loop(L, ("split_lo", "split_hi"))
        # The split's bounds come before the loop: _SPLIT_N (keys per split) is a multiple of _BLOCK_N.
        at = L.index("    visits = pid_m * 0")
        L[at:at] = [
            "    pid_s = tl.program_id(2)",
            "    split_lo = pid_s * _SPLIT_N",
            "    split_hi = tl.minimum(split_lo + _SPLIT_N, _N)",
        ]
        L.append("    part = (pid_bh.to(tl.int64) * tl.num_programs(2) + pid_s) * _M + i")
        if att.norm.kind is NormKind.SOFTMAX:
            L.append("    alive = l_i > 0")
            L.append("    m_safe = tl.where(m_i == float('-inf'), 0.0, m_i)")
            L.append("    o_s = tl.where(alive, acc / tl.where(alive, l_i, 1.0), 0.0)")
            L.append("    l_s = tl.where(alive, m_safe + tl.log2(tl.where(alive, l_i, 1.0)), float('-inf'))")
        else:
            L.append("    o_s = acc")
            L.append("    l_s = l_i")
        L.append(
            "    tl.store(_OPART + part * _E + offs_e[None, :], o_s, mask=(i < _M) & (offs_e[None, :] < _E))"
        )
        L.append("    tl.store(_LPART + part, l_s, mask=i < _M)")
        L.append("    if _COUNT_VISITS:")
        L.append(
            "        tl.store(_VISITS + (pid_bh.to(tl.int64) * tl.num_programs(2) + pid_s) * tl.num_programs(0)"
            " + pid_m, visits)"
        )
        return KernelText(f"_{nm}_fwd_split_kernel", ["_Q", "_K", "_V", "_OPART", "_LPART", "_SPLIT_N"], L)

    def combine(self) -> KernelText:
        """Merge the _NSPLIT partials of each row into the running statistics of one pass over all keys, then
        run the forward's own epilogue. Softmax partials merge by log-sum-exp weighting (FlashDecoding; the
        rescaling of FlashAttention-2, Alg. 1): m = max_s lse2_s, l = Σ_s 2^(lse2_s - m), acc = Σ_s 2^(lse2_s - m)
        o_s, which is exactly (m, l, acc) of the unsplit loop; a split with no visible key has lse2_s = -inf
        and weight 0. Sigmoid, none and sum partials are plain sums."""
        nm = self.att.name
        L = [
            "    pid_m = tl.program_id(0)",
            "    pid_bh = tl.program_id(1)",
            "    b = pid_bh // _NH",
            "    h = pid_bh % _NH",
            "    hk = h // (_NH // _NG)",
            "    offs_m = pid_m * _BLOCK_M + tl.arange(0, _BLOCK_M)",
            "    offs_e = tl.arange(0, _BLOCK_E)",
            "    i = offs_m[:, None]",
            "    m_i = tl.full([_BLOCK_M, 1], float('-inf'), tl.float32)",
            "    l_i = tl.full([_BLOCK_M, 1], 0.0, tl.float32)",
            "    acc = tl.full([_BLOCK_M, _BLOCK_E], 0.0, tl.float32)",
            "    for split in range(0, _NSPLIT):",
            "        part = (pid_bh.to(tl.int64) * _NSPLIT + split) * _M + i",
            "        o_s = tl.load(_OPART + part * _E + offs_e[None, :], mask=(i < _M) & (offs_e[None, :] < _E),"
            " other=0.0)",
        ]
        if self.att.norm.kind is NormKind.SOFTMAX:
            L += [
                "        l_s = tl.load(_LPART + part, mask=i < _M, other=float('-inf'))",
                "        m_new = tl.maximum(m_i, l_s)",
                "        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)",
                "        alpha = tl.exp2(m_i - m_safe)",
                "        w = tl.exp2(l_s - m_safe)",
                "        l_i = l_i * alpha + w",
                "        acc = acc * alpha + w * o_s",
                "        m_i = m_new",
            ]
        else:
            L += [
                "        l_i += tl.load(_LPART + part, mask=i < _M, other=0.0)",
                "        acc += o_s",
            ]
        self._forward_epilogue(L)
        return KernelText(
            f"_{nm}_fwd_combine_kernel", ["_OPART", "_LPART", "_NSPLIT", "_O", "_ORAW", "_STAT"], L
        )

    # ---- backward -----------------------------------------------------------------------------------------

    def _dscore(self, L: list[str], ind: str) -> None:
        """From p (weights), dp = dO·vᵀ and the row statistics: ds = ∂loss/∂s, then dqk = ds · ∂s/∂qk."""
        att, kind = self.att, self.att.norm.kind
        if kind is NormKind.SOFTMAX:
            L.append(f"{ind}ds = p * (dp - delta)")
        elif kind is NormKind.SIGMOID:
            L.append(f"{ind}ds = tl.where(valid, dp * p * (1.0 - p), 0.0)")
        elif kind is NormKind.NONE:
            L.append(f"{ind}ds = tl.where(valid, dp, 0.0)")
        else:
            L.append(f"{ind}ds = tl.where(valid, (dp - delta) / stat_safe, 0.0)")
        dot = next((n for n in walk([att.score]) if n.op is Op.DOT), None)
        if dot is None:
            L.append(f"{ind}dqk = ds * 0.0")
            return
        d = gradients(att.score, [dot])[dot]
        e = self.expr(d, {"b": "b", "h": "h", "hk": "hk", "i": "i", "j": "j"}, L, ind)
        L.append(f"{ind}dqk = tl.where(valid, ds * ({e}), 0.0)")

    def _weights(self, L: list[str], ind: str) -> None:
        """p: the weight of each (i, j) in o_i = Σ_j p_ij v_j, recomputed from the forward's row statistics."""
        att, kind = self.att, self.att.norm.kind
        if kind is NormKind.SOFTMAX:
            L.append(f"{ind}p = tl.where(valid, tl.exp2(s * {LOG2E!r} - stat * {LOG2E!r}), 0.0)")
        elif kind is NormKind.SIGMOID:
            bias = "0.0"
            if att.norm.bias is not None:
                bias = self.expr(att.norm.bias, {"b": "b", "h": "h", "hk": "hk", "i": "i", "j": "j"}, L, ind)
            L.append(f"{ind}p = tl.where(valid, 1.0 / (1.0 + tl.exp(-(s + {bias}))), 0.0)")
        else:
            L.append(f"{ind}p = s")

    def _bwd_dot_type(self) -> str:
        """Operands of the backward's products in the input dtype (tensor cores, few registers), as in
        FlashAttention-2; unnormalised weights (norm = none) can exceed float16, so those stay in float32."""
        return "tl.float32" if self.att.norm.kind is NormKind.NONE else "q.dtype"

    def _row_stats(self, L: list[str], ind: str) -> None:
        L.append(f"{ind}row = (b * _NH + h).to(tl.int64) * _M + i")
        L.append(f"{ind}stat = tl.load(_STAT + row, mask=i < _M, other=0.0)")
        L.append(f"{ind}delta = tl.load(_DELTA + row, mask=i < _M, other=0.0)")
        if self.att.norm.kind is NormKind.SUM:
            L.append(f"{ind}stat_safe = tl.where(stat != 0, stat, 1.0)")

    def _feature_grad(self, root: Node | None, t: str, names: dict[str, str], L: list[str], ind: str) -> None:
        """d(raw) = d(feature) · φ'(raw), elementwise."""
        if root is None:
            return
        elem = next(n for n in walk([root]) if n.op is Op.ELEM)
        e = self.expr(gradients(root, [elem])[elem], names, L, ind)
        L.append(f"{ind}d{t} = d{t} * ({e})")

    def dkdv(self) -> KernelText:
        att, nm = self.att, self.att.name
        L: list[str] = []
        ind = "    "
        L.append("    pid_n = tl.program_id(0)")
        L.append("    pid_bg = tl.program_id(1)")
        L.append("    b = pid_bg // _NG")
        L.append("    hk = pid_bg % _NG")
        L.append("    rep = _NH // _NG")
        L.append("    offs_n = pid_n * _BLOCK_N + tl.arange(0, _BLOCK_N)")
        L.append("    offs_d = tl.arange(0, _BLOCK_D)")
        L.append("    offs_e = tl.arange(0, _BLOCK_E)")
        L.append("    j = offs_n[None, :]")
        L.append(
            "    kt = tl.load(_K + b.to(tl.int64) * _sk_b + hk.to(tl.int64) * _sk_h + offs_n[None, :] * _sk_n"
            " + offs_d[:, None] * _sk_d, mask=(offs_n[None, :] < _N) & (offs_d[:, None] < _D), other=0.0)"
        )
        knames = {
            "b": "b",
            "hk": "hk",
            "j": "offs_n[None, :]",
            "d": "offs_d[:, None]",
            "k": "kt.to(tl.float32)",
        }
        self._feature(att.feature_k, "kt", knames, L, ind)
        kname = "ktf" if att.feature_k is not None else "kt"
        L.append(
            "    vt = tl.load(_V + b.to(tl.int64) * _sv_b + hk.to(tl.int64) * _sv_h + offs_n[None, :] * _sv_n"
            " + offs_e[:, None] * _sv_d, mask=(offs_n[None, :] < _N) & (offs_e[:, None] < _E), other=0.0)"
        )
        L.append("    dkt = tl.full([_BLOCK_D, _BLOCK_N], 0.0, tl.float32)")
        L.append("    dvt = tl.full([_BLOCK_E, _BLOCK_N], 0.0, tl.float32)")
        L.append("    n0 = pid_n * _BLOCK_N")
        L += self._own_summaries("k", "pid_bg", "pid_n")
        L.append("    visits = pid_n * 0")
        L.append("    for hh in range(0, rep):")
        L.append("        h = hk * rep + hh")
        L.append("        for start_m in range(0, _M, _BLOCK_M):")
        ind = "            "
        L.append(f"{ind}m0 = start_m")
        L.append(f"{ind}visits += 1")
        L.append(f"{ind}offs_m = start_m + tl.arange(0, _BLOCK_M)")
        L.append(f"{ind}i = offs_m[:, None]")
        L.append(
            f"{ind}q = tl.load(_Q + b.to(tl.int64) * _sq_b + h.to(tl.int64) * _sq_h + i * _sq_n"
            " + offs_d[None, :] * _sq_d, mask=(i < _M) & (offs_d[None, :] < _D), other=0.0)"
        )
        qnames = {"b": "b", "h": "h", "hk": "hk", "i": "i", "d": "offs_d[None, :]", "q": "q.to(tl.float32)"}
        self._feature(att.feature_q, "q", qnames, L, ind)
        qname = "qf" if att.feature_q is not None else "q"
        L.append(f"{ind}qk = tl.dot({qname}, {kname}, input_precision=_DOT_PRECISION)")
        self._score_block(L, ind, "i", "j")
        self._row_stats(L, ind)
        self._weights(L, ind)
        L.append(
            f"{ind}do = tl.load(_DO + b.to(tl.int64) * _so_b + h.to(tl.int64) * _so_h + i * _so_n"
            " + offs_e[None, :] * _so_d, mask=(i < _M) & (offs_e[None, :] < _E), other=0.0)"
        )
        # dV = Pᵀ dO: p is scaled by the row normaliser for sum (o = Σ p v / stat).
        pv = "p / stat_safe" if att.norm.kind is NormKind.SUM else "p"
        w = self._bwd_dot_type()
        L.append(f"{ind}dvt += tl.dot(tl.trans(do).to({w}), ({pv}).to({w}), input_precision=_DOT_PRECISION)")
        L.append(f"{ind}dp = tl.dot(do.to({w}), vt.to({w}), input_precision=_DOT_PRECISION)")
        self._dscore(L, ind)
        L.append(
            f"{ind}dkt += tl.dot(tl.trans({qname}).to({w}), dqk.to({w}), input_precision=_DOT_PRECISION)"
        )
        ind = "    "
        self._feature_grad(att.feature_k, "kt", knames, L, ind)
        L.append("    kmask = (offs_n[None, :] < _N) & (offs_d[:, None] < _D)")
        L.append(
            "    tl.store(_DK + b.to(tl.int64) * _sk_b + hk.to(tl.int64) * _sk_h + offs_n[None, :] * _sk_n"
            " + offs_d[:, None] * _sk_d, dkt, mask=kmask)"
        )
        L.append("    vmask = (offs_n[None, :] < _N) & (offs_e[:, None] < _E)")
        L.append(
            "    tl.store(_DV + b.to(tl.int64) * _sv_b + hk.to(tl.int64) * _sv_h + offs_n[None, :] * _sv_n"
            " + offs_e[:, None] * _sv_d, dvt, mask=vmask)"
        )
        L.append("    if _COUNT_VISITS:")
        L.append("        tl.store(_VISITS + pid_bg.to(tl.int64) * tl.num_programs(0) + pid_n, visits)")
        return KernelText(
            f"_{nm}_bwd_dkdv_kernel", ["_Q", "_K", "_V", "_DO", "_STAT", "_DELTA", "_DK", "_DV"], L
        )

    def dq(self) -> KernelText:
        att, nm = self.att, self.att.name
        L: list[str] = []
        ind = "    "
        L += self._query_tile_prologue()
        qnames = {"b": "b", "h": "h", "hk": "hk", "i": "i", "d": "offs_d[None, :]", "q": "q.to(tl.float32)"}
        self._feature(att.feature_q, "q", qnames, L, ind)
        qname = "qf" if att.feature_q is not None else "q"
        L.append(
            "    do = tl.load(_DO + b.to(tl.int64) * _so_b + h.to(tl.int64) * _so_h + i * _so_n"
            " + offs_e[None, :] * _so_d, mask=(i < _M) & (offs_e[None, :] < _E), other=0.0)"
        )
        self._row_stats(L, ind)
        L.append("    dq = tl.full([_BLOCK_M, _BLOCK_D], 0.0, tl.float32)")
        L.append("    m0 = pid_m * _BLOCK_M")
        L += self._own_summaries("q", "pid_bh", "pid_m")
        L.append("    visits = pid_m * 0")
        L.append("    for start_n in range(0, _N, _BLOCK_N):")
        ind = "        "
        L.append(f"{ind}n0 = start_n")
        L.append(f"{ind}visits += 1")
        L.append(f"{ind}offs_n = start_n + tl.arange(0, _BLOCK_N)")
        L.append(f"{ind}j = offs_n[None, :]")
        L.append(
            f"{ind}kt = tl.load(_K + b.to(tl.int64) * _sk_b + hk.to(tl.int64) * _sk_h + offs_n[None, :] * _sk_n"
            " + offs_d[:, None] * _sk_d, mask=(offs_n[None, :] < _N) & (offs_d[:, None] < _D), other=0.0)"
        )
        knames = {
            "b": "b",
            "hk": "hk",
            "j": "offs_n[None, :]",
            "d": "offs_d[:, None]",
            "k": "kt.to(tl.float32)",
        }
        self._feature(att.feature_k, "kt", knames, L, ind)
        kname = "ktf" if att.feature_k is not None else "kt"
        L.append(
            f"{ind}vt = tl.load(_V + b.to(tl.int64) * _sv_b + hk.to(tl.int64) * _sv_h + offs_n[None, :] * _sv_n"
            " + offs_e[:, None] * _sv_d, mask=(offs_n[None, :] < _N) & (offs_e[:, None] < _E), other=0.0)"
        )
        L.append(f"{ind}qk = tl.dot({qname}, {kname}, input_precision=_DOT_PRECISION)")
        self._score_block(L, ind, "i", "j")
        self._weights(L, ind)
        w = self._bwd_dot_type()
        L.append(f"{ind}dp = tl.dot(do.to({w}), vt.to({w}), input_precision=_DOT_PRECISION)")
        self._dscore(L, ind)
        L.append(f"{ind}dq += tl.dot(dqk.to({w}), tl.trans({kname}).to({w}), input_precision=_DOT_PRECISION)")
        ind = "    "
        self._feature_grad(att.feature_q, "q", qnames, L, ind)
        L.append(
            "    tl.store(_DQ + b.to(tl.int64) * _sq_b + h.to(tl.int64) * _sq_h + i * _sq_n"
            " + offs_d[None, :] * _sq_d, dq, mask=(i < _M) & (offs_d[None, :] < _D))"
        )
        L.append("    if _COUNT_VISITS:")
        L.append("        tl.store(_VISITS + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m, visits)")
        return KernelText(f"_{nm}_bwd_dq_kernel", ["_Q", "_K", "_V", "_DO", "_STAT", "_DELTA", "_DQ"], L)

    def kernels(self) -> tuple[list[str], list[KernelText]]:
        """All kernels (forward, dK/dV, dQ, split-KV forward and its combine); the shared tail of their
        signatures is known only once all are emitted."""
        ks = [self.forward(), self.dkdv(), self.dq(), self.forward_split(), self.combine()]
        ks = [
            KernelText(
                k.name,
                k.params,
                _expand_loops(
                    _with_layout(k.body), self.kv_intervals, self.q_intervals, *self._summary_conditions()
                ),
            )
            for k in ks
        ]
        tail = [
            *self.spec_args(),
            *self.uniforms,
            *_QKV_STRIDES,
            *_EXTENTS,
            *self.summary_params(),
            *_LAYOUT_ARGS,
            "_VISITS",
        ]
        lines: list[str] = []
        for k in ks:
            lines += ["@triton.jit", f"def {k.name}("]
            lines += [f"    {p}," for p in [*k.params, *tail]]
            lines += [f"    {c}: tl.constexpr," for c in _CONSTEXPRS]
            lines.append("):")
            lines += k.body
            lines += ["", ""]
        return lines, ks


# ---- block sparsity ------------------------------------------------------------------------------------------

Intervals = list[tuple[str, str]]


def _tile_code(att: Attention) -> tuple[Intervals, Intervals, str | None]:
    """Key intervals per query tile, query intervals per key tile and the full-tile test, as kernel code.
    Whatever cannot be printed falls back to the whole range with the mask applied (sound, never skipping)."""
    whole_k, whole_q = [("0", "_N")], [("0", "_M")]
    if att.mask is None:
        return whole_k, whole_q, None
    plan = plan_tiles(att)
    try:
        kv = [(tile_code.code(lo), tile_code.code(hi)) for lo, hi in plan.kv_intervals]
    except tile_code.Unprintable:
        kv = whole_k
    try:
        qv = [(tile_code.code(lo), tile_code.code(hi)) for lo, hi in plan.q_intervals]
    except tile_code.Unprintable:
        qv = whole_q
    try:
        full = None if plan.full is sp.false else tile_code.code(plan.full)
    except tile_code.Unprintable:
        full = None
    return kv or [("0", "0")], qv or [("0", "0")], full


_TILE_LOOP = re.compile(r"^(\s*)for (start_n|start_m) in range\((\w+), (\w+), (_BLOCK_N|_BLOCK_M)\):$")


def _bound(e: str, clip: str, fn: str, default: str) -> str:
    """`fn(e, clip)`; a literal bound against the default clip (0 or the extent) stays as it is."""
    return e if e.lstrip("-").isdigit() and clip == default else f"{fn}({e}, {clip})"


def _loop_block(body: list[str], k: int) -> tuple[re.Match[str] | None, list[str], int]:
    """The tile loop header at body[k] (or None), the lines of its body and the index after it."""
    m = _TILE_LOOP.match(body[k])
    if m is None:
        return None, [], k + 1
    ind = m.group(1)
    end = k + 1
    while end < len(body) and (body[end].startswith(ind + " ") or not body[end].strip()):
        end += 1
    return m, body[k + 1 : end], end


def _with_layout(body: list[str]) -> list[str]:
    """Give each tile loop a second form, taken when the `_LAYOUT` constexpr is set: an outer loop over the
    blocks the runtime layout lists for this program's block (key blocks for a query tile in the forward and
    dQ, query blocks for a key tile in dK/dV), each clipped to the loop's own range (all keys, or a split's).
    `_expand_loops` then intersects each listed block with the tile plan, so the spec's mask still skips."""
    out: list[str] = []
    k = 0
    while k < len(body):
        m, inner, end = _loop_block(body, k)
        if m is None:
            out.append(body[k])
            k = end
            continue
        ind, var, lo, hi, block = m.groups()
        if var == "start_n":  # key blocks listed for this query tile's block (BLOCK_M divides _QBLK)
            own, cnt, idx, size = "(pid_m * _BLOCK_M) // _QBLK", "_LKV_CNT", "_LKV_IDX", "_KVBLK"
            cs, xs = ("_slkc_b", "_slkc_h", "_slkc_m"), ("_slk_b", "_slk_h", "_slk_m", "_slk_k")
        else:  # query blocks listed for this key tile's block (BLOCK_N divides _KVBLK), per query head h
            own, cnt, idx, size = "(pid_n * _BLOCK_N) // _KVBLK", "_LQ_CNT", "_LQ_IDX", "_QBLK"
            cs, xs = ("_slqc_b", "_slqc_h", "_slqc_n"), ("_slq_b", "_slq_h", "_slq_n", "_slq_k")
        row = f"b.to(tl.int64) * {cs[0]} + h.to(tl.int64) * {cs[1]} + lay_blk * {cs[2]}"
        out += [
            f"{ind}if _LAYOUT:",
            f"{ind}    lay_blk = {own}",
            f"{ind}    lay_cnt = tl.load({cnt} + {row})",
            f"{ind}    for lay_t in range(0, lay_cnt):",
            f"{ind}        lay_b = tl.load({idx} + b.to(tl.int64) * {xs[0]} + h.to(tl.int64) * {xs[1]}"
            f" + lay_blk * {xs[2]} + lay_t * {xs[3]})",
            f"{ind}        lay_lo = tl.maximum(lay_b * {size}, {lo})",
            f"{ind}        lay_hi = tl.minimum(lay_b * {size} + {size}, {hi})",
            f"{ind}        for {var} in range(lay_lo, lay_hi, {block}):",
            *["        " + x if x.strip() else x for x in inner],
            f"{ind}else:",
            f"{ind}    {body[k].lstrip()}",
            *["    " + x if x.strip() else x for x in inner],
        ]
        k = end
    return out


def _expand_loops(
    body: list[str], kv: Intervals, qv: Intervals, key_cond: str | None = None, query_cond: str | None = None
) -> list[str]:
    """Replace each tile loop over a range [LO, HI) (all keys or queries, a split's keys, a listed block) by
    one loop per interval of the plan, intersected with [LO, HI). A tile that several intervals cover is
    visited once: by the first interval containing it (the intervals need not be sorted). Tiles failing the
    data-dependent condition (`key_cond` for key loops, `query_cond` for query loops) are skipped."""
    out: list[str] = []
    k = 0
    while k < len(body):
        m, inner, end = _loop_block(body, k)
        if m is None:
            out.append(body[k])
            k = end
            continue
        ind, var, range_lo, range_hi, block = m.groups()
        extent, intervals = ("_N", kv) if var == "start_n" else ("_M", qv)
        extra = key_cond if var == "start_n" else query_cond
        for n, (lo, hi) in enumerate(intervals):
            out.append(f"{ind}lo{n} = {_bound(lo, range_lo, 'tl.maximum', '0')}")
            out.append(f"{ind}hi{n} = {_bound(hi, range_hi, 'tl.minimum', extent)}")
            out.append(f"{ind}for {var} in range((lo{n} // {block}) * {block}, hi{n}, {block}):")
            conds = [f"(({var} < (lo{p} // {block}) * {block}) | ({var} >= hi{p}))" for p in range(n)]
            if extra:
                conds.append(f"({extra})")
            if not conds:
                out += inner
                continue
            out.append(f"{ind}    if {' & '.join(conds)}:")
            out += ["    " + x if x.strip() else x for x in inner]
        k = end
    return out


def summary_atoms(att: Attention) -> list[tuple[Node, Node]]:
    """Conjuncts `A == B` of the mask with A a function of the query side only (b, h, hk, i) and B of the key
    side only (b, hk, j), reading a tensor (document ids, segment ids...). Tiles whose [min, max] ranges of A
    and B do not overlap hold no visible pair: a device pre-pass summarises each tile, the kernels skip."""
    if att.mask is None:
        return []
    conjuncts, stack = [], [att.mask]
    while stack:
        n = stack.pop()
        if n.op is Op.AND:
            stack.extend(n.args)
        else:
            conjuncts.append(n)
    out = []
    for c in conjuncts:
        if c.op is not Op.EQ or any(a.dtype is not DType.INT for a in c.args):
            continue
        a, b = c.args
        for x, y in ((a, b), (b, a)):
            q_side = uses_var(x, Var.I) and not uses_var(x, Var.J)
            k_side = uses_var(y, Var.J) and not uses_var(y, Var.I) and not uses_var(y, Var.H)
            reads = any(n.op is Op.LOAD for n in walk([x, y]))
            if q_side and k_side and reads:
                out.append((x, y))
                break
    return out[:2]
