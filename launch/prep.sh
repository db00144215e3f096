#!/usr/bin/env bash
# Run the whole data prep (normalize, generate, score, teacher, align, build) on all GPUs of this
# node, one process per GPU under the deepspeed launcher. Finished stages and shards are skipped, so
# rerunning after a crash resumes where it stopped.
#
#   bash launch/prep.sh CONFIG [key.sub=value ...]
#   NPROC=4 bash launch/prep.sh CONFIG               # use 4 GPUs (default: all visible)
#   DS_ACCELERATOR=cpu NPROC=2 bash launch/prep.sh CONFIG   # two CPU processes (tests, no GPU)
#   STAGE=teacher bash launch/prep.sh CONFIG         # only one stage
#   MASTER_PORT=29611 bash launch/prep.sh CONFIG     # if the default port is taken
#
# Several nodes: put them in a hostfile and run
#   deepspeed --hostfile HOSTFILE --no_local_rank --module profuser.cli prep CONFIG
# (run_dir must be on a filesystem every node sees).
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
PY=${PYTHON:-python3}
NPROC=${NPROC:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
EXTRA=()
[ -n "${STAGE:-}" ] && EXTRA=(--stage "$STAGE")
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  --module profuser.cli prep "$@" "${EXTRA[@]}"
