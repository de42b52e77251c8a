"""The `reference` backend: IR -> a readable, exact PyTorch implementation of each attention block.

For every `attention NAME(...)` the module gets `NAME_reference(...)` (exact math, accumulation in the wider
of the input dtype and float32, memory bounded by query-row chunks under `torch.utils.checkpoint`) and the
dispatching entry point `NAME(..., backend=None)`. The chunked driver `_attend` and the argument checks are
the runtime of `codegen/reference_runtime.py`, copied into the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

from dsl.analysis.ranges import index_status
from dsl.ir import (
    Attention,
    DType,
    Node,
    NormKind,
    Op,
    Role,
    TensorParam,
    TensorType,
)

from .emit import Emitter, code, constant, expr_from_string, name

_RUNTIME_PATH = Path(__file__).with_name("reference_runtime.py")
_EXACT = {
    TensorType.FLOAT16: "torch.float16",
    TensorType.BFLOAT16: "torch.bfloat16",
    TensorType.FLOAT32: "torch.float32",
    TensorType.FLOAT64: "torch.float64",
    TensorType.INT32: "torch.int32",
    TensorType.INT64: "torch.int64",
}
_CLOSURES = [
    # (attention field, closure name, parameters, _Spec field)
    ("score", "_score", "b, h, hk, i, j, qk", "score"),
    ("mask", "_mask", "b, h, hk, i, j", "mask"),
    ("sink", "_sink", "b, h, hk, i", "sink"),
    ("bias", "_bias", "b, h, hk, i, j", "bias"),
    ("eps", "_eps", "b, h, hk, i", "eps"),
    ("output", "_output", "o, b, h, hk, i, e", "output"),
    ("feature q", "_feature_q", "q, b, h, hk, i, d", "feature_q"),
    ("feature k", "_feature_k", "k, b, hk, j, d", "feature_k"),
]


def runtime_source() -> str:
    from .reference_runtime import MARKER

    text = _RUNTIME_PATH.read_text()
    return text[text.index(MARKER) :]


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
            "_load({t}, {n}, {idx}, {chk})",
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


def emit_attention(att: Attention) -> str:
    """The `<name>_reference` and `<name>` functions for one attention block."""
    nm = att.name
    L: list[str] = []
    shapes = {p.name: _shape_text(p) for p in att.tensors}
    doc_params = ", ".join(
        f"{p.name}: {shapes[p.name]}" + ("" if p.type is TensorType.FLOAT else f" {p.type.value}")
        if isinstance(p, TensorParam)
        else f"{p.name}: {'int' if p.dtype is DType.INT else 'float'}"
        for p in att.params
    )
    v = next(p for p in att.tensors if p.role is Role.V)
    q = next(p for p in att.tensors if p.role is Role.Q)
    row_dims = [dim_code(d) for d in q.shape[:3]]
    out_shape = "[" + ", ".join([*row_dims, dim_code(v.shape[3])]) + "]"
    softmax = att.norm.kind is NormKind.SOFTMAX

    L.append(f"def {nm}_reference(")
    L += _signature(att)
    L.append("    *,")
    L.append("    return_lse: bool = False,")
    L.append("):")
    L.append(f'    """Exact PyTorch reference for `{nm}` (norm = {att.norm.kind.value}).')
    L.append("")
    L.append(f"    {doc_params}")
    lse_doc = (
        f" and lse: [{', '.join(out_shape[1:-1].split(', ')[:3])}] when return_lse=True" if softmax else ""
    )
    L.append(f"    Returns o: {out_shape}{lse_doc}.")
    L.append('    """')
    # Argument checks: shapes, dtypes, devices, scalars.
    L.append("    sizes: dict[str, int] = {}")
    for p in att.tensors:
        L.append(f"    _bind(sizes, {p.name!r}, {p.name}, {_dims_tuple(p)}, {shapes[p.name]!r})")
    syms = _sizes(att)
    L.append(
        f"    {', '.join(syms)}{',' if len(syms) == 1 else ''} = {', '.join(f'sizes[{s!r}]' for s in syms)}"
    )
    for p in att.tensors:
        kind = p.type.kind.value
        if p.role in (Role.K, Role.V):
            exact = "q.dtype"
        else:
            exact = _EXACT.get(p.type, "None")
        L.append(f"    _check_type({p.name!r}, {p.name}, {kind!r}, {exact}, q.device)")
    for s in att.scalars:
        kind = "int" if s.dtype is DType.INT else "float"
        if s.default is not None and s.default.op is not Op.CONST:
            L.append(f"    if {s.name} is None:")
            L.append(f"        {s.name} = {dim_code(s.default)}")
        L.append(f"    {s.name} = _check_scalar({s.name!r}, {s.name}, {kind!r})")
    for p in att.tensors:
        for axis, d in enumerate(p.shape):
            if d.op not in (Op.SIZE, Op.CONST):
                text = dim_code(d)
                L.append(
                    f"    _check_dim({p.name!r}, {p.name}, {axis}, {dim_code(d)}, {text!r}, {shapes[p.name]!r})"
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
    if not softmax:
        L.append("    if return_lse:")
        L.append(
            f'        raise ValueError("return_lse=True needs norm = softmax; {nm} uses norm = {att.norm.kind.value}")'
        )
    L.append("    _cdt = torch.float64 if q.dtype is torch.float64 else torch.float32")
    for p in att.aux_tensors:
        if p.type.kind is DType.FLOAT:
            L.append(f"    {p.name} = {p.name}.to(_cdt)")

    # The spec's expressions as closures over the auxiliary tensors and scalars.
    em = Emitter(load_code=_Loads(att), leaf_code=_leaf)
    roots = att.roots()
    closures: list[str] = []
    spec_args: list[str] = []
    for field_name, fn, params, spec_field in _CLOSURES:
        root = roots.get(field_name)
        if root is None:
            continue
        stmts, ret = em.body(root)
        closures.append(f"    def {fn}({params}):")
        closures += [f"        {s}" for s in stmts]
        closures.append(f"        return {ret}")
        closures.append("")
        spec_args.append(f"{spec_field}={fn}")
    scalars = ", ".join(f"{s.name}={{{s.name}!r}}" for s in att.scalars)
    context = f'f"sizes {{sizes}}{", " + scalars if scalars else ""}"'
    if em.hoisted:
        # Size/scalar expressions are plain Python numbers: a domain error names the inputs, not math.
        L.append("    try:")
        L += [f"        {var} = {expr}" for var, expr in em.hoisted]
        L.append("    except (ArithmeticError, ValueError) as err:")
        L.append(f"        raise _eval_error({nm!r}, err, {context}) from None")
    L.append("")
    L += closures
    norm = att.norm.kind.value
    L.append(f"    spec = _Spec({norm!r}, {', '.join(spec_args)})")
    L.append("    try:")
    L.append("        o, lse = _attend(q.to(_cdt), k.to(_cdt), v.to(_cdt), spec, return_lse)")
    L.append("    except RuntimeError as err:  # torch reports an integer division by zero this way")
    L.append('        if "ZeroDivisionError" not in str(err):')
    L.append("            raise")
    L.append(f"        raise _eval_error({nm!r}, err, {context}) from None")
    L.append("    o = o.to(q.dtype)")
    L.append("    return (o, lse) if return_lse else o")
    L.append("")
    L.append("")
    # The dispatching entry point.
    L.append(f"def {nm}(")
    L += _signature(att)
    L.append("    *,")
    L.append("    return_lse: bool = False,")
    L.append("    backend: str | None = None,")
    L.append("):")
    L.append(f'    """`{nm}` attention. backend: None (best available) or "reference".')
    L.append("")
    L.append(f"    {doc_params}")
    L.append('    """')
    L.append('    if backend not in (None, "reference"):')
    L.append("        raise ValueError(")
    L.append(
        f"            f\"backend={{backend!r}}: this module provides only the 'reference' backend for {nm}\""
    )
    L.append("        )")
    call_args = ", ".join(p.name for p in att.params)
    L.append(f"    return {nm}_reference({call_args}, return_lse=return_lse)")
    return "\n".join(L) + "\n"
