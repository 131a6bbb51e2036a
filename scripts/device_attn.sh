#!/usr/bin/env bash
# expected: ~400 s (565 s at most, plus ~15 s of start-up). Pallas paged attention on the
# GPU (issue 27 section 1):
# 1. the gpu-marked kernel tests compiled (not interpreted), the fitted tilings of head_dim
#    256/576 included (the shared-memory fit);
# 2. bench_attention --gpu: decode attention of the 8B shape at 4K/32K/128K over bf16 and
#    int8 pages against HBM bandwidth measured in the same run (% of HBM printed per run),
#    the 128K int8 cache held beside 16 GB of bf16 weights, the kernel against the reference
#    past 4 GiB of cache, batch 8, a prefill chunk, the reference -> $OUT/attn.json;
# 3. the knob sweep (bench_attention.py SWEEP_BF16 / SWEEP_INT8: combine in XLA vs the
#    combine kernel, split counts, keys per step, stages, warps) at every context, ending
#    with the best variant per context -> $OUT/attn_sweep.json;
# 4. decode with the layers unrolled (no scan) -> $OUT/attn_unroll.json, and with XLA's
#    default command buffers (KTJAX_COMMAND_BUFFERS=0) -> $OUT/attn_nographs.json;
# 5. the engine generating with the pallas backend against the reference;
# 6. Mosaic GPU (scripts/mosaic_gpu_probe.py): a paged read by TMA page copies driven by the
#    block table, and a wgmma flash-decoding kernel over the same pages, each checked
#    against jnp, then timed against HBM -> $OUT/mosaic_gpu.json.
# Each stage has its own time limit and writes its JSON after every run; none stops the
# next. Knobs (env): CONTEXTS (default 4096,32768,131072), SKIP (stage numbers to skip, e.g.
# "3 4"). SMOKE=1: the benchmark's tiny sizes (CPU check, interpreted). Log: $OUT/attn.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KTJAX_NO_PROGRESS=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD:${PYTHONPATH:-}
CONTEXTS=${CONTEXTS:-4096,32768,131072}
SKIP=" ${SKIP:-} "
stage() {  # stage N NAME SECONDS CMD...: run with a hard limit, log its time and status
  local n=$1 name=$2 limit=$3 t0=$(date +%s); shift 3
  if [[ "$SKIP" == *" $n "* ]]; then echo "== $n $name: skipped"; return; fi
  echo "== $n $name (limit $limit s)"
  timeout -k 5 "$limit" "$@"
  local rc=$?
  echo "== $n $name: $(( $(date +%s) - t0 )) s, exit $rc$( ((rc == 124)) && echo ' (timed out)')"
}
BENCH=(python3 scripts/bench_attention.py --gpu --contexts "$CONTEXTS")
TESTS=(python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_attention.py)
if [[ "${SMOKE:-0}" == 1 ]]; then   # no GPU here: the interpreted kernel tests stand in
  TESTS+=(-k "interpreted and (decode or sinks)")
else
  TESTS+=(-m gpu)
fi
{
  date -u; nvidia-smi -L 2>/dev/null
  timeout 20 python3 -c "import jax, sys; print(sys.version.split()[0], jax.__version__, jax.devices())"
  stage 1 "gpu kernel tests" 110 "${TESTS[@]}"
  stage 2 "bench_attention --gpu" 90 "${BENCH[@]}" --json "$OUT/attn.json" \
    --parts decode,far,batch,prefill,reference
  stage 3 "knob sweep" 160 "${BENCH[@]}" --json "$OUT/attn_sweep.json" --parts sweep
  stage 4 "decode, layers unrolled" 40 "${BENCH[@]}" --json "$OUT/attn_unroll.json" \
    --parts decode --unroll
  stage 4 "decode, XLA's default command buffers" 40 env KTJAX_COMMAND_BUFFERS=0 \
    "${BENCH[@]}" --json "$OUT/attn_nographs.json" --parts decode
  stage 5 "engine with pallas" 45 python3 -m pytest -q -p no:cacheprovider \
    -k engine_generates tests/test_gpu_attention.py
  stage 6 "Mosaic GPU probe" 80 python3 scripts/mosaic_gpu_probe.py \
    --contexts "$CONTEXTS" --json "$OUT/mosaic_gpu.json"
} 2>&1 | tee "$OUT/attn.log"
