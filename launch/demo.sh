#!/usr/bin/env bash
# Install ProFuser and run the CPU demo: three tiny specialist sources fused into a tiny target
# (prep -> 2-rank DeepSpeed ZeRO-2 training for several presets -> eval -> table + report).
#
#   bash launch/demo.sh                       # into ./profuser-demo
#   bash launch/demo.sh --out /tmp/demo --presets profuser fusellm sft simul reverse
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/install.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export WANDB_MODE=${WANDB_MODE:-offline}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m profuser.cli demo "$@"
