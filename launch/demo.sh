#!/usr/bin/env bash
# Install ProFuser and run the CPU demo: three tiny specialist sources, pre-trained on many more
# examples of their skill than the fusion set holds, fused into a random-init tiny target
# (per seed: prep -> one 2-rank DeepSpeed ZeRO-2 training per preset -> eval), then a table of
# held-out accuracy, mean ± sd over seeds, results.json and a report.
#
#   bash launch/demo.sh                       # 3 seeds x profuser fusellm sft simul reverse, into ./profuser-demo
#   bash launch/demo.sh --seeds 1 --presets profuser sft     # a quick look (two trainings)
#   bash launch/demo.sh --out /tmp/demo --seeds 5
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/install.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export WANDB_MODE=${WANDB_MODE:-offline}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m profuser.cli demo "$@"
