"""The runtime side: a generated module picks up a tuned config (once per key, then a dictionary hit) from
the exported table without tuning and without optuna, `attnc codegen --tuned-from` bakes configs in, the
runtime's key and settings agree with autotune's, and the accuracy gate runs the real kernels.

Real kernels run under the Triton interpreter: tiny shapes (B = H = 1, N = 64, D = 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from attnc.autotune.key import DeviceInfo, TuningKey, current_device, kernel_hash
from attnc.autotune.measure import FailReason, KernelObjective, SyntheticObjective, TrialFailure, make_inputs
from attnc.autotune.search import SamplerKind, tune
from attnc.autotune.space import Candidate, DType, KernelKind, Problem, space_for
from attnc.autotune.store import export_table, open_storage
from attnc.dsl.lower import compile_to_ir

from attnc.runtime import module_state, reset_tuned, set_autotune_hook, tuning, visit_probe
from attnc.runtime import triton as rt_triton
from attnc.settings import settings

from .conftest import SPECS

pytest.importorskip("triton")

SPEC = SPECS / "causal.attn"
PROBLEM = Problem(16, 16, DType.FP32, 64, 64)
# Not the default (64, 64, 4, 2): a table hit is visible in the launch.
TUNED = {"block_m": 32, "block_n": 16, "num_warps": 2, "num_stages": 1, "warp_specialize": 0}


def _kernels_file(mod) -> Path:
    return Path(mod.__file__).with_name(Path(mod.__file__).stem + "_triton.py")


def _inputs(dtype=torch.float32):
    att = compile_to_ir(SPEC.read_text(), str(SPEC)).attentions[0]
    return att, make_inputs(
        att, batch=1, heads=1, q_len=64, kv_len=64, head_dim=16, dtype=dtype, device="cpu", seed=1
    )


def _cpu_key(mod, kind=KernelKind.FWD) -> TuningKey:
    return TuningKey.make("causal", kind, kernel_hash(_kernels_file(mod)), current_device(False), PROBLEM)


@pytest.fixture
def tuned_table(compiled, tmp_path):
    """Tune the causal forward for this CPU key with a synthetic objective whose optimum is TUNED, and
    export the table: what `attnc tune` leaves behind."""
    mod = compiled("causal")
    store = tmp_path / "journal.log"
    optimum = Candidate.of(KernelKind.FWD, TUNED)
    obj = SyntheticObjective(lambda c: 1.0 if c == optimum else 2.0 + c["block_m"] / 64)
    space = space_for(KernelKind.FWD, PROBLEM)
    assert optimum in space.candidates()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tune(_cpu_key(mod), space, obj, storage=str(store), n_trials=len(space.candidates()), seed=0)
    assert res.best == optimum
    return export_table(open_storage(str(store)), tmp_path / "best.json"), store


def _probe_run(mod, inputs):
    with visit_probe() as probe:
        out = mod.causal(**inputs, backend="triton")
    return probe["fwd_config"], out


def test_runtime_key_is_the_tuning_key(compiled):
    mod = compiled("causal")
    kern = module_state(mod).kernels(interpret=True)
    name, kh = tuning._kernel_identity(kern._causal_fwd_kernel)
    assert (name, kh) == ("causal", kernel_hash(_kernels_file(mod)))
    version = module_state(mod).attnc_version
    assert version == mod.ATTNC_VERSION
    text = tuning._tune_key_text(
        version, name, "fwd", kh, tuning._device_identity(torch.device("cpu")), torch.float32, 16, 16, 50, 64
    )
    assert text == _cpu_key(mod).text()
    dev = DeviceInfo("NVIDIA H100 80GB HBM3", 90, "3.6.0", "2.11.0")
    p = Problem(128, 64, DType.BF16, 3000, 8192)
    runtime_dev = (dev.name, dev.cc, dev.triton, dev.torch)
    assert (
        tuning._tune_key_text(version, "causal", "dq", kh, runtime_dev, torch.bfloat16, 128, 64, 3000, 8192)
        == TuningKey.make("causal", KernelKind.DQ, kh, dev, p).text()
    )


@pytest.mark.parametrize("table_env", [None, "elsewhere/best.json"])
def test_runtime_settings_mirror_codegen_settings(monkeypatch, tmp_path, table_env):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    if table_env:
        monkeypatch.setenv("ATTNC_TUNED_CONFIGS", str(tmp_path / table_env))
    else:
        monkeypatch.delenv("ATTNC_TUNED_CONFIGS", raising=False)
    for flag in ("", "0", "1"):
        monkeypatch.setenv("ATTNC_AUTOTUNE", flag)
        s = settings()
        assert tuning._tune_settings() == (str(s.tuned_table), s.autotune)


def test_module_picks_up_the_tuned_config_once(compiled, tuned_table, monkeypatch):
    table, _ = tuned_table
    mod = compiled("causal")
    _, inputs = _inputs()
    monkeypatch.setenv("ATTNC_TUNED_CONFIGS", str(table))
    reset_tuned()
    try:
        cfg, out = _probe_run(mod, inputs)
        assert cfg._asdict() | TUNED == cfg._asdict(), cfg
        ref = mod.causal_reference(**inputs)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        # Once per key: the table is not read again (a dictionary hit), even if it vanished.
        monkeypatch.setattr(tuning, "_tuned_table", lambda state: pytest.fail("table read twice"))
        cfg2, _ = _probe_run(mod, inputs)
        assert cfg2 == cfg
        # Another sequence bucket is another key: untuned, so the heuristic default.
        monkeypatch.undo()
        monkeypatch.setenv("ATTNC_TUNED_CONFIGS", str(table))
        _, small = _inputs()
        small = {**small, "q": small["q"][:, :, :32], "k": small["k"][:, :, :32], "v": small["v"][:, :, :32]}
        cfg3, _ = _probe_run(mod, small)
        assert cfg3 == rt_triton._default_config(16, 16, "fwd", False)
    finally:
        reset_tuned()


_RUN_MODULE = textwrap.dedent(
    """
    import importlib.util, json, sys, torch
    path, = sys.argv[1:]
    if path.endswith(".attn"):
        import attnc
        mod = attnc.compile(path)
    else:
        spec = importlib.util.spec_from_file_location("baked", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 64, 16, generator=g) for _ in range(3))
    from attnc.runtime import visit_probe
    with visit_probe() as probe:
        o = mod.causal(q, k, v, backend="triton")
    err = float((o - mod.causal_reference(q, k, v)).abs().max())
    print(json.dumps({"config": probe["fwd_config"]._asdict(), "err": err,
                      "optuna": "optuna" in sys.modules, "attnc": "attnc.autotune" in sys.modules}))
    """
)


def _run(path: Path | str, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_MODULE, str(path)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tuned_config_reaches_a_new_process_without_tuning(tuned_table):
    table, _ = tuned_table
    got = _run(SPEC, {"ATTNC_TUNED_CONFIGS": str(table)})
    assert {k: got["config"][k] for k in TUNED} == TUNED
    assert got["err"] < 1e-4
    assert not got["optuna"] and not got["attnc"], "the runtime must not import optuna or the autotuner"


@pytest.mark.parametrize("source", ["table", "journal"])
def test_codegen_tuned_from_bakes_the_config_in(tuned_table, tmp_path, source):
    from attnc.cli import main

    table, journal = tuned_table
    out = tmp_path / "out"
    tuned_from = table if source == "table" else journal
    assert main(["codegen", str(SPEC), "-o", str(out), "--tuned-from", str(tuned_from)]) == 0
    text = (out / "causal.py").read_text()
    assert "_BAKED_CONFIGS = {" in text and "kernel=fwd" in text
    # No database and no table on the machine that runs it: the baked config still applies.
    empty = tmp_path / "empty-cache"
    got = _run(
        out / "causal.py",
        {"ATTNC_CACHE_DIR": str(empty), "ATTNC_TUNED_CONFIGS": str(tmp_path / "missing.json")},
    )
    assert {k: got["config"][k] for k in TUNED} == TUNED
    assert got["err"] < 1e-4
    assert not empty.exists() or not any(empty.rglob("*.json"))


def test_codegen_with_an_empty_table_writes_the_plain_module(tmp_path):
    from attnc.cli import main

    empty = tmp_path / "none.json"
    empty.write_text(json.dumps({"format": "attnc-tuned-configs", "version": 1, "configs": {}}))
    assert main(["codegen", str(SPEC), "-o", str(tmp_path / "a"), "--tuned-from", str(empty)]) == 0
    assert main(["codegen", str(SPEC), "-o", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "causal.py").read_text() == (tmp_path / "b" / "causal.py").read_text()
    assert (
        main(["codegen", str(SPEC), "-o", str(tmp_path / "c"), "--tuned-from", str(tmp_path / "x.json")]) == 2
    )


def test_autotune_hook_runs_only_when_asked(compiled, monkeypatch, tmp_path):
    """Never tunes implicitly: the hook attnc installs is called on an untuned key only with
    ATTNC_AUTOTUNE=1, once per key."""
    mod = compiled("causal")
    _, inputs = _inputs()
    calls = []

    def hook(key, kernel, q, k, v, heavy):
        calls.append((key, kernel))
        assert heavy == 0
        return TUNED if kernel == "fwd" else None

    monkeypatch.setenv("ATTNC_TUNED_CONFIGS", str(tmp_path / "none.json"))
    set_autotune_hook(mod, hook)
    try:
        monkeypatch.delenv("ATTNC_AUTOTUNE", raising=False)
        reset_tuned()
        cfg, _ = _probe_run(mod, inputs)
        assert not calls and cfg == rt_triton._default_config(16, 16, "fwd", False)
        monkeypatch.setenv("ATTNC_AUTOTUNE", "1")
        reset_tuned()
        cfg, _ = _probe_run(mod, inputs)
        _probe_run(mod, inputs)
        assert [k for _, k in calls] == ["fwd", "dkdv", "dq"]
        assert calls[0][0] == _cpu_key(mod).text()
        assert {f: getattr(cfg, f) for f in TUNED} == TUNED
    finally:
        set_autotune_hook(mod, None)
        reset_tuned()


def test_unreadable_table_warns_and_runs_the_default(compiled, monkeypatch, tmp_path):
    mod = compiled("causal")
    bad = tmp_path / "best.json"
    bad.write_text("{ not json")
    monkeypatch.setenv("ATTNC_TUNED_CONFIGS", str(bad))
    _, inputs = _inputs()
    reset_tuned()
    try:
        with pytest.warns(RuntimeWarning, match="ignoring tuned-config table"):
            cfg, _ = _probe_run(mod, inputs)
        assert cfg == rt_triton._default_config(16, 16, "fwd", False)
    finally:
        reset_tuned()


def _miscompiled(mod, monkeypatch, wrong_block_m: int) -> None:
    """Launch with half the head dim for one tile size: a config that 'compiles' to wrong code."""
    launch = rt_triton._launch

    def bad_launch(cfg, q, D, E):
        kw = launch(cfg, q, D, E)
        if cfg.block_m == wrong_block_m:
            kw = {**kw, "_BLOCK_D": 8, "_BLOCK_E": 8}
        return kw

    monkeypatch.setattr(rt_triton, "_launch", bad_launch)


def test_accuracy_gate_rejects_a_wrong_candidate_on_real_kernels(compiled, monkeypatch):
    mod = compiled("causal")
    _, inputs = _inputs()
    _miscompiled(mod, monkeypatch, wrong_block_m=32)
    obj = KernelObjective(mod, "causal", KernelKind.FWD, inputs, DType.FP32)
    good = space_for(KernelKind.FWD, PROBLEM).default
    m = obj.measure(good)
    assert m.error is not None and m.error < 1e-5 and m.time_ms > 0 and len(m.timings_ms) >= 2
    wrong = Candidate.of(KernelKind.FWD, TUNED)
    with pytest.raises(TrialFailure) as info:
        obj.measure(wrong)
    assert info.value.reason is FailReason.ACCURACY
    assert module_state(mod).forced is None, "the probe is cleared after each measurement"


def test_backward_kernels_measure_through_the_gate(compiled):
    mod = compiled("causal")
    _, inputs = _inputs()
    for kind in (KernelKind.DKDV, KernelKind.DQ):
        space = space_for(kind, PROBLEM)
        obj = KernelObjective(mod, "causal", kind, inputs, DType.FP32)
        m = obj.measure(space.default)
        assert m.error is not None and m.error < 1e-4


def test_launch_errors_become_failed_trials(compiled, monkeypatch, tmp_path):
    """A config the kernel cannot run is a failed trial with its reason; the study goes on."""
    mod = compiled("causal")
    _, inputs = _inputs()
    launch = rt_triton._launch

    def broken(cfg, q, D, E):
        if cfg.num_warps == 2:
            raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory")
        return launch(cfg, q, D, E)

    monkeypatch.setattr(rt_triton, "_launch", broken)
    obj = KernelObjective(mod, "causal", KernelKind.FWD, inputs, DType.FP32, gate=False)
    space = space_for(KernelKind.FWD, PROBLEM)
    cands = space.candidates()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tune(
            _cpu_key(mod),
            space,
            obj,
            storage=str(tmp_path / "j.log"),
            n_trials=len(cands),
            sampler=SamplerKind.GRID,
            seed=0,
        )
    failed = res.failed
    assert failed and all(r.config["num_warps"] == 2 for r in failed)
    assert all(r.reason.startswith("launch: RuntimeError") for r in failed)
    assert res.best is not None and res.best["num_warps"] != 2


@pytest.mark.slow  # ~40 s of CI time; the tuned-config tests above cover the lookup it relies on
def test_attnc_autotune_tunes_an_untuned_key_once_per_machine(tmp_path):
    """ATTNC_AUTOTUNE=1 through attnc.compile: the first call tunes its keys (fwd, dkdv, dq) into the
    default storage and table; a second process finds them tuned and measures nothing."""
    env = {"ATTNC_CACHE_DIR": str(tmp_path / "cache"), "ATTNC_AUTOTUNE": "1"}
    env.pop("ATTNC_TUNED_CONFIGS", None)
    first = _run(SPEC, env)
    assert first["err"] < 1e-4 and first["attnc"], "the hook is attnc's: it imports the autotuner"
    table = json.loads((tmp_path / "cache" / "tune" / "best.json").read_text())["configs"]
    assert sorted(k.split("|")[1] for k in table) == ["kernel=dkdv", "kernel=dq", "kernel=fwd"]
    journal = tmp_path / "cache" / "tune" / "journal.log"
    size = journal.stat().st_size
    second = _run(SPEC, env)
    assert second["config"] == first["config"]
    assert journal.stat().st_size == size, "tuned keys are not tuned again"


@pytest.mark.parametrize(
    ("spec", "name", "want"),
    [
        ("t5_bias", "bias", ((2, 129), torch.float32)),  # [H, 2 * R + 1] with R's default 64
        ("sliding_window", "k", ((1, 2, 32, 16), torch.float64)),  # G (kv heads) defaults to H
    ],
)
def test_make_inputs_sizes_expressions_and_defaults(spec, name, want):
    path = SPECS / f"{spec}.attn"
    att = compile_to_ir(path.read_text(), str(path)).attentions[0]
    kw = make_inputs(
        att, batch=1, heads=2, q_len=32, kv_len=32, head_dim=16, dtype=torch.float64, device="cpu"
    )
    assert (tuple(kw[name].shape), kw[name].dtype) == want


def test_make_inputs_keeps_declared_int_widths_and_asks_for_free_symbols():
    for spec in SPECS.glob("*.attn"):
        for att in compile_to_ir(spec.read_text(), str(spec)).attentions:
            try:
                kw = make_inputs(
                    att, batch=1, heads=2, q_len=32, kv_len=32, head_dim=16, dtype=torch.float32, device="cpu"
                )
            except ValueError as err:
                assert "--size" in str(err), err  # a symbol only a user can give (a table length)
                continue
            for p in att.aux_tensors:
                if p.type.value in ("int32", "int64", "float16", "bfloat16", "float32", "float64"):
                    assert kw[p.name].dtype == getattr(torch, p.type.value), (spec.name, p.name)


@pytest.mark.parametrize("spec", ["causal", "lightning", "alibi"])
def test_baked_keys_use_the_written_kernels_hash(spec):
    """The hash a baked key names is the content hash of the kernels file written beside the module (the
    runtime's `kh`), whatever else goes into that file (the linear family's kernels, for one)."""
    from attnc.codegen.module import Target, render_all

    path = SPECS / f"{spec}.attn"
    source = path.read_text()
    program = compile_to_ir(source, str(path))
    _, kernels = render_all(program, source, Target.ALL)
    kh = next(ln for ln in kernels.splitlines() if ln.startswith("# content-sha256: ")).split(": ")[1][:16]
    name = program.attentions[0].name
    table = {
        f"attn={name}|kernel=fwd|kh={kh}|attnc=x|gpu=g|cc=90": {"config": TUNED},
        f"attn={name}|kernel=fwd|kh={'0' * 16}|attnc=x|gpu=g|cc=90": {"config": TUNED},  # other kernels
    }
    main, kernels2 = render_all(program, source, Target.ALL, table)
    assert kernels2 == kernels
    assert "(1 keys)" in main and f"kh={kh}" in main and "kh=0000" not in main
