#!/bin/bash
# The CPU smoke run: a tiny GPT trained for a few steps with the GEM loss on this machine's
# CPUs (gloo), through the same entry and the same Megatron loop as the cluster runs. Needs no
# GPU and no data (Megatron's mock data); takes about a minute.
#
#   bash launch_scripts/cpu_smoke.sh                   # 2 processes, TP=2, --loss gem
#   NPROC=1 TP=1 LOSS=ce bash launch_scripts/cpu_smoke.sh
#   CKPT_DIR=/tmp/smoke bash launch_scripts/cpu_smoke.sh   # also save (and resume) there
#   DRY_RUN=1 bash launch_scripts/cpu_smoke.sh         # check the arguments only
set -euo pipefail
GEM_REPO=${GEM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=launch_scripts/common.sh
source "$GEM_REPO/launch_scripts/common.sh"

# ------------------------------------------------------------------ knobs
: "${NPROC:=2}"                 # processes (ranks) on this machine
: "${TP:=2}" "${PP:=1}" "${CP:=1}" "${SP:=0}" "${DIST_OPT:=0}"
: "${LOSS:=gem}"
: "${GEM_BETA:=}"             # empty: the entry's default (megatron_gem.DEFAULT_BETA)
: "${GEM_H:=}"
: "${PRECISION:=fp32}"          # CPUs: fp32
: "${TOKENIZER_VOCAB_SIZE:=1000}"
: "${TRAIN_ITERS:=10}"
: "${CKPT_DIR:=}"               # empty: no checkpoints

# ------------------------------------------------------------------ arguments
NODES=1
GPUS_PER_NODE=$NPROC            # "GPUs" = processes here; the entry's CPU mode does the rest
gem_job_size
gem_model_args tiny
gem_parallel_args
gem_precision_args
gem_loss_args
gem_extra_args "$@"
TRAIN_ARGS=(
    --mock-data --split "98,1,1" --tokenizer-type NullTokenizer --vocab-size "$TOKENIZER_VOCAB_SIZE"
    --seq-length 64 --micro-batch-size 2 --global-batch-size 8 --train-iters "$TRAIN_ITERS"
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 2 --seed 1234
    --log-interval 1 --eval-interval "$TRAIN_ITERS" --eval-iters 1 --num-workers 0
    --cpu                       # the entry's CPU mode (gloo, torch.cuda stand-ins)
)
if [[ -n "$CKPT_DIR" ]]; then
    TRAIN_ARGS+=(--save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval "$TRAIN_ITERS")
fi
gem_assemble

# ------------------------------------------------------------------ launch
gem_launch cpu
