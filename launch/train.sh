#!/usr/bin/env bash
# Train the target under the DeepSpeed launcher: every GPU of this node, or every node of a hostfile.
#
#   bash launch/train.sh CONFIG [key.sub=value ...] [--data DIR]
#
#   bash launch/train.sh examples/paper_7b.yaml train.deepspeed=deepspeed_configs/zero3.json
#   NUM_GPUS=4 bash launch/train.sh CONFIG ...          # only the first 4 GPUs of this node
#   HOSTFILE=/job/hostfile bash launch/train.sh CONFIG  # several nodes: MPI-style hostfile ("node-1 slots=8"),
#                                                       # passwordless ssh, the repo and data at the same paths
#   DS_ACCELERATOR=cpu NUM_GPUS=2 bash launch/train.sh CONFIG train.deepspeed=deepspeed_configs/zero2.json
#                                                       # two CPU ranks (what the tests run)
#
# Each rank runs `python -m profuser.train CONFIG ...` (see profuser/train/run.py); the DeepSpeed
# config is the run config's train.deepspeed (ZeRO-2, ZeRO-3, ZeRO-3 + CPU offload in
# deepspeed_configs/; without one the ranks train with plain DDP). A run that is killed resumes
# from its last complete checkpoint when started again with the same command.
# Other environment: MASTER_PORT (default 29500), MASTER_ADDR (multi-node; inferred if unset),
# DEEPSPEED_ARGS (extra launcher flags, e.g. "--include node-1:0,1").
set -euo pipefail
if [ $# -lt 1 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
# paths in CONFIG and the overrides stay relative to where you run this; the package comes from the repo
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

args=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE")
  [ -n "${MASTER_ADDR:-}" ] && args+=(--master_addr "$MASTER_ADDR")
fi
[ -n "${NUM_GPUS:-}" ] && args+=(--num_gpus "$NUM_GPUS")
# shellcheck disable=SC2206
[ -n "${DEEPSPEED_ARGS:-}" ] && args+=(${DEEPSPEED_ARGS})

export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
if [ "${DS_ACCELERATOR:-}" = "cpu" ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  # ranks share the cores: one rank's threads per core share (at least 1)
  ranks=${NUM_GPUS:-1}
  export OMP_NUM_THREADS=$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 ))
fi
echo "[train.sh] deepspeed ${args[*]} --module profuser.train $*"
exec deepspeed "${args[@]}" --module profuser.train "$@"
