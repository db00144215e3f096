#!/usr/bin/env bash
# Evaluate a model on all GPUs of this node, one process per GPU under the deepspeed launcher: the
# held-out records are split across the processes (prep's rule) and rank 0 writes results.json.
#
#   bash launch/eval.sh CONFIG --model DIR [--out FILE] [key.sub=value ...]
#   NPROC=4 bash launch/eval.sh CONFIG --model DIR             # use 4 GPUs (default: all visible)
#   DS_ACCELERATOR=cpu NPROC=2 bash launch/eval.sh CONFIG --model DIR   # two CPU processes (no GPU)
#   MASTER_PORT=29612 bash launch/eval.sh CONFIG --model DIR   # if the default port is taken
#
# torchrun works the same: torchrun --nproc-per-node N -m profuser.cli eval CONFIG --model DIR
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
PY=${PYTHON:-python3}
NPROC=${NPROC:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  --module profuser.cli eval "$@"
