#!/usr/bin/env bash
# One lease of a GPU machine (the project's device tool), all GPU work in one call:
#   1. the wheels the image lacks (../shared/device/wheels.sh put them in ./.whl; name `.whl` in carry);
#   2. `pytest -m gpu` (tests/test_gpu.py, tests/test_linear.py), one line per test in gpu_tests.log;
#   3. benchmarks/bench.py (attnc vs FlexAttention and SDPA) and benchmarks/bench_linear.py (vs fla).
# Every step runs under its own time limit, so the whole stays inside one 10-minute command, and writes straight
# into $OUT (the JSON files are rewritten after every measurement: a step cut off still returns valid JSON).
# At most 8 files come back: env.txt, session.log, gpu_tests.log and the two benchmarks' JSON and PNG.
# Usage (device tool): carry [".whl"], command `bash benchmarks/device_session.sh`, timeout_s 590.
# Limits in seconds may be changed through the environment: TESTS_S, BENCH_S, LINEAR_S.
set -uo pipefail
OUT="${OUT:-/tmp/attnc-device-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ATTNC_CACHE_DIR=/tmp/attnc-cache
TESTS_S="${TESTS_S:-230}" BENCH_S="${BENCH_S:-200}" LINEAR_S="${LINEAR_S:-120}"
exec > >(tee -a "$OUT/session.log") 2>&1
t0=$(date +%s)
stamp() { echo "== $(date -u +%H:%M:%S) (+$(($(date +%s) - t0)) s) $*"; }

stamp install
# NO_WHEELS=1: a local dry run, where the Python in PATH already has everything.
[ -n "${NO_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name(),
torch.cuda.get_device_capability())'
    python3 -c 'import attnc, fla; print("attnc", attnc.__version__, "fla", getattr(fla, "__version__", "?"))'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stamp "pytest -m gpu (limit ${TESTS_S} s)"
timeout -k 10 "$TESTS_S" python3 -m pytest -m gpu -v -n 14 -p no:cacheprovider -o console_output_style=classic \
    tests/test_gpu.py tests/test_linear.py > "$OUT/gpu_tests.log" 2>&1
echo "pytest rc=$?"
grep -cE "PASSED" "$OUT/gpu_tests.log" | sed 's/^/passed: /'
grep -E "FAILED|ERROR" "$OUT/gpu_tests.log" | grep -v "^FAILED\|^ERROR" | head -40
tail -5 "$OUT/gpu_tests.log"

stamp "bench.py (limit ${BENCH_S} s)"
timeout -k 10 "$BENCH_S" python3 benchmarks/bench.py --out "$OUT" --dims 128 --seqs 4096,16384 \
    --variants causal,sliding_window,document,alibi --budget-s $((BENCH_S - 70)) --learned alibi_slopes
echo "bench rc=$?"

stamp "bench_linear.py (limit ${LINEAR_S} s)"
timeout -k 10 "$LINEAR_S" python3 benchmarks/bench_linear.py --out "$OUT" --quick --seqs 4096,32768 \
    --variants retention,gated_deltanet,linear_elu,causal --budget-s $((LINEAR_S - 40))
echo "bench_linear rc=$?"
for j in "$OUT"/*.json; do
    [ -f "${j%.json}.png" ] || python3 "benchmarks/$(case $j in *linear-*) echo bench_linear;; *) echo bench;; esac).py" \
        --plot-only "$j" || true
done
rm -f "$OUT"/*.tmp* 2>/dev/null
stamp done
ls -la "$OUT"
