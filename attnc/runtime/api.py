"""The names generated code calls, in one namespace: a generated module imports this module as `_rt` and
calls `_rt._bind(...)`, `_rt._attend(...)`, ... (a spec's block names can then never shadow a runtime name).
These underscore names are an interface between attnc's code generator and this runtime, versioned by
RUNTIME_VERSION (attnc/runtime/__init__.py), not a user API. Modules with a linear-form block also import
attnc.runtime.linear, as `_rt_lin` (kept apart: only those modules need it)."""

from __future__ import annotations

from .attention_op import OpSignature, attention_ops
from .checks import (
    _bind,
    _check_dim,
    _check_scalar,
    _check_triton_dtype,
    _check_type,
    _eval_error,
    _load,
    _require_tensor,
)
from .layout import BlockLayout, _kernel_layout, _layout_from_op_args, _layout_op_args, _with_block_layout
from .ops import _custom_op, _grad, _lse_dtype, _with_autograd
from .paged import Paged, PagedKVCache, paged_batch, paged_reference
from .reference import _attend, _clamp, _full, _reference_run, _sigmoid_scalar, _Spec, _to_int
from .triton import (
    _aux_args,
    _dense_output,
    _has_triton,
    _triton_backward,
    _triton_forward,
    _TritonAttention,
    _TritonSpec,
)
from .tuning import ModuleState, _tuned_configs
from .varlen import Varlen, varlen_batch, varlen_pack_rows, varlen_reference, varlen_unpack, varlen_views

__all__ = [
    "BlockLayout",
    "ModuleState",
    "OpSignature",
    "Paged",
    "PagedKVCache",
    "Varlen",
    "_Spec",
    "_TritonAttention",
    "_TritonSpec",
    "_attend",
    "_aux_args",
    "_bind",
    "_check_dim",
    "_check_scalar",
    "_check_triton_dtype",
    "_check_type",
    "_clamp",
    "_custom_op",
    "_dense_output",
    "_eval_error",
    "_full",
    "_grad",
    "_has_triton",
    "_kernel_layout",
    "_layout_from_op_args",
    "_layout_op_args",
    "_load",
    "_lse_dtype",
    "_reference_run",
    "_require_tensor",
    "_sigmoid_scalar",
    "_to_int",
    "_triton_backward",
    "_triton_forward",
    "_tuned_configs",
    "_with_autograd",
    "_with_block_layout",
    "attention_ops",
    "paged_batch",
    "paged_reference",
    "varlen_batch",
    "varlen_pack_rows",
    "varlen_reference",
    "varlen_unpack",
    "varlen_views",
]
