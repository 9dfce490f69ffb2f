#!/bin/bash
# SFT with GEM on the GPUs of this machine (no slurm): torchrun, one process per GPU.
#
#   bash launch_scripts/local_torchrun.sh                          # Llama-3 8B on 8 GPUs
#   GPUS_PER_NODE=4 TP=4 PRECISION=fp8 bash launch_scripts/local_torchrun.sh
#   MODEL=gpt-350m HF_MODEL=... BASE_CKPT=... bash launch_scripts/local_torchrun.sh
#   DRY_RUN=1 bash launch_scripts/local_torchrun.sh                # check it, no GPU needed
#
# The same run as llama3_8b_sft.sbatch (same variables, same defaults) without slurm.
set -euo pipefail
GEM_REPO=${GEM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=launch_scripts/common.sh
source "$GEM_REPO/launch_scripts/common.sh"

# ------------------------------------------------------------------ knobs
: "${MODEL:=llama3-8b}"
: "${PRECISION:=bf16}"          # bf16 | fp8
: "${FP8_RECIPE:=tensorwise}"
: "${LOSS:=gem}"                # gem | ce
: "${GEM_BETA:=}"             # empty: the entry's default (megatron_gem.DEFAULT_BETA)
: "${GEM_H:=}"
: "${GEM_WORK:=$GEM_REPO/work}"
: "${HF_MODEL:=$GEM_WORK/hf/Meta-Llama-3-8B}"
: "${BASE_CKPT:=$GEM_WORK/megatron/llama3-8b}"
: "${SFT_DATA:=$GEM_WORK/data/sft/train}"
: "${RUN_NAME:=$MODEL-sft-$LOSS-$PRECISION-local}"
: "${CKPT_DIR:=$GEM_WORK/checkpoints/$RUN_NAME}"
: "${NODES:=1}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=8
    if [[ "$DRY_RUN" == 0 ]] && command -v nvidia-smi > /dev/null; then
        GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU')
    fi
fi
: "${TP:=2}" "${PP:=1}" "${CP:=1}" "${SP:=1}" "${DIST_OPT:=1}"
: "${SEQ_LENGTH:=4096}" "${MICRO_BATCH:=1}" "${GLOBAL_BATCH:=128}" "${TRAIN_ITERS:=1000}"
: "${LR:=1e-5}" "${MIN_LR:=1e-6}" "${WARMUP_ITERS:=30}"
: "${SAVE_INTERVAL:=100}" "${EVAL_INTERVAL:=100}" "${EVAL_ITERS:=10}" "${LOG_INTERVAL:=1}"

# ------------------------------------------------------------------ arguments
(( NODES == 1 )) || gem_die "local_torchrun.sh runs on this machine only (NODES=1); use the sbatch scripts"
gem_job_size
gem_model_args "$MODEL"
gem_parallel_args
gem_precision_args
gem_loss_args
gem_extra_args "$@"
gem_sft_args
gem_assemble

# ------------------------------------------------------------------ launch
gem_require "$HF_MODEL" "$SFT_DATA"
[[ -f "$CKPT_DIR/latest_checkpointed_iteration.txt" ]] || gem_require "$BASE_CKPT"
gem_cluster_env
gem_launch torchrun
