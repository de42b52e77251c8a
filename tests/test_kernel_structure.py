"""The generated kernels as structure: one loop-body helper per kind, called by the kernels (no repeated loop
body), and one typed signature per kernel whose optional groups are absent or gated.

These inspect the generated kernels file with Python's `ast` (the generated code itself, not its text) and the
signatures the writer built, for every example spec.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from attnc.codegen.triton.kernels import KERNEL_KINDS, ONE_CALL_LOOPS, Edge, KernelWriter
from attnc.codegen.triton.module import render_kernels
from attnc.dsl.lower import compile_to_ir

from attnc.runtime import core_abi
from attnc.runtime.signature import BindError, BlockABI, Group, Kind

SPECS = Path(__file__).resolve().parents[1] / "examples" / "specs"
# The quadratic-form specs (the linear family's own kernels are codegen/triton/linear_kernels.py).
EXAMPLES = sorted(p.stem for p in SPECS.glob("*.attn"))
HELPERS = ("fwd_inner", "dkdv_inner", "dq_inner")
# Which helper each kernel's tile loop calls (the combine has no tile loop).
CALLS = {"fwd": "fwd_inner", "fwd_split": "fwd_inner", "bwd_dkdv": "dkdv_inner", "bwd_dq": "dq_inner"}


def _module(stem: str) -> tuple[ast.Module, list[KernelWriter]]:
    program = compile_to_ir((SPECS / f"{stem}.attn").read_text(), f"{stem}.attn")
    writers = [KernelWriter(att) for att in program.attentions]
    text = render_kernels(program, [w.kernels()[0] for w in writers])
    return ast.parse(text), writers


def _loops(fn: ast.FunctionDef) -> list[ast.For]:
    return [n for n in ast.walk(fn) if isinstance(n, ast.For)]


def _tile_loops(fn: ast.FunctionDef) -> list[ast.For]:
    return [n for n in _loops(fn) if isinstance(n.target, ast.Name) and n.target.id in ("start_n", "start_m")]


def _calls(fn: ast.FunctionDef) -> list[str]:
    return [n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]


@pytest.mark.parametrize("stem", EXAMPLES)
def test_one_loop_body_helper_per_kind_and_kernels_call_it(stem: str) -> None:
    tree, writers = _module(stem)
    fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for w in writers:
        nm = w.att.name
        for h in HELPERS:
            helper = fns[f"_{nm}_{h}"]
            # The helper is the only place the loop body is written: exactly one tile loop, at its top level.
            assert len(_tile_loops(helper)) == 1, (nm, h)
            assert _tile_loops(helper)[0] in helper.body
        for kind in KERNEL_KINDS:
            kernel = fns[f"_{nm}_{kind}_kernel"]
            assert not _tile_loops(kernel), f"{nm} {kind}: a tile loop body written in the kernel"
            called = [c for c in _calls(kernel) if c.startswith(f"_{nm}_") and c.endswith("_inner")]
            if kind in CALLS:
                # Per plan interval, in each of the two forms (plain range, runtime block layout): one call, or
                # where the helper splits off lean interior tiles (EDGE) the boundary tiles before them (unless
                # the lean interval starts at 0), the lean ones and the boundary tiles after them; and where the
                # kernel calls it once per interval under `_TMA` (`_one_call`) one more, the whole interval.
                kv = CALLS[kind] != "dkdv_inner"
                intervals = w.kv_intervals if kv else w.q_intervals
                lean = w.kv_lean if kv else w.q_lean
                edge = "EDGE" in [a.arg for a in fns[f"_{nm}_{CALLS[kind]}"].args.args]
                per = [
                    1
                    if not edge
                    else 2
                    if (lean[k] if len(lean) == len(intervals) else lean[0])[0] == "0"
                    else 3
                    for k in range(len(intervals))
                ]
                if edge and CALLS[kind].split("_")[0] in ONE_CALL_LOOPS and w._one_call(kind):
                    per = [n + 1 for n in per]
                assert called == [f"_{nm}_{CALLS[kind]}"] * (2 * sum(per)), (nm, kind, called)
            else:
                assert not called, (nm, kind, called)
        # The helper's parameters and each call's arguments agree in number.
        for name, fn in fns.items():
            for call in (c for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)):
                if call.func.id in fns and call.func.id.endswith("_inner"):
                    assert len(call.args) == len(fns[call.func.id].args.args), (name, call.func.id)


@pytest.mark.parametrize("stem", EXAMPLES)
def test_kernel_defs_come_from_their_signatures(stem: str) -> None:
    tree, writers = _module(stem)
    fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for w in writers:
        for k in w.kernels()[1]:
            fn = fns[k.name]
            assert tuple(a.arg for a in fn.args.args) == k.signature.names
            annotated = {a.arg for a in fn.args.args if a.annotation is not None}
            assert annotated == set(k.signature.constexprs)


def _writer(text: str) -> KernelWriter:
    (att,) = compile_to_ir(text, "t.attn").attentions
    w = KernelWriter(att)
    w.kernels()
    return w


CAUSAL = """
attention causal(q: [B, H, M, D], k: [B, G, N, D], v: [B, G, N, D]) {
    score = dot(q, k) * D ** -0.5
    mask  = j <= i
}
"""
DOCUMENT = """
attention doc(q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D], ids: [B, N] int32) {
    score = dot(q, k) * D ** -0.5
    mask  = ids[b, i] == ids[b, j] and j <= i
}
"""


def test_a_kernel_without_summaries_does_not_carry_them() -> None:
    plain, doc = _writer(CAUSAL), _writer(DOCUMENT)
    for k in plain.kernels()[1]:
        assert not k.signature.has(Group.SUMMARIES), k.name
        assert not any(
            n.startswith("_S") and n[2:5] in ("QMI", "QMA", "KMI", "KMA") for n in k.signature.names
        )
    for k in doc.kernels()[1]:
        if k.name.endswith("_fwd_combine_kernel"):
            continue
        assert k.signature.group(Group.SUMMARIES).names == ("_SQMIN0", "_SQMAX0", "_SKMIN0", "_SKMAX0")


def test_the_combine_carries_no_summaries_layout_or_probe() -> None:
    """The combine merges partials row by row: it reads no key tiles, no layout and counts no visits, so
    neither those groups nor their gates are parameters of it."""
    sig = _writer(DOCUMENT).signature("fwd_combine")
    assert not any(sig.has(g) for g in (Group.SUMMARIES, Group.LAYOUT, Group.PROBE))
    assert "_LAYOUT" not in sig.names and "_COUNT_VISITS" not in sig.names
    with pytest.raises(BindError, match="no parameter group layout"):
        sig.bind(layout=None)


@pytest.mark.parametrize("stem", EXAMPLES)
def test_the_kernels_file_abi_rebuilds_the_writers_signatures(stem: str) -> None:
    """The launcher's signatures are the emitter's: rebuilt from the `_<name>_ABI` literal the kernels file
    carries, each equals the one the kernel's `def` was rendered from."""
    tree, writers = _module(stem)
    data = {
        t.id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name) and t.id.endswith("_ABI")
    }
    for w in writers:
        rebuilt = BlockABI.from_data(data[f"_{w.att.name}_ABI"]).signatures()
        assert {kind: k.signature for kind, k in zip(KERNEL_KINDS, w.kernels()[1], strict=True)} == rebuilt


class _Recorder:
    """Stands in for a Triton kernel: `kernel[grid](**kwargs)` records the arguments."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda **kw: self.calls.append(kw)


def test_the_launcher_binds_every_argument_by_name() -> None:
    """Each launch passes keyword arguments only, exactly the kernel's parameters (plus warps and stages):
    the layout and probe groups as None with their gates False when the call uses neither, and for the
    combine no such parameters at all."""
    import torch

    from attnc.runtime import triton as rt

    w = _writer(DOCUMENT)
    abi = w.abi().to_data()
    fwd, combine = _Recorder(), _Recorder()
    B, H, M, N, D = 1, 2, 16, 32, 16
    q, k, v = (torch.zeros(B, H, n, D) for n in (M, N, N))
    ids = torch.zeros(B, N, dtype=torch.int32)
    spec = rt._TritonSpec(
        fwd, None, None, "softmax", (*rt._aux_args(ids), B, H, M, N, D), (0.25,) * len(w.uniforms), abi,
        summaries=((lambda b, h, hk, i: i, lambda b, hk, j: j),), combine=combine,
    )  # fmt: skip
    o = torch.zeros(B, H, M, D)
    cfg = rt._KernelConfig(16, 16, 4, 1)
    io = {"_Q": q, "_K": k, "_V": v, "_O": o, "_ORAW": o, "_STAT": torch.zeros(B, H, M)}
    rt._run(spec, "fwd", (1, B * H), cfg, io, q, k, v, o, probe=(B * H, 1))
    (got,) = fwd.calls
    sig = w.signature("fwd")
    assert list(got) == [*sig.names, "num_warps", "num_stages"]
    assert got["_a_ids"] is ids and got["_s_ids_1"] == 1 and got["_ku0"] == 0.25 and got["_Q"] is q
    assert got["_SQMIN0"].shape == (B * H, 1)  # the summaries pre-pass: one tile of 16 rows
    assert all(got[n] is None for n in (*sig.group(Group.LAYOUT).names, *sig.group(Group.PROBE).names))
    assert got["_LAYOUT"] is False and got["_COUNT_VISITS"] is False and got["_BLOCK_M"] == 16
    with rt.visit_probe() as probe:
        rt._run(spec, "fwd", (1, B * H), cfg, io, q, k, v, o, probe=(B * H, 1))
    assert fwd.calls[1]["_VISITS"] is probe["fwd"] and fwd.calls[1]["_COUNT_VISITS"] is True
    io = {"_OPART": o, "_LPART": o, "_NSPLIT": 2, "_O": o, "_ORAW": o, "_STAT": o}
    rt._run(spec, "fwd_combine", (1, B * H), cfg, io, q, k, v, o)
    (got,) = combine.calls
    assert list(got) == [*w.signature("fwd_combine").names, "num_warps", "num_stages"]


def test_unused_layout_and_probe_groups_are_gated_and_bind_to_none() -> None:
    """The layout and the visit probe are read only under their constexprs; a launch (or an AOT compile)
    without them binds None to every parameter of the group (Triton specialises None as a constexpr, so the
    compiled kernel does not carry them) and False to the gate."""
    w = _writer(CAUSAL)
    sig = next(k.signature for k in w.kernels()[1] if k.name.endswith("_fwd_kernel"))
    assert sig.group(Group.LAYOUT).gate == "_LAYOUT"
    assert sig.group(Group.PROBE).gate == "_COUNT_VISITS"
    io = dict.fromkeys(sig.group(Group.IO).names, object())
    bound = sig.bind(
        io=io,
        spec=[1] * len(sig.group(Group.SPEC).params),
        uniforms=[1.0] * len(sig.group(Group.UNIFORMS).params),
        strides=range(16),
        extents=range(6),
        constexprs={
            "_BLOCK_M": 64,
            "_BLOCK_N": 64,
            "_BLOCK_D": 64,
            "_BLOCK_E": 64,
            "_DOT_PRECISION": "tf32",
            "_TMA": False,
            "_WS": False,
        },
    )
    assert list(bound) == list(sig.names)
    assert all(bound[n] is None for n in (*sig.group(Group.LAYOUT).names, *sig.group(Group.PROBE).names))
    assert bound["_LAYOUT"] is False and bound["_COUNT_VISITS"] is False
    types = sig.triton_types("fp16", absent=(Group.LAYOUT, Group.PROBE))
    assert "_LKV_IDX" not in types and "_VISITS" not in types
    assert types["_Q"] == "*fp16" and types["_STAT"] == "*fp32" and types["_M"] == "i32"
    bound_spec = [1] * len(sig.group(Group.SPEC).params)
    bound_uniforms = [1.0] * len(sig.group(Group.UNIFORMS).params)
    with pytest.raises(BindError, match="strides"):
        sig.bind(
            io=io, spec=bound_spec, uniforms=bound_uniforms, strides=range(3), extents=range(6), constexprs={}
        )


def test_signature_kinds() -> None:
    w = _writer(DOCUMENT)
    sig = next(k.signature for k in w.kernels()[1] if k.name.endswith("_fwd_kernel"))
    spec = {p.name: p for p in sig.group(Group.SPEC).params}
    assert spec["_a_ids"].kind is Kind.POINTER and spec["_a_ids"].dtype == "i32"
    assert spec["_s_ids_0"].kind is Kind.INT32
    assert all(p.kind is Kind.CONSTEXPR for p in sig.group(Group.CONSTEXPRS).params)


@pytest.mark.parametrize(
    ("path", "sigs"),
    [("linear_kernels.py", core_abi.LINEAR_CORE), ("delta_kernels.py", core_abi.DELTA_KERNELS)],
)
def test_runtime_kernels_defs_match_their_signatures(path: str, sigs: tuple) -> None:
    """The runtime's hand-written kernels state their parameters in their `def`s once more: each must be its
    `core_abi` signature exactly (names, order, constexprs), since launches bind by those names and the AOT
    compile types from them."""
    src = (Path(core_abi.__file__).parent / path).read_text()
    fns = {
        n.name: n
        for n in ast.parse(src).body
        if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")
    }
    assert set(fns) == {s.name for s in sigs}
    for sig in sigs:
        args = fns[sig.name].args.args
        assert tuple(a.arg for a in args) == sig.names, sig.name
        assert {a.arg for a in args if a.annotation is not None} == set(sig.constexprs), sig.name


# ---- lean interior tiles ------------------------------------------------------------------------------------

# What a bounds or mask comparison reads: the matrix's extents, the row ends the helper's prelude derives, and
# the tile's row and column positions.
_BOUNDS = {"_M", "_N", "M", "N", "_m_end", "_n_end", "_pos_i", "_pos_j", "i", "j", "offs_m", "offs_n"}


def _constexpr_test(test: ast.expr, env: dict[str, int]) -> bool | None:
    """The value of an `if` test on the constexprs in `env` (`EDGE`, `EDGE == 1`, `_TMA`), else None."""
    if isinstance(test, ast.Name) and test.id in env:
        return bool(env[test.id])
    if (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id in env
        and len(test.ops) == 1
        and isinstance(test.comparators[0], ast.Constant)
    ):
        a, b = env[test.left.id], test.comparators[0].value
        return {ast.Eq: a == b, ast.NotEq: a != b}[type(test.ops[0])]
    return None


def _specialise(body: list[ast.stmt], edge: Edge, **env: int) -> list[ast.stmt]:
    """The statements a call with the constexpr EDGE = `edge` compiles (and the constexprs in `env`): each
    `if` on them keeps one branch."""
    env = {"EDGE": int(edge), **env}
    out: list[ast.stmt] = []
    for st in body:
        taken = _constexpr_test(st.test, env) if isinstance(st, ast.If) else None
        if taken is not None:
            assert isinstance(st, ast.If)
            out += _specialise(st.body if taken else st.orelse, edge, **env)
            continue
        st = ast.fix_missing_locations(ast.parse(ast.unparse(st)).body[0])  # a copy
        for field in ("body", "orelse"):
            if isinstance(getattr(st, field, None), list):
                setattr(st, field, _specialise(getattr(st, field), edge, **env))
        out.append(st)
    return out


def _aux_guards(tree: ast.AST) -> set[int]:
    """The nodes inside the mask of an auxiliary tensor's load (`tl.load(_a_g + ..., mask=...)`): the index
    guards of a spec tensor's read, which belong to the spec's expression, not to the tile's bounds."""
    out: set[int] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "tl.load" and n.args:
            if any(isinstance(x, ast.Name) and x.id.startswith("_a_") for x in ast.walk(n.args[0])):
                for kw in n.keywords:
                    if kw.arg == "mask":
                        out |= {id(x) for x in ast.walk(kw.value)}
    return out


def _bounds_compares(body: list[ast.stmt]) -> list[str]:
    tree = ast.Module(body, [])
    guards = _aux_guards(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and id(node) not in guards:
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if names & _BOUNDS:
                out.append(ast.unparse(node))
    return out


LEAN = [s for s in EXAMPLES if s not in ("document", "key_padding")]


@pytest.mark.parametrize("stem", LEAN)
def test_interior_tiles_carry_no_bounds_or_mask_comparison(stem: str) -> None:
    """The key loops of the forward and dQ run their interior tiles (EDGE = LEAN) with no comparison against
    the matrix's extents or the tile's positions: no load row mask, no in-range test, no mask. The boundary
    tiles (EDGE = BOUNDARY) keep them, and so does a whole interval's call under TMA: in the dQ (MASKED) on
    every tile, in the forward (PER_TILE) only under its runtime test of the tile against the lean interval.
    Every kernel calls the helper with EDGE = LEAN for its interior."""
    tree, writers = _module(stem)
    fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for w in writers:
        nm = w.att.name
        for h in ("fwd_inner", "dq_inner"):
            helper = fns[f"_{nm}_{h}"]
            params = [a.arg for a in helper.args.args]
            assert "EDGE" in params, (nm, h)
            (loop,) = _tile_loops(helper)
            lean = _bounds_compares(_specialise(loop.body, Edge.LEAN))
            assert not lean, (nm, h, lean)
            assert _bounds_compares(_specialise(loop.body, Edge.BOUNDARY)), (nm, h)
            assert _bounds_compares(_specialise(loop.body, Edge.MASKED)), (nm, h)
            one = ONE_CALL_LOOPS[h.split("_")[0]]
            if one is Edge.PER_TILE:
                body = _specialise(loop.body, Edge.PER_TILE, _TMA=1, _PAGED=0)
                tests = [st for st in body if isinstance(st, ast.If)]
                (branch,) = [st for st in tests if "lean_lo" in ast.unparse(st.test)]
                outside = [st for st in body if st is not branch]
                assert not _bounds_compares(outside), (nm, h, _bounds_compares(outside))
                assert not _bounds_compares(branch.orelse), (nm, h)
                assert _bounds_compares(branch.body), (nm, h)
            at = params.index("EDGE")
            for kind, callee in CALLS.items():
                if callee != h:
                    continue
                calls = [
                    n
                    for n in ast.walk(fns[f"_{nm}_{kind}_kernel"])
                    if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == helper.name
                ]
                edges = {ast.literal_eval(c.args[at]) for c in calls}
                want = {Edge.LEAN, Edge.BOUNDARY} | ({one} if w._one_call(kind) else set())
                assert edges == want, (nm, kind, edges)


def test_specs_without_a_lean_interval_keep_one_call_per_interval() -> None:
    """A mask the analysis cannot prove visible on whole tiles (document ids) gets no EDGE split: its helpers
    and kernels are those of one loop per interval."""
    tree, _ = _module("document")
    fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for h in HELPERS:
        assert "EDGE" not in [a.arg for a in fns[f"_document_{h}"].args.args]


def _tma_conditions(fn: ast.FunctionDef) -> list[str]:
    """The conditions of the `if`s that choose a descriptor load (`if _TMA ...: x = desc.load(...)`)."""
    return [
        ast.unparse(n.test)
        for n in ast.walk(fn)
        if isinstance(n, ast.If) and "_TMA" in ast.unparse(n.test) and ".load(" in ast.unparse(n.body[0])
    ]


@pytest.mark.parametrize(
    ("stem", "by_pointer"), [("linear_bidir", True), ("linear_elu", True), ("lightning", False)]
)
def test_the_masked_dq_of_a_key_feature_map_loads_by_pointer(stem: str, by_pointer: bool) -> None:
    """The one-call dQ (EDGE = MASKED) of a key feature map with products in the inputs' dtype takes its k and
    v tiles by pointer under TMA too (`KernelWriter` dQ loop, measured on sm_90); with float32 products
    (lightning) and in the other helpers they keep the descriptor loads."""
    tree, _ = _module(stem)
    fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    masked = f"_TMA & (EDGE != {int(Edge.MASKED)})"
    dq = _tma_conditions(fns[f"_{stem}_dq_inner"])
    assert len(dq) == 2 and all(c == (masked if by_pointer else "_TMA") for c in dq), dq
    for h in ("fwd_inner", "dkdv_inner"):
        assert masked not in _tma_conditions(fns[f"_{stem}_{h}"]), h
