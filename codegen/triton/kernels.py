"""Writes the Triton module of an attention block: forward, dK/dV and dQ kernels, the split-KV forward and its
combine, with their signatures.

The forward kernel is FlashAttention-2's (Dao, 2023, Alg. 1): one program per (query tile, batch, head),
an online softmax over key tiles in float32 with exp2 (log2(e) folded into the score) and the log-sum-exp
written for the backward. The backward follows Alg. 2 split in two deterministic kernels: dK/dV (one program
per key tile and key/value head, looping over the query heads of its group, so GQA needs no atomics) and dQ
(one program per query tile and head). The score's derivative ∂s/∂(q·k) comes from `dsl.autodiff`.
Row reductions are `tl.reduce` with `tl.standard`'s own combine functions (what `tl.max`/`tl.sum` use):
the interpreter recognises them and reduces with numpy instead of calling the combine per element.
What each norm contributes (forward update, epilogue, weights, dS, split merge) is its strategy's (`norms`).

Decoding shapes use a split-KV forward (FlashDecoding): a third grid axis splits the key range, each program
writes a float32 partial, and a combine kernel merges them and runs the forward's own epilogue.

Kernels are built as structure: statements from small templates (`codegen.emit.statement_from_string`) whose
holes take ast nodes. Each tile loop's body is ONE `@triton.jit` helper per kind (`_<name>_fwd_inner` for the
forward's key loop, `_<name>_dkdv_inner` for the dK/dV query loop, `_<name>_dq_inner` for the dQ key loop), as
the Triton tutorial's `_attn_fwd_inner`; a kernel calls it once per interval of the compile-time tile plan and
per form of its range: all keys (or queries), a split's keys, or (under the `_LAYOUT` constexpr) each block an
explicit runtime block layout lists. Triton inlines the helpers, so the compiled code is that of one loop per
call. Every kernel's parameters come from one `KernelSignature` (`attnc.runtime.signature`).
"""

from __future__ import annotations

import ast
import copy
import math
import textwrap
from dataclasses import dataclass
from enum import IntEnum

import sympy as sp
from attnc.dsl.analysis.plan import PAIR_ROOTS, ROW_ROOTS, AttentionPlan, AuxGrad, AuxRead, plan_attention
from attnc.dsl.autodiff import gradients
from attnc.dsl.builder import ieee_binary
from attnc.dsl.ir import (
    COMPARE_OPS,
    LOGIC_OPS,
    Attention,
    DType,
    Node,
    NormKind,
    Op,
    TensorParam,
    TensorType,
    Var,
    const,
    is_uniform,
    linearize,
    uses_var,
    walk,
)
from attnc.dsl.scope import ROOT_ELEMENT, ROOT_VARS, Root

from attnc.runtime.signature import (
    ATTENTION_KINDS,
    AUX_GRAD_GATE,
    BlockABI,
    Group,
    KernelSignature,
    Param,
    ParamGroup,
    f32,
    i32,
    pointer,
)

from ..emit import Emitter, constant, expr_from_string, name
from ..emit import statement_from_string as S
from . import tile_code
from .expr import TritonExprs, _f32_constant, aux_name, leaf, scalar_name
from .norms import LOG2E, NormStrategy, norm_strategy

__all__ = ["KERNEL_KINDS", "LOG2E", "Kernel", "KernelWriter", "LoopHelper"]

# The kernels of one attention block, by kind: `_<name>_<kind>_kernel`.
KERNEL_KINDS = ATTENTION_KINDS

# Pointer element types of the spec's auxiliary tensors (what a launch passes for each declared type).
AUX_DTYPES = {
    TensorType.FLOAT: "fp32",
    TensorType.FLOAT16: "fp16",
    TensorType.BFLOAT16: "bf16",
    TensorType.FLOAT32: "fp32",
    TensorType.FLOAT64: "fp64",
    TensorType.INT: "i64",
    TensorType.INT64: "i64",
    TensorType.INT32: "i32",
    TensorType.BOOL: "i1",
}

Intervals = list[tuple[str, str]]

# A varlen launch's pointer moves (`_varlen_prologue`): each packed tensor to its sequence's first row, by
# the start of q's or k's sequence times the stride of its row axis (dQ, dO and the outputs follow q or o).
_VARLEN_REBASE = {
    "_Q": ("q_start", "_sq_n"),
    "_K": ("k_start", "_sk_n"),
    "_V": ("k_start", "_sv_n"),
    "_DO": ("q_start", "_so_n"),
    "_OB": ("q_start", "_so_n"),
    "_DOUT": ("q_start", "_so_n"),
}
# The pointers a kernel only stores to after its tile loop: moved there (`_varlen_store_rebase`), from the
# offsets table again, so that no start lives in registers across the loop (the heavier dQ kernels spilled).
_VARLEN_STORES = {
    "_O": ("_CU_Q", "_so_n"),
    "_ORAW": ("_CU_Q", "_so_n"),
    "_DQ": ("_CU_Q", "_sq_n"),
    "_DK": ("_CU_K", "_sk_n"),
    "_DV": ("_CU_K", "_sv_n"),
}


def _varlen_store_rebase(*ptrs: str) -> Stmts:
    """Under `_VARLEN`, `ptrs` moved to the program's sequence's first row, just before their stores."""
    body: Stmts = []
    for p in ptrs:
        cu, stride = _VARLEN_STORES[p]
        body += S(f"{p} = {p} + tl.load({cu} + b).to(tl.int64) * {stride}")
    return S("if _VARLEN:\n    {body}", body=body)


# `Attention.roots()` field of each root an auxiliary read may sit in.
_ROOT_FIELD = {
    Root.SCORE: "score",
    Root.BIAS: "bias",
    Root.SINK: "sink",
    Root.EPS: "eps",
    Root.OUTPUT: "output",
}

# Where each index variable lives in the kernels' tile code (program scalars b, h, hk; i along a tile's rows,
# j along its columns); d, e and a transposed tile's j are placed per root (`feature_names`, `row_names`).
# The spec's index variables as the kernels name them. i and j are positions (`_pos_i`, `_pos_j`): the local
# rows `i` and `j` themselves, except under `_SHIFT` (context parallelism), where they are global positions
# and `i`, `j` stay the local rows that index memory and bound the masks.
_AT = {Var.B: "b", Var.H: "h", Var.HK: "hk", Var.I: "_pos_i", Var.J: "_pos_j"}


def _descriptors(*specs: tuple[str, str, str, str, str, str, str]) -> Stmts:
    """Under `_TMA`, a tensor descriptor per (name, base pointer, rows, channels, row stride, block rows,
    block channels): the 2-D [rows, channels] matrix of one (batch, head) at `base`, unit channel stride (the
    launch checked it, `triton._tma_ok`), read in [block rows, block channels] tiles. Otherwise the name is
    the base pointer itself, unused. Rows are at least 1: an idle varlen program has no rows, and a
    descriptor needs some."""
    tma: Stmts = []
    plain: Stmts = []
    for spec in specs:
        tma += _descriptor(*spec)
        plain += S(f"{spec[0]} = {spec[1]}")
    return S("if _TMA:\n    {tma}\nelse:\n    {plain}", tma=tma, plain=plain)


def _descriptor(d: str, base: str, rows: str, chans: str, stride: str, brows: str, bchans: str) -> Stmts:
    """`d` = the tensor descriptor of `_descriptors` (no `_TMA` test: the caller is under one)."""
    return S(
        f"{d} = tl.make_tensor_descriptor({base}, shape=[tl.maximum({rows}, 1), {chans}],"
        f" strides=[{stride}, 1], block_shape=[{brows}, {bchans}])"
    )


def _position(var: str, local: str, offset: str) -> Stmts:
    """`var` = the local row `local` as a position: itself, or under `_SHIFT` plus the launch's `offset`."""
    return S(f"{var} = {local}\nif _SHIFT:\n    {var} = {local} + {offset}")


def _shifted(var: str, offset: str) -> Stmts:
    """A tile start (m0, n0) as a position: under `_SHIFT`, plus the launch's `offset`."""
    return S(f"if _SHIFT:\n    {var} = {var} + {offset}")


Stmts = list[ast.stmt]

# The loops whose interior tiles run lean (`_intervals`: boundary and lean calls of one helper). The key loops
# of the forward (and split forward) and dQ: on sm_90 their lean loop has 2.5x fewer SASS instructions than the
# boundary loop (causal, D = 128, 128 x 64: 409 vs 1039, dQ 365 vs 991), with no spills. Not the dK/dV query
# loop: ptxas spills each copy of its loop separately, and three copies tripled the spill code (680 -> 2412
# bytes at 128 x 64; a feature-map spec spilled at the default tiles), where one loop does not spill.
LEAN_LOOPS = ("fwd", "dq")


class Edge(IntEnum):
    """The `EDGE` constexpr of a lean loop's helper call: which tiles of its range get the bounds and mask."""

    LEAN = 0  # none: every tile lies inside the matrix and is wholly visible
    BOUNDARY = 1  # all of them
    PER_TILE = 2  # those outside [lean_lo, lean_hi), chosen per tile at run time (tiles through TMA only)
    MASKED = 3  # all of them, at the launch's stages (a whole interval's call: tiles through TMA only)


# The lean loops whose interval is one call under `_TMA` for some kernels (`_one_call`), and that call's EDGE:
# descriptor loads need no bounds, so the lean and boundary tiles load alike and only the mask differs. The
# forward's helper picks it per tile with a warp-uniform branch (PER_TILE); the dQ's masks every tile (MASKED),
# which held fewer registers there than the branch (retention D = 64: 72 against 77, decay_abs D = 64 no
# spill against 36 bytes). One pipelined loop body instead of two.
ONE_CALL_LOOPS = {"fwd": Edge.PER_TILE, "dq": Edge.MASKED}


# The dK/dV kernel's tile orientation, a condition on its constexpr tiles that Triton folds (each compile takes
# one branch). Wider key tiles than query tiles run keys as rows, as FlashAttention-2's backward does (Dao,
# 2023, Algorithm 2): the score tile is [BLOCK_N, BLOCK_M], dK and dV accumulate as [BLOCK_N, D] and the
# weights enter dV = PᵀdO as the register (A) operand of the MMA. On sm_90 wgmma splits an A operand's rows
# over warp groups, so 8 warps need 128 of them: at 64 x 128 (causal, D = 128, fp16) the [BLOCK_M, BLOCK_N]
# orientation spilled 1484 bytes and this one none (239 registers); at 128 x 64 it is the other way round
# (246 registers and no spill, against 372 bytes), hence the choice by shape. Tiles of equal size keep the
# [BLOCK_M, BLOCK_N] form, and so do key tiles under 64 rows (one wgmma's M): at 16 x 32 (8 warps) keys as rows
# spilled 40 bytes where the other form took 96 registers.
KEY_ROWS = "(_BLOCK_N > _BLOCK_M) & (_BLOCK_N >= 64)"


@dataclass(frozen=True)
class LoopHelper:
    """A tile loop's body as a `@triton.jit` helper: `state` is carried through the loop and returned,
    `context` are the caller's locals the body reads; after them come the block's shared parameters."""

    name: str
    var: str  # the loop variable: start_n (key loop) or start_m (query loop)
    block: str  # its step: _BLOCK_N or _BLOCK_M
    state: tuple[str, ...]
    context: tuple[str, ...]
    priors: int  # how many earlier plan intervals a call may have to skip (max intervals - 1)
    body: Stmts
    # Whether the helper takes the `EDGE` constexpr (an `Edge`) and the lean interval's bounds: its calls then
    # split each interval into boundary tiles (bounds and mask applied) and lean ones (neither; `_lean_split`).
    edge: bool = False
    kind: str = ""  # fwd, dq or dkdv (the helper is _<block>_<kind>_inner)


@dataclass(frozen=True)
class Kernel:
    signature: KernelSignature
    body: Stmts

    @property
    def name(self) -> str:
        return self.signature.name


def _bound(e: str, clip: str, fn: str, default: str) -> str:
    """`fn(e, clip)`; a literal bound against the default clip (0 or the extent) stays as it is."""
    return e if e.lstrip("-").isdigit() and clip == default else f"{fn}({e}, {clip})"


class KernelWriter:
    def __init__(self, att: Attention) -> None:
        self.att = att
        self.plan: AttentionPlan = plan_attention(att)
        self.norm: NormStrategy = norm_strategy(att)
        self.tx = TritonExprs(att)
        # One emitter for all kernels of the block, so uniform values get one name each (`_ku<k>`).
        self.em: Emitter = self.tx.emitter(self._load, leaf({}))
        # Loads in the (i, j) roots indexed per program only (`slopes[h]`): loaded once per program (per
        # query head in dK/dV) before the tile loop, and read by name inside it (`_pl<k>`).
        self.program_loads: dict[Node, str] = {n: f"_pl{k}" for k, n in enumerate(_program_loads(att))}
        self._in_loop = False  # whether the emitter renders a tile loop's body (program loads by name)
        self.counter = 0
        tiles = _tile_code(att, self.plan)
        self.kv_intervals, self.q_intervals, self.full = tiles.kv_intervals, tiles.q_intervals, tiles.full
        self.kv_lean, self.q_lean = tiles.kv_lean, tiles.q_lean
        # The loop variable of the loop body being built when it has the `EDGE` constexpr (a helper whose plan has
        # lean intervals), else None: its loads and score then drop the bounds and the mask on lean tiles.
        self._edge: str | None = None
        self._kernel = ""  # the kind of kernel being written (`KERNEL_KINDS`), for `_one_call`
        self._kernels: tuple[list[str], list[Kernel]] | None = None
        self._calls: list[ast.Call] = []
        self._loops: dict[str, LoopHelper] = {}
        # Each kernel's `if _VARLEN:` / `if _PAGED:` body, and where in it the recomputed uniforms go (the
        # index from the end: before the varlen body's idle clamp).
        self._varlen_bodies: list[tuple[Stmts, int]] = []

    # ---- what the backends read from the analysis -------------------------------------------------------

    @property
    def summaries(self) -> list[tuple[Node, Node]]:
        return list(self.plan.summaries)

    @property
    def heavy(self) -> int:
        """How many more registers per tile the spec takes (0: none; see `AttentionPlan.heavy`)."""
        return self.plan.heavy

    @property
    def uniforms(self) -> list[str]:
        return [v for v, _ in self.em.hoisted]

    def _load(self, n: Node, args: list[ast.expr]) -> ast.expr:
        if self._in_loop and n in self.program_loads:
            return name(self.program_loads[n])
        return self.tx.load(n, args)

    def _program_load_code(self) -> Stmts:
        """The program loads, before a tile loop (b, h and hk are the program's)."""
        out: Stmts = []
        for n, var in self.program_loads.items():
            e = self.expr(n, {"b": "b", "h": "h", "hk": "hk"}, out)
            out += S(f"{var} = {{e}}", e=e)
        return out

    # ---- expressions --------------------------------------------------------------------------------------

    def expr(self, root: Node, names: dict[str, str], out: Stmts) -> ast.expr:
        """Append the temporaries of `root` to `out`; return its expression."""
        self.em.leaf_code = leaf(names)
        self.counter += 1
        stmts, e = self.em.body_nodes(root, prefix=f"_t{self.counter}_")
        out += stmts
        return e

    def pair_names(self, root: Root) -> dict[str, str]:
        """Names for a root evaluated on an (i, j) tile (score, mask, sigmoid bias)."""
        return {v.value: _AT[v] for v in ROOT_VARS[root]}

    def row_names(self, root: Root) -> dict[str, str]:
        """Names for a root evaluated per query row (sink, eps, output epilogue)."""
        at = {**_AT, Var.E: "offs_e[None, :]"}
        out = {v.value: at[v] for v in ROOT_VARS[root]}
        if root in ROOT_ELEMENT:
            out[ROOT_ELEMENT[root]] = ROOT_ELEMENT[root]
        return out

    def feature_names(self, root: Root) -> dict[str, str]:
        """Names for a feature map: on the q tile [BLOCK_M, D] or on the transposed k tile [D, BLOCK_N]."""
        if root is Root.FEATURE_Q:
            at = {**_AT, Var.D: "offs_d[None, :]"}
            elem = "q.to(tl.float32)"
        else:
            at = {**_AT, Var.D: "offs_d[:, None]"}
            elem = "kt.to(tl.float32)"
        return {ROOT_ELEMENT[root]: elem, **{v.value: at[v] for v in ROOT_VARS[root]}}

    # ---- signatures ---------------------------------------------------------------------------------------

    def spec_group(self) -> ParamGroup:
        """Aux tensors (+ strides and extents), scalars and size symbols, in a fixed order."""
        params: list[Param] = []
        for p in self.att.aux_tensors:
            params.append(pointer(aux_name(p.name), AUX_DTYPES[p.type]))
            params += [i32(f"_s_{p.name}_{k}") for k in range(len(p.shape))]
            params += [i32(f"_n_{p.name}_{k}") for k in range(len(p.shape))]
        params += [
            i32(scalar_name(s.name)) if s.dtype is DType.INT else f32(scalar_name(s.name))
            for s in self.att.scalars
        ]
        params += [i32(s) for s in self.size_symbols()]
        return ParamGroup(Group.SPEC, tuple(params))

    def uniforms_group(self) -> ParamGroup:
        """The hoisted uniforms: known once every kernel of the block is emitted."""
        kinds = {var: node.dtype for node, var in self.em._uniform_names.items()}
        return ParamGroup(
            Group.UNIFORMS, tuple(i32(v) if kinds.get(v) is DType.INT else f32(v) for v in self.uniforms)
        )

    def size_symbols(self) -> list[str]:
        seen: list[str] = []
        for p in self.att.tensors:
            for d in p.shape:
                for n in walk([d]):
                    if n.op is Op.SIZE and n.attr not in seen:
                        seen.append(str(n.attr))
        return seen

    def abi(self) -> BlockABI:
        """The block's own part of its kernels' signatures (the fixed groups are the runtime's)."""
        return BlockABI(
            self.att.name,
            self.spec_group(),
            self.uniforms_group(),
            len(self.plan.summaries),
            self.backward_group(),
            self.aux_grads_group(),
            self.aux_grads_kv_group(),
        )

    def backward_group(self) -> ParamGroup:
        """The output the dQ kernel reads for the row delta: the float32 raw output under an epilogue."""
        if self.att.output is None:
            return ParamGroup(Group.BACKWARD, (pointer("_OB"),))
        # Under an epilogue the dQ kernel also reads dO of the final output (`_DOUT`, the input dtype) and
        # writes dO of the raw output into `_DO` (float32) for the dK/dV kernel: the epilogue's chain rule.
        return ParamGroup(Group.BACKWARD, (pointer("_OB", "fp32"), pointer("_DOUT")))

    def aux_grads_group(self) -> ParamGroup:
        """The dQ kernel's aux-gradient buffers (gated by `_AUX_GRAD`): one float32 partial buffer
        [programs, numel(aux)] per read reduced per program, one [lead..., *aux.shape] per dense (i, j) read
        (`_pair_lead`) and per epilogue read (`epilogue_lead`)."""
        partials = tuple(pointer(f"_GA{n}", "fp32") for n in range(len(self.plan.kernel_reads())))
        dense = tuple(pointer(f"_GD{n}", "fp32") for n in range(len(self.plan.pair_reads())))
        epilogue = tuple(pointer(f"_GE{n}", "fp32") for n in range(len(self.plan.epilogue_reads())))
        feature = tuple(
            pointer(f"_GF{n}", "fp32") for n in range(len(self.plan.feature_reads(Root.FEATURE_Q)))
        )
        return ParamGroup(Group.AUX_GRADS, (*partials, *dense, *epilogue, *feature), gate=AUX_GRAD_GATE)

    def aux_grads_kv_group(self) -> ParamGroup:
        """The dK/dV kernel's aux-gradient buffers (gated by `_AUX_GRAD`): one per read of k's feature map."""
        feature = tuple(pointer(f"_GK{n}", "fp32") for n in range(len(self.plan.kv_reads())))
        return ParamGroup(Group.AUX_GRADS_KV, feature, gate=AUX_GRAD_GATE)

    def signature(self, kind: str) -> KernelSignature:
        """The kernel's parameters (`BlockABI.signature`): the combine reads neither tiles of k nor masks,
        so it carries no summaries, no layout and no visit probe."""
        return self.abi().signature(kind)

    def shared_params(self) -> list[str]:
        """The block's parameters that every loop helper takes after its state and context (all but I/O)."""
        sig = self.signature("fwd")
        return [
            p.name
            for g in sig.groups
            if g.group not in (Group.IO, Group.LAYOUT, Group.PROBE, Group.VARLEN)
            for p in g.params
        ]

    # ---- data-dependent masks: per-tile summaries (computed by a pre-pass on the device) -------------------

    def _own_summaries(self, side: str, row: str, tile: str) -> Stmts:
        """Load this program's own tile summaries (min/max of each summarised value over its tile)."""
        out: Stmts = []
        for n in range(len(self.plan.summaries)):
            for bound in ("min", "max"):
                out += S(
                    f"{side}{bound}{n} = tl.load({{ptr}} + {{row}}.to(tl.int64) * tl.num_programs(0) + {{tile}})",
                    ptr=name(f"_S{side.upper()}{bound.upper()}{n}"),
                    row=name(row),
                    tile=name(tile),
                )
        return out

    def _own_summary_names(self, side: str) -> tuple[str, ...]:
        return tuple(f"{side}{b}{n}" for n in range(len(self.plan.summaries)) for b in ("min", "max"))

    def _summary_condition(self, loop: str) -> str | None:
        """Inside the key loop (forward, dQ) or the query loop (dK/dV): whether a tile can hold a visible pair;
        for each `A(i) == B(j)` conjunct, the tiles' [min, max] ranges of A and B overlap."""
        if not self.plan.summaries:
            return None
        parts = []
        for n in range(len(self.plan.summaries)):
            if loop == "start_n":
                tile = (
                    "(b * _NG + hk).to(tl.int64) * ((_PN + _BLOCK_N - 1) // _BLOCK_N) + start_n // _BLOCK_N"
                )
                parts.append(
                    f"(qmax{n} >= tl.load(_SKMIN{n} + {tile})) & (tl.load(_SKMAX{n} + {tile}) >= qmin{n})"
                )
            else:
                tile = "(b * _NH + h).to(tl.int64) * ((_PM + _BLOCK_M - 1) // _BLOCK_M) + start_m // _BLOCK_M"
                parts.append(
                    f"(kmax{n} >= tl.load(_SQMIN{n} + {tile})) & (tl.load(_SQMAX{n} + {tile}) >= kmin{n})"
                )
        return " & ".join(f"({c})" for c in parts)

    # ---- shared tile code ---------------------------------------------------------------------------------

    def _tile_load(
        self,
        target: str,
        ptr: str,
        rows: str,
        chans: str | None,
        other: str = "0.0",
        desc: tuple[str, str] | None = None,
        transpose: bool = False,
        masked_by_pointer: bool = False,
    ) -> Stmts:
        """`target = tl.load(ptr)` masked by the tile's row bounds `rows` and channel bounds `chans`. In a
        loop body with `EDGE`, the lean calls (EDGE = LEAN) keep only the channel mask: their tiles lie
        inside the matrix (`_intervals`). `desc` (a tensor descriptor's name and the tile's first row, e.g.
        ("k_desc", "start_n")): under `_TMA` the tile comes through it instead, rows by channels (`transpose`:
        then transposed, for kᵀ). The descriptor's bounds are the matrix's, so its loads need no mask at all:
        TMA fills rows and channels outside with zeros. `masked_by_pointer`: the call with every tile masked
        (EDGE = MASKED) loads by pointer even under `_TMA`."""
        mask = f"({rows}) & ({chans})" if chans else rows
        edge = S(f"{target} = tl.load({ptr}, mask={mask}, other={other})")
        if self._edge:
            lean = S(
                f"{target} = tl.load({ptr}, mask={chans}, other={other})"
                if chans
                else f"{target} = tl.load({ptr})"
            )
            # Every call but the lean ones loads with the bounds (under TMA only the block table's load is a
            # pointer load).
            edge = S(f"if EDGE != {int(Edge.LEAN)}:\n    {{edge}}\nelse:\n    {{lean}}", edge=edge, lean=lean)
        if desc is None:
            return edge
        d, row = desc
        tile = f"tl.trans({d}.load([{row}, 0]))" if transpose else f"{d}.load([{row}, 0])"
        # Without `EDGE` (no lean interval) the helper has no MASKED call to tell apart: descriptors.
        tma = f"_TMA & (EDGE != {int(Edge.MASKED)})" if masked_by_pointer and self._edge else "_TMA"
        return S(f"if {tma}:\n    {target} = {tile}\nelse:\n    {{ptr}}", ptr=edge)

    def _score_block(self, out: Stmts, i: str, j: str) -> None:
        """qk -> valid (bool tile) and s (float32 tile, the score where valid)."""
        att = self.att
        names = self.pair_names(Root.SCORE)
        # In positions (`_m_end`, `_n_end`: the rows' ends as positions, from the loop helper's prelude), so
        # that under `_SHIFT` the local rows need not stay live beside the positions in the loop.
        i, j = "_pos_i", "_pos_j"
        in_range = "(_pos_i < _m_end) & (_pos_j < _n_end)"
        bounds: Stmts = []
        if att.mask is None:
            bounds += S(f"valid = {in_range}")
        else:
            inner: Stmts = []
            m = self.expr(att.mask, names, inner)
            if not (uses_var(att.mask, Var.I) and uses_var(att.mask, Var.J)):
                # Broadcast to a tile first: the interpreter mis-types `tile_bool & scalar_bool`.
                m = expr_from_string(f"(({{m}}).to(tl.int32) + 0 * {i} + 0 * {j}) != 0", m=m)
            inner += S(f"valid = {in_range} & {{m}}", m=m)
            index_only = self.plan.tiles is not None and not self.plan.tiles.data_dependent
            if self.full is not None and not (self._edge and index_only):
                # A tile the analysis proves fully visible skips the mask arithmetic. Not for index-only masks
                # under the lean split: its edge tiles are the partly visible ones (and the matrix's last),
                # so the cheap side is rarely taken, while two paths for `valid` cost registers (sm_90 causal
                # forward, D = 64, 128 x 128 on 4 warps: 176 spill bytes with the branch, 0 without).
                bounds += S(
                    f"if {{full}}:\n    valid = {in_range}\nelse:\n    {{inner}}", full=self.full, inner=inner
                )
            else:
                bounds += inner
        softmax = self.norm.kind is NormKind.SOFTMAX
        # The softmax works in base 2: the score comes out already times log2(e) (`log2_score`), so that
        # `dot(q, k) * scale` costs one multiply per element, by the hoisted uniform scale·log2(e).
        target, fill = ("s2", "float('-inf')") if softmax else ("s", "0.0")
        if not self._edge:
            out += bounds
            sc = self.expr(self.log2_score() if softmax else att.score, names, out)
            out += S(f"{target} = tl.where(valid, {{s}}, {fill})", s=sc)
            return
        # The score once, before the branches: a per-tile call compiles both of them.
        out += S("sc = {s}", s=self.expr(self.log2_score() if softmax else att.score, names, out))

        def masked() -> Stmts:
            return S(f"{target} = tl.where(valid, sc, {fill})")

        # A lean tile is inside the matrix and wholly visible: `valid` is a constant true tile, which Triton
        # folds out of every `tl.where(valid, ...)` (no compare, no select on the tile). A tile, not the scalar
        # True: a score that is uniform over the tile must still broadcast to one. Per tile (EDGE = PER_TILE),
        # the branch sets the masked score too, so that the score tile, not a bool tile beside it, is what the
        # two paths merge (a merged `valid` held 37 more registers in causal's forward, sm_90, D = 128).
        edge = [*bounds, *masked()]
        lean = [*S("valid = tl.full([_BLOCK_M, _BLOCK_N], True, tl.int1)"), *masked()]
        var = self._edge
        out += S(
            f"""
            if EDGE == {int(Edge.PER_TILE)}:
                if ({var} < lean_lo) | ({var} >= lean_hi):
                    {{edge}}
                else:
                    {{lean}}
            elif EDGE != {int(Edge.LEAN)}:
                {{edge2}}
            else:
                {{lean2}}
            """,
            edge=edge,
            lean=lean,
            edge2=copy.deepcopy(edge),
            lean2=copy.deepcopy(lean),
        )

    def log2_score(self) -> Node:
        """The score times log2(e), the constant pushed into sums and onto a uniform factor of a product
        (which the emitter hoists as one `_ku`), else one multiply at the end."""
        return _times(self.att.score, LOG2E)

    def _feature(self, root: Node | None, tensor: str, which: Root, out: Stmts, pad: bool = False) -> str:
        """The feature map of q or k applied to its tile (`qf`, `ktf`); returns the name of the dot operand.
        `pad`: zero the tile's channels beyond D."""
        if root is None:
            return tensor
        e = self.expr(root, self.feature_names(which), out)
        q_side = which is Root.FEATURE_Q
        if not _finite_at_zero(root):
            # Lanes outside the loaded tile (rows beyond M or N, channels beyond D) were loaded as 0, where
            # this map may not be finite (k * (0.5 / k) is NaN at 0): zeros in the other operand, or a masked
            # dS, would not cancel it (0 * NaN = NaN; found by the fuzz run). Zero the whole outside.
            inside = (
                "(i < _M) & (offs_d[None, :] < _D)"
                if q_side
                else "(offs_n[None, :] < _N) & (offs_d[:, None] < _D)"
            )
        elif pad:
            # Channels beyond D (D not a power of two) were loaded as 0, but a feature map of 0 need not be 0
            # (elu(0) + 1 = 1). Zeroing them in one operand of each q·k suffices (the other operand is finite
            # there): the other's padded channels then meet zeros, and dq, dk are stored for d < D only. Each
            # kernel zeroes its q tile (forward, dq: mapped once per program; dkdv: per tile), which keeps
            # every default config free of spills on sm_90 (zeroing both operands, or dkdv's k, spilled).
            inside = "offs_d[None, :] < _D" if q_side else "offs_d[:, None] < _D"
        else:
            out += S(f"{tensor}f = ({{e}}).to({tensor}.dtype)", e=e)
            return f"{tensor}f"
        out += S(f"{tensor}f = tl.where({inside}, {{e}}, 0.0).to({tensor}.dtype)", e=e)
        return f"{tensor}f"

    def _feature_grad(self, root: Node | None, t: str, which: Root, L: Stmts) -> None:
        """d(raw) = d(feature) · φ'(raw), elementwise."""
        if root is None:
            return
        elem = next(n for n in walk([root]) if n.op is Op.ELEM)
        e = self.expr(gradients(root, [elem])[elem], self.feature_names(which), L)
        L += S(f"d{t} = d{t} * {{e}}", e=e)

    # ---- tile loops: one helper per kind, called per interval and per form --------------------------------

    def _loop_call(
        self,
        helper: LoopHelper,
        lo: str,
        hi: str,
        prior: int,
        edge: Edge = Edge.BOUNDARY,
        lean: tuple[str, str] = ("0", "0"),
    ) -> Stmts:
        """`state = helper(state, lo, hi, PRIOR, [EDGE, lean_lo, lean_hi,] earlier intervals' bounds, context,
        shared)`; `lean`: the lean tiles' bounds for EDGE = PER_TILE."""
        pairs = [a for p in range(helper.priors) for a in ((f"lo{p}", f"hi{p}") if p < prior else ("0", "0"))]
        args = [
            *helper.state,
            lo,
            hi,
            str(prior),
            *((str(int(edge)), *lean) if helper.edge else ()),
            *pairs,
            *helper.context,
        ]
        call = ast.Call(name(helper.name), [ast.parse(a, mode="eval").body for a in args], [])
        # The block's shared parameters (the hoisted uniforms among them) are final only once every kernel is
        # emitted: `kernels()` appends them to each call then.
        self._calls.append(call)
        target = ast.Tuple([ast.Name(s, ast.Store()) for s in helper.state], ast.Store())
        return [ast.Assign([target], call)]

    def _intervals(self, helper: LoopHelper, range_lo: str, range_hi: str) -> Stmts:
        """The loop over [range_lo, range_hi) as one helper call per interval of the plan, each intersected
        with the range. A tile that several intervals cover is visited once: by the first interval containing
        it (the helper skips tiles of the earlier ones: the intervals need not be sorted)."""
        extent, intervals = ("_N", self.kv_intervals) if helper.var == "start_n" else ("_M", self.q_intervals)
        lean = self.kv_lean if helper.var == "start_n" else self.q_lean
        offset = "_K_POS" if helper.var == "start_n" else "_Q_POS"
        out: Stmts = []
        for n, (lo, hi) in enumerate(intervals):
            out += S(f"lo{n} = {_bound(lo, range_lo, 'tl.maximum', '0')}")
            out += S(f"hi{n} = {_bound(hi, range_hi, 'tl.minimum', extent)}")
            # Under `_SHIFT` the plan's bounds are positions: the loop's range is local rows. (The fallback
            # of a spec without a plan, [0, extent), is local already.)
            if (lo, hi) != ("0", extent):
                out += S(
                    f"if _SHIFT:\n    lo{n} = tl.maximum(({lo}) - {offset}, {range_lo})\n"
                    f"    hi{n} = tl.minimum(({hi}) - {offset}, {range_hi})"
                )
            if helper.edge:
                out += self._lean_split(helper, n, lean[n] if len(lean) == len(intervals) else lean[0])
            else:
                out += self._loop_call(helper, f"lo{n}", f"hi{n}", n)
        return out

    def _lean_split(self, helper: LoopHelper, n: int, lean: tuple[str, str]) -> Stmts:
        """Interval n's tiles [lo_n, hi_n) in three calls: boundary tiles before the lean interval, the tiles
        wholly inside it (EDGE = LEAN), the boundary tiles after it. The lean ones must also lie inside the
        matrix: the program's own tile whole (else the lean range is empty) and the tiles below the extent.
        Tile starts stay multiples of the block (the helper starts at lo rounded down), so every tile of the
        interval is visited exactly once, as by one call; a lean interval starting at 0 needs no first call.
        Where the kernel takes the one-call form (`_one_call`), under `_TMA` one call visits [lo_n, hi_n) instead,
        told the lean bounds (EDGE = PER_TILE) or masking every tile (EDGE = MASKED)."""
        blk = helper.block
        if helper.var == "start_n":
            extent, offset, whole = "_N", "_K_POS", "pid_m * _BLOCK_M + _BLOCK_M <= _M"
        else:
            extent, offset, whole = "_M", "_Q_POS", "pid_n * _BLOCK_N + _BLOCK_N <= _N"
        flo, fhi = lean
        up = f"(hi{n} + {blk} - 1) // {blk} * {blk}"  # the interval's end, rounded up to a tile
        lead = flo != "0"
        out = S(f"f_hi = {fhi}\nif _SHIFT:\n    f_hi = f_hi - {offset}")
        start = f"lo{n} // {blk} * {blk}"
        if lead:
            out += S(f"f_lo = {flo}\nif _SHIFT:\n    f_lo = f_lo - {offset}")
            start = f"tl.maximum({start}, tl.minimum((f_lo + {blk} - 1) // {blk} * {blk}, {up}))"
        out += S(
            f"""
            f_hi = tl.where({whole}, tl.minimum(f_hi, {extent}), 0)
            lean_lo{n} = {start}
            lean_hi{n} = tl.maximum(lean_lo{n}, tl.minimum(tl.maximum(f_hi, 0) // {blk} * {blk}, {up}))
            """
        )
        calls: Stmts = []
        if lead:
            calls += self._loop_call(helper, f"lo{n}", f"lean_lo{n}", n)
        calls += self._loop_call(helper, f"lean_lo{n}", f"lean_hi{n}", n, edge=Edge.LEAN)
        calls += self._loop_call(helper, f"lean_hi{n}", f"hi{n}", n)
        if helper.kind not in ONE_CALL_LOOPS or not self._one_call(self._kernel):
            return out + calls
        # Tiles through TMA: one call over the same tiles (`ONE_CALL_LOOPS`).
        edge = ONE_CALL_LOOPS[helper.kind]
        one = self._loop_call(helper, f"lo{n}", f"hi{n}", n, edge=edge, lean=(f"lean_lo{n}", f"lean_hi{n}"))
        return out + S("if _TMA:\n    {one}\nelse:\n    {calls}", one=one, calls=calls)

    def _one_call(self, kernel: str) -> bool:
        """Whether kernel `kernel` calls its lean loop of `ONE_CALL_LOOPS` once per interval under `_TMA`:
        the split forward; the forward for weights other than the softmax's or a heavy score; the dQ for
        weights other than the softmax's. Measured on sm_90 (fp16, default tiles, registers): those hold fewer
        registers with one loop body (forwards: lightning D = 128 192 -> 109, linear_bidir D = 64 242 -> 174,
        relpos_table D = 128 145 -> 114; split forwards: chunked_local D = 64 72 -> 67; dQ: retention D = 64
        84 -> 72, gated_linear D = 64 84 -> 68), the others with two (causal's forward D = 128 142 against
        170, alibi's D = 64 170 against 213; t5_bias's dQ D = 64 63 against 70)."""
        if kernel == "fwd_split":
            return True
        if kernel == "bwd_dq":
            return self.norm.kind is not NormKind.SOFTMAX
        return self.norm.kind is not NormKind.SOFTMAX or self.heavy > 0

    def _tile_loop(self, helper: LoopHelper, range_lo: str, range_hi: str) -> Stmts:
        """The loop in both forms: under `_LAYOUT`, an outer loop over the blocks the runtime layout lists for
        this program's block (key blocks for a query tile in the forward and dQ, query blocks for a key tile in
        dK/dV, per query head h), each clipped to the loop's range; otherwise the range itself. Either way the
        tile plan's intervals then restrict it, so the spec's mask still skips."""
        if helper.var == "start_n":  # key blocks listed for this query tile's block (BLOCK_M divides _QBLK)
            own, cnt, idx, size = "(pid_m * _BLOCK_M) // _QBLK", "_LKV_CNT", "_LKV_IDX", "_KVBLK"
            cs, xs = ("_slkc_b", "_slkc_h", "_slkc_m"), ("_slk_b", "_slk_h", "_slk_m", "_slk_k")
        else:  # query blocks listed for this key tile's block (BLOCK_N divides _KVBLK)
            own, cnt, idx, size = "(pid_n * _BLOCK_N) // _KVBLK", "_LQ_CNT", "_LQ_IDX", "_QBLK"
            cs, xs = ("_slqc_b", "_slqc_h", "_slqc_n"), ("_slq_b", "_slq_h", "_slq_n", "_slq_k")
        listed = S(
            f"""
            lay_blk = {own}
            lay_cnt = tl.load({cnt} + b.to(tl.int64) * {cs[0]} + h.to(tl.int64) * {cs[1]} + lay_blk * {cs[2]})
            for lay_t in range(0, lay_cnt):
                lay_b = tl.load({idx} + b.to(tl.int64) * {xs[0]} + h.to(tl.int64) * {xs[1]} + lay_blk * {xs[2]} + lay_t * {xs[3]})
                lay_lo = tl.maximum(lay_b * {size}, {range_lo})
                lay_hi = tl.minimum(lay_b * {size} + {size}, {range_hi})
                {{loop}}
            """,
            loop=self._intervals(helper, "lay_lo", "lay_hi"),
        )
        return S(
            "if _LAYOUT:\n    {listed}\nelse:\n    {plain}",
            listed=listed,
            plain=self._intervals(helper, range_lo, range_hi),
        )

    def _helper(
        self,
        kind: str,
        var: str,
        state: tuple[str, ...],
        context: tuple[str, ...],
        body: Stmts,
        edge: bool = False,
    ) -> LoopHelper:
        block = "_BLOCK_N" if var == "start_n" else "_BLOCK_M"
        intervals = self.kv_intervals if var == "start_n" else self.q_intervals
        priors = len(intervals) - 1
        # Which tiles of [lo, hi) the body runs for: not those of an earlier interval (the first PRIOR ones,
        # a constexpr per call), and only those whose data-dependent summaries can meet.
        extra = self._summary_condition(var)
        cases: list[str | None] = []
        for prior in range(priors + 1):
            conds = [f"(({var} < (p{p}_lo // {block}) * {block}) | ({var} >= p{p}_hi))" for p in range(prior)]
            if extra:
                conds.append(f"({extra})")
            cases.append(" & ".join(conds) if conds else None)
        if all(c is None for c in cases):
            inner = body
        elif len(cases) == 1:
            inner = S("if {c}:\n    {body}", c=cases[0], body=body)
        else:
            # PRIOR is a constexpr: each call compiles exactly one branch of this chain.
            chain: Stmts = S("take = {c}", c=cases[-1] or "True")
            for prior in range(priors - 1, -1, -1):
                chain = S(
                    f"if PRIOR == {prior}:\n    take = {{c}}\nelse:\n    {{rest}}",
                    c=cases[prior] or "True",
                    rest=chain,
                )
            inner = [*chain, *S("if take:\n    {body}", body=body)]
        # The first tile starts at lo rounded down to a tile (computed here, not by the caller: on sm_90 that
        # keeps the register count of the loop written in the kernel).
        steps = f"(lo // {block}) * {block}, hi, {block}"
        if edge:
            # Boundary calls visit a tile or two: software-pipelining them (the launch's stages) buys no overlap
            # and its prologue costs registers (decay_abs dQ, fp16, D = 64: a 16-byte spill, none with one
            # stage). The lean calls keep the launch's stages.
            steps += f", num_stages=1 if EDGE == {int(Edge.BOUNDARY)} else None"
        # `_WS`: every key loop of the kernel or none (sm_100, Triton 3.9: partitioning the lean loop alone
        # fails to compile when the boundary loop follows it).
        loop = S(f"for {var} in tl.range({steps}, warp_specialize=_WS):\n    {{body}}", body=inner)
        # The program's own tile start, from its program id here rather than passed in: the tile plan's
        # bounds then fold as they do in one function (a register less on sm_90 for some dQ kernels).
        if var == "start_n":
            own = [
                *S("m0 = pid_m * _BLOCK_M"),
                *_shifted("m0", "_Q_POS"),
                *_position("_pos_i", "i", "_Q_POS"),
            ]
        else:
            own = [
                *S("n0 = pid_n * _BLOCK_N"),
                *_shifted("n0", "_K_POS"),
                *S(f"if {KEY_ROWS}:\n    j = offs_n[:, None]"),  # keys as rows (the dK/dV kernel's choice)
                *_position("_pos_j", "j", "_K_POS"),
            ]
        own += [*_position("_m_end", "_M", "_Q_POS"), *_position("_n_end", "_N", "_K_POS")]
        name_ = f"_{self.att.name}_{kind}_inner"
        return LoopHelper(name_, var, block, state, context, priors, [*own, *loop], edge, kind)

    def _render_helper(self, h: LoopHelper) -> list[str]:
        shared = self.shared_params()
        constexprs = set(self.signature("fwd").constexprs) | {"PRIOR", "EDGE", AUX_GRAD_GATE}
        params = [
            *h.state,
            "lo",
            "hi",
            "PRIOR",
            *(("EDGE", "lean_lo", "lean_hi") if h.edge else ()),
            *(f"p{p}_{e}" for p in range(h.priors) for e in ("lo", "hi")),
            *h.context,
            *shared,
        ]
        ret = S("return {r}", r=ast.Tuple([name(s) for s in h.state], ast.Load()))
        return _render_def(h.name, params, constexprs, [*h.body, *ret])

    # ---- forward ------------------------------------------------------------------------------------------

    def _query_program(self, kind: str) -> Stmts:
        """Program ids of a (query tile, batch·head) program and its rows (in a varlen launch: of its sequence)."""
        return (
            S(
                """
            pid_m = tl.program_id(0)
            pid_bh = tl.program_id(1)
            b = pid_bh // _NH
            h = pid_bh % _NH
            hk = h // (_NH // _NG)
            _PM = _M
            _PN = _N
            """
            )
            + self._varlen_prologue(kind, "pid_m * _BLOCK_M >= _M")
            + self._paged_prologue(kind)
            + S("offs_m = pid_m * _BLOCK_M + tl.arange(0, _BLOCK_M)")
        )

    def _paged_prologue(self, kind: str) -> Stmts:
        """Under `_PAGED` (the forward kernels over a paged KV cache): the sequence's key count becomes `_N`
        and the keys' length symbol, so the tile plan's bounds and the masks see logical positions; the
        length-reading uniforms are recomputed (`_varlen_uniforms`). The rows come through the block table
        in the key loop (`_forward_helper`)."""
        if kind not in ("fwd", "fwd_split"):
            return []
        body: Stmts = S("_N = tl.load(_KV_LEN + b)")
        q_len, k_len = self.length_symbols()
        if k_len is not None and k_len != q_len:
            body += S(f"{k_len} = _N")
        block = S("if _PAGED:\n    {body}", body=body)
        self._varlen_bodies.append((block[0].body, 0))  # type: ignore[attr-defined]
        return block

    def _varlen_prologue(self, kind: str, idle: str) -> Stmts:
        """Under `_VARLEN` (a packed variable-length batch: b is the sequence), the program's sequence: `_M`
        and `_N` (and the spec's length symbols, which the tile plan's bounds read) become its lengths, the
        packed tensors' pointers move to its first row, and a program whose tile `idle` lies past its end
        visits no tile (the grid covers the longest sequence). Tiles never mix sequences; the per-row buffers keep
        their pitch (`_PM`, `_PN`: the launch's `_M` and `_N`, kept before the rebinding). Hoisted uniforms that read a length are recomputed here at the end of
        `kernels()`, when every uniform is known (`_varlen_uniforms`)."""
        present = set(self.signature(kind).names)
        body: Stmts = S(
            """
            q_start = tl.load(_CU_Q + b).to(tl.int64)
            _M = tl.load(_CU_Q + b + 1) - tl.load(_CU_Q + b)
            k_start = tl.load(_CU_K + b).to(tl.int64)
            _N = tl.load(_CU_K + b + 1) - tl.load(_CU_K + b)
            """
        )
        q_len, k_len = self.length_symbols()
        if q_len is not None and q_len != k_len:
            body += S(f"{q_len} = _M")
        if k_len is not None:
            body += S(f"{k_len} = _N")
        for ptr, (start, stride) in _VARLEN_REBASE.items():
            if ptr in present:
                body += S(f"{ptr} = {ptr} + {start} * {stride}")
        # A program past its sequence's end visits nothing: its loop's extent becomes 0 (an early `return`
        # costs sm_90 registers and spills in the heavier dQ kernels) and its stores are masked off.
        loop_extent = "_N" if idle.endswith("_M") else "_M"
        body += S(f"{loop_extent} = tl.where({idle}, 0, {loop_extent})")
        block = S("if _VARLEN:\n    {body}", body=body)
        self._varlen_bodies.append((block[0].body, 1))  # type: ignore[attr-defined]
        return block

    def length_symbols(self) -> tuple[str | None, str | None]:
        """The size symbols of q's and k's sequence axes (None where that axis is not a plain symbol)."""
        out: list[str | None] = []
        for role in ("q", "k"):
            d = self.att.param(role).shape[2]  # type: ignore[union-attr]
            out.append(str(d.attr) if d.op is Op.SIZE else None)
        return out[0], out[1]

    def _varlen_uniforms(self) -> Stmts:
        """The hoisted uniforms that read a sequence length, recomputed in the kernel from the rebound lengths
        (`-log(N)` of a sigmoid bias): the host's value is that of the longest sequence."""
        lengths = {s for s in self.length_symbols() if s is not None}
        out: Stmts = []
        for node, var in self.em._uniform_names.items():
            if not any(n.op is Op.SIZE and str(n.attr) in lengths for n in walk([node])):
                continue
            vals: dict[Node, ast.expr] = {}
            for n in linearize([node]):
                if n.op is Op.CONST:
                    vals[n] = _f32_constant(n.attr) or constant(n.attr)  # type: ignore[arg-type]
                elif n.op is Op.SIZE:
                    vals[n] = name(str(n.attr))
                elif n.op is Op.SCALAR:
                    vals[n] = name(scalar_name(str(n.attr)))
                else:
                    vals[n] = self.tx.apply(n, [vals[a] for a in n.args], [False] * len(n.args))
            out += S(f"{var} = {{e}}", e=vals[node])
        return out

    def _query_tile_prologue(self, kind: str) -> Stmts:
        """Program ids of a (query tile, batch, head) program, its offsets, and its q tile."""
        ptr = S(
            "q = tl.load(_Q + b.to(tl.int64) * _sq_b + h.to(tl.int64) * _sq_h + i * _sq_n + offs_d[None, :] * _sq_d,"
            " mask=(i < _M) & (offs_d[None, :] < _D), other=0.0)"
        )
        if kind == "fwd":
            # Under `_TMA` the forward's q tile comes through a descriptor when the kernel warp-specialises
            # (`_WS`: a key loop that reads a pointer-loaded q does not) or its intervals split into a lean
            # and a boundary loop; otherwise a pointer load. Measured on sm_90 (fp16, registers): the two-loop
            # forwards hold fewer with the descriptor (chunked_local D = 128: 175 against 188, causal 142
            # against 150), the one-loop ones with the pointer load (key_padding D = 128: 142 against 175,
            # linear_elu 165 against 204), as the dQ kernel does (relpos_table D = 64: 32 spill bytes with
            # the descriptor) and the split forward (58 -> 72 registers at D = 64).
            split = bool(self.kv_lean) and "fwd" in LEAN_LOOPS and not self._one_call(kind)
            desc = ("q_desc", "_Q + b.to(tl.int64) * _sq_b + h.to(tl.int64) * _sq_h", "_M", "_D", "_sq_n")
            ptr = S(
                f"if {'_TMA' if split else '_TMA and _WS'}:\n    {{desc}}\n    q = q_desc.load([pid_m * _BLOCK_M, 0])\nelse:\n    {{ptr}}",
                desc=_descriptor(*desc, "_BLOCK_M", "_BLOCK_D"),
                ptr=ptr,
            )
        return (
            self._query_program(kind)
            + S(
                """
            offs_d = tl.arange(0, _BLOCK_D)
            offs_e = tl.arange(0, _BLOCK_E)
            i = offs_m[:, None]
            """
            )
            + ptr
            + _position("_pos_i", "i", "_Q_POS")
        )

    def _forward_helper(self) -> LoopHelper:
        """The forward's key-loop body: one key tile's scores, weights and accumulation (the norm's update)."""
        if "fwd" in self._loops:
            return self._loops["fwd"]
        att = self.att
        self._in_loop = True
        self._edge = "start_n" if "fwd" in LEAN_LOOPS and self.kv_lean else None
        B: Stmts = S(
            """
            n0 = start_n
            if _SHIFT:
                n0 = start_n + _K_POS
            visits += 1
            offs_n = start_n + tl.arange(0, _BLOCK_N)
            j = offs_n[None, :]
            _pos_j = j
            if _SHIFT:
                _pos_j = j + _K_POS
            """
        )
        paged = self._tile_load(
            "kv_page", "_BT + b.to(tl.int64) * _sbt_b + offs_n // _PAGE", "offs_n < _N", None, "0"
        )
        B += S(
            "if _PAGED:\n    {page}\n    kv_row = kv_page.to(tl.int64) * _PAGE + offs_n % _PAGE\nelse:\n    kv_row = offs_n",
            page=paged,
        )
        B += self._tile_load(
            "kt",
            "k_base + kv_row[None, :] * _sk_n + offs_d[:, None] * _sk_d",
            "offs_n[None, :] < _N",
            "offs_d[:, None] < _D",
            desc=("k_desc", "start_n"),
            transpose=True,
        )
        # Under `_PAGED`, logical key n is row n % page of page block_table[b, n // page] (`kv_row`).
        kname = self._feature(att.feature_k, "kt", Root.FEATURE_K, B)
        B += S("qk = tl.dot(q_op, {k}, input_precision=_DOT_PRECISION)", k=kname)
        self._score_block(B, "i", "j")
        load_v = self._tile_load(
            "v",
            "v_base + kv_row[:, None] * _sv_n + offs_e[None, :] * _sv_d",
            "offs_n[:, None] < _N",
            "offs_e[None, :] < _E",
            desc=("v_desc", "start_n"),
        )
        self.norm.update(self, B, load_v)
        self._in_loop = False
        edge, self._edge = self._edge is not None, None
        context = (
            *self.program_loads.values(),
            "q_op",
            "k_base",
            "v_base",
            "k_desc",
            "v_desc",
            "b",
            "h",
            "hk",
            "i",
            "offs_d",
            "offs_e",
            "pid_m",
            "_PN",
            *self._own_summary_names("q"),
        )
        helper = self._helper(
            "fwd",
            "start_n",
            ("m_i", "l_i", "acc", "visits"),
            context,
            B,
            edge,
        )
        self._loops["fwd"] = helper
        return helper

    def _forward_loop(self, L: Stmts, key_range: tuple[str, str], before_loop: Stmts, kind: str) -> None:
        """The forward up to the end of its key loop over `key_range` (all keys, or one split's): q tile,
        running statistics (m_i, l_i, acc) and the key loop."""
        att = self.att
        self._kernel = kind
        L += self._query_tile_prologue(kind)
        qname = self._feature(att.feature_q, "q", Root.FEATURE_Q, L, pad=True)
        helper = self._forward_helper()
        L += self._program_load_code()
        L += S(
            f"""
            q_op = {qname}
            k_base = _K + b.to(tl.int64) * _sk_b + hk.to(tl.int64) * _sk_h
            v_base = _V + b.to(tl.int64) * _sv_b + hk.to(tl.int64) * _sv_h
            m_i = tl.full([_BLOCK_M, 1], float('-inf'), tl.float32)
            l_i = tl.full([_BLOCK_M, 1], 0.0, tl.float32)
            acc = tl.full([_BLOCK_M, _BLOCK_E], 0.0, tl.float32)
            m0 = pid_m * _BLOCK_M
            """
        )
        L += _descriptors(
            ("k_desc", "k_base", "_N", "_D", "_sk_n", "_BLOCK_N", "_BLOCK_D"),
            ("v_desc", "v_base", "_N", "_E", "_sv_n", "_BLOCK_N", "_BLOCK_E"),
        )
        L += _shifted("m0", "_Q_POS")
        L += self._own_summaries("q", "pid_bh", "pid_m")
        L += before_loop
        L += S("visits = pid_m * 0")
        L += self._tile_loop(helper, *key_range)

    def _forward_epilogue(self, L: Stmts, tma_store: bool = False) -> None:
        """From the running statistics (m_i, l_i, acc) of a whole key range to o and the row statistic: the
        norm's finish (sink, normalisation), the output epilogue and the stores. Shared by the one-pass forward
        and the split-KV combine, so both paths end in the very same code. `tma_store` (the forward): under
        `_TMA`, o leaves through a tensor descriptor, whose bounds clip the rows and channels past the end."""
        self.norm.finish(self, L)
        L += _varlen_store_rebase("_O", *(("_ORAW",) if self.att.output is not None else ()))
        L += S(
            """
            o_off = b.to(tl.int64) * _so_b + h.to(tl.int64) * _so_h + i * _so_n + offs_e[None, :] * _so_d
            o_mask = (i < _M) & (offs_e[None, :] < _E)
            """
        )
        if self.att.output is not None:
            L += S("tl.store(_ORAW + o_off, o, mask=o_mask)")
            out = self.expr(self.att.output, self.row_names(Root.OUTPUT), L)
            L += S("o = {out}", out=out)
        store = S("tl.store(_O + o_off, o.to(_O.dtype.element_ty), mask=o_mask)")
        if tma_store:
            desc = ("o_desc", "_O + b.to(tl.int64) * _so_b + h.to(tl.int64) * _so_h", "_M", "_E", "_so_n")
            tile = "tl.broadcast_to(o, [_BLOCK_M, _BLOCK_E]).to(_O.dtype.element_ty)"
            store = S(
                "if _TMA:\n    {desc}\n    o_desc.store([pid_m * _BLOCK_M, 0], {tile})\nelse:\n    {store}",
                desc=_descriptor(*desc, "_BLOCK_M", "_BLOCK_E"),
                tile=expr_from_string(tile),
                store=store,
            )
        L += store
        L += S("tl.store(_STAT + pid_bh.to(tl.int64) * _PM + i, stat, mask=i < _M)")

    def forward(self) -> Kernel:
        L: Stmts = []
        self._forward_loop(L, ("0", "_N"), [], "fwd")
        self._forward_epilogue(L, tma_store=True)
        L += S(
            """
            if _COUNT_VISITS:
                tl.store(_VISITS + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m, visits)
            """
        )
        return Kernel(self.signature("fwd"), L)

    # ---- split-KV forward for decoding shapes (FlashDecoding: Dao, Haziza, Massa, Sizov, 2023) ---------------

    def forward_split(self) -> Kernel:
        """Program (query tile, batch·head, split) runs the forward over the keys [split_lo, split_hi) only, the
        split's range intersected with the tile plan, and writes a float32 partial (the norm's `partial`).
        Partials are [B·H, S, M, E] and [B·H, S, M], contiguous. The sink, the normalisation and the epilogue
        wait for the combine, so the sink counts once."""
        L: Stmts = []
        # The split's bounds: _SPLIT_N (keys per split) is a multiple of _BLOCK_N.
        bounds = S(
            """
            pid_s = tl.program_id(2)
            split_lo = pid_s * _SPLIT_N
            split_hi = tl.minimum(split_lo + _SPLIT_N, _N)
            """
        )
        self._forward_loop(L, ("split_lo", "split_hi"), bounds, "fwd_split")
        L += S("part = (pid_bh.to(tl.int64) * tl.num_programs(2) + pid_s) * _PM + i")
        self.norm.partial(L)
        L += S(
            """
            tl.store(_OPART + part * _E + offs_e[None, :], o_s, mask=(i < _M) & (offs_e[None, :] < _E))
            tl.store(_LPART + part, l_s, mask=i < _M)
            if _COUNT_VISITS:
                tl.store(_VISITS + (pid_bh.to(tl.int64) * tl.num_programs(2) + pid_s) * tl.num_programs(0) + pid_m, visits)
            """
        )
        return Kernel(self.signature("fwd_split"), L)

    def combine(self) -> Kernel:
        """Merge the _NSPLIT partials of each row into the running statistics of one pass over all keys (the
        norm's `merge`: exactly (m, l, acc) of the unsplit loop), then run the forward's own epilogue."""
        L: Stmts = (
            self._query_program("fwd_combine")
            + S(
                """
            offs_e = tl.arange(0, _BLOCK_E)
            i = offs_m[:, None]
            m_i = tl.full([_BLOCK_M, 1], float('-inf'), tl.float32)
            l_i = tl.full([_BLOCK_M, 1], 0.0, tl.float32)
            acc = tl.full([_BLOCK_M, _BLOCK_E], 0.0, tl.float32)
            """
            )
            + _position("_pos_i", "i", "_Q_POS")
        )
        merge: Stmts = S(
            """
            part = (pid_bh.to(tl.int64) * _NSPLIT + split) * _PM + i
            o_s = tl.load(_OPART + part * _E + offs_e[None, :], mask=(i < _M) & (offs_e[None, :] < _E), other=0.0)
            """
        )
        self.norm.merge(merge)
        L += S("for split in range(0, _NSPLIT):\n    {merge}", merge=merge)
        self._forward_epilogue(L)
        return Kernel(self.signature("fwd_combine"), L)

    # ---- backward -----------------------------------------------------------------------------------------

    def _dscore(self, L: Stmts) -> None:
        """ds = ∂loss/∂s (the norm's), then dqk = ds · ∂s/∂qk."""
        self.norm.dscore(L)
        dot = next((n for n in walk([self.att.score]) if n.op is Op.DOT), None)
        if dot is None:
            L += S("dqk = ds * 0.0")
            return
        d = gradients(self.att.score, [dot])[dot]
        e = self.expr(d, self.pair_names(Root.SCORE), L)
        L += S("dqk = tl.where(valid, ds * {e}, 0.0)", e=e)

    def _row_stats(self, L: Stmts, compute_delta: bool = False) -> None:
        """The row statistics the backward reads: stat (saved by the forward) and delta. `compute_delta` (the
        dQ kernel, launched first): delta = Σ_e dO·O from this program's do tile and its output rows, less
        d lse for softmax (∂lse/∂s = p folds into ds = p (dp - delta)), stored for the dK/dV kernel."""
        L += S("row = (b * _NH + h).to(tl.int64) * _PM + i")
        L += self._tile_load("stat", "_STAT + row", "i < _M", None)
        if compute_delta:
            if self.att.output is None:  # else loaded by `_epilogue_chain_rule`
                L += S(
                    "ob = tl.load(_OB + b.to(tl.int64) * _so_b + h.to(tl.int64) * _so_h + i * _so_n + offs_e[None, :] * _so_d, mask=(i < _M) & (offs_e[None, :] < _E), other=0.0)"
                )
            L += S("delta = tl.reduce(do * ob.to(tl.float32), 1, tl.standard._sum_combine, keep_dims=True)")
            if self.norm.kind is NormKind.SOFTMAX:
                L += S("delta = delta - tl.load(_DSTAT + row, mask=i < _M, other=0.0)")
            L += S("tl.store(_DELTA + row, delta, mask=i < _M)")
        else:
            L += self._tile_load("delta", "_DELTA + row", "i < _M", None)
        self.norm.row_extras(L)

    def dkdv(self) -> Kernel:
        att = self.att
        L: Stmts = S(
            """
            pid_n = tl.program_id(0)
            pid_bg = tl.program_id(1)
            b = pid_bg // _NG
            hk = pid_bg % _NG
            rep = _NH // _NG
            _PM = _M
            _PN = _N
            """
        )
        L += self._varlen_prologue("bwd_dkdv", "pid_n * _BLOCK_N >= _N")
        L += S(
            """
            offs_n = pid_n * _BLOCK_N + tl.arange(0, _BLOCK_N)
            offs_d = tl.arange(0, _BLOCK_D)
            offs_e = tl.arange(0, _BLOCK_E)
            j = offs_n[None, :]
            kt = tl.load(_K + b.to(tl.int64) * _sk_b + hk.to(tl.int64) * _sk_h + offs_n[None, :] * _sk_n + offs_d[:, None] * _sk_d, mask=(offs_n[None, :] < _N) & (offs_d[:, None] < _D), other=0.0)
            """
        )
        L += _position("_pos_j", "j", "_K_POS")
        kname = self._feature(att.feature_k, "kt", Root.FEATURE_K, L)
        L += S(
            f"""
            k_op = {kname}
            vt = tl.load(_V + b.to(tl.int64) * _sv_b + hk.to(tl.int64) * _sv_h + offs_n[None, :] * _sv_n + offs_e[:, None] * _sv_d, mask=(offs_n[None, :] < _N) & (offs_e[:, None] < _E), other=0.0)
            if {KEY_ROWS}:
                k_op = tl.trans(k_op)
                v_op = tl.trans(vt)
                dkt = tl.full([_BLOCK_N, _BLOCK_D], 0.0, tl.float32)
                dvt = tl.full([_BLOCK_N, _BLOCK_E], 0.0, tl.float32)
            else:
                v_op = vt
                dkt = tl.full([_BLOCK_D, _BLOCK_N], 0.0, tl.float32)
                dvt = tl.full([_BLOCK_E, _BLOCK_N], 0.0, tl.float32)
            n0 = pid_n * _BLOCK_N
            """
        )
        L += _shifted("n0", "_K_POS")
        L += self._own_summaries("k", "pid_bg", "pid_n")
        self._in_loop = True
        self._edge = "start_m" if "dkdv" in LEAN_LOOPS and self.q_lean else None
        B: Stmts = S(
            """
            m0 = start_m
            if _SHIFT:
                m0 = start_m + _Q_POS
            visits += 1
            offs_m = start_m + tl.arange(0, _BLOCK_M)
            i = offs_m[:, None]
            _pos_i = i
            if _SHIFT:
                _pos_i = i + _Q_POS
            """
        )
        B += self._tile_load(
            "q",
            "_Q + b.to(tl.int64) * _sq_b + h.to(tl.int64) * _sq_h + i * _sq_n + offs_d[None, :] * _sq_d",
            "i < _M",
            "offs_d[None, :] < _D",
            desc=("q_desc", "start_m"),
        )
        qname = self._feature(att.feature_q, "q", Root.FEATURE_Q, B, pad=True)
        # q and its feature map are [BLOCK_M, D] in both orientations; with keys as rows the score's row
        # index i becomes [1, BLOCK_M] after them (j is [BLOCK_N, 1]: the helper's prelude).
        rows = S("i = offs_m[None, :]") + _position("_pos_i", "i", "_Q_POS")
        B += S(
            f"if {KEY_ROWS}:\n    {{rows}}\n    qk = tl.dot(k_op, tl.trans({{q}}), input_precision=_DOT_PRECISION)\n"
            "else:\n    qk = tl.dot({q}, k_op, input_precision=_DOT_PRECISION)",
            rows=rows,
            q=qname,
        )
        self._score_block(B, "i", "j")
        self._row_stats(B)
        self.norm.weights(self, B)
        w = self.norm.dot_type
        B += self._tile_load(
            "do",
            "_DO + b.to(tl.int64) * _so_b + h.to(tl.int64) * _so_h + offs_m[:, None] * _so_n + offs_e[None, :] * _so_d",
            "offs_m[:, None] < _M",
            "offs_e[None, :] < _E",
            desc=("do_desc", "start_m"),
        )
        pw = f"({self.norm.dv_weights}).to({w})"
        B += S(
            f"""
            if {KEY_ROWS}:
                dvt += tl.dot({pw}, do.to({w}), input_precision=_DOT_PRECISION)
                dp = _dot_as(v_op, tl.trans(do), {w}, _DOT_PRECISION)
            else:
                dvt += tl.dot(tl.trans(do).to({w}), {pw}, input_precision=_DOT_PRECISION)
                dp = _dot_as(do, v_op, {w}, _DOT_PRECISION)
            """
        )
        self._dscore(B)
        B += S(
            f"""
            if {KEY_ROWS}:
                dkt += tl.dot(dqk.to({w}), {qname}.to({w}), input_precision=_DOT_PRECISION)
            else:
                dkt += tl.dot(tl.trans({qname}).to({w}), dqk.to({w}), input_precision=_DOT_PRECISION)
            """
        )
        self._in_loop = False
        edge, self._edge = self._edge is not None, None
        context = (
            *self.program_loads.values(),
            "k_op",
            "v_op",
            "b",
            "h",
            "hk",
            "j",
            "offs_n",
            "offs_d",
            "offs_e",
            "pid_n",
            "_PM",
            *self._own_summary_names("k"),
            "_Q",
            "_DO",
            "_STAT",
            "_DELTA",
            "q_desc",
            "do_desc",
        )
        helper = self._helper("dkdv", "start_m", ("dkt", "dvt", "visits"), context, B, edge)
        self._loops["dkdv"] = helper
        # Per query head h of the group: its program loads and the descriptors of its q and dO rows.
        per_head = self._program_load_code() + _descriptors(
            (
                "q_desc",
                "_Q + b.to(tl.int64) * _sq_b + h.to(tl.int64) * _sq_h",
                "_M",
                "_D",
                "_sq_n",
                "_BLOCK_M",
                "_BLOCK_D",
            ),
            (
                "do_desc",
                "_DO + b.to(tl.int64) * _so_b + h.to(tl.int64) * _so_h",
                "_M",
                "_E",
                "_so_n",
                "_BLOCK_M",
                "_BLOCK_E",
            ),
        )
        L += S(
            "visits = pid_n * 0\nfor hh in range(0, rep):\n    h = hk * rep + hh\n    {loads}\n    {loop}",
            loads=per_head,
            loop=self._tile_loop(helper, "0", "_M"),
        )
        L += S(f"if {KEY_ROWS}:\n    dkt = tl.trans(dkt)\n    dvt = tl.trans(dvt)")
        if self.plan.kv_reads():
            L += _gated(self._feature_aux_grads, Root.FEATURE_K)
        self._feature_grad(att.feature_k, "kt", Root.FEATURE_K, L)
        L += _varlen_store_rebase("_DK", "_DV")
        L += S(
            """
            kmask = (offs_n[None, :] < _N) & (offs_d[:, None] < _D)
            tl.store(_DK + b.to(tl.int64) * _sk_b + hk.to(tl.int64) * _sk_h + offs_n[None, :] * _sk_n + offs_d[:, None] * _sk_d, dkt, mask=kmask)
            vmask = (offs_n[None, :] < _N) & (offs_e[:, None] < _E)
            tl.store(_DV + b.to(tl.int64) * _sv_b + hk.to(tl.int64) * _sv_h + offs_n[None, :] * _sv_n + offs_e[:, None] * _sv_d, dvt, mask=vmask)
            if _COUNT_VISITS:
                tl.store(_VISITS + pid_bg.to(tl.int64) * tl.num_programs(0) + pid_n, visits)
            """
        )
        return Kernel(self.signature("bwd_dkdv"), L)

    def dq(self) -> Kernel:
        att = self.att
        self._kernel = "bwd_dq"
        L: Stmts = self._query_tile_prologue("bwd_dq")
        qname = self._feature(att.feature_q, "q", Root.FEATURE_Q, L, pad=True)
        L += S(f"q_op = {qname}")
        if att.output is None:
            L += S(
                "do = tl.load(_DO + b.to(tl.int64) * _so_b + h.to(tl.int64) * _so_h + i * _so_n + offs_e[None, :] * _so_d, mask=(i < _M) & (offs_e[None, :] < _E), other=0.0)"
            )
        else:
            self._epilogue_chain_rule(L)
        self._row_stats(L, compute_delta=True)
        reads = self.plan.kernel_reads()
        partials = tuple(f"ga{n}" for n, r in enumerate(reads) if r.grad is AuxGrad.PROGRAM)
        # A gathered read's loop code writes its histogram row itself: it needs the program and its buffer.
        gathered = tuple(f"_GA{n}" for n, r in enumerate(reads) if r.grad is AuxGrad.GATHER)
        for g in partials:
            L += S(f"{g} = (pid_m * 0).to(tl.float32)")
        L += _gated(self._row_aux_grads, reads)
        L += S("dq = tl.full([_BLOCK_M, _BLOCK_D], 0.0, tl.float32)\nm0 = pid_m * _BLOCK_M")
        L += _descriptors(
            (
                "k_desc",
                "_K + b.to(tl.int64) * _sk_b + hk.to(tl.int64) * _sk_h",
                "_N",
                "_D",
                "_sk_n",
                "_BLOCK_N",
                "_BLOCK_D",
            ),
            (
                "v_desc",
                "_V + b.to(tl.int64) * _sv_b + hk.to(tl.int64) * _sv_h",
                "_N",
                "_E",
                "_sv_n",
                "_BLOCK_N",
                "_BLOCK_E",
            ),
        )
        L += _shifted("m0", "_Q_POS")
        L += self._own_summaries("q", "pid_bh", "pid_m")
        L += self._program_load_code()
        self._in_loop = True
        self._edge = "start_n" if "dq" in LEAN_LOOPS and self.kv_lean else None
        # The one-call dQ (EDGE = MASKED, every tile masked) of a key feature map with products in the inputs'
        # dtype (linear_bidir, linear_elu) loads k and v by pointer even under TMA: k goes through registers
        # for its map either way, and sm_90 held fewer registers so (linear_bidir D = 64: 125 -> 114, D = 128
        # 197 -> 181; linear_elu 128 -> 120, 203 -> 192). With float32 products (lightning) it held more
        # (D = 128: 98 -> 116), and k alone by pointer held more (linear_bidir D = 64: 127).
        by_pointer = att.feature_k is not None and self.norm.dot_type != "tl.float32"
        B: Stmts = S(
            """
            n0 = start_n
            if _SHIFT:
                n0 = start_n + _K_POS
            visits += 1
            offs_n = start_n + tl.arange(0, _BLOCK_N)
            j = offs_n[None, :]
            _pos_j = j
            if _SHIFT:
                _pos_j = j + _K_POS
            """
        )
        B += self._tile_load(
            "kt",
            "_K + b.to(tl.int64) * _sk_b + hk.to(tl.int64) * _sk_h + offs_n[None, :] * _sk_n + offs_d[:, None] * _sk_d",
            "offs_n[None, :] < _N",
            "offs_d[:, None] < _D",
            desc=("k_desc", "start_n"),
            transpose=True,
            masked_by_pointer=by_pointer,
        )
        kname = self._feature(att.feature_k, "kt", Root.FEATURE_K, B)
        B += self._tile_load(
            "vt",
            "_V + b.to(tl.int64) * _sv_b + hk.to(tl.int64) * _sv_h + offs_n[None, :] * _sv_n + offs_e[:, None] * _sv_d",
            "offs_n[None, :] < _N",
            "offs_e[:, None] < _E",
            desc=("v_desc", "start_n"),
            transpose=True,
            masked_by_pointer=by_pointer,
        )
        B += S(f"qk = tl.dot(q_op, {kname}, input_precision=_DOT_PRECISION)")
        self._score_block(B, "i", "j")
        self.norm.weights(self, B)
        w = self.norm.dot_type
        B += S(f"dp = _dot_as(do, vt, {w}, _DOT_PRECISION)")
        self._dscore(B)
        B += S(f"dq += tl.dot(dqk.to({w}), tl.trans({kname}).to({w}), input_precision=_DOT_PRECISION)")
        B += _gated(self._pair_aux_grads, reads)
        dense: list[str] = []
        B += _gated(lambda out: dense.extend(self._dense_pair_grads(out)))
        self._in_loop = False
        edge, self._edge = self._edge is not None, None
        # The key loop holds gated code only for score (and sigmoid bias) reads: epilogue and feature-map
        # reductions run after it, so their blocks do not thread the gate through the loop helper.
        in_loop = self.plan.pair_reads() or any(r.root in PAIR_ROOTS for r in reads)
        gate = (AUX_GRAD_GATE,) if in_loop else ()
        context = (
            *self.program_loads.values(),
            "q_op",
            "q",
            "do",
            "stat",
            "delta",
            *self.norm.row_extra_names,
            "b",
            "h",
            "hk",
            "i",
            "offs_d",
            "offs_e",
            "pid_m",
            "_PN",
            *self._own_summary_names("q"),
            "_K",
            "_V",
            "k_desc",
            "v_desc",
            *dense,
            *(("pid_bh", *gathered) if gathered else ()),
            *gate,
        )
        helper = self._helper("dq", "start_n", ("dq", "visits", *partials), context, B, edge)
        self._loops["dq"] = helper
        L += S("visits = pid_m * 0")
        L += self._tile_loop(helper, "0", "_N")
        if self.plan.feature_reads(Root.FEATURE_Q) or any(
            r.root is Root.FEATURE_Q for r in self.plan.kernel_reads()
        ):
            L += _gated(self._feature_aux_grads, Root.FEATURE_Q)
        self._feature_grad(att.feature_q, "q", Root.FEATURE_Q, L)
        L += _gated(self._store_aux_partials, reads)
        L += _varlen_store_rebase("_DQ")
        L += S(
            """
            tl.store(_DQ + b.to(tl.int64) * _sq_b + h.to(tl.int64) * _sq_h + i * _sq_n + offs_d[None, :] * _sq_d, dq, mask=(i < _M) & (offs_d[None, :] < _D))
            if _COUNT_VISITS:
                tl.store(_VISITS + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m, visits)
            """
        )
        return Kernel(self.signature("bwd_dq"), L)

    # ---- the output epilogue's chain rule (dQ kernel: it owns whole output rows) ---------------------------

    def _epilogue_chain_rule(self, L: Stmts) -> None:
        """dO of the raw output, do = dO·∂out/∂o (`dsl.autodiff`, elementwise on the program's rows), stored
        into _DO for the dK/dV kernel (launched after this one); and, gated, each epilogue read's gradient
        Σ dO·∂out/∂read over the output axes its indices leave out (`_epilogue_aux_grads`). No PyTorch pass
        over [B, H, M, E] on the host."""
        att = self.att
        assert att.output is not None
        L += S(
            """
            o_off = b.to(tl.int64) * _so_b + h.to(tl.int64) * _so_h + i * _so_n + offs_e[None, :] * _so_d
            o_mask = (i < _M) & (offs_e[None, :] < _E)
            ob = tl.load(_OB + o_off, mask=o_mask, other=0.0)
            dout = tl.load(_DOUT + o_off, mask=o_mask, other=0.0).to(tl.float32)
            o = ob
            """
        )
        names = self.row_names(Root.OUTPUT)
        elem = next((n for n in walk([att.output]) if n.op is Op.ELEM), None)
        if elem is None:  # an epilogue that ignores o (`output = offset[h, e]`) passes it no gradient
            L += S("do = dout * 0.0")
        else:
            d = self.expr(gradients(att.output, [elem])[elem], names, L)
            # The where keeps a derivative that is not finite off the output (rows beyond M) out of dO.
            L += S("do = tl.where(o_mask, dout * {d}, 0.0)", d=d)
        # Through a descriptor under `_TMA` (as the dK/dV kernel reads it back): the pointer store's 64-bit
        # address tile held 36 more registers (head_offset's dQ, sm_90, fp16, D = 128: 231 -> 195).
        desc = ("do_out", "_DO + b.to(tl.int64) * _so_b + h.to(tl.int64) * _so_h", "_M", "_E", "_so_n")
        L += S(
            "if _TMA:\n    {desc}\n    do_out.store([pid_m * _BLOCK_M, 0], do)\nelse:\n    {store}",
            desc=_descriptor(*desc, "_BLOCK_M", "_BLOCK_E"),
            store=S("tl.store(_DO + o_off, do, mask=o_mask)"),
        )
        L += _gated(self._epilogue_aux_grads)

    def _epilogue_aux_grads(self, L: Stmts) -> None:
        """Each epilogue read `t[axes]` (distinct plain variables among b, h, hk, i, e): dO·∂out/∂read,
        reduced and stored by `_reduce_to_element` (rows i, columns e)."""
        assert self.att.output is not None
        names = self.row_names(Root.OUTPUT)
        for n, r in enumerate(self.plan.epilogue_reads()):
            d = self.expr(gradients(self.att.output, [r.load])[r.load], names, L)
            L += S(f"gre{n} = tl.where(o_mask, dout * {{d}}, 0.0)", d=d)
            self._reduce_to_element(L, r, f"gre{n}", f"_GE{n}", _ROW_TILE)
        # Gathered epilogue reads (computed indices, or ones that may leave the tensor): a histogram row.
        for n, r in enumerate(self.plan.kernel_reads()):
            if r.root is Root.OUTPUT:
                d = self.expr(gradients(self.att.output, [r.load])[r.load], names, L)
                self._gather_grad(L, n, r, d, names=names, valid="o_mask", value="dout")

    def _feature_aux_grads(self, L: Stmts, which: Root) -> None:
        """Each read `t[axes]` of q's feature map (dQ kernel: dq holds d(feature q) [BLOCK_M, BLOCK_D]) or of
        k's (dK/dV kernel: dkt holds d(feature k)ᵀ [BLOCK_D, BLOCK_N]): d(feature)·∂feature/∂read over the
        tile, reduced and stored by `_reduce_to_element` before the chain rule to the raw q or k."""
        root = self.att.feature_q if which is Root.FEATURE_Q else self.att.feature_k
        assert root is not None
        q_side = which is Root.FEATURE_Q
        names = self.feature_names(which)
        tile, mask, buf = (
            ("dq", "(i < _M) & (offs_d[None, :] < _D)", "_GF")
            if q_side
            else ("dkt", "(offs_d[:, None] < _D) & (offs_n[None, :] < _N)", "_GK")
        )
        plain = self.plan.feature_reads(which) if q_side else self.plan.kv_reads()
        for n, r in enumerate(plain):
            d = self.expr(gradients(root, [r.load])[r.load], names, L)
            if r.grad is AuxGrad.GATHER:  # k's gathered reads: a histogram row per key tile (and b, hk)
                vs = {a.attr for a in r.load.args if a.op is Op.VAR}
                row = "pid_n.to(tl.int64)"
                if Var.B not in vs:
                    row = f"({row}) * (tl.num_programs(1) // _NG) + b"
                if Var.HK not in vs:
                    row = f"({row}) * _NG + hk"
                self._gather_grad(L, n, r, d, names=names, valid=mask, value=tile, buf=f"{buf}{n}", row=row)
                continue
            L += S(f"grf{n} = tl.where({mask}, {tile} * {{d}}, 0.0)", d=d)
            self._reduce_to_element(
                L, r, f"grf{n}", f"{buf}{n}", _Q_FEATURE_TILE if q_side else _K_FEATURE_TILE
            )
        if q_side:  # q's gathered reads: the dQ kernel's histogram rows (`kernel_reads`)
            for n, r in enumerate(self.plan.kernel_reads()):
                if r.root is Root.FEATURE_Q:
                    d = self.expr(gradients(root, [r.load])[r.load], names, L)
                    self._gather_grad(L, n, r, d, names=names, valid=mask, value=tile)

    def _reduce_to_element(self, L: Stmts, r: AuxRead, g: str, buf: str, tile: _GradTile) -> None:
        """The gradient tile `g` of read `t[axes]` (distinct plain variables) summed over the tile axes its
        indices leave out, then stored at the read's element of a zeroed buffer [lead..., *t.shape] whose
        lead axes (`grad_lead`: this program's tile, then program variables the axes leave out) give every
        element one writer. The host sums the lead axes in a fixed order: deterministic, no atomics,
        O(tiles · numel(t)) memory."""
        p = self.att.param(r.tensor)
        assert isinstance(p, TensorParam)
        vs = r.plain_vars
        kept = [(axis, var) for axis, var in enumerate(tile.axes) if var in vs]
        if not kept:  # one element per program: a scalar store
            L += S(
                f"{g} = tl.reduce(tl.reduce({g}, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)"
            )
        elif len(kept) == 1:
            L += S(f"{g} = tl.reduce({g}, {1 - kept[0][0]}, tl.standard._sum_combine, keep_dims=True)")
        at = {**tile.at, **{v: v.value for v in (Var.B, Var.H, Var.HK)}}
        flat, numel = "0", "1"
        for k in range(len(p.shape) - 1, -1, -1):
            flat = f"{at[vs[k]]}.to(tl.int64) * ({numel}) + {flat}"
            numel = f"_n_{p.name}_{k} * ({numel})"
        for v, extent in reversed(grad_lead(r, tile)):
            flat = f"{v}.to(tl.int64) * ({numel}) + {flat}"
            numel = f"{extent} * ({numel})"
        # The checks refuse a tensor smaller than the range read: every element stored lies inside it.
        m = " & ".join(tile.bounds[a] for a, _ in kept)
        L += S(f"tl.store({buf} + {flat}, {g}" + (f", mask={m})" if m else ")"))

    # ---- gradients of auxiliary tensors (dQ kernel: one query tile and head per program) ------------------

    def _read_grad(self, r: AuxRead, names: dict[str, str], out: Stmts) -> ast.expr:
        """∂root/∂(this read), evaluated on the tile (pairs) or the rows (sink)."""
        root = self.att.roots()[_ROOT_FIELD[r.root]]
        return self.expr(gradients(root, [r.load])[r.load], names, out)

    def _pair_aux_grads(self, B: Stmts, reads: tuple[AuxRead, ...]) -> None:
        """Per key tile: each score (or sigmoid bias) read indexed per program adds Σ_ij dS·∂s/∂read to its
        scalar partial. dS is zero off the visible pairs; the where keeps a derivative that is not finite
        there (a masked-out pair's score) out of the sum."""
        for n, r in enumerate(reads):
            if r.root not in PAIR_ROOTS:
                continue
            g = self._read_grad(r, self.pair_names(r.root), B)
            if r.grad is AuxGrad.GATHER:
                self._gather_grad(B, n, r, g)
                continue
            B += S(
                f"ga{n} += tl.reduce(tl.reduce(tl.where(valid, ds * {{g}}, 0.0), 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)",
                g=g,
            )

    def _gather_grad(
        self,
        B: Stmts,
        n: int,
        r: AuxRead,
        g: ast.expr,
        names: dict[str, str] | None = None,
        valid: str = "valid",
        value: str = "ds",
        buf: str | None = None,
        row: str | None = None,
    ) -> None:
        """A read at computed indices (`table[h, bucket(i - j)]`): this tile's dS·∂s/∂read summed per flat index
        of the read and added into the program's own row of the zeroed buffer _GA{n} [programs, numel(aux)].
        Only the index range the tile touches is walked (a tile off the diagonal often maps to one table
        entry); the program is the row's only writer and walks its tiles in order: deterministic, no atomics.
        Out-of-range indices read 0, a constant: they are dropped, as they carry no gradient."""
        p = self.att.param(r.tensor)
        assert isinstance(p, TensorParam)
        # Defaults: a score read in the dQ kernel's key loop (dS on the visible pairs). The epilogue and the
        # feature maps pass their own tile (`value`, masked by `valid`), names, buffer and buffer row.
        names = self.pair_names(r.root) if names is None else names
        buf = f"_GA{n}" if buf is None else buf
        flat: ast.expr | None = None
        inb: ast.expr | None = None
        numel = "1"
        for k in range(len(p.shape) - 1, -1, -1):
            ix = self.expr(r.load.args[k], names, B)
            B += S(f"gx{n}_{k} = ({{ix}}).to(tl.int32)", ix=ix)
            term = expr_from_string(f"gx{n}_{k} * ({numel})")
            flat = term if flat is None else expr_from_string("{a} + {b}", a=term, b=flat)
            ok = expr_from_string(f"((gx{n}_{k} >= 0) & (gx{n}_{k} < _n_{p.name}_{k})).to(tl.int32)")
            inb = ok if inb is None else expr_from_string("{a} * {b}", a=inb, b=ok)
            numel = f"_n_{p.name}_{k} * ({numel})"
        assert flat is not None and inb is not None
        # The buffer's row: the query tile, then the program variables the read's indices do not fix (b; h,
        # also when only hk is read): programs that share a row would race, and programs that the indices
        # tell apart need none of their own (memory O(programs × entries each program can touch)).
        if row is None:
            lead_b, lead_h = r.gather_lead
            row = "pid_m.to(tl.int64)"
            if lead_b:
                row = f"({row}) * (tl.num_programs(1) // _NH) + b"
            if lead_h:
                row = f"({row}) * _NH + h"
        plain = {a.attr for a in r.load.args if a.op is Op.VAR}
        axis = None
        if len(plain) == len(r.load.args) and plain <= {Var.B, Var.H, Var.HK, Var.I, Var.J}:
            axis = (
                1
                if Var.I in plain and Var.J not in plain
                else 0
                if Var.J in plain and Var.I not in plain
                else None
            )
        if axis is not None:
            # Indexed by the row (`g[b, h, i]`) or the column (`g[b, h, j]`) itself: each row (column) of the
            # tile has its own element, so the tile's row (column) sums are added in one vector step.
            B += S(
                f"""
                gk{n} = {{inb}} != 0
                gp{n} = {buf} + ({row}) * ({numel}) + {{flat}}
                gs{n} = tl.reduce(tl.where({valid}, {value} * {{g}}, 0.0), {axis}, tl.standard._sum_combine, keep_dims=True)
                tl.store(gp{n}, tl.load(gp{n}, mask=gk{n}, other=0.0) + gs{n}, mask=gk{n})
                """,
                inb=inb,
                flat=flat,
                g=g,
            )
            return
        B += S(
            f"""
            gk{n} = ({valid}) & ({{inb}} != 0)
            gf{n} = {{flat}}
            gv{n} = tl.where(gk{n}, {value} * {{g}}, 0.0)
            glo{n} = tl.reduce(tl.reduce(tl.where(gk{n}, gf{n}, 2147483647), 1, tl.standard._elementwise_min), 0, tl.standard._elementwise_min)
            ghi{n} = tl.reduce(tl.reduce(tl.where(gk{n}, gf{n}, -1), 1, tl.standard._elementwise_max), 0, tl.standard._elementwise_max)
            gp{n} = {buf} + ({row}) * ({numel})
            for ge{n} in range(glo{n}, ghi{n} + 1):
                tl.store(gp{n} + ge{n}, tl.load(gp{n} + ge{n}) + tl.reduce(tl.reduce(tl.where(gf{n} == ge{n}, gv{n}, 0.0), 1, tl.standard._sum_combine), 0, tl.standard._sum_combine))
            """,
            inb=inb,
            flat=flat,
            g=g,
        )

    def _dense_pair_grads(self, B: Stmts) -> tuple[str, ...]:
        """Per key tile: each dense (i, j) read stores dS·∂s/∂read at its element of a zeroed buffer
        [lead..., *aux.shape] (lead: b and/or h when the read's indices leave them out, so that every element
        has one writer); the host sums the lead axes. Returns the buffers' parameter names."""
        out = []
        for n, r in enumerate(self.plan.pair_reads()):
            p = self.att.param(r.tensor)
            assert isinstance(p, TensorParam)
            g = self._read_grad(r, self.pair_names(r.root), B)
            at = _AT
            flat, numel = "0", "1"
            for k in range(len(p.shape) - 1, -1, -1):
                flat = f"{at[r.plain_vars[k]]}.to(tl.int64) * ({numel}) + {flat}"
                numel = f"_n_{p.name}_{k} * ({numel})"
            for v, extent in reversed(_pair_lead(r)):
                flat = f"{at[v]}.to(tl.int64) * ({numel}) + {flat}"
                numel = f"{extent} * ({numel})"
            B += S(
                f"tl.store(_GD{n} + {flat}, tl.where(valid, ds * {{g}}, 0.0), mask=(i < _M) & (j < _N))",
                g=g,
            )
            out.append(f"_GD{n}")
        return tuple(out)

    def _row_aux_grads(self, L: Stmts, reads: tuple[AuxRead, ...]) -> None:
        """The per-row roots. The sink's share of each row: with p_sink = exp(sink - lse), ∂loss/∂sink =
        -p_sink·delta (delta already holds -d lse). The sum norm's eps: o = acc / (l + eps), so ∂loss/∂eps =
        -Σ_e dO·o / (l + eps) = -delta / stat (0 on a dead row). Then times ∂root/∂read: summed over the
        program's rows (a read per program), or into a histogram row (`_gather_grad`)."""
        rows = [(n, r) for n, r in enumerate(reads) if r.root in ROW_ROOTS]
        if not rows:
            return
        value = {}
        if any(r.root is Root.SINK for _, r in rows):
            assert self.att.norm.sink is not None
            sink = self.expr(self.att.norm.sink, self.row_names(Root.SINK), L)
            L += S(
                f"dsink = tl.where(i < _M, -tl.exp2(({{sink}}) * {LOG2E!r} - stat * {LOG2E!r}) * delta, 0.0)",
                sink=sink,
            )
            value[Root.SINK] = "dsink"
        if any(r.root is Root.EPS for _, r in rows):
            L += S("deps = tl.where((i < _M) & (stat != 0), -delta * stat_inv, 0.0)")
            value[Root.EPS] = "deps"
        for n, r in rows:
            names = self.row_names(r.root)
            g = self._read_grad(r, names, L)
            if r.grad is AuxGrad.GATHER:
                # [BLOCK_M, 1] rows: the histogram walk over the entries they touch.
                tile = f"({value[r.root]} + tl.full([_BLOCK_M, 1], 0.0, tl.float32))"
                self._gather_grad(L, n, r, g, names=names, valid="(i < _M)", value=tile)
                continue
            L += S(
                f"ga{n} += tl.reduce(tl.reduce({value[r.root]} * {{g}} + tl.full([_BLOCK_M, 1], 0.0, tl.float32), 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)",
                g=g,
            )

    def _store_aux_partials(self, L: Stmts, reads: tuple[AuxRead, ...]) -> None:
        """Program (pid_m, b·h) writes each partial at [program, flat index of its read] of a zeroed buffer
        [B·H·tiles, numel(aux)]: the host sums over programs in a fixed order (deterministic, no atomics)."""
        names = {"b": "b", "h": "h", "hk": "hk"}
        for n, r in enumerate(reads):
            if r.grad is AuxGrad.GATHER:  # written tile by tile in the loop (`_gather_grad`)
                continue
            p = self.att.param(r.tensor)
            assert isinstance(p, TensorParam)
            flat: str = "0"
            numel: str = "1"
            for k in range(len(p.shape) - 1, -1, -1):
                ix = self.expr(r.load.args[k], names, L)
                L += S(f"gi{n}_{k} = ({{ix}}).to(tl.int64)", ix=ix)
                flat = f"gi{n}_{k} * ({numel}) + {flat}" if flat != "0" else f"gi{n}_{k} * ({numel})"
                numel = f"_n_{p.name}_{k} * ({numel})"
            L += S(
                f"tl.store(_GA{n} + (pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m) * ({numel}) + {flat}, ga{n})"
            )

    # ---- the block's kernels ------------------------------------------------------------------------------

    def kernels(self) -> tuple[list[str], list[Kernel]]:
        """The kernels file's lines for this block (loop helpers, then the forward, dK/dV, dQ, split-KV forward
        and combine kernels) and the kernels with their signatures. Emitted once per writer: the hoisted
        uniforms, hence the signatures' uniform group, are known only once all are emitted."""
        if self._kernels is not None:
            return self._kernels
        bodies = [self.forward(), self.dkdv(), self.dq(), self.forward_split(), self.combine()]
        recompute = self._varlen_uniforms()
        for body, before in self._varlen_bodies:
            at = len(body) - before
            body[at:at] = copy.deepcopy(recompute)
        # Re-read the signatures now that every uniform is hoisted, and complete the helper calls.
        shared = [name(p) for p in self.shared_params()]
        for call in self._calls:
            call.args += shared
        ks = [Kernel(self.signature(kind), k.body) for kind, k in zip(KERNEL_KINDS, bodies, strict=True)]
        lines: list[str] = []
        for h in self.helpers():
            lines += self._render_helper(h)
        for k in ks:
            lines += render_kernel(k)
        lines += self._render_abi()
        self._kernels = (lines, ks)
        return self._kernels

    def abi_name(self) -> str:
        return f"_{self.att.name}_ABI"

    def _render_abi(self) -> list[str]:
        """The block's `BlockABI` as plain literals: the launcher rebuilds the kernels' signatures from it."""
        st = S("{target} = {data}", target=name(self.abi_name()), data=_literal(self.abi().to_data()))
        text = ast.unparse(ast.fix_missing_locations(ast.Module(st, [])))
        why = (
            "# The block's own kernel parameters (spec, uniforms, summarised terms): the runtime's BlockABI."
        )
        return [why, *text.splitlines(), "", ""]

    def helpers(self) -> list[LoopHelper]:
        """The loop helpers, one per kind: the forward's key loop (also the split forward's), dK/dV's query
        loop and dQ's key loop."""
        return [self._loops[k] for k in ("fwd", "dkdv", "dq")]


def _program_loads(att: Attention) -> list[Node]:
    """Loads in the score, mask and sigmoid bias whose indices depend on b, h, hk (and uniforms) only."""
    roots = [r for r in (att.score, att.mask, att.norm.bias) if r is not None]
    out: list[Node] = []
    for n in walk(roots):
        per_program = not any(uses_var(a, v) for a in n.args for v in (Var.I, Var.J, Var.D, Var.E))
        if n.op is Op.LOAD and per_program and n not in out:
            out.append(n)
    return out


def _times(n: Node, c: float) -> Node:
    """`n * c` with c distributed over sums and folded into a uniform factor of a product."""
    if n.op in (Op.ADD, Op.SUB) and n.dtype is DType.FLOAT and all(a.dtype is DType.FLOAT for a in n.args):
        return ieee_binary(n.op, _times(n.args[0], c), _times(n.args[1], c))
    if n.op is Op.MUL and n.dtype is DType.FLOAT:
        a, b = n.args
        for x, y in ((a, b), (b, a)):
            if is_uniform(x) and x.dtype is DType.FLOAT:
                return ieee_binary(Op.MUL, y, ieee_binary(Op.MUL, x, const(c)))
    if is_uniform(n) and n.dtype is DType.FLOAT:
        return ieee_binary(Op.MUL, n, const(c))
    return ieee_binary(Op.MUL, n, const(c))


def _gated(emit, *args) -> Stmts:  # type: ignore[no-untyped-def]
    """What `emit(out, *args)` appends, under `if _AUX_GRAD:` (nothing when it appends nothing): a launch
    whose learned inputs need no gradient compiles the aux-gradient code out."""
    body: Stmts = []
    emit(body, *args)
    return S("if _AUX_GRAD:\n    {body}", body=body) if body else []


_F32_MAX = 3.4028234663852886e38
_INT_BOUND = float(2**31)  # index variables and sizes: int32 positions and extents


def _bound_at_zero(root: Node) -> float:
    """A bound on |map| where its element is 0 (a lane outside the loaded tile), for every finite value of
    the auxiliary tensors and scalars it reads (each at most the float32 maximum): inf when none is proven.
    Overflow counts: `exp(k + 1e6)` or `k + 2 * t[j]` may be inf there (found by the fuzz run). Ops whose
    result at a bounded input need not be finite (division, logarithms, roots, powers, mod) give inf."""
    bound: dict[Node, float] = {}
    for n in sorted(set(walk([root])), key=lambda n: n.depth):
        a = [bound[x] for x in n.args]
        op = n.op
        if op is Op.CONST:
            b = abs(float(n.attr))  # type: ignore[arg-type]
        elif op is Op.ELEM:
            b = 0.0
        elif op in (Op.VAR, Op.SIZE):
            b = _INT_BOUND
        elif op in (Op.SCALAR, Op.LOAD):
            b = _F32_MAX
        elif op in (Op.NEG, Op.ABS, Op.RELU, Op.FLOOR, Op.CEIL, Op.TO_FLOAT):
            b = a[0]
        elif op in (Op.EXP, Op.EXP2):
            base = math.e if op is Op.EXP else 2.0
            b = math.inf if a[0] * math.log(base) > 88.7 else base ** a[0]
        elif op in (Op.TANH, Op.SIGMOID) or op in COMPARE_OPS or op in LOGIC_OPS or op is Op.NOT:
            b = 1.0
        elif op is Op.ELU:
            b = max(a[0], 1.0)
        elif op in (Op.ADD, Op.SUB):
            b = a[0] + a[1]
        elif op is Op.MUL:
            # 0 times a finite bound is 0; times an unproven one (inf) it may be NaN (0 * (0.5 / 0)).
            b = math.inf if math.inf in a else (0.0 if 0.0 in a else a[0] * a[1])
        elif op in (Op.MIN, Op.MAX):
            b = max(a)
        elif op is Op.WHERE:
            b = max(a[1], a[2])
        else:
            b = math.inf
        bound[n] = b if b <= _F32_MAX else math.inf
    return bound[root]


def _finite_at_zero(root: Node | None) -> bool:
    """Whether a feature map is surely finite where its input is 0 (`_bound_at_zero`)."""
    return root is None or _bound_at_zero(root) < math.inf


def _pair_lead(r: AuxRead) -> list[tuple[Var, str]]:
    """The program variables a dense (i, j) read's indices leave out, with their extents: the leading axes
    of its gradient buffer (b, then h; h also when only hk is read, as the heads of a group share it)."""
    vs = r.plain_vars
    lead = []
    if Var.B not in vs:
        lead.append((Var.B, "(tl.num_programs(1) // _NH)"))
    if Var.H not in vs:
        lead.append((Var.H, "_NH"))
    return lead


@dataclass(frozen=True)
class _GradTile:
    """A program's gradient tile for `_reduce_to_element`: the index variable along each of its two axes,
    the index expression of each, the in-bounds mask per axis, and the program's own tile variable with its
    count and the other program variables (with extents) that can lead a buffer."""

    axes: tuple[Var, Var]
    at: dict[Var, str]
    bounds: tuple[str, str]
    lead: tuple[tuple[Var, str, str], ...]  # (variable, its name in the kernel, extent), in buffer order


def _program_lead(tile: Var, pid: str, head: Var, heads: str) -> tuple[tuple[Var, str, str], ...]:
    """A kernel's program variables as buffer lead axes: its tile (`pid`, along grid axis 0), b, then its head
    (h of _NH, or hk of _NG), each with its extent."""
    return (
        (tile, pid, "tl.num_programs(0)"),
        (Var.B, "b", f"(tl.num_programs(1) // {heads})"),
        (head, head.value, heads),
    )


# The dQ kernel's output rows (epilogue: [BLOCK_M, BLOCK_E]) and q features ([BLOCK_M, BLOCK_D]); the dK/dV
# kernel's k features, transposed ([BLOCK_D, BLOCK_N]). The program's tile leads when its variable is no axis.
_ROW_TILE = _GradTile(
    (Var.I, Var.E),
    {Var.I: "_pos_i", Var.E: "offs_e[None, :]"},
    ("(i < _M)", "(offs_e[None, :] < _E)"),
    _program_lead(Var.I, "pid_m", Var.H, "_NH"),
)
_Q_FEATURE_TILE = _GradTile(
    (Var.I, Var.D),
    {Var.I: "_pos_i", Var.D: "offs_d[None, :]"},
    ("(i < _M)", "(offs_d[None, :] < _D)"),
    _ROW_TILE.lead,
)
_K_FEATURE_TILE = _GradTile(
    (Var.D, Var.J),
    {Var.D: "offs_d[:, None]", Var.J: "_pos_j"},
    ("(offs_d[:, None] < _D)", "(offs_n[None, :] < _N)"),
    _program_lead(Var.J, "pid_n", Var.HK, "_NG"),
)


def grad_lead(r: AuxRead, tile: _GradTile) -> list[tuple[str, str]]:
    """The lead axes of a read's gradient buffer, as (kernel name, extent): each lead variable of the tile
    the read's indices leave out (the program's tile; b; h, also when only hk is read). The runtime
    allocates the same axes (`epilogue_grads`, `feature_grads` in the generated spec)."""
    vs = r.plain_vars
    return [(nm, extent) for v, nm, extent in tile.lead if v not in vs]


def _literal(value: object) -> ast.expr:
    """Nested tuples of str and int as an ast literal."""
    if isinstance(value, tuple):
        return ast.Tuple([_literal(v) for v in value], ast.Load())
    return ast.Constant(value)


def _render_def(fn: str, params: list[str], constexprs: set[str], body: Stmts) -> list[str]:
    lines = ["@triton.jit", f"def {fn}("]
    lines += [f"    {p}: tl.constexpr," if p in constexprs else f"    {p}," for p in params]
    lines.append("):")
    text = ast.unparse(ast.fix_missing_locations(ast.Module(body, [])))
    lines += textwrap.indent(text, "    ").splitlines()
    return [*lines, "", ""]


def render_kernel(k: Kernel) -> list[str]:
    """A kernel's source lines: the `def` from its signature, the body from its statements."""
    sig = k.signature
    return _render_def(sig.name, list(sig.names), set(sig.constexprs), k.body)


# ---- block sparsity ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileCode:
    """The tile plan as kernel code: key intervals per query tile, query intervals per key tile, the
    full-tile test, and the lean intervals (`TilePlan.kv_lean`, `q_lean`; empty: no tile runs lean)."""

    kv_intervals: Intervals
    q_intervals: Intervals
    full: str | None
    kv_lean: Intervals
    q_lean: Intervals


def _lean_code(ivs: tuple[tuple[sp.Expr, sp.Expr], ...]) -> Intervals:
    """Lean intervals as code; one that cannot be printed is dropped (a subset stays sound)."""
    out: Intervals = []
    for lo, hi in ivs:
        try:
            out.append((tile_code.code(lo), tile_code.code(hi)))
        except tile_code.Unprintable:
            continue
    return out


def _tile_code(att: Attention, plan: AttentionPlan) -> TileCode:
    """The plan's intervals and full-tile test as kernel code. Whatever cannot be printed falls back to the
    whole range with the mask applied (sound, never skipping), and to no lean tile."""
    whole_k, whole_q = [("0", "_N")], [("0", "_M")]
    tiles = plan.tiles
    if att.mask is None or tiles is None:
        return TileCode(whole_k, whole_q, None, whole_k, whole_q)
    try:
        kv = [(tile_code.code(lo), tile_code.code(hi)) for lo, hi in tiles.kv_intervals]
    except tile_code.Unprintable:
        kv = whole_k
    try:
        qv = [(tile_code.code(lo), tile_code.code(hi)) for lo, hi in tiles.q_intervals]
    except tile_code.Unprintable:
        qv = whole_q
    try:
        full = None if tiles.full is sp.false else tile_code.code(tiles.full)
    except tile_code.Unprintable:
        full = None
    return TileCode(
        kv or [("0", "0")], qv or [("0", "0")], full, _lean_code(tiles.kv_lean), _lean_code(tiles.q_lean)
    )
