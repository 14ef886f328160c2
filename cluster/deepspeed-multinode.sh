#!/usr/bin/env bash
# bash cluster/deepspeed-multinode.sh --objective pgd --task pawsx --model xlm-roberta-large
#
# Multi-node training with the DeepSpeed launcher and cluster/hostfile (or $HOSTFILE).
# Two ways to start it:
#   * from the first host, with passwordless ssh (pdsh) to every host in the hostfile:
#         bash cluster/deepspeed-multinode.sh [train.py flags]
#   * on every node yourself (SLURM srun, Kubernetes, or by hand), no ssh needed:
#         NODE_RANK=<0..N-1> MASTER_ADDR=<node 0's address> bash cluster/deepspeed-multinode.sh [train.py flags]
# Every node needs the repository at the same path and the same data (a shared filesystem or an
# fsspec URL for --data-dir). --output-dir may be shared, an fsspec URL, or each node's local disk:
# then every node keeps complete checkpoints of its own and the same command resumes on each
# (results.json and the exported model are written on the first node).
# Environment: HOSTFILE (cluster/hostfile), MASTER_ADDR (first host), MASTER_PORT (29500),
# DS_CONFIG (ds_configs/zero2.json), NODE_RANK (unset: ssh launch).
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTFILE=${HOSTFILE:-cluster/hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
FIRST_HOST=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')
MASTER_ADDR=${MASTER_ADDR:-$FIRST_HOST}

if [[ -n "${NODE_RANK:-}" ]]; then
  exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    train.py --deepspeed "$DS_CONFIG" "$@"
fi
exec deepspeed --hostfile "$HOSTFILE" --launcher pdsh \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  train.py --deepspeed "$DS_CONFIG" "$@"
