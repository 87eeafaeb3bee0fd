#!/usr/bin/env bash
# Every GPU check of issue 4 in one device call (see /work/.library/device):
#   run(command="bash scripts/gpu_checks.sh", timeout_s=590)
# Uses the device image's python3 (torch + triton), no install: the package is staged from the
# source folders with symlinks. Writes logs and result JSON under $OUT (or /tmp/gpu_checks) and
# prints a short summary last. Each step has its own time limit so one hang cannot eat the lease;
# BATCH, MODELS, REPEATS and CUDA_GRAPH (on/off/both) narrow the throughput run to fit a call.
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
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
summary() { printf '%-28s %s\n' "$1" "$2" >> "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/device.txt" 2>&1
summary device "$(tr '\n' ' ' < "$OUT/device.txt")"

timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py > "$OUT/pytest_triton.log" 2>&1
summary "pytest triton (rc $?)" "$(tail -1 "$OUT/pytest_triton.log")"

timeout 120 $PY -m modegpt_rt.bench.triton_kernels --json "$OUT/triton_kernels.json" > "$OUT/triton_kernels.log" 2>&1
summary "bench triton_kernels (rc $?)" "$(tail -1 "$OUT/triton_kernels.log")"

timeout 240 $PY -m modegpt_rt.bench.gpu_throughput --hf-baseline --cuda-graph ${CUDA_GRAPH:-both} \
  --batch ${BATCH:-1,16,64,256} --models ${MODELS:-dense,paper30,5,10,20,40} --repeats ${REPEATS:-2} --json "$OUT/gpu_throughput.json" > "$OUT/gpu_throughput.log" 2>&1
summary "bench gpu_throughput (rc $?)" "$(tail -1 "$OUT/gpu_throughput.log")"

tail -40 "$OUT/gpu_throughput.log" "$OUT/triton_kernels.log" 2>/dev/null | cut -c1-160
cat "$OUT/summary.txt"
