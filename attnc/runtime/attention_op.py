"""An attention block's custom ops, built here from what is specific to the block: its parameters (names and
schema types), its launch description (`_NAME_triton_spec`), its reference (`NAME_reference`) and the sums that
give its learned inputs' gradients (`_NAME_aux_grads`). A generated module calls `attention_ops(...)` once
per block; the forward, the fake, the backward and the autograd wiring are this module's, not copied into
every module.

Two ops per block: the batched one (`NAME`, with an optional block layout) and the packed variable-length
one (`NAME_varlen`, with the sequences' offsets). Each returns (o, stat, oraw): the output, the kernels' row
statistic (the log-sum-exp for softmax) and the float32 output before an epilogue (empty without one); the
backward op reads what the forward saved and, on the Triton path, launches only the backward kernels (no
forward runs again). The reference backward recomputes the forward under autograd (checkpointed: a
deliberate memory choice). Schemas are explicit, so the ops' Python functions take their arguments as a
tuple, and torch.compile(fullgraph=True) traces models that call them through their fake implementations.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .layout import _layout_from_op_args
from .ops import _custom_op, _grad, _lse_dtype, _with_autograd
from .triton import _triton_backward, _triton_forward
from .varlen import Varlen, varlen_reference, varlen_views

# The extra arguments of each form: an explicit block layout travels as six (the schema takes no tuples), a
# varlen call as its offsets and longest lengths.
_FORM_PARAMS = {
    "batched": (
        ("_bl_kv_indices", "Tensor?"),
        ("_bl_kv_counts", "Tensor?"),
        ("_bl_q_indices", "Tensor?"),
        ("_bl_q_counts", "Tensor?"),
        ("_bl_q_block", "int"),
        ("_bl_kv_block", "int"),
    ),
    "varlen": (("_cu_q", "Tensor"), ("_cu_k", "Tensor"), ("_max_q", "int"), ("_max_k", "int")),
}


@dataclass(frozen=True)
class OpSignature:
    """A block's parameters in the generated signature's order: (name, schema type) with types "Tensor",
    "float", "int", "float?", "int?"; the positions of q, k, v and of the float tensors (whose gradients the
    backward returns); whether the norm is softmax (the op's stat is then the log-sum-exp and gets a
    gradient) and whether the spec has an output epilogue (the Triton forward then keeps the raw output)."""

    params: tuple[tuple[str, str], ...]
    qkv: tuple[int, int, int]
    floats: tuple[int, ...]
    softmax: bool
    epilogue: bool

    def schema(self, form: str) -> str:
        args = [f"{t} a_{n}" for n, t in (*self.params, *_FORM_PARAMS[form])]
        return "(" + ", ".join([*args, "str backend"]) + ") -> (Tensor, Tensor, Tensor)"

    def backward_schema(self, form: str) -> str:
        outs = ["Tensor do", "Tensor dlse", "Tensor o", "Tensor lse", "Tensor oraw"]
        args = [f"{t} a_{n}" for n, t in (*self.params, *_FORM_PARAMS[form])]
        return "(" + ", ".join([*outs, *args, "str backend", "bool aux_grad"]) + ") -> Tensor[]"


class _Block:
    """One block's forms: the launch description and the reference, per form."""

    def __init__(
        self,
        sig: OpSignature,
        triton_spec: Callable[..., object] | None,
        reference: Callable[..., object],
        aux_grads: Callable[..., dict[str, torch.Tensor]] | None,
        varlen_axes: tuple[object, ...] | None,
    ) -> None:
        self.sig, self.triton_spec, self.reference = sig, triton_spec, reference
        self.aux_grads, self.varlen_axes = aux_grads, varlen_axes
        self.n = len(sig.params)

    # ---- per form: the Triton launch and the reference ------------------------------------------------

    def launch(self, form, args, extra):
        """(spec, q, k, v) for the kernels: a batched call's contiguous q, k, v (its layout in the spec), or a
        varlen call's packed ones' kernel views (`varlen.packed_view`)."""
        qi, ki, vi = self.sig.qkv
        if form == "batched":
            spec = self.triton_spec(*args, block_layout=_layout_from_op_args(*extra))
            return spec, args[qi].contiguous(), args[ki].contiguous(), args[vi].contiguous()
        cu_q, cu_k, max_q, max_k = extra
        _, views = varlen_views(args[qi], args[ki], args[vi], cu_q.shape[0] - 1, max_q, max_k)
        vargs = list(args)
        vargs[qi], vargs[ki], vargs[vi] = views
        lay = Varlen(cu_q, cu_k, args[qi].shape[0], args[ki].shape[0])
        return self.triton_spec(*vargs)._replace(varlen=lay), *views

    def reference_forward(self, form, args, extra):
        q = args[self.sig.qkv[0]]
        if form == "varlen":
            cu_q, cu_k, max_q, _ = extra
            v = args[self.sig.qkv[2]]
            return varlen_reference(
                self._reference_pair, args, self.varlen_axes, cu_q, cu_k, max_q,
                (q.shape[0], q.shape[1], v.shape[2]), _lse_dtype(q),
            )  # fmt: skip
        layout = _layout_from_op_args(*extra)
        o, lse = self._reference_pair(*args, block_layout=layout)
        return o, lse if lse is not None else torch.zeros(q.shape[:3], dtype=_lse_dtype(q), device=q.device)

    def _reference_pair(self, *args, **kw):
        if self.sig.softmax:
            return self.reference(*args, return_lse=True, **kw)
        return self.reference(*args, **kw), None

    def shapes(self, form, args, extra):
        """(o shape, stat shape) of a call."""
        q, v = args[self.sig.qkv[0]], args[self.sig.qkv[2]]
        if form == "varlen":
            cu_q, _, max_q, _ = extra
            return (q.shape[0], q.shape[1], v.shape[2]), (cu_q.shape[0] - 1, q.shape[1], max_q)
        return (*q.shape[:3], v.shape[3]), tuple(q.shape[:3])

    # ---- the custom ops' functions ----------------------------------------------------------------------

    def split(self, a):
        return a[: self.n], a[self.n : -1], a[-1]

    def forward(self, form):
        def impl(*a):
            args, extra, backend = self.split(a)
            if backend == "triton":
                spec, q, k, v = self.launch(form, args, extra)
                o, oraw, stat = _triton_forward(spec, q, k, v)
                return o, stat, oraw if self.sig.epilogue else stat.new_empty((0,))
            o, lse = self.reference_forward(form, args, extra)
            q = args[self.sig.qkv[0]]
            return o.contiguous(), lse.to(_lse_dtype(q)).contiguous(), q.new_empty((0,), dtype=torch.float32)

        def fake(*a):
            args, extra, backend = self.split(a)
            q = args[self.sig.qkv[0]]
            o_shape, stat_shape = self.shapes(form, args, extra)
            raw = o_shape if self.sig.epilogue and backend == "triton" else (0,)
            return (
                q.new_empty(o_shape),
                q.new_empty(stat_shape, dtype=_lse_dtype(q)),
                q.new_empty(raw, dtype=torch.float32),
            )

        return impl, fake

    def backward(self, form):
        sig = self.sig

        def impl(*a):
            do, dlse, o, lse, oraw = a[:5]
            args, extra, backend = a[5 : 5 + self.n], a[5 + self.n : -2], a[-2]
            aux_grad = a[-1]
            if backend == "triton":
                spec, q, k, v = self.launch(form, args, extra)
                saved = oraw if sig.epilogue else o
                dstat = dlse if sig.softmax else None
                dq, dk, dv, parts = _triton_backward(spec, q, k, v, o, saved, lse, do, dstat, aux_grad)
                names = [n for n, _ in sig.params]
                g = dict(zip((names[i] for i in sig.qkv), (dq, dk, dv), strict=True))
                if aux_grad and self.aux_grads is not None:
                    g.update(self.aux_grads(parts, *args))
                return [
                    g[names[i]].contiguous()
                    if names[i] in g
                    else torch.zeros_like(args[i], memory_format=torch.contiguous_format)
                    for i in sig.floats
                ]

            def grads():
                leaves = {i: args[i].detach().requires_grad_() for i in sig.floats}
                rec = [leaves.get(i, x) for i, x in enumerate(args)]
                o, lse, _ = self.forward(form)[0](*rec, *extra, "reference")
                outs, ins = ((o, lse), (do, dlse)) if sig.softmax else ((o,), (do,))
                return _grad(outs, tuple(leaves.values()), ins)

            out = _with_autograd(grads)
            return [
                torch.zeros_like(args[i], memory_format=torch.contiguous_format)
                if g is None
                else g.contiguous()
                for i, g in zip(sig.floats, out, strict=True)
            ]

        def fake(*a):
            args = a[5 : 5 + self.n]
            return [torch.empty_like(args[i], memory_format=torch.contiguous_format) for i in sig.floats]

        return impl, fake


def attention_ops(
    name: str,
    key: str,
    file: str,
    sig: OpSignature,
    triton_spec: Callable[..., object] | None,
    reference: Callable[..., object],
    aux_grads: Callable[..., dict[str, torch.Tensor]] | None = None,
    varlen_axes: tuple[object, ...] | None = None,
) -> tuple[object, object | None]:
    """Register the block's batched op (`attnc::<name>_...`) and, with `varlen_axes` (how the reference cuts
    each argument to one sequence: `varlen.varlen_reference`), its varlen op, each with its backward op and
    autograd formula. Returns (batched op, varlen op or None)."""
    block = _Block(sig, triton_spec, reference, aux_grads, varlen_axes)
    _BLOCKS[(os.path.realpath(file), name)] = block
    ops = []
    for form, suffix in (("batched", ""), ("varlen", "_varlen")):
        if form == "varlen" and varlen_axes is None:
            ops.append(None)
            continue
        fwd, fwd_fake = block.forward(form)
        op, fresh = _custom_op(f"{name}{suffix}", fwd, fwd_fake, key, file, schema=sig.schema(form))
        bwd, bwd_fake = block.backward(form)
        bwd_op, _ = _custom_op(
            f"{name}{suffix}_backward", bwd, bwd_fake, key, file, schema=sig.backward_schema(form)
        )
        if fresh:
            op.register_autograd(_autograd(block, bwd_op), setup_context=_setup_context(block))
        ops.append(op)
    return ops[0], ops[1]


# Every registered block by (module file, name): what attnc.distributed reads of a generated operator (its
# parameters, their axes, its launch description and reference).
_BLOCKS: dict[tuple[str, str], _Block] = {}


def registered_block(file: str, name: str) -> _Block | None:
    """The block `name` of the generated module at `file`, once the module has been imported."""
    return _BLOCKS.get((os.path.realpath(file), name))


def block_axes(file: str, name: str) -> tuple[object, ...] | None:
    """The axis roles the block `name` of the generated module at `file` registered, per parameter: "q" / "k"
    for q and k, v; per axis of an auxiliary tensor "b" (batch), "q" / "k" (a sequence position) or None; None
    for scalars. None for a block without a varlen form; KeyError for one no module registered in this
    process. (What context parallelism shards along the sequence.)"""
    block = registered_block(file, name)
    if block is None:
        raise KeyError((file, name))
    return block.varlen_axes


def _setup_context(block: _Block):
    def setup(ctx, inputs, output):
        # Tensors through save_for_backward (a layout's may be None), everything else by value.
        where = [i for i, x in enumerate(inputs) if x is None or isinstance(x, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in where), *output)
        ctx.where = where
        ctx.rest = tuple(None if i in where else x for i, x in enumerate(inputs))

    return setup


def _autograd(block: _Block, bwd_op):
    sig = block.sig
    aux = [i for i in sig.floats if i not in sig.qkv]

    def backward(ctx, do, dlse, _doraw):
        saved = ctx.saved_tensors
        inputs = list(ctx.rest)
        for i, t in zip(ctx.where, saved, strict=False):
            inputs[i] = t
        o, lse, oraw = saved[len(ctx.where) :]
        if do is None:
            do = torch.zeros_like(o)
        if dlse is None:
            dlse = torch.zeros_like(lse)
        aux_grad = any(ctx.needs_input_grad[i] for i in aux)
        grads = bwd_op(do, dlse, o, lse, oraw, *inputs, aux_grad)
        out: list[torch.Tensor | None] = [None] * len(inputs)
        for i, g in zip(sig.floats, grads, strict=True):
            out[i] = g
        return tuple(out)

    return backward
