#!/usr/bin/env bash
# The lower bounds of setup.py, tested: a separate virtual environment with transformers, datasets,
# deepspeed, accelerate, pydantic and rapidfuzz at the lowest versions setup.py admits (everything else, torch included,
# comes from this Python's site-packages), then the smoke subset: config -> `profuser check` ->
# `profuser prep` -> a 2-step, 2-rank ZeRO-2 training under the deepspeed launcher -> from_pretrained
# (tests/test_smoke.py). CI runs it after the main suite.
#
#   bash launch/floor.sh                        # venv in $FLOOR_VENV (default /tmp/profuser-floor-venv)
#   FLOOR_VENV=/path/venv bash launch/floor.sh -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FLOOR_VENV:-/tmp/profuser-floor-venv}
# the ">=X" of each package in setup.py, as "package==X"
pins=$("$PY" -c '
import re
src = open("setup.py").read()
for name in ("transformers", "datasets", "deepspeed", "accelerate", "pydantic", "rapidfuzz"):
    print(name + "==" + re.search(r"\"" + name + r">=([0-9][^,\"]*)", src).group(1))
')
echo "[floor] $(echo $pins) in $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $pins
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cpu WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"  # DeepSpeed's JIT-built ops for these versions stay apart
"$VENV/bin/python" -c '
import importlib.metadata as md
print("[floor] testing with " + ", ".join(n + " " + md.version(n) for n in
      ("torch", "transformers", "datasets", "deepspeed", "accelerate", "pydantic", "rapidfuzz", "tokenizers", "safetensors")))'
exec "$VENV/bin/python" -m pytest -p no:cacheprovider tests/test_smoke.py "$@"
