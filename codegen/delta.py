"""Emits the entry points of a state block (`state S = ...`): `NAME`, `NAME_reference` and `NAME_varlen`.

The generated function checks its arguments (errors name the parameter), evaluates the plan's per-token
inputs (dsl/analysis/recurrence.py: q', k', v', β or a, b, and the log-gate g) in PyTorch over index grids
[B, H, T, ·] — autograd carries gradients to q, k, v and every float auxiliary — and calls the delta-rule
runtime, `attnc.runtime.delta` (Triton kernels, or its exact PyTorch reference for backend="reference").
Float auxiliaries are computed in at least float32 (float64 stays float64) and never rounded to q's dtype.

`NAME_varlen` takes a packed batch of variable-length sequences (cu_seqlens, FlashAttention's convention, as
the softmax family's `NAME_varlen` and the linear family's `NAME_linear_varlen`): its per-token inputs are the
same closures over a [1, H, total] grid whose b and i are each token's sequence number and position inside it,
with the packed auxiliaries read by (sequence, position); the runtime's `*_varlen` kernels walk each sequence.
"""

from __future__ import annotations

import ast

from attnc.dsl.analysis.recurrence import DeltaPlan, GateShape, PlanKind, analyse
from attnc.dsl.ir import DType, Node, Role, TensorParam
from attnc.dsl.state_ir import Recurrence, Side, side_of

from .emit import Emitter, expr_from_string, name
from .linear import _packing, _varlen_dims
from .reference import _hoisted, _leaf, _Loads, _shape_text, _signature, _sizes, argument_checks, dim_code

_GRID = "q, k, v, b, h, hk, i, d, e"


def _closure(em: Emitter, fn: str, root: Node) -> list[str]:
    stmts, ret = em.body(root)
    return [f"    def {fn}({_GRID}):", *[f"        {s}" for s in stmts], f"        return {ret}", ""]


def _plan_doc(plan: DeltaPlan) -> str:
    if plan.kind is PlanKind.DELTA:
        gate = {GateShape.NONE: "DeltaNet", GateShape.SCALAR: "Gated DeltaNet", GateShape.CHANNEL: "KDA"}
        return f"the delta rule ({gate[plan.gate]} form): attnc.runtime.delta.delta_rule"
    rank1 = "diagonal plus rank 1" if plan.a is not None else "diagonal"
    return f"a {rank1} transition: attnc.runtime.delta.dplr"


def _members(plan: DeltaPlan) -> list[tuple[str, Node, str]]:
    """The plan's per-token inputs: (runtime argument, expression, shape kind of `spec_input`)."""
    members: list[tuple[str, Node, str]] = []
    for field_name in ("q", "k", "v", "g", "beta", "a", "b"):
        node = getattr(plan, field_name)
        if node is None:
            continue
        side = side_of(node)
        kind = "value" if side is Side.VALUE else "key" if side is Side.KEY else "scalar"
        if field_name in ("q", "k", "a", "b") or (field_name == "g" and plan.gate is GateShape.CHANNEL):
            kind = "key"  # a key-side input even where the expression does not vary along d
        if field_name == "v":
            kind = "value"
        members.append((field_name, node, kind))
    return members


def _runtime_call(plan: DeltaPlan, fn_suffix: str, extra: str, wrap: str) -> str:
    """The runtime call on the evaluated inputs `_x_*` (each through `wrap`, a format with one field)."""
    st = f"{extra}initial_state=initial_state, return_state=return_state"
    alg = "algorithm='reference' if backend == 'reference' else algorithm"
    x = {f: wrap.format(f"_x_{f}") for f in ("q", "k", "v", "beta", "g", "a", "b")}
    g = x["g"] if plan.g is not None else "None"
    if plan.kind is PlanKind.DELTA:
        args = f"{x['q']}, {x['k']}, {x['v']}, {x['beta']}"
        return f"    return _rt_delta.delta_rule{fn_suffix}({args}, g={g}, {st}, {alg})"
    ab = f"{x['a']}, {x['b']}" if plan.a is not None else "None, None"
    return f"    return _rt_delta.dplr{fn_suffix}({x['q']}, {x['k']}, {x['v']}, {ab}, g={g}, {st}, {alg})"


class _PackedLoads:
    """Loads of the auxiliary tensors packed along the sequence ([total, ...]) by (sequence number, position),
    as the batched spec reads them; the others' loads are `base`'s (a per-sequence tensor [nseq, ...] is read
    at b = the sequence number as a batched one is)."""

    def __init__(self, kinds: dict[str, object], base: _Loads) -> None:
        self.kinds, self.base = kinds, base

    def __call__(self, n: Node, args: list[ast.expr]) -> ast.expr:
        kind = self.kinds.get(str(n.attr))
        if not isinstance(kind, tuple):
            return self.base(n, args)
        return expr_from_string(
            "_rt_delta.packed_load({t}, {idx}, {axis}, cu_seqlens)",
            t=name(str(n.attr)),
            idx=ast.Tuple(args, ast.Load()),
            axis=ast.Constant(kind[1]),
        )


def _aux_promotions(rec: Recurrence) -> list[str]:
    L = ["    _cdt = torch.float64 if q.dtype is torch.float64 else torch.float32"]
    for p in rec.aux_tensors:
        if p.type.kind is DType.FLOAT:
            # Never narrower than the compute dtype: a float32 (or float64) gate is not rounded to q's dtype.
            L.append(f"    {p.name} = {p.name}.to(torch.promote_types({p.name}.dtype, _cdt))")
    return L


def _backend_checks(fn: str) -> list[str]:
    return [
        "    if backend is None:",
        '        backend = "triton" if q.is_cuda and _rt._has_triton() else "reference"',
        '    if backend not in ("reference", "triton"):',
        f"        raise ValueError(f\"backend={{backend!r}}: {fn} has the backends 'reference' or 'triton'\")",
        '    if algorithm not in ("auto", "chunk", "recurrent"):',
        f"        raise ValueError(f\"algorithm={{algorithm!r}}: {fn} takes 'auto', 'chunk' or 'recurrent'\")",
    ]


def _inputs(rec: Recurrence, plan: DeltaPlan, load: object) -> list[str]:
    """The hoisted uniforms, the closures of the per-token inputs and their evaluation at full shape."""
    em = Emitter(load_code=load, leaf_code=_leaf)  # type: ignore[arg-type]
    members = _members(plan)
    closures: list[str] = []
    for field_name, node, _ in members:
        closures += _closure(em, f"_in_{field_name}", node)
    L = _hoisted(rec, em.hoisted)  # type: ignore[arg-type]
    L.append("")
    L += closures
    for field_name, _, kind in members:
        L.append(
            f"    _x_{field_name} = _rt_delta.spec_input(_in_{field_name}(*_rows, *_grid), {kind!r}, _grid)"
        )
    return L


def emit_varlen(rec: Recurrence, plan: DeltaPlan) -> list[str]:
    """`NAME_varlen`: the block on a packed batch of variable-length sequences (cu_seqlens)."""
    nm = rec.name
    fn = f"{nm}_varlen"
    packing = _packing(rec)  # type: ignore[arg-type]  # a state block has an attention block's parameters
    if packing is None:  # pragma: no cover - a state block's q, k and v share B and N (dsl/state_ir.py)
        return []
    bsym, nsym, kinds = packing
    q = next(p for p in rec.tensors if p.role is Role.Q)
    v = next(p for p in rec.tensors if p.role is Role.V)
    H, D, E = dim_code(q.shape[1]), dim_code(rec.layout.head_dim), dim_code(v.shape[3])
    G = dim_code(rec.layout.kv_heads)
    L = [f"def {fn}("]
    L += _signature(rec)  # type: ignore[arg-type]
    L += [
        "    *,",
        "    cu_seqlens: torch.Tensor,",
        "    max_seqlen: int | None = None,",
        "    initial_state: torch.Tensor | None = None,",
        "    return_state: bool = False,",
        "    algorithm: str = 'auto',",
        "    backend: str | None = None,",
        "):",
    ]
    doc = [f"{p.name}: {_varlen_dims(p, None)[1]}" for p in rec.tensors if p.role is not Role.AUX]
    doc += [
        f"{p.name}: {_varlen_dims(p, kinds[p.name])[1]}"
        for p in rec.aux_tensors
        if kinds[p.name] not in ("bad", None)
    ]
    chunk = plan.kind is PlanKind.DELTA and plan.gate is not GateShape.CHANNEL
    L += [
        f'    """`{nm}` on a packed batch of variable-length sequences (FlashAttention\'s varlen convention).',
        "",
        "    The sequences one after another; cu_seqlens: int32 [nseq + 1] offsets (0, ..., total). i counts from",
        "    each sequence's start and b is the sequence number; each sequence starts from its own initial state",
        "    (or zeros) and nothing crosses a sequence boundary.",
        f"    {'; '.join(doc)}.",
        f"    initial_state / the returned state: [nseq, {H}, {E}, {D}] float32, one per sequence. Returns o:",
        f"    [total, {H}, {E}] (q's dtype), or (o, state) when return_state=True. max_seqlen: the longest",
        "    sequence; None reads it from cu_seqlens (one host synchronisation, which also checks its values;",
        "    CPU offsets are always checked). The Triton kernels take cu_seqlens themselves: one program per",
        "    (sequence, head, value block), forward and backward. algorithm, backend: as "
        + (
            f"`{nm}` ('chunk': chunks start at each sequence's first token; 'auto' picks it when the"
            if chunk
            else f"`{nm}`."
        ),
    ]
    if chunk:
        L.append("    longest sequence has >= 64 tokens).")
    L.append('    """')
    for p in rec.aux_tensors:
        if kinds[p.name] == "bad":
            L.append(
                f'    raise ValueError("{p.name}: {_shape_text(p)} has no packed form in {fn} '
                '(a sequence axis needs the batch axis first, and only one)")'
            )
            return L
    L.append("    sizes: dict[str, int] = {}")
    for p in rec.tensors:
        if p.role is not Role.AUX:
            dims, text = _varlen_dims(p, None)
            L.append(f"    _rt._bind(sizes, {p.name!r}, {p.name}, {dims}, {text!r})")
    L.append(f"    _nseq = sizes['nseq'] = _rt_delta.varlen_cu({fn!r}, cu_seqlens, q.device)")
    L.append(f"    sizes[{bsym!r}] = _nseq")
    for p in rec.aux_tensors:
        dims, text = _varlen_dims(p, kinds[p.name])
        L.append(f"    _rt._bind(sizes, {p.name!r}, {p.name}, {dims}, {text!r})")
    # Every size symbol but the sequence length, which is each sequence's own (B is nseq).
    syms = [s_ for s_ in _sizes(rec) if s_ != nsym]  # type: ignore[arg-type]
    L.append(
        f"    {', '.join(syms)}{',' if len(syms) == 1 else ''} = {', '.join(f'sizes[{s_!r}]' for s_ in syms)}"
    )
    checks = argument_checks(rec)  # type: ignore[arg-type]
    L += [c for c in checks if "_rt._check_type(" in c or "_rt._check_scalar(" in c]
    heads, kv_heads = rec.layout.heads, rec.layout.kv_heads
    if heads != kv_heads:
        hc, gc = dim_code(heads), dim_code(kv_heads)
        L.append(f"    if {gc} < 1 or {hc} % {gc} != 0:")
        L.append(
            f'        raise ValueError(f"k, v: the key/value head count ({{{gc}}}) must divide the query head count ({{{hc}}})")'
        )
    L += _backend_checks(fn)
    L += _aux_promotions(rec)
    L.append("    _total = q.shape[0]")
    L.append(f"    _grid = _rt_delta.spec_grid_varlen(cu_seqlens, {H}, {G}, _total, {D}, {E}, q.device)")
    L.append(
        "    # The per-token inputs see the packed batch as one [1, H, total] batch (the batched closures)."
    )
    L.append(
        f"    _rows = _rt_delta.spec_rows(q.movedim(0, 1)[None], k.movedim(0, 1)[None], v.movedim(0, 1)[None], {H}, {G})"
    )
    L += _inputs(rec, plan, _PackedLoads(kinds, _Loads(rec)))  # type: ignore[arg-type]
    extra = "cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, "
    L.append(_runtime_call(plan, "_varlen", extra, "{}[0].movedim(1, 0)"))
    return L


def emit_recurrence(rec: Recurrence) -> str:
    plan = analyse(rec)
    nm = rec.name
    q = next(p for p in rec.tensors if p.role is Role.Q)
    v = next(p for p in rec.tensors if p.role is Role.V)
    dims = [dim_code(x) for x in q.shape[:3]]
    B, H, T = dims
    D, E, G = dim_code(rec.layout.head_dim), dim_code(v.shape[3]), dim_code(rec.layout.kv_heads)
    doc_params = ", ".join(
        f"{p.name}: {_shape_text(p)}" if isinstance(p, TensorParam) else p.name for p in rec.params
    )
    returns = f"Returns o: [{B}, {H}, {T}, {E}] (q's dtype), and the final state [{B}, {H}, {E}, {D}] (float32) with return_state=True."
    call_args = ", ".join(p.name for p in rec.params)

    L = [f"def {nm}("]
    L += _signature(rec)  # type: ignore[arg-type]
    L += [
        "    *,",
        "    initial_state: torch.Tensor | None = None,",
        "    return_state: bool = False,",
        "    algorithm: str = 'auto',",
        "    backend: str | None = None,",
        "):",
        f'    """`{nm}`: a state recurrence computed as {_plan_doc(plan)}.',
        "",
        f"    {doc_params}",
        f"    {returns}",
        "    initial_state: [B, H, E, D] (float32); algorithm: 'auto', 'chunk' (not a general rank-1 DPLR),",
        "    'recurrent'; backend: None (Triton on CUDA tensors, else the reference), 'reference' or 'triton'.",
        '    """',
    ]
    L += argument_checks(rec)  # type: ignore[arg-type]  # a state block has the same parameters
    L += _backend_checks(nm)
    L += _aux_promotions(rec)
    L.append(f"    _grid = _rt_delta.spec_grid({B}, {H}, {G}, {T}, {D}, {E}, q.device)")
    L.append(f"    _rows = _rt_delta.spec_rows(q, k, v, {H}, {G})")
    L += _inputs(rec, plan, _Loads(rec))  # type: ignore[arg-type]
    L.append(_runtime_call(plan, "", "", "{}"))
    L += ["", ""]
    L += [f"def {nm}_reference("]
    L += _signature(rec)  # type: ignore[arg-type]
    L += [
        "    *,",
        "    initial_state: torch.Tensor | None = None,",
        "    return_state: bool = False,",
        "):",
        f'    """Exact PyTorch reference for `{nm}` (token by token; float64 for float64 inputs, else float32)."""',
        f"    return {nm}({call_args}, initial_state=initial_state, return_state=return_state, backend='reference')",
    ]
    L += ["", ""]
    L += emit_varlen(rec, plan)
    return "\n".join(L) + "\n"
