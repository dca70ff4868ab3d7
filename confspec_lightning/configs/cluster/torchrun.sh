#!/usr/bin/env bash
# DDP training with torchrun (torch.distributed.run), on one node or several, without SLURM.
#
# One node, 4 GPUs:
#   NPROC_PER_NODE=4 configs/cluster/torchrun.sh
# Two nodes x 8 GPUs: run the same command on both nodes; RDZV_ENDPOINT is host:port of one of them
# (any free port, reachable from the other node), RDZV_ID any string shared by the nodes of this run:
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node01:29400 RDZV_ID=trades_csr_1 configs/cluster/torchrun.sh
# Extra arguments go to `confspec <SUBCOMMAND>` after the config (so they override it):
#   NPROC_PER_NODE=4 configs/cluster/torchrun.sh --trainer.max_epochs 50 --data.init_args.batch_size 32
# Resume an interrupted run from its last.ckpt (the CLI resolves `last` to the newest earlier run's):
#   NPROC_PER_NODE=4 configs/cluster/torchrun.sh --ckpt_path last
# CPU check with 2 processes (what tests/test_cluster.py runs, on the digits config):
#   ACCELERATOR=cpu NPROC_PER_NODE=2 CONFIG=digits/trades_csr configs/cluster/torchrun.sh
#
# Settings (environment variables, defaults in brackets):
#   CONFIG          [cifar10/scratch_trades_csr: a recipe name or a config file]
#   NNODES          [1] number of nodes (fixed: Lightning does not support elastic min:max node ranges)
#   NPROC_PER_NODE  [number of GPUs from nvidia-smi, else 1] processes per node = GPUs per node
#   ACCELERATOR     [gpu] or cpu (gloo backend)
#   RDZV_ENDPOINT   [empty] host:port of the c10d rendezvous; required when NNODES > 1. Empty on one node:
#                   --standalone (rendezvous on localhost on a free port: several runs on one machine do not
#                   collide)
#   RDZV_ID         [confspec] rendezvous id, the same on every node of one run
#   SUBCOMMAND      [fit]
#   TORCHRUN        [torchrun] e.g. .venv/bin/torchrun
#
# How it works: torchrun starts NPROC_PER_NODE workers per node and sets RANK, LOCAL_RANK, WORLD_SIZE,
# MASTER_ADDR and MASTER_PORT in each (node ranks are assigned by the c10d rendezvous: no --node_rank;
# --standalone is c10d on localhost:0, i.e. a free port). Lightning detects torchrun
# (TorchElasticEnvironment, which takes precedence over SLURM), does not spawn processes itself, and checks
# that devices x num_nodes = WORLD_SIZE: hence --trainer.devices $NPROC_PER_NODE and --trainer.num_nodes
# $NNODES below. With more than one process per node torchrun sets OMP_NUM_THREADS=1 in every worker
# unless it is set. data.batch_size is per process: the global batch is batch_size x NPROC_PER_NODE x
# NNODES; keep the recipe's global batch (128 for CIFAR-10) by dividing, or scale the learning rate
# linearly with the global batch (with a warm-up) when you raise it. `confspec test` must run on one
# device: NPROC_PER_NODE=1 SUBCOMMAND=test configs/cluster/torchrun.sh --ckpt_path best
# Multi-node and GPU runs of this script are not tested by this repository; the tests run it on one node
# with 2 CPU processes.

set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

CONFIG=${CONFIG:-cifar10/scratch_trades_csr}
NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [[ "$gpus" -gt 0 ]]; then NPROC_PER_NODE=$gpus; fi
    fi
fi
ACCELERATOR=${ACCELERATOR:-gpu}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
RDZV_ID=${RDZV_ID:-confspec}
SUBCOMMAND=${SUBCOMMAND:-fit}
TORCHRUN=${TORCHRUN:-torchrun}

if [[ -n "$RDZV_ENDPOINT" ]]; then
    RDZV=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID")
elif [[ "$NNODES" -eq 1 ]]; then
    RDZV=(--standalone)
else
    echo "NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the same on every node)." >&2
    exit 2
fi

CMD=(
    "$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${RDZV[@]}"
    -m confspec_lightning "$SUBCOMMAND" --config "$CONFIG"
    --trainer.accelerator "$ACCELERATOR"
    --trainer.devices "$NPROC_PER_NODE"
    --trainer.num_nodes "$NNODES"
    --trainer.strategy ddp
    "$@"
)
echo "+ ${CMD[*]}" >&2
exec "${CMD[@]}"
