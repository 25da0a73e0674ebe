#!/usr/bin/env bash
# The GPU check, run on a CUDA machine from the repository root: environment, the CUDA test suite, a memcheck of
# every Triton kernel, the kernel benchmarks and the monitor overhead. Results land under $OUT
# (default ./gpu-results). Optional wheels for peers (e.g. liger-kernel) are taken from ./.whl.
# Usage: OUT=results bash benchmarks/gpu_suite.sh [test-timeout-s] [bench-ops]
# Environment: WORKERS (pytest-xdist workers, default 8), RNN_ARGS (extra arguments of bench_ln_rnn_gpu.py),
# MODES / PROVIDERS / BENCH_TIMEOUT (per op) for `normscope bench`, MEMCHECK_TIMEOUT, MONITOR_BENCH_TIMEOUT,
# RNN_BENCH_TIMEOUT.
set -uo pipefail
OUT=${OUT:-gpu-results}
TEST_TIMEOUT=${1:-150}
OPS=${2:-layer_norm,rms_norm,add_layer_norm,add_rms_norm,masked_layer_norm,masked_rms_norm}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NORMSCOPE_CACHE_DIR=/tmp/normscope-cache
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; python3 -m normscope env; } \
  >"$OUT/env.txt" 2>&1
# The CUDA suite and every test file that runs the Triton kernels on the GPU when one is present, in one pytest run
# (in parallel workers where pytest-xdist is installed: most of the time is Triton's compilation).
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-8}")
timeout "$TEST_TIMEOUT" python3 -m pytest tests/cuda tests/test_triton_backend.py tests/test_triton_api.py \
  tests/test_monitor_triton.py tests/test_recurrent_triton.py -q -rfE -p no:cacheprovider $XDIST \
  >"$OUT/tests.log" 2>&1
echo "tests exit $?" >>"$OUT/tests.log"
tail -3 "$OUT/tests.log"
# Every Triton kernel under compute-sanitizer's memcheck, the caching allocator off so that a read past a tensor's
# end is seen (scripts/gpu-memcheck.py).
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SANITIZER" ]; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${MEMCHECK_TIMEOUT:-240}" "$SANITIZER" --tool memcheck --error-exitcode 9 \
    --print-limit 5 python3 scripts/gpu-memcheck.py >"$OUT/memcheck.log" 2>&1
  echo "memcheck exit $?" >>"$OUT/memcheck.log"
  tail -2 "$OUT/memcheck.log"
fi
# LN-LSTM / LN-GRU: the speed of the fused Triton step kernels against the per-step module path and
# cuDNN's nn.LSTM / nn.GRU (no LN).
timeout "${RNN_BENCH_TIMEOUT:-300}" python3 benchmarks/bench_ln_rnn_gpu.py ${RNN_ARGS:-} --json "$OUT/ln-rnn-gpu.json" \
  --markdown "$OUT/ln-rnn-gpu.md" 2>>"$OUT/bench.err" >"$OUT/ln-rnn-gpu.log"
echo "ln rnn gpu bench exit $?"
# One bench run per op so that a run cut short still returns the ops it finished.
for op in ${OPS//,/ }; do
  timeout "${BENCH_TIMEOUT:-120}" python3 -m normscope bench --device cuda --op "$op" --dtype bf16 --modes "${MODES:-forward,backward,full}" \
    --providers "${PROVIDERS:-normscope,torch,torch_compile,liger,copy}" \
    ${CSV:+--csv "$OUT/bench-$op.csv"} --markdown "$OUT/bench-$op.md" 2>>"$OUT/bench.err" >/dev/null
  echo "bench $op exit $?"
done
tail -3 "$OUT/bench.err"
# Monitor step-time overhead on a small bf16 Llama: Triton kernels vs torch operations (needs transformers).
timeout "${MONITOR_BENCH_TIMEOUT:-300}" python3 benchmarks/monitor_overhead_gpu.py --json "$OUT/monitor-overhead.json" \
  --markdown "$OUT/monitor-overhead.md" 2>>"$OUT/bench.err" >/dev/null
echo "monitor overhead exit $?"
