"""Emits `NAME_linear` for blocks with a linear-time form (dsl/analysis/linear.py).

The generated function evaluates the prologue — q~ = φ(q)·a(i), k~ = ψ(k)·c(j) and the log-decay G at
positions −1..N−1 — in PyTorch (autograd carries gradients to every auxiliary tensor), runs the core with
the Triton kernels or exactly in PyTorch, and finishes the norm and the output epilogue. As in
flash-linear-attention, element-wise feature maps are applied before the kernels; the kernels fuse the
decays, the causal mask, the carried state and both normalisers.
"""

from __future__ import annotations

import ast
from collections.abc import Callable

from attnc.dsl.analysis.linear import LinearForm, linear_form
from attnc.dsl.ir import Attention, DType, Node, NormKind, Op, Role, TensorParam

from .emit import Emitter, expr_from_string, name
from .reference import (
    _EXACT,
    Extension,
    _checks,
    _closures,
    _dims_tuple,
    _hoisted,
    _leaf,
    _Loads,
    _shape_text,
    _signature,
)


def _zero_load(n: Node, args: list[ast.expr]) -> ast.expr:
    return expr_from_string(
        "_rt_lin._lin_load0({t}, {idx})", t=name(f"_a_{n.attr}"), idx=ast.Tuple(args, ast.Load())
    )


class _ShardLoads:
    """Loads of a sequence shard (`NAME_linear(..., position_offset=)`): i and j are global positions, so an
    auxiliary tensor's sequence axes (sized like q's positions) are read at i − position_offset, its local row;
    every other load is `base`'s."""

    def __init__(self, att: Attention, base: Callable[[Node, list[ast.expr]], ast.expr]) -> None:
        q = next(p for p in att.tensors if p.role is Role.Q)
        k = next(p for p in att.tensors if p.role is Role.K)
        lengths = {str(t.shape[2].attr) for t in (q, k) if t.shape[2].op is Op.SIZE}
        self.axes = {
            p.name: {a for a, d in enumerate(p.shape) if d.op is Op.SIZE and str(d.attr) in lengths}
            for p in att.aux_tensors
        }
        self.base = base

    def __call__(self, n: Node, args: list[ast.expr]) -> ast.expr:
        axes = self.axes.get(str(n.attr), set())
        local = [
            ast.BinOp(a, ast.Sub(), name("position_offset")) if k in axes else a for k, a in enumerate(args)
        ]
        return self.base(n, local)


def _closure(em: Emitter, fn: str, params: str, root: Node, prelude: tuple[str, ...] = ()) -> list[str]:
    stmts, ret = em.body(root)
    body = [*prelude, *stmts]
    return [f"    def {fn}({params}):", *[f"        {s}" for s in body], f"        return {ret}", ""]


def _prologue_closures(
    att: Attention,
    form: LinearForm,
    load: Callable[[Node, list[ast.expr]], ast.expr],
    zero_load: Callable[[Node, list[ast.expr]], ast.expr],
) -> list[str]:
    """The hoisted uniforms and the prologue's closures: feature maps, eps, output, the q/k scales (loads by
    `load`) and the log-decay G (loads by `zero_load`: reads at position -1 give 0)."""
    em = Emitter(load_code=load, leaf_code=_leaf)
    closures, _ = _closures(att, em, only={"feature q", "feature k", "eps", "output"})
    if form.q_scale is not None:
        closures += _closure(em, "_lin_qs", "b, h, hk, i", form.q_scale)
    if form.k_scale is not None:
        closures += _closure(em, "_lin_ks", "b, h, hk, j", form.k_scale)
    gem = Emitter(load_code=zero_load, leaf_code=_leaf, uniform_prefix="_ug")
    if form.log_decay is not None:
        aux = [p.name for p in att.aux_tensors]
        params = ", ".join(["b", "h", "hk", "j", *(f"_a_{a}" for a in aux)])
        closures += _closure(gem, "_lin_g", params, form.log_decay, ("_cdt = torch.float64",))
    return [*_hoisted(att, [*em.hoisted, *gem.hoisted]), "", *closures]


def _feature_lines(att: Attention, form: LinearForm, q: str, k: str) -> list[str]:
    """q~ and k~ from the tensors named `q` and `k` ([B, H, N, D] and [B, G, N, D], or the packed batch's
    [1, H, total, D] views), over the index variables b, h, i, d of the caller."""
    L = [f"    _qt = {q}.to(_cdt)"]
    if att.feature_q is not None:
        L.append(
            "    _qt = _rt._full(_feature_q(_qt, b[..., None], h[..., None], (h // _rep)[..., None], i[..., None], d), _qt.shape, _qt)"
        )
    if form.q_scale is not None:
        L.append("    _qt = _qt * _rt._full(_lin_qs(b, h, h // _rep, i), (_Bq, _Hq, _Nq), _qt)[..., None]")
    kt_heads = "_Hq" if form.k_per_query_head else "_Gv"
    L.append(f"    _kt = {k}.to(_cdt){'.repeat_interleave(_rep, dim=1)' if form.k_per_query_head else ''}")
    L.append(f"    hk = torch.arange({kt_heads}, device=_dev).view(1, {kt_heads}, 1)")
    hk_k = "hk // _rep" if form.k_per_query_head else "hk"
    if att.feature_k is not None:
        L.append(
            f"    _kt = _rt._full(_feature_k(_kt, b[..., None], ({hk_k})[..., None], i[..., None], d), _kt.shape, _kt)"
        )
    if form.k_scale is not None:
        L.append(
            f"    _kt = _kt * _rt._full(_lin_ks(b, hk, {hk_k}, i), (_Bq, {kt_heads}, _Nq), _kt)[..., None]"
        )
    return L


def linear_kwargs() -> list[str]:
    return [
        "    algorithm: str | None = None,",
        "    initial_state: torch.Tensor | None = None,",
        "    return_state: bool = False,",
    ]


def dispatch_lines(att: Attention, has_triton: bool) -> list[str]:
    """Lines of the entry point `NAME` that route to the linear forms (after `backend` is resolved)."""
    nm = att.name
    args = ", ".join(p.name for p in att.params)
    L = ["    if algorithm is not None or initial_state is not None or return_state:"]
    L.append("        if block_layout is not None:")
    L.append(
        '            raise ValueError("block_layout= selects key blocks of the quadratic kernels; the linear '
        'forms (algorithm=, initial_state=, return_state=) visit every key")'
    )
    L.append(
        f"        return {nm}_linear({args}, algorithm=algorithm or 'chunk', backend=backend, "
        "initial_state=initial_state, return_state=return_state)"
    )
    if has_triton:
        L.append(
            "    if backend == 'triton' and block_layout is None and q.dim() == 4 "
            "and q.shape[2] > _rt_lin._LINEAR_PARALLEL_MAX_N:"
        )
        L.append(f"        return {nm}_linear({args}, algorithm='chunk', backend=backend)")
    return L


def emit_linear(att: Attention, form: LinearForm, has_triton: bool) -> list[str]:
    nm = att.name
    norm_sum = att.norm.kind is NormKind.SUM
    state_shape = "[B, H, D, E + 1] (the last column is the normaliser z)" if norm_sum else "[B, H, D, E]"
    L = [f"def {nm}_linear("]
    L += _signature(att)
    L.append("    *,")
    L.append("    return_lse: bool = False,")
    L.append('    algorithm: str = "chunk",')
    L.append(f'    backend: str = "{"triton" if has_triton else "reference"}",')
    L.append("    initial_state: torch.Tensor | None = None,")
    L.append("    return_state: bool = False,")
    L.append("    position_offset: int = 0,")
    L.append("    initial_log_decay: torch.Tensor | None = None,")
    L.append("    return_log_decay: bool = False,")
    L.append("):")
    L.append(
        f'    """Linear-time forms of `{nm}`: algorithm "chunk" (chunked, carried state), "recurrent" (token by'
    )
    L.append('    token, for decoding) or "parallel" (the quadratic kernels; no state).')
    L.append("")
    L.append(f"    initial_state / the returned state: {state_shape}, float32, the state after position")
    L.append(
        "    P + N - 1 (the initial one sits at position P - 1), P = position_offset: the global position of"
    )
    L.append(
        "    row 0 (a shard of a longer sequence; per-position auxiliary tensors hold the shard's rows)."
    )
    L.append(
        "    The log-decay G: at P - 1 as the call computes it (0 where it reads a per-position tensor there),"
    )
    L.append(
        "    or initial_log_decay [B, H]; return_log_decay=True also returns G at P - 1 and P + N - 1 [B, H, 2]"
    )
    L.append(
        "    float64 (zeros, and initial_log_decay unused, without a decay): a state carried over the call"
    )
    L.append("    decays by exp(G[..., 1] - G[..., 0]).")
    L.append("    Returns o, then the state (return_state=True), then G (return_log_decay=True).")
    L.append('    """')
    L += _checks(att)
    L.append("    if algorithm not in _rt_lin._LINEAR_ALGORITHMS:")
    L.append(
        f'        raise ValueError(f"algorithm={{algorithm!r}}: {nm} has the algorithms {{_rt_lin._LINEAR_ALGORITHMS}}")'
    )
    backends = "('reference', 'triton')" if has_triton else "('reference',)"
    L.append(f"    if backend not in {backends}:")
    L.append(f'        raise ValueError(f"backend={{backend!r}}: {nm}_linear has the backends {backends}")')
    if not form.causal:
        L.append('    if algorithm == "recurrent":')
        L.append(
            f"        raise ValueError(\"algorithm='recurrent': {nm} is bidirectional (no causal mask), "
            "so it has no token-by-token form; use 'chunk'\")"
        )
    L.append("    _rt_lin._lin_check_shard(position_offset, initial_log_decay, return_log_decay, algorithm)")
    L.append('    if algorithm == "parallel":')
    L.append("        if initial_state is not None or return_state:")
    L.append(
        "            raise ValueError(\"algorithm='parallel' carries no state; use algorithm='chunk' "
        'for initial_state/return_state")'
    )
    impl = f"{nm}_triton" if has_triton else f"{nm}_reference"
    call = ", ".join(p.name for p in att.params)
    if has_triton:
        L.append(f"        return ({impl} if backend == 'triton' else {nm}_reference)({call})")
    else:
        L.append(f"        return {impl}({call})")
    if has_triton:
        L.append('    if backend == "triton":')
        L.append(
            "        _rt._check_triton_dtype(q)  # and bfloat16 on CPU (the interpreter's bf16 dot is wrong)"
        )
    L.append("    _cdt = torch.float64 if q.dtype is torch.float64 else torch.float32")
    float_aux = [p for p in att.aux_tensors if p.type.kind is DType.FLOAT]
    for p in float_aux:
        L.append(f"    {p.name} = {p.name}.to(_cdt)")
    L += _prologue_closures(att, form, _ShardLoads(att, _Loads(att)), _ShardLoads(att, _zero_load))
    L.append("    _Bq, _Hq, _Nq, _Dq = q.shape")
    L.append("    _Gv, _Ev = v.shape[1], v.shape[3]")
    L.append("    _rep = _Hq // _Gv")
    L.append("    _dev = q.device")
    L.append("    b = torch.arange(_Bq, device=_dev).view(_Bq, 1, 1)")
    L.append("    h = torch.arange(_Hq, device=_dev).view(1, _Hq, 1)")
    L.append("    i = torch.arange(_Nq, device=_dev).view(1, 1, _Nq) + position_offset")
    L.append("    d = torch.arange(_Dq, device=_dev).view(1, 1, 1, _Dq)")
    L += _feature_lines(att, form, "q", "k")
    if form.log_decay is not None:
        aux_args = "".join(
            f", {p.name}.double()" if p.type.kind is DType.FLOAT else f", {p.name}" for p in att.aux_tensors
        )
        L.append(
            "    # G at positions P-1..P+N-1 in float64: chunks take differences of it (reads before row 0 give 0)."
        )
        L.append("    _jj = torch.arange(-1, _Nq, device=_dev).view(1, 1, _Nq + 1) + position_offset")
        L.append(
            f"    _gfull = _rt._full(_lin_g(b, h, h // _rep, _jj{aux_args}), (_Bq, _Hq, _Nq + 1), "
            "torch.empty((), dtype=torch.float64, device=_dev))"
        )
        L.append("    _gfull = _rt_lin._lin_g_start(_gfull, initial_log_decay)")
    else:
        L.append("    _gfull = None")
    L.append(
        f"    _s0, _z0 = _rt_lin._lin_state_split(initial_state, _Bq, _Hq, _Dq, _Ev, {norm_sum}, q.device)"
    )
    causal = form.causal
    if has_triton:
        L.append('    if backend == "triton":')
        L.append(
            f'        _opts = _rt_lin._LinOpts({causal}, {norm_sum}, algorithm == "recurrent", _rt_lin._lin_config(_STATE, {nm!r}, q, _Dq, _Ev, _Nq))'
        )
        L.append("        _s0 = None if _s0 is None else _s0.float()")
        L.append("        _z0 = None if _z0 is None else _z0.float()")
        L.append("        o, _den, _so, _zo = _rt_lin._lin_core(")
        L.append(
            "            _qt.to(q.dtype).contiguous(), _kt.to(q.dtype).contiguous(), v.contiguous(), _gfull, _s0, _z0, _opts"
        )
        L.append("        )")
        L.append("    else:")
        ind = "        "
    else:
        ind = "    "
    L.append(f"{ind}_s0 = None if _s0 is None else _s0.to(_cdt)")
    L.append(f"{ind}_z0 = None if _z0 is None else _z0.to(_cdt)")
    L.append(
        f"{ind}o, _den, _so, _zo = _rt_lin._lin_core_torch(_qt, _kt, v.to(_cdt), _gfull, _s0, _z0, {causal}, {norm_sum})"
    )
    if norm_sum:
        if att.norm.eps is not None:
            L.append("    _den = _den + _rt._full(_eps(b, h, h // _rep, i), _den.shape, _den)")
        L.append("    _alive = _den != 0")
        L.append("    o = torch.where(_alive[..., None], o / torch.where(_alive, _den, 1.0)[..., None], 0.0)")
    if att.output is not None:
        L.append("    o = _rt._dense_output(_output, o, _rep, position_offset)")
    L.append("    o = o.to(q.dtype)")
    L.append("    if return_state or return_log_decay:")
    L.append(
        f"        return _rt_lin._lin_results(o, _so, _zo, {norm_sum}, _gfull, return_state, return_log_decay)"
    )
    L.append("    return o")
    L.append("")
    L.append("")
    L.append(
        f"{nm}_linear.causal = {form.causal!r}  # attnc.distributed: a prefix (causal) or total state combination"
    )
    return L


def _is_size(d: Node, sym: str) -> bool:
    return d.op is Op.SIZE and str(d.attr) == sym


def _packing(att: Attention) -> tuple[str, str, dict[str, object]] | None:
    """The batch and sequence-length symbols, and how each auxiliary tensor travels in the packed form:
    ("tok", axis) packed along the sequence (its sequence axis at `axis` of the batched shape), "seq" one row
    per sequence, None as in the batched call, or "bad" (no packed form: the varlen call refuses it).
    None when q and k do not share their sequence length (cross attention: one cu_seqlens does not do)."""
    q = next(p for p in att.tensors if p.role is Role.Q)
    k = next(p for p in att.tensors if p.role is Role.K)
    bsym, nsym = str(q.shape[0].attr), str(q.shape[2].attr)
    if not (_is_size(k.shape[2], nsym) and _is_size(q.shape[0], bsym) and _is_size(q.shape[2], nsym)):
        return None
    kinds: dict[str, object] = {}
    for p in att.aux_tensors:
        seq_axes = [a for a, d in enumerate(p.shape) if _is_size(d, nsym)]
        batched = bool(p.shape) and _is_size(p.shape[0], bsym)
        if batched and len(seq_axes) == 1:
            kinds[p.name] = ("tok", seq_axes[0])
        elif batched and not seq_axes:
            kinds[p.name] = "seq"
        elif not seq_axes:
            kinds[p.name] = None
        else:
            kinds[p.name] = "bad"
    return bsym, nsym, kinds


def _varlen_dims(p: TensorParam, kind: object) -> tuple[str, str]:
    """A tensor's varlen shape: its dims tuple (code) and text."""
    dims = list(zip(ast.literal_eval(_dims_tuple(p)) if p.shape else (), p.shape, strict=True))
    texts = [_shape_text(p)[1:-1].split(", ")] if p.shape else [[]]
    text = texts[0]
    if p.role is not Role.AUX or (isinstance(kind, tuple)):
        axis = 2 if p.role is not Role.AUX else kind[1]  # type: ignore[index]
        keep = [a for a in range(len(dims)) if a not in (0, axis)]
        code = ["'total'", *(repr(dims[a][0]) for a in keep)]
        shown = ["total", *(text[a] for a in keep)]
        return f"({', '.join(code)},)", f"[{', '.join(shown)}] (the packed form of {_shape_text(p)})"
    if kind == "seq":
        code = ["'nseq'", *(repr(d) for d, _ in dims[1:])]
        return f"({', '.join(code)},)", f"[{', '.join(['nseq', *text[1:]])}] (one row per sequence)"
    return _dims_tuple(p), _shape_text(p)


class _PackedLoads:
    """Loads of the packed auxiliary tensors by (sequence number, position, ...), as the batched spec reads
    them; the other tensors' loads are `base`'s."""

    def __init__(self, att: Attention, kinds: dict[str, object], base, prefix: str = "") -> None:
        self.att, self.kinds, self.base, self.prefix = att, kinds, base, prefix

    def __call__(self, n: Node, args: list[ast.expr]) -> ast.expr:
        kind = self.kinds.get(str(n.attr))
        if not isinstance(kind, tuple):
            return self.base(n, args)
        return expr_from_string(
            "_rt_lin._lin_packed_load({t}, {idx}, {axis}, cu_seqlens)",
            t=name(f"{self.prefix}{n.attr}"),
            idx=ast.Tuple(args, ast.Load()),
            axis=ast.Constant(kind[1]),
        )


def emit_linear_varlen(att: Attention, form: LinearForm, has_triton: bool) -> list[str]:
    """`NAME_linear_varlen`: the linear forms on a packed batch of variable-length sequences (cu_seqlens)."""
    packing = _packing(att)
    if packing is None:
        return []
    bsym, _, kinds = packing
    nm = att.name
    norm_sum = att.norm.kind is NormKind.SUM
    width = "E + 1" if norm_sum else "E"
    L = [f"def {nm}_linear_varlen("]
    L += _signature(att)
    L.append("    *,")
    L.append("    cu_seqlens: torch.Tensor,")
    L.append("    max_seqlen: int | None = None,")
    L.append('    algorithm: str = "chunk",')
    L.append(f'    backend: str = "{"triton" if has_triton else "reference"}",')
    L.append("    initial_state: torch.Tensor | None = None,")
    L.append("    return_state: bool = False,")
    L.append("):")
    aux_doc = []
    for p in att.aux_tensors:
        kind = kinds[p.name]
        if kind != "bad" and kind is not None:
            aux_doc.append(f"{p.name}: {_varlen_dims(p, kind)[1]}")
    L.append(
        f'    """`{nm}_linear` on a packed batch of variable-length sequences (FlashAttention\'s varlen convention).'
    )
    L.append("")
    L.append(
        "    q: [total, H, D], k: [total, G, D], v: [total, G, E]: the sequences one after another; cu_seqlens: int32"
    )
    L.append(
        "    [nseq + 1] offsets (0, ..., total). i and j count from each sequence's start, b is the sequence number;"
    )
    L.append("    nothing crosses a sequence boundary." + (f" {'; '.join(aux_doc)}." if aux_doc else ""))
    L.append(
        f"    initial_state / the returned state: [nseq, H, D, {width}] float32, one per sequence. Returns o:"
    )
    L.append(
        "    [total, H, E], or (o, state) when return_state=True. max_seqlen: the longest sequence; None reads it"
    )
    L.append("    from cu_seqlens (one host synchronisation; the reference backend always reads cu_seqlens).")
    L.append('    """')
    for p in att.aux_tensors:
        if kinds[p.name] == "bad":
            L.append(
                f'    raise ValueError("{p.name}: {_shape_text(p)} has no packed form in {nm}_linear_varlen '
                '(a sequence axis needs the batch axis first, and only one)")'
            )
            return L
    L.append("    sizes: dict[str, int] = {}")
    qkv = [p for p in att.tensors if p.role is not Role.AUX]
    for p in qkv:
        dims, text = _varlen_dims(p, None)
        L.append(f"    _rt._bind(sizes, {p.name!r}, {p.name}, {dims}, {text!r})")
    L.append("    _nseq = sizes['nseq'] = _rt_lin._lin_varlen_cu(cu_seqlens, q.device)")
    L.append(f"    sizes[{bsym!r}] = _nseq")
    for p in att.aux_tensors:
        dims, text = _varlen_dims(p, kinds[p.name])
        L.append(f"    _rt._bind(sizes, {p.name!r}, {p.name}, {dims}, {text!r})")
    syms = [s_ for s_ in dict.fromkeys(str(d.attr) for p in att.tensors for d in p.shape if d.op is Op.SIZE)]
    syms = [
        s_
        for s_ in syms
        if s_ in ("D", "E", "H", "G")
        or s_ == bsym
        or any(_is_size(d, s_) for p in att.aux_tensors if kinds[p.name] is None for d in p.shape)
    ]
    syms = [s_ for s_ in syms if s_ != str(next(p for p in att.tensors if p.role is Role.Q).shape[2].attr)]
    L.append(
        f"    {', '.join(syms)}{',' if len(syms) == 1 else ''} = {', '.join(f'sizes[{s_!r}]' for s_ in syms)}"
    )
    for p in att.tensors:
        exact = "q.dtype" if p.role in (Role.K, Role.V) else _EXACT.get(p.type, "None")
        L.append(f"    _rt._check_type({p.name!r}, {p.name}, {p.type.kind.value!r}, {exact}, q.device)")
    for sc in att.scalars:
        kind = "int" if sc.dtype is DType.INT else "float"
        L.append(f"    {sc.name} = _rt._check_scalar({sc.name!r}, {sc.name}, {kind!r})")
    L.append("    if sizes['H'] % v.shape[1] != 0:")
    L.append(
        "        raise ValueError(f\"k, v: the key/value head count ({v.shape[1]}) must divide the query head count ({sizes['H']})\")"
    )
    L.append("    if algorithm == 'parallel':")
    L.append(
        f"        raise ValueError(\"algorithm='parallel': {nm}_linear_varlen has the algorithms 'chunk' and "
        f"'recurrent'; the quadratic kernels take packed batches through {nm}_varlen(..., algorithm='parallel')\")"
    )
    algs = "('chunk', 'recurrent')" if form.causal else "('chunk',)"
    L.append(f"    if algorithm not in {algs}:")
    L.append(
        f'        raise ValueError(f"algorithm={{algorithm!r}}: {nm}_linear_varlen has the algorithms {algs}"'
        + (
            ' + (" (bidirectional: no token-by-token form)" if algorithm == "recurrent" else ""))'
            if not form.causal
            else ")"
        )
    )
    backends = "('reference', 'triton')" if has_triton else "('reference',)"
    L.append(f"    if backend not in {backends}:")
    L.append(
        f'        raise ValueError(f"backend={{backend!r}}: {nm}_linear_varlen has the backends {backends}")'
    )
    L.append(
        f"    _s0, _z0 = _rt_lin._lin_state_split(initial_state, _nseq, sizes['H'], sizes['D'], sizes['E'], {norm_sum}, q.device)"
    )
    call_kinds = ", ".join(
        repr(("tok", 2))  # q, k, v: [total, H, D] -> [1, H, n, D]
        if isinstance(p, TensorParam) and p.role is not Role.AUX
        else repr(kinds.get(p.name))
        for p in att.params
    )
    args = ", ".join(p.name for p in att.params)
    L.append(
        "    if backend == 'reference':  # the batched reference, once per sequence (reads cu_seqlens on the host)"
    )
    L.append(
        f"        return _rt_lin._lin_varlen_loop({nm}_linear, ({args},), ({call_kinds},), cu_seqlens, q.shape[0], "
        f"initial_state, (sizes['H'], sizes['D'], sizes['E']{' + 1' if norm_sum else ''}), return_state, "
        "algorithm=algorithm, backend='reference')"
    )
    if not has_triton:
        return L
    L.append("    _rt._check_triton_dtype(q)  # and bfloat16 on CPU (the interpreter's bf16 dot is wrong)")
    L.append("    _max_n = _rt_lin._lin_max_seqlen(cu_seqlens, q.shape[0], max_seqlen)")
    L.append("    _cdt = torch.float64 if q.dtype is torch.float64 else torch.float32")
    for p in att.aux_tensors:
        if p.type.kind is DType.FLOAT:
            L.append(f"    {p.name} = {p.name}.to(_cdt)")
    L += _prologue_closures(
        att, form, _PackedLoads(att, kinds, _Loads(att)), _PackedLoads(att, kinds, _zero_load, "_a_")
    )
    L.append(
        "    # The prologue sees the packed batch as one [1, H, total] batch whose b and i are each token's"
    )
    L.append("    # sequence number and position inside it (the batched closures, unchanged).")
    L.append("    _T, _Hq, _Dq = q.shape")
    L.append("    _Gv, _Ev = v.shape[1], v.shape[2]")
    L.append("    _rep = _Hq // _Gv")
    L.append("    _dev = q.device")
    L.append("    _Bq, _Nq = 1, _T")
    L.append("    _seq, _pos = _rt_lin._lin_varlen_index(cu_seqlens, _T, _dev)")
    L.append("    b = _seq.view(1, 1, _T)")
    L.append("    h = torch.arange(_Hq, device=_dev).view(1, _Hq, 1)")
    L.append("    i = _pos.view(1, 1, _T)")
    L.append("    d = torch.arange(_Dq, device=_dev).view(1, 1, 1, _Dq)")
    L += _feature_lines(att, form, "q.transpose(0, 1)[None]", "k.transpose(0, 1)[None]")
    if form.log_decay is not None:
        aux_args = "".join(
            f", {p.name}.double()" if p.type.kind is DType.FLOAT else f", {p.name}" for p in att.aux_tensors
        )
        L.append("    # G at every sequence's positions -1..n-1 in float64 (reads at -1 give 0).")
        L.append("    _eb, _ej = _rt_lin._lin_varlen_ext(_T, _nseq, cu_seqlens, _dev)")
        L.append(
            f"    _gext = _rt._full(_lin_g(_eb.view(1, 1, -1), h, h // _rep, _ej.view(1, 1, -1){aux_args}), "
            "(1, _Hq, _T + _nseq), torch.empty((), dtype=torch.float64, device=_dev))[0]"
        )
    else:
        L.append("    _gext = None")
    L.append(
        f'    _opts = _rt_lin._LinOpts({form.causal}, {norm_sum}, algorithm == "recurrent", '
        f"_rt_lin._lin_config(_STATE, {nm!r}, q, _Dq, _Ev, max(_max_n, 1)))"
    )
    L.append("    _s0 = None if _s0 is None else _s0.float()")
    L.append("    _z0 = None if _z0 is None else _z0.float()")
    L.append("    o, _den, _so, _zo = _rt_lin._lin_core_varlen(")
    L.append(
        "        _qt[0].to(q.dtype).contiguous(), _kt[0].to(q.dtype).contiguous(), v.transpose(0, 1).contiguous(), "
        "_gext, _s0, _z0, cu_seqlens, _opts, _max_n"
    )
    L.append("    )")
    L.append("    o = o[None]  # [1, H, total, E]: the epilogue's batched view")
    if norm_sum:
        L.append("    _den = _den[None]")
        if att.norm.eps is not None:
            L.append("    _den = _den + _rt._full(_eps(b, h, h // _rep, i), _den.shape, _den)")
        L.append("    _alive = _den != 0")
        L.append("    o = torch.where(_alive[..., None], o / torch.where(_alive, _den, 1.0)[..., None], 0.0)")
    if att.output is not None:
        L.append("    o = _rt._dense_output(_output, o, _rep)")
    L.append("    o = o[0].transpose(0, 1).contiguous().to(q.dtype)")
    L.append("    if return_state:")
    L.append(f"        return o, _rt_lin._lin_state_join(_so, _zo, {norm_sum})")
    L.append("    return o")
    return L


__all__ = ["dispatch_lines", "emit_linear", "emit_linear_varlen", "linear_kwargs"]


def extension(att: Attention, has_triton: bool) -> Extension | None:
    """The linear forms' additions to the block's entry point, or None for a block without a linear form."""
    lin = linear_form(att)
    if lin is None or lin.form is None:
        return None
    varlen = emit_linear_varlen(att, lin.form, has_triton)
    return Extension(
        tuple(linear_kwargs()),
        tuple(dispatch_lines(att, has_triton)),
        tuple([*emit_linear(att, lin.form, has_triton), "", "", *varlen]),
        varlen_kwargs=tuple(linear_kwargs()) if varlen else (),
        varlen_dispatch=tuple(varlen_dispatch_lines(att)) if varlen else (),
    )


def varlen_dispatch_lines(att: Attention) -> list[str]:
    """Lines of `NAME_varlen` that route to `NAME_linear_varlen` (after `backend` is resolved): an explicit
    linear algorithm, a state, or (as `NAME` does) sequences longer than the quadratic kernels' sweet spot
    or not known on the host; algorithm='parallel' keeps the quadratic kernels."""
    nm = att.name
    args = ", ".join(p.name for p in att.params)
    return [
        "    if algorithm == 'parallel' and (initial_state is not None or return_state):",
        "        raise ValueError(\"algorithm='parallel' carries no state; use algorithm='chunk' for initial_state/return_state\")",
        "    linear = algorithm not in (None, 'parallel') or initial_state is not None or return_state",
        "    if linear or (algorithm is None and (max_seqlen_q is None or max_seqlen_q > _rt_lin._LINEAR_PARALLEL_MAX_N)):",
        "        if cu_seqlens_k is not None and cu_seqlens_k is not cu_seqlens_q:",
        f'            raise ValueError("cu_seqlens_k: the linear forms of {nm} take one offsets table (cu_seqlens_q)")',
        f"        return {nm}_linear_varlen({args}, cu_seqlens=cu_seqlens_q, max_seqlen=max_seqlen_q, "
        "algorithm=algorithm or 'chunk', backend=backend, initial_state=initial_state, return_state=return_state)",
    ]
