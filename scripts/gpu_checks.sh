#!/usr/bin/env bash
# Every GPU check of issue 4 in one device call (see /work/.library/device):
#   run(command="bash scripts/gpu_checks.sh", timeout_s=590)
# Uses the device image's python3 (torch + triton), no install: the package is staged from the
# source folders with symlinks. Writes logs and result JSON under $OUT (or /tmp/gpu_checks) and
# prints a short summary last. Each step has its own time limit so one hang cannot eat the lease.
# Knobs (environment):
#   STEPS     which steps, comma-separated, in this order: tests,kernels,throughput,compress (default: the
#             first three; compress: `modegpt compress --device cuda`'s tests and its time on the SmolLM2-135M
#             shape and on the first COMPRESS_LAYERS (default 4) layers of the LLaMA-2-7B shape, also with --offload;
#             it writes 8 files, a device call's limit, so run it alone: STEPS=compress)
#   BATCH, MODELS, REPEATS, PROMPT, NEW, CUDA_GRAPH (on/off/both), ALIGN (auto/on/off/both: widths
#             zero-padded as modegpt_rt.load does on a GPU), MULTIPLES (M,P,V: widths chosen at multiples
#             within the budget), GLUE (triton/torch/both: fused Triton norm + SiLU·up kernels or torch
#             ops), HF (1: transformers baseline)
#             narrow the throughput run to fit a call; TAG names its files (gpu_throughput$TAG.*,
#             triton_kernels$TAG.*)
#   TILES     Triton decode tiles for the throughput run (gpu_throughput --decode-tiles), e.g.
#             default,sweep:$OUT/triton_kernels.json (the fastest of a sweep this call made) or default,64:8:2
#   SWEEP     decode shapes for bench.triton_kernels --sweep (every launch configuration timed), or 'all'
#   RANKS     the paper's layer ranks JSON where ../shared is not beside the checkout
#   T_TESTS, T_KERNELS, T_THROUGHPUT, T_COMPRESS   per-step time limits in seconds (T_COMPRESS: each of the
#             compress step's four runs, default 120)
#   APPEND=1  keep summary.txt (a second run in the same call, e.g. STEPS=throughput TAG=_mult MULTIPLES=64,8,8)
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
ROOT=$(pwd)
STAGE=$(mktemp -d)
mkdir "$STAGE/modegpt_rt"
for f in modegpt_rt/*.py; do ln -s "$ROOT/$f" "$STAGE/modegpt_rt/"; done
ln -s "$ROOT/compressor" "$STAGE/modegpt_rt/compressor"
ln -s "$ROOT/kernels" "$STAGE/modegpt_rt/kernels"
ln -s "$ROOT/bench" "$STAGE/modegpt_rt/bench"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compile the kernels for the GPU
cd "$STAGE"  # python -m puts the cwd first on sys.path: the checkout's own modegpt_rt/ must not shadow the stage
PY=${PY:-python3}
STEPS=${STEPS:-tests,kernels,throughput}
TAG=${TAG:-}
summary() { printf '%-28s %s\n' "$1" "$2" >> "$OUT/summary.txt"; }
step() { [[ ",$STEPS," == *",$1,"* ]]; }
[[ ${APPEND:-0} == 1 ]] || : > "$OUT/summary.txt"  # APPEND=1: a second run in the same call adds to it

# (the device line lives in summary.txt only: a call brings back at most 8 files)
DEVICE=$({ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tr '\n' ' ')
summary device "$DEVICE"

if step tests; then
  XDIST=""
  $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
  timeout ${T_TESTS:-200} $PY -m pytest -q -rfEs -p no:cacheprovider $XDIST "$ROOT/tests/test_triton_kernels.py" > "$OUT/pytest_triton.log" 2>&1
  summary "pytest triton (rc $?)" "$(tail -1 "$OUT/pytest_triton.log")"
fi

if step kernels; then
  KEXTRA=()
  [[ -n ${SWEEP:-} ]] && KEXTRA+=(--sweep "$SWEEP")
  timeout ${T_KERNELS:-120} $PY -m modegpt_rt.bench.triton_kernels "${KEXTRA[@]}" --json "$OUT/triton_kernels$TAG.json" > "$OUT/triton_kernels$TAG.log" 2>&1
  summary "bench triton_kernels (rc $?)" "$(tail -1 "$OUT/triton_kernels$TAG.log")"
fi

if step throughput; then
  EXTRA=()
  [[ ${HF:-1} == 1 ]] && EXTRA+=(--hf-baseline)
  [[ -n ${RANKS:-} ]] && EXTRA+=(--ranks "$(realpath -m "$ROOT/$RANKS")")
  [[ -n ${MULTIPLES:-} ]] && EXTRA+=(--multiples "$MULTIPLES")
  [[ -n ${TILES:-} ]] && EXTRA+=(--decode-tiles "$TILES")
  timeout ${T_THROUGHPUT:-240} $PY -m modegpt_rt.bench.gpu_throughput "${EXTRA[@]}" --cuda-graph ${CUDA_GRAPH:-on} --align ${ALIGN:-auto} --glue ${GLUE:-triton} \
    --batch ${BATCH:-256,1,16,64} --models ${MODELS:-dense,paper30,5,10,20,40} --repeats ${REPEATS:-2} \
    --prompt ${PROMPT:-256} --new ${NEW:-256} --json "$OUT/gpu_throughput$TAG.json" > "$OUT/gpu_throughput$TAG.log" 2>&1
  summary "bench gpu_throughput (rc $?)" "$(tail -1 "$OUT/gpu_throughput$TAG.log")"
fi

if step compress; then
  timeout ${T_COMPRESS:-120} $PY -m pytest -q -rfEs -p no:cacheprovider "$ROOT/tests/test_runtime_tiny.py" \
    -k "device_of_every or compress_on_cuda or offloaded or compress_cli_on_cuda" > "$OUT/pytest_compress.log" 2>&1
  summary "pytest compress (rc $?)" "$(tail -1 "$OUT/pytest_compress.log")"
  for run in smollm2-135m llama2-7b llama2-7b:offload; do
    shape=${run%%:*} name=${run/:/_} ARGS=()
    [[ $shape == llama2-7b ]] && ARGS+=(--layers ${COMPRESS_LAYERS:-4})
    [[ $run == *:offload ]] && ARGS+=(--offload)
    timeout ${T_COMPRESS:-120} $PY -m modegpt_rt.bench.compress_speed --shape $shape "${ARGS[@]}" --device cuda \
      --json "$OUT/compress_speed_$name$TAG.json" > "$OUT/compress_speed_$name$TAG.log" 2>&1
    summary "compress_speed $name (rc $?)" "$(grep -E '"(wall_seconds|seconds_per_layer|peak_device_gib)"' \
      "$OUT/compress_speed_$name$TAG.log" | tr -d ' \n')"
  done
fi

step tests && grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_triton.log" | tail -15 | cut -c1-200
tail -30 "$OUT/triton_kernels$TAG.log" "$OUT/gpu_throughput$TAG.log" 2>/dev/null | cut -c1-200
cat "$OUT/summary.txt"
