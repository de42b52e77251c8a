"""The `reference` backend: IR -> a readable, exact PyTorch implementation of each attention block.

For every `attention NAME(...)` the module gets `NAME_reference(...)` (exact math, accumulation in the wider
of the input dtype and float32, memory bounded by query-row chunks under `torch.utils.checkpoint`) and the
dispatching entry point `NAME(..., backend=None)`. The chunked driver `_attend`, the argument checks and
everything else that is not specific to the spec live in the runtime library, `attnc.runtime` (imported
by the module as `_rt`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import TYPE_CHECKING

from attnc.dsl.analysis.plan import AuxGrad, AuxRead, plan_attention
from attnc.dsl.analysis.ranges import index_status
from attnc.dsl.ir import (
    Attention,
    DType,
    Node,
    NormKind,
    Op,
    Role,
    TensorParam,
    TensorType,
    Var,
)
from attnc.dsl.ir import (
    walk as _walk,
)
from attnc.dsl.scope import Root, root_names

from .emit import Emitter, code, constant, expr_from_string, name
from .triton import tile_code

if TYPE_CHECKING:
    from attnc.dsl.analysis.plan import AttentionPlan

    from .triton.kernels import KernelWriter

_EXACT = {
    TensorType.FLOAT16: "torch.float16",
    TensorType.BFLOAT16: "torch.bfloat16",
    TensorType.FLOAT32: "torch.float32",
    TensorType.FLOAT64: "torch.float64",
    TensorType.INT32: "torch.int32",
    TensorType.INT64: "torch.int64",
}
_CLOSURES = [
    # (attention field, closure name, root, _Spec field); the parameters are the root's names in the one
    # per-root table (`dsl.scope.root_names`), and the score's closure also takes q·k (its `dot(q, k)`).
    ("score", "_score", Root.SCORE, "score"),
    ("mask", "_mask", Root.MASK, "mask"),
    ("sink", "_sink", Root.SINK, "sink"),
    ("bias", "_bias", Root.BIAS, "bias"),
    ("eps", "_eps", Root.EPS, "eps"),
    ("output", "_output", Root.OUTPUT, "output"),
    ("feature q", "_feature_q", Root.FEATURE_Q, "feature_q"),
    ("feature k", "_feature_k", Root.FEATURE_K, "feature_k"),
]
_CLOSURE_EXTRA = {Root.SCORE: ("qk",)}


def _closure_params(root: Root) -> str:
    return ", ".join((*root_names(root), *_CLOSURE_EXTRA.get(root, ())))


def dim_code(d: Node) -> str:
    """A shape dimension as code over size symbols and int scalars (always uniform)."""
    em = Emitter(load_code=_no_load, leaf_code=_no_leaf)
    stmts, expr = em.body(d)
    assert not stmts
    if em.hoisted:  # inline the (single) hoisted expression
        return em.hoisted[-1][1] if len(em.hoisted) == 1 else f"({expr})"
    return expr


def _no_load(n: Node, args: list[ast.expr]) -> ast.expr:  # pragma: no cover - dims never load
    raise AssertionError("load in a dimension")


def _no_leaf(n: Node) -> ast.expr:  # pragma: no cover
    raise AssertionError(n)


def _shape_text(p: TensorParam) -> str:
    return "[" + ", ".join(dim_code(d) for d in p.shape) + "]"


def _dims_tuple(p: TensorParam) -> str:
    parts = []
    for d in p.shape:
        if d.op is Op.SIZE:
            parts.append(repr(str(d.attr)))
        elif d.op is Op.CONST:
            parts.append(str(d.attr))
        else:
            parts.append("None")
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _signature(att: Attention) -> list[str]:
    lines = []
    for p in att.params:
        if isinstance(p, TensorParam):
            lines.append(f"    {p.name}: torch.Tensor,")
        else:
            ty = "int" if p.dtype is DType.INT else "float"
            if p.default is None:
                lines.append(f"    {p.name}: {ty},")
            elif p.default.op is Op.CONST:
                lines.append(f"    {p.name}: {ty} = {code(constant(p.default.attr))},")  # type: ignore[arg-type]
            else:
                lines.append(f"    {p.name}: {ty} | None = None,")
    return lines


def _sizes(att: Attention) -> list[str]:
    seen: list[str] = []
    for p in att.tensors:
        for d in p.shape:
            if d.op is Op.SIZE and d.attr not in seen:
                seen.append(str(d.attr))
    return seen


class _Loads:
    """Renders loads, with a run-time bounds check on every axis not proven in range."""

    def __init__(self, att: Attention) -> None:
        self.att = att

    def __call__(self, n: Node, args: list[ast.expr]) -> ast.expr:
        p = self.att.param(str(n.attr))
        assert isinstance(p, TensorParam)
        check = [
            k
            for k, (ix, ext) in enumerate(zip(n.args, p.shape, strict=True))
            if index_status(ix, ext, self.att.layout) != "in"
        ]
        idx = ast.Tuple(args, ast.Load()) if len(args) > 1 else args[0]
        if not check:
            return ast.Subscript(name(p.name), idx, ast.Load())
        return expr_from_string(
            "_rt._load({t}, {n}, {idx}, {chk})",
            t=name(p.name),
            n=ast.Constant(p.name),
            idx=ast.Tuple(args, ast.Load()),
            chk=ast.Tuple([ast.Constant(k) for k in check], ast.Load()),
        )


def _leaf(n: Node) -> ast.expr:
    if n.op is Op.VAR:
        return name(n.attr.value)  # type: ignore[union-attr]
    if n.op is Op.DOT:
        return name("qk")
    if n.op is Op.ELEM:
        return name(str(n.attr))
    raise AssertionError(n)  # pragma: no cover


def _doc_params(att: Attention) -> str:
    shapes = {p.name: _shape_text(p) for p in att.tensors}
    return ", ".join(
        f"{p.name}: {shapes[p.name]}" + ("" if p.type is TensorType.FLOAT else f" {p.type.value}")
        if isinstance(p, TensorParam)
        else f"{p.name}: {'int' if p.dtype is DType.INT else 'float'}"
        for p in att.params
    )


def _def(
    att: Attention, fn: str, doc: list[str], backend: bool = False, kwargs: tuple[str, ...] = ()
) -> list[str]:
    """A generated entry point's header: the spec's parameters, the common keywords, then `kwargs` (lines)."""
    L = [f"def {fn}("]
    L += _signature(att)
    L.append("    *,")
    L.append("    return_lse: bool = False,")
    L.append("    block_layout: BlockLayout | None = None,")
    if backend:
        L.append("    backend: str | None = None,")
    L += kwargs
    L.append("):")
    L.append(f'    """{doc[0]}')
    L += [f"    {d}" if d else "" for d in doc[1:]]
    L.append('    """')
    return L


def _checks(att: Attention) -> list[str]:
    """Argument checks: shapes, dtypes, devices, scalars (the same for every backend)."""
    nm = att.name
    L = argument_checks(att)
    if att.norm.kind is not NormKind.SOFTMAX:
        L.append("    if return_lse:")
        L.append(
            f'        raise ValueError("return_lse=True needs norm = softmax; {nm} uses norm = {att.norm.kind.value}")'
        )
    return L


def argument_checks(att: Attention) -> list[str]:
    """The checks every block's entry point starts with (attention blocks, and the state blocks of
    codegen/delta.py, which have the same tensors, scalars and head layout): sizes bound from the shapes,
    dtypes, devices, scalars, computed dimensions, and the query/key-value head ratio."""
    shapes = {p.name: _shape_text(p) for p in att.tensors}
    L = ["    sizes: dict[str, int] = {}"]
    for p in att.tensors:
        L.append(f"    _rt._bind(sizes, {p.name!r}, {p.name}, {_dims_tuple(p)}, {shapes[p.name]!r})")
    syms = _sizes(att)
    L.append(
        f"    {', '.join(syms)}{',' if len(syms) == 1 else ''} = {', '.join(f'sizes[{s!r}]' for s in syms)}"
    )
    for p in att.tensors:
        exact = "q.dtype" if p.role in (Role.K, Role.V) else _EXACT.get(p.type, "None")
        L.append(f"    _rt._check_type({p.name!r}, {p.name}, {p.type.kind.value!r}, {exact}, q.device)")
    for sc in att.scalars:
        kind = "int" if sc.dtype is DType.INT else "float"
        if sc.default is not None and sc.default.op is not Op.CONST:
            L.append(f"    if {sc.name} is None:")
            L.append(f"        {sc.name} = {dim_code(sc.default)}")
        L.append(f"    {sc.name} = _rt._check_scalar({sc.name!r}, {sc.name}, {kind!r})")
    for p in att.tensors:
        for axis, d in enumerate(p.shape):
            if d.op not in (Op.SIZE, Op.CONST):
                text = dim_code(d)
                L.append(
                    f"    _rt._check_dim({p.name!r}, {p.name}, {axis}, {text}, {text!r}, {shapes[p.name]!r})"
                )
    heads, kv_heads = att.layout.heads, att.layout.kv_heads
    if heads != kv_heads:
        hc, gc = dim_code(heads), dim_code(kv_heads)
        L.append(f"    if {gc} < 1 or {hc} % {gc} != 0:")
        L.append("        raise ValueError(")
        L.append(
            f'            f"k, v: the key/value head count ({{{gc}}}) must divide the query head count ({{{hc}}})"'
        )
        L.append("        )")
    return L


def _context(att: Attention) -> str:
    scalars = ", ".join(f"{s.name}={{{s.name}!r}}" for s in att.scalars)
    return f'f"sizes {{sizes}}{", " + scalars if scalars else ""}"'


def _hoisted(att: Attention, hoisted: list[tuple[str, str]]) -> list[str]:
    if not hoisted:
        return []
    # Size/scalar expressions are plain Python numbers: a domain error names the inputs, not math.
    L = ["    try:"]
    L += [f"        {var} = {expr}" for var, expr in hoisted]
    L.append("    except (ArithmeticError, ValueError) as err:")
    L.append(f"        raise _rt._eval_error({att.name!r}, err, {_context(att)}) from None")
    return L


def _closures(att: Attention, em: Emitter, only: set[str] | None = None) -> tuple[list[str], list[str]]:
    """The spec's expressions as closures over the auxiliary tensors and scalars."""
    roots = att.roots()
    closures: list[str] = []
    spec_args: list[str] = []
    for field_name, fn, scope, spec_field in _CLOSURES:
        root = roots.get(field_name)
        if root is None or (only is not None and field_name not in only):
            continue
        closures += _closure(em, fn, _closure_params(scope), root)
        spec_args.append(f"{spec_field}={fn}")
    return closures, spec_args


def _closure(em: Emitter, fn: str, params: str, root: Node) -> list[str]:
    """`def fn(params): ...; return root` inside a generated entry point."""
    stmts, ret = em.body(root)
    return [f"    def {fn}({params}):", *(f"        {st}" for st in stmts), f"        return {ret}", ""]


def _summary_closures(em: Emitter, summaries) -> tuple[list[str], list[str]]:  # type: ignore[no-untyped-def]
    """Per data-dependent mask term `A(i) == B(j)`: closures `_sum_q<n>(b, h, hk, i)`, `_sum_k<n>(b, hk, j)`
    and their pairs, as the kernels' tile summaries and context parallelism's schedule read them."""
    closures: list[str] = []
    pairs = []
    for n, (qside, kside) in enumerate(summaries):
        closures += _closure(em, f"_sum_q{n}", "b, h, hk, i", qside)
        closures += _closure(em, f"_sum_k{n}", "b, hk, j", kside)
        pairs.append(f"(_sum_q{n}, _sum_k{n})")
    return closures, pairs


def _keys_closure(att: Attention, plan) -> list[str]:  # type: ignore[no-untyped-def]
    """The tile plan's key intervals of a query range [m0, m0 + bm) as a host closure `_keys` (nothing when
    the mask has no plan, or a bound cannot be printed: every key is then a candidate)."""
    tiles = plan.tiles
    if att.mask is None or tiles is None:
        return []
    try:
        ivs = [(tile_code.python_code(lo), tile_code.python_code(hi)) for lo, hi in tiles.kv_intervals]
    except tile_code.Unprintable:
        return []
    body = ", ".join(f"({lo}, {hi})" for lo, hi in ivs)
    return [
        "    def _keys(_m0, _bm):  # the key positions [lo, hi) queries [_m0, _m0 + _bm) may see (the tile plan)",
        f"        return ({body}{',' if len(ivs) == 1 else ''})",
        "",
    ]


@dataclass(frozen=True)
class Extension:
    """What another emitter adds to a block's dispatching entry point (the linear family's forms: keyword
    arguments, dispatch statements before the op call, and definitions after it). Handed in by the module
    assembler, so this emitter imports none of its extensions."""

    kwargs: tuple[str, ...] = ()
    dispatch: tuple[str, ...] = ()
    tail: tuple[str, ...] = ()
    # the same for `NAME_varlen` (the linear forms' packed entry, `NAME_linear_varlen`)
    varlen_kwargs: tuple[str, ...] = ()
    varlen_dispatch: tuple[str, ...] = ()


def emit_attention(
    att: Attention, kernels: KernelWriter | None = None, extension: Extension | None = None
) -> str:
    """`<name>_reference`, `<name>_triton` (when the block's Triton `kernels` are given) and the dispatching
    `<name>` for one attention block."""
    nm = att.name
    doc_params = _doc_params(att)
    v = next(p for p in att.tensors if p.role is Role.V)
    q = next(p for p in att.tensors if p.role is Role.Q)
    row_dims = [dim_code(d) for d in q.shape[:3]]
    out_shape = "[" + ", ".join([*row_dims, dim_code(v.shape[3])]) + "]"
    softmax = att.norm.kind is NormKind.SOFTMAX
    lse_doc = f" and lse: [{', '.join(row_dims)}] when return_lse=True" if softmax else ""
    returns = f"Returns o: {out_shape}{lse_doc}."
    call_args = ", ".join(p.name for p in att.params)
    context = _context(att)

    # The reference in two parts: the checked arguments as the spec's closures (`_NAME_reference_spec`, which
    # attnc.distributed also calls, with the global sizes, to evaluate local shards at global positions) and
    # the runtime's chunked driver.
    L = _def(
        att,
        f"{nm}_reference",
        [f"Exact PyTorch reference for `{nm}` (norm = {att.norm.kind.value}).", "", doc_params, returns],
    )
    L.append(
        f"    spec, _context = _{nm}_reference_spec({call_args}, return_lse=return_lse, block_layout=block_layout)"
    )
    L.append(f"    return _rt._reference_run({nm!r}, spec, _context, q, k, v, return_lse)")
    L += ["", ""]
    L += _def(
        att,
        f"_{nm}_reference_spec",
        [f"The checked arguments of `{nm}` as the reference's `_Spec`, and the context of its errors."],
    )
    L += _checks(att)
    L.append("    _cdt = torch.float64 if q.dtype is torch.float64 else torch.float32")
    for p in att.aux_tensors:
        if p.type.kind is DType.FLOAT:
            L.append(f"    {p.name} = {p.name}.to(_cdt)")
    em = Emitter(load_code=_Loads(att), leaf_code=_leaf)
    closures, spec_args = _closures(att, em)
    L += _hoisted(att, em.hoisted)
    L.append("")
    L += closures
    plan = plan_attention(att)
    keys = _keys_closure(att, plan)
    if keys:
        L += keys
        spec_args.append("keys=_keys")
    closures, pairs = _summary_closures(em, plan.summaries)
    if pairs:
        L += closures
        spec_args.append(f"summaries=({', '.join(pairs)},)")
    L.append(f"    spec = _rt._Spec({att.norm.kind.value!r}, {', '.join(spec_args)})")
    L.append(
        "    spec = _rt._with_block_layout(spec, block_layout, q, k)  # a runtime block layout: a dense mask here"
    )
    L.append(f"    return spec, {context}")
    L += ["", ""]

    if kernels is not None:
        L += _emit_triton(att, kernels, doc_params, returns)
        L += ["", ""]

    # The dispatching entry point (with the linear forms' keyword arguments when the block has them).
    ext = extension or Extension()
    backends = "'reference' or 'triton'" if kernels is not None else "'reference'"
    L += _def(
        att,
        nm,
        [
            f"`{nm}` attention. backend: None (Triton on CUDA tensors, else the reference) or {backends}.",
            "",
            doc_params,
            returns,
        ],
        backend=True,
        kwargs=ext.kwargs,
    )
    L.append("    if backend is None:")
    if kernels is not None:
        L.append('        backend = "triton" if q.is_cuda and _rt._has_triton() else "reference"')
    else:
        L.append('        backend = "reference"')
    allowed = '("reference", "triton")' if kernels is not None else '("reference",)'
    L.append(f"    if backend not in {allowed}:")
    L.append(f'        raise ValueError(f"backend={{backend!r}}: {nm} has the backends {backends}")')
    if not softmax:
        L.append("    if return_lse:")
        L.append(
            f'        raise ValueError("return_lse=True needs norm = softmax; {nm} uses norm = {att.norm.kind.value}")'
        )
    # The op's schema admits only tensors and numbers: check the kinds here, for messages naming parameters.
    for p in att.params:
        if isinstance(p, TensorParam):
            L.append(f"    _rt._require_tensor({p.name!r}, {p.name}, {_shape_text(p)!r}, q)")
        else:
            kind = "int" if p.dtype is DType.INT else "float"
            optional = p.default is not None and p.default.op is not Op.CONST
            check = f"_rt._check_scalar({p.name!r}, {p.name}, {kind!r})"
            L.append(f"    {p.name} = {check}" + (f" if {p.name} is not None else None" if optional else ""))
    L += ext.dispatch
    L.append(f"    o, lse, _ = _{nm}_op({call_args}, *_rt._layout_op_args(block_layout), backend)")
    L.append("    return (o, lse) if return_lse else o")
    L += ["", ""]
    lengths = _varlen_lengths(att)
    if lengths is not None:
        L += _emit_varlen(att, kernels is not None, ext)
        L += ["", ""]
    L += _emit_ops(att, kernels.plan if kernels is not None else None, varlen=lengths is not None)
    if lengths is not None and lengths[1] != lengths[2]:
        L += ["", ""]
        L += _emit_paged(att, kernels is not None)
    if ext.tail:
        L += ["", ""]
        L += ext.tail
    return "\n".join(L) + "\n"


def _op_types(att: Attention) -> list[str]:
    out = []
    for p in att.params:
        if isinstance(p, TensorParam):
            out.append(f"{p.name}: torch.Tensor")
        else:
            ty = "int" if p.dtype is DType.INT else "float"
            out.append(
                f"{p.name}: Optional[{ty}]"
                if p.default is not None and p.default.op is not Op.CONST
                else f"{p.name}: {ty}"
            )
    return out


_LAYOUT_OP_PARAMS = [
    "_bl_kv_indices: Optional[torch.Tensor]",
    "_bl_kv_counts: Optional[torch.Tensor]",
    "_bl_q_indices: Optional[torch.Tensor]",
    "_bl_q_counts: Optional[torch.Tensor]",
    "_bl_q_block: int",
    "_bl_kv_block: int",
]


def _varlen_lengths(att: Attention) -> tuple[str, str, str] | None:
    """The size symbols of the batch and of q's and k's sequence axes, when all three are plain symbols (a
    block has a varlen form then); None otherwise."""
    q = next(p for p in att.tensors if p.role is Role.Q)
    k = next(p for p in att.tensors if p.role is Role.K)
    dims = (q.shape[0], q.shape[2], k.shape[2])
    if any(d.op is not Op.SIZE for d in dims) or k.shape[0] != q.shape[0]:
        return None
    return str(dims[0].attr), str(dims[1].attr), str(dims[2].attr)


def _varlen_axes(att: Attention, query_positions: bool = True) -> tuple[object, ...]:
    """Per parameter, how the varlen (or paged) reference cuts it to one sequence (`varlen.cut_to_sequence`):
    "q" / "k" for q and k, v; per axis of an auxiliary tensor "b" (the sequence), "q" / "k" (a position axis;
    without `query_positions`, as for the paged form's batched queries, q's axes are kept whole) or None;
    None for scalars."""
    lengths = _varlen_lengths(att)
    assert lengths is not None
    batch, q_len, k_len = lengths
    kinds = {batch: "b", k_len: "k", **({q_len: "q"} if query_positions else {})}
    out: list[object] = []
    for p in att.params:
        if isinstance(p, TensorParam) and p.role in (Role.Q, Role.K, Role.V):
            out.append("q" if p.role is Role.Q else "k")
        elif isinstance(p, TensorParam):
            out.append(tuple(kinds.get(str(d.attr)) if d.op is Op.SIZE else None for d in p.shape))
        else:
            out.append(None)
    return tuple(out)


def _packed_aux(att: Attention, p: TensorParam) -> int | None:
    """The axis of a per-token auxiliary tensor's sequence position ([B, H, N]: 2), which `NAME_varlen`
    takes packed like q ([total, H]); None for any other tensor (passed as in the batched call, its length
    axes as long as the longest sequence)."""
    lengths = _varlen_lengths(att)
    assert lengths is not None
    batch, q_len, k_len = lengths
    syms = [str(d.attr) if d.op is Op.SIZE else None for d in p.shape]
    seq = [a for a, s in enumerate(syms) if s in (q_len, k_len)]
    if len(p.shape) >= 2 and syms[0] == batch and len(seq) == 1 and batch not in syms[1:]:
        return seq[0]
    return None


def _emit_varlen(att: Attention, has_triton: bool, ext: Extension) -> list[str]:
    """`NAME_varlen`: the block over a packed variable-length batch (FlashAttention's `cu_seqlens`)."""
    nm = att.name
    lengths = _varlen_lengths(att)
    assert lengths is not None
    batch, q_len, k_len = lengths
    softmax = att.norm.kind is NormKind.SOFTMAX
    qn, kn, vn = (next(p.name for p in att.tensors if p.role is r) for r in (Role.Q, Role.K, Role.V))
    packed = {qn: "[total_q, H, D]", kn: "[total_k, G, D]", vn: "[total_k, G, E]"}
    docs = [f"{qn}: {packed[qn]}, {kn}: {packed[kn]}, {vn}: {packed[vn]} (packed along the sequence)"]
    # The sizes the packed q, k, v fix: the batch is the sequences, the lengths the longest ones.
    q, k, v = (next(p for p in att.tensors if p.role is r) for r in (Role.Q, Role.K, Role.V))
    known = {batch: "_cu_q.shape[0] - 1", q_len: "_max_q", k_len: "_max_k"}
    for t, tn in ((q, qn), (k, kn), (v, vn)):
        for axis, packed_axis in ((1, 1), (3, 2)):  # [B, H, N, D] packed as [total, H, D]
            d = t.shape[axis]
            if d.op is Op.SIZE and str(d.attr) not in known:
                known[str(d.attr)] = f"{tn}.shape[{packed_axis}]"
    checks: list[str] = ["    sizes = {" + ", ".join(f"{s!r}: {e}" for s, e in known.items()) + "}"]
    for p in att.aux_tensors:
        axis = _packed_aux(att, p)
        if axis is None:
            docs.append(f"{p.name}: {_shape_text(p)} ({batch} = nseq, lengths = the longest sequence's)")
            checks.append(f"    _rt._require_tensor({p.name!r}, {p.name}, {_shape_text(p)!r}, {qn})")
            checks.append(f"    _rt._bind(sizes, {p.name!r}, {p.name}, {_dims_tuple(p)}, {_shape_text(p)!r})")
            continue
        side = "q" if str(p.shape[axis].attr) == q_len else "k"
        rest = [d for a, d in enumerate(p.shape) if a not in (0, axis)]
        text = "[" + ", ".join([f"total_{side}", *(dim_code(d) for d in rest)]) + "]"
        dims = _dims_tuple(TensorParam(p.name, p.role, (p.shape[axis], *rest), p.type))
        docs.append(f"{p.name}: {text} (packed like {qn if side == 'q' else kn})")
        total = f"{qn if side == 'q' else kn}.shape[0]"
        checks.append(f"    _rt._require_tensor({p.name!r}, {p.name}, {text!r}, {qn})")
        checks.append(
            f"    _rt._bind({{**sizes, {str(p.shape[axis].attr)!r}: {total}}}, {p.name!r}, {p.name}, {dims}, {text!r})"
        )
        checks.append(
            f"    {p.name} = _rt.varlen_unpack({p.name!r}, {p.name}, _cu_{side}, _max_{side}, {axis})"
        )
    lengthy = {q_len, k_len}
    for sc in att.scalars:
        kind = "int" if sc.dtype is DType.INT else "float"
        default = sc.default
        if (
            default is not None
            and default.op is not Op.CONST
            and any(n.op is Op.SIZE and str(n.attr) in lengthy for n in _walk([default]))
        ):
            checks.append(f"    if {sc.name} is None:")
            checks.append(
                f'        raise ValueError("{sc.name}: its default reads a sequence length, which varies per sequence in {nm}_varlen; pass {sc.name}")'
            )
        optional = default is not None and default.op is not Op.CONST
        check = f"_rt._check_scalar({sc.name!r}, {sc.name}, {kind!r})"
        checks.append(
            f"    {sc.name} = {check}" + (f" if {sc.name} is not None else None" if optional else "")
        )
    L = [f"def {nm}_varlen("]
    L += _signature(att)
    L += [
        "    *,",
        "    cu_seqlens_q: torch.Tensor,",
        "    cu_seqlens_k: torch.Tensor | None = None,",
        "    max_seqlen_q: int | None = None,",
        "    max_seqlen_k: int | None = None,",
        "    return_lse: bool = False,",
        "    backend: str | None = None,",
        *ext.varlen_kwargs,
        "):",
    ]
    same = q_len == k_len
    lse_doc = " and lse: [total_q, H] when return_lse=True" if softmax else ""
    L += [
        f'    """`{nm}` over a packed variable-length batch (FlashAttention\'s varlen convention): i and j are',
        "    positions inside each sequence, b its number; tiles never mix sequences.",
        "",
        *(f"    {d}" for d in docs),
        "    cu_seqlens_q: int32 [nseq + 1], the offsets of the sequences in q"
        + (" (and in k, v: cu_seqlens_k defaults to it)" if same else "; cu_seqlens_k: the same for k, v"),
        f"    Returns o: [total_q, H, E]{lse_doc}.",
        "",
        "    Host synchronisation: only where a max_seqlen is None (it is read from the offsets, which are then",
        "    validated, as they always are for CPU tensors); with them given, a CUDA call never synchronises",
        "    and trusts the offsets.",
        '    """',
    ]
    L += _backend_lines(att, f"{nm}_varlen", has_triton, qn)
    L += ext.varlen_dispatch
    L.append(
        f"    _cu_q, _cu_k, _max_q, _max_k = _rt.varlen_batch({nm!r}, {qn}, {kn}, {vn}, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, {same!r})"
    )
    L += checks
    call_args = ", ".join(p.name for p in att.params)
    L.append(f"    o, lse, _ = _{nm}_varlen_op({call_args}, _cu_q, _cu_k, _max_q, _max_k, backend)")
    L.append(f"    return (o, _rt.varlen_pack_rows(lse, _cu_q, {qn}.shape[0])) if return_lse else o")
    return L


def _backend_lines(att: Attention, entry: str, has_triton: bool, qn: str) -> list[str]:
    """An entry point's backend choice (Triton on CUDA tensors, else the reference) and its checks."""
    L = ["    if backend is None:"]
    if has_triton:
        L.append(f'        backend = "triton" if {qn}.is_cuda and _rt._has_triton() else "reference"')
    else:
        L.append('        backend = "reference"')
    backends = "'reference' or 'triton'" if has_triton else "'reference'"
    allowed = '("reference", "triton")' if has_triton else '("reference",)'
    L.append(f"    if backend not in {allowed}:")
    L.append(f'        raise ValueError(f"backend={{backend!r}}: {entry} has the backends {backends}")')
    if att.norm.kind is not NormKind.SOFTMAX:
        L.append("    if return_lse:")
        L.append(
            f'        raise ValueError("return_lse=True needs norm = softmax; {att.name} uses norm = {att.norm.kind.value}")'
        )
    return L


def _emit_paged(att: Attention, has_triton: bool) -> list[str]:
    """`NAME_paged`: the block's forward over a paged KV cache (`attnc.runtime.paged`), for a block whose
    queries have a length symbol of their own (the spec aligns them with the keys: `j <= i + N - M`)."""
    nm = att.name
    softmax = att.norm.kind is NormKind.SOFTMAX
    qn, kn, vn = (next(p.name for p in att.tensors if p.role is r) for r in (Role.Q, Role.K, Role.V))
    floats = [p.name for p in att.tensors if p.type.kind is DType.FLOAT]
    L = [f"def {nm}_paged("]
    L += _signature(att)
    L += [
        "    *,",
        "    block_table: torch.Tensor,",
        "    seq_lens: torch.Tensor,",
        "    max_seqlen_k: int | None = None,",
        "    return_lse: bool = False,",
        "    backend: str | None = None,",
        "):",
    ]
    lse_doc = " and lse: [B, H, M] when return_lse=True" if softmax else ""
    L += [
        f'    """`{nm}` over a paged KV cache (vLLM\'s and FlashInfer\'s layout), forward only: decoding (M <= 16,',
        "    the split-KV path) and chunked prefill; j is the logical position in each sequence.",
        "",
        f"    {qn}: [B, H, M, D]; {kn}, {vn}: pages [num_pages, page_size, G, D] and [num_pages, page_size, G, E]",
        "    (page_size a multiple of 16); block_table: int32 [B, max_pages]; seq_lens: int32 [B], each",
        f"    sequence's number of keys. Auxiliary tensors as in `{nm}`, their key axes max_seqlen_k long.",
        f"    Returns o: [B, H, M, E]{lse_doc}.",
        "",
        "    Host synchronisation: only where max_seqlen_k is None (and to validate the table of CPU tensors).",
        '    """',
    ]
    L += _backend_lines(att, f"{nm}_paged", has_triton, qn)
    L.append(
        f"    _lk, _lv, _paged, _max_k = _rt.paged_batch({nm!r}, {qn}, {kn}, {vn}, block_table, seq_lens, max_seqlen_k, ({', '.join(floats)},))"
    )
    largs = ", ".join({kn: "_lk", vn: "_lv"}.get(p.name, p.name) for p in att.params)
    if has_triton:
        L.append("    if backend == 'triton':")
        L.append(f"        spec = _{nm}_triton_spec({largs}, return_lse=return_lse)._replace(paged=_paged)")
        L.append(f"        o, _, lse = _rt._triton_forward(spec, {qn}.contiguous(), _lk, _lv)")
        L.append("        return (o, lse) if return_lse else o")
    # The reference: each sequence's keys gathered from the pages, the batched reference on them, after the
    # batched call's checks on the logical shapes.
    L.append(f"    _{nm}_check_paged({largs})")
    axes = _varlen_axes(att, query_positions=False)
    ref = (
        f"lambda *a: {nm}_reference(*a, return_lse=True)"
        if softmax
        else f"lambda *a: ({nm}_reference(*a), None)"
    )
    call_args = ", ".join(p.name for p in att.params)
    L.append(f"    o, lse = _rt.paged_reference({ref}, ({call_args},), {axes!r}, _paged)")
    L.append("    return (o, lse) if return_lse else o")
    L += ["", ""]
    # The batched call's argument checks, on the logical k and v (shapes, dtypes, scalars).
    L.append(f"def _{nm}_check_paged(")
    L += _signature(att)
    L.append("):")
    L += argument_checks(att)
    return L


def _emit_ops(att: Attention, plan: AttentionPlan | None, varlen: bool) -> list[str]:
    """The block's custom ops, built by the runtime (`attention_op.attention_ops`) from what is the block's:
    its parameters with their schema types, its launch description and reference, the sums that give its
    learned inputs' gradients (`_NAME_aux_grads`), and how the varlen reference cuts each argument to one
    sequence. The op returns (o, stat, oraw): see attnc/runtime/attention_op.py."""
    nm = att.name
    has_triton = plan is not None
    float_aux = [p.name for p in att.aux_tensors if p.type.kind is DType.FLOAT]
    L: list[str] = []
    if has_triton and float_aux:
        assert plan is not None
        L += _fused_aux_grads(nm, plan, float_aux, att)
        L += ["", ""]
    params = []
    for p in att.params:
        if isinstance(p, TensorParam):
            params.append((p.name, "Tensor"))
        else:
            ty = "int" if p.dtype is DType.INT else "float"
            params.append(
                (p.name, f"{ty}?" if p.default is not None and p.default.op is not Op.CONST else ty)
            )
    names = [p.name for p in att.params]
    qkv = tuple(
        names.index(next(p.name for p in att.tensors if p.role is r)) for r in (Role.Q, Role.K, Role.V)
    )
    floats = tuple(
        k for k, p in enumerate(att.params) if isinstance(p, TensorParam) and p.type.kind is DType.FLOAT
    )
    softmax = att.norm.kind is NormKind.SOFTMAX
    epilogue = has_triton and att.output is not None
    sig = f"_rt.OpSignature({tuple(params)!r}, {qkv!r}, {floats!r}, {softmax!r}, {epilogue!r})"
    spec = f"_{nm}_triton_spec" if has_triton else "None"
    grads = f", aux_grads=_{nm}_aux_grads" if has_triton and float_aux else ""
    axes = f", varlen_axes={_varlen_axes(att)!r}" if varlen else ""
    target = f"_{nm}_op, _{nm}_varlen_op" if varlen else f"_{nm}_op, _"
    L.append(f"{target} = _rt.attention_ops(")
    L.append(f"    {nm!r}, _OP_KEY, __file__, {sig},")
    L.append(f"    {spec}, {nm}_reference{grads}{axes},")
    L.append(")")
    return L


def _fused_aux_grads(nm: str, plan: AttentionPlan, float_aux: list[str], att: Attention) -> list[str]:
    """`_NAME_aux_grads(_parts, *args)`: the gradients of the float auxiliary tensors, by name, from the
    backward kernels' partials (`_parts`: `plan.kernel_reads()`, then `pair_reads()`, `epilogue_reads()` and
    the feature maps' reads, q's then k's, in order, each summed over programs); zeros for a tensor no
    gradient reaches (read by the mask only, or not at all)."""
    fused = plan.fused_aux()
    read = {r.tensor for r in plan.aux_reads}
    args = ", ".join(p.name for p in att.params)
    L = [f"def _{nm}_aux_grads(_parts, {args}):"]
    L.append(
        f'    """The learned inputs\' gradients of `{nm}` from its backward kernels\' summed partials."""'
    )
    L.append("    return {")
    # A tensor the spec declares but never reads gets zeros, as does one read by the mask only.
    for t in [*fused, *(t for t in float_aux if t not in read)]:
        terms = [f"_parts[{n}]" for n, r in enumerate(plan.kernel_reads()) if r.tensor == t]
        first = len(plan.kernel_reads())
        terms += [f"_parts[{first + n}]" for n, r in enumerate(plan.pair_reads()) if r.tensor == t]
        at = first + len(plan.pair_reads())
        for reads in (
            plan.epilogue_reads(),
            plan.feature_reads(Root.FEATURE_Q),
            plan.kv_reads(),
        ):
            terms += [f"_parts[{at + n}]" for n, r in enumerate(reads) if r.tensor == t]
            at += len(reads)
        value = " + ".join(terms) if terms else f"torch.zeros_like({t})"  # read by the mask only
        L.append(f"        {t!r}: ({value}).view({t}.shape).to({t}.dtype),")
    L.append("    }")
    # Every read of an attention block is fused (`plan._classify`): the Triton backward never falls back to
    # the reference. A read the plan could not place is a compiler bug, not a slow path.
    unfused = [t for t in float_aux if t in read and t not in fused]
    assert not unfused, f"{nm}: auxiliary gradients of {', '.join(unfused)} have no fused reduction"
    return L


def _grad_lead(r: AuxRead, lead_vars: tuple[Var, Var, Var]) -> tuple[bool, bool, bool]:
    """Which of (the program's tile, b, h or hk) lead a plain or gathered read's gradient buffer: those its
    indices leave out; a gathered read's tile always leads (`kernels.grad_lead`, `_gather_grad`)."""
    used = {a.attr for a in r.load.args if a.op is Op.VAR}
    gathered = r.grad is AuxGrad.GATHER
    return (gathered or lead_vars[0] not in used, lead_vars[1] not in used, lead_vars[2] not in used)


def _tuple(items: list[str]) -> str:
    """A tuple display of code items (one item keeps its comma)."""
    return f"({', '.join(items)}{',' if len(items) == 1 else ''})"


def _emit_triton(att: Attention, writer: KernelWriter, doc_params: str, returns: str) -> list[str]:
    kernels = writer.em.hoisted
    nm = att.name
    call_args = ", ".join(p.name for p in att.params)
    # The launch description (checks, uniforms, closures, kernels, configs): shared by `NAME_triton` and by
    # the custom op's forward and backward, which launch the kernels themselves.
    L = _def(
        att,
        f"_{nm}_triton_spec",
        [f"The checked arguments of `{nm}` as the runtime's `_TritonSpec` (what the kernels launch with)."],
    )
    L += _checks(att)
    L.append("    _rt._check_triton_dtype(q)  # and bfloat16 on CPU (the interpreter's bf16 dot is wrong)")
    L.append(
        "    _cdt = torch.float32  # the kernels compute in float32: the closures' conversions (output = o + hk)"
    )
    em = Emitter(load_code=_Loads(att), leaf_code=_leaf)
    closures, _ = _closures(att, em, only={"output"})
    plan = writer.plan
    # Per-tile summaries of data-dependent mask terms (`doc[b, i] == doc[b, j]`): the kernels skip key tiles
    # whose range of values cannot meet the query tile's.
    more, pairs = _summary_closures(em, writer.summaries)
    closures += more
    L += _hoisted(att, [*kernels, *em.hoisted])
    L += closures
    aux = [p.name for p in att.aux_tensors]
    # The kernels' spec and uniforms groups, in their signature's order (`BlockABI`).
    spec_args = [f"*_rt._aux_args({', '.join(aux)}{',' if len(aux) == 1 else ''})"] if aux else []
    spec_args += [s.name for s in att.scalars] + _sizes(att)
    uniforms = [v for v, _ in kernels]
    output = ", output=_output" if att.output is not None else ""
    if plan.epilogue_reads():
        # Per epilogue read, its gradient buffer's lead axes (the query tile, b, h: `epilogue_lead`) and the
        # tensor's shape; the dQ kernel computes the epilogue's chain rule (`_epilogue_chain_rule`).
        leads = [
            (Var.I not in r.plain_vars, Var.B not in r.plain_vars, Var.H not in r.plain_vars)
            for r in plan.epilogue_reads()
        ]
        output += (
            ", epilogue_grads=("
            + "".join(
                f"({lead!r}, tuple({r.tensor}.shape)), "
                for lead, r in zip(leads, plan.epilogue_reads(), strict=True)
            )
            + ")"
        )
    if plan.kernel_reads():
        output += f", grad_numels=({''.join(f'{r.tensor}.numel(), ' for r in plan.kernel_reads())})"
        # Per read, the rows of its partial buffer: None, one per program; (b, h) for a gathered read, one
        # per query tile and per program variable its indices leave out (`AuxRead.gather_lead`).
        rows = [r.gather_lead if r.grad is AuxGrad.GATHER else None for r in plan.kernel_reads()]
        if any(x is not None for x in rows):
            output += f", grad_rows=({''.join(f'{x!r}, ' for x in rows)})"
    if plan.pair_reads():
        leads = [(Var.B not in r.plain_vars, Var.H not in r.plain_vars) for r in plan.pair_reads()]
        output += (
            ", pair_grads=("
            + "".join(
                f"({lead!r}, tuple({r.tensor}.shape)), "
                for lead, r in zip(leads, plan.pair_reads(), strict=True)
            )
            + ")"
        )
    # Reads of the feature maps: the same lead axes as the epilogue's (q: the query tile, b, h; k: the key
    # tile, b, hk), reduced by the dQ and the dK/dV kernel (`_feature_aux_grads`).
    # A gathered read of k's map (`kv_reads`) writes a histogram row per key tile, b and hk its indices
    # leave out: the same buffer layout, with the key tile always leading.
    for field, reads, lead_vars in (
        ("feature_grads", plan.feature_reads(Root.FEATURE_Q), (Var.I, Var.B, Var.H)),
        ("feature_kv_grads", plan.kv_reads(), (Var.J, Var.B, Var.HK)),
    ):
        if reads:
            descs = "".join(f"({_grad_lead(r, lead_vars)!r}, tuple({r.tensor}.shape)), " for r in reads)
            output += f", {field}=({descs})"
    output += f", heavy={writer.heavy}" if writer.heavy else ""
    output += f", summaries=({', '.join(pairs)},)" if pairs else ""
    # Which summed buffers are row terms (sink, eps, output epilogue: `_TritonSpec.once`), in the order
    # `_triton_backward` returns them: kernel reads, dense pair reads, epilogue reads, feature-map reads.
    once = [r.root in (Root.SINK, Root.EPS, Root.OUTPUT) for r in plan.kernel_reads()]
    once += [False] * len(plan.pair_reads()) + [True] * len(plan.epilogue_reads())
    if any(once):
        once += [False] * (len(plan.feature_reads(Root.FEATURE_Q)) + len(plan.kv_reads()))
        output += f", once={tuple(once)!r}"
    # The autotuner's best configs for this call's key (autotune/; None: the heuristic defaults).
    output += f", configs=_rt._tuned_configs(_STATE, _kern._{nm}_fwd_kernel, q, k, v, {writer.heavy!r})"
    L.append("    _kern = _STATE.kernels(interpret=not q.is_cuda)")
    L.append("    spec = _rt._TritonSpec(")
    L.append(f"        _kern._{nm}_fwd_kernel, _kern._{nm}_bwd_dkdv_kernel, _kern._{nm}_bwd_dq_kernel,")
    L.append(
        f"        {att.norm.kind.value!r}, {_tuple(spec_args)}, {_tuple(uniforms)}, _kern.{writer.abi_name()}{output}"
    )
    L.append("    )")
    L.append("    spec = spec._replace(")
    L.append(f"        fwd_split=_kern._{nm}_fwd_split_kernel, combine=_kern._{nm}_fwd_combine_kernel,")
    L.append("        layout=_rt._kernel_layout(block_layout, q, k),")
    L.append("    )")
    L.append("    return spec")
    L += ["", ""]
    L += _def(
        att,
        f"{nm}_triton",
        [
            f"Fused Triton kernels for `{nm}` (FlashAttention-2 style, forward and backward).",
            "",
            doc_params,
            returns,
            "",
            "CPU tensors run the kernels under the Triton interpreter.",
        ],
    )
    float_aux = [p.name for p in att.aux_tensors if p.type.kind is DType.FLOAT]
    if float_aux:
        L.append(
            f"    if torch.is_grad_enabled() and any(t.requires_grad for t in ({', '.join(float_aux)},)):"
        )
        L.append(
            "        # Learned inputs: the custom op, whose backward kernels reduce their gradients too."
        )
        L.append(
            f"        return {nm}({call_args}, return_lse=return_lse, block_layout=block_layout, backend='triton')"
        )
    L.append(f"    spec = _{nm}_triton_spec({call_args}, return_lse=return_lse, block_layout=block_layout)")
    L.append("    o, lse = _rt._TritonAttention.apply(spec, q.contiguous(), k.contiguous(), v.contiguous())")
    L.append("    return (o, lse) if return_lse else o")
    return L
