# shellcheck shell=bash
# shellcheck disable=SC2034  # the helpers set variables (MODEL_ARGS, EXTRA, ...) for the scripts
# Shared by every launch script of megatron-gem: sourced, never run.
#
# A launch script sets its knobs (each `: "${VAR:=default}"`, so the environment wins), builds
# the full argument list into the array GEM_ARGS with the helpers below, and ends with
# `gem_launch MODE`. Everything up to that last call is the same for a real launch and a
# dry run, so a dry run checks exactly the arguments a job would get:
#
#   DRY_RUN=1 bash launch_scripts/llama3_8b_sft.sbatch    # no GPU, no slurm needed
#
# parses them with the training entry's own parser (Megatron's parser + --loss/--gem-*) for
# the job's world size (NODES x GPUS_PER_NODE), checks the parallel layout against the model
# and prints the layout and Megatron's per-GPU memory estimate (megatron_gem.train.launch_check).
#
# Launch modes (gem_launch):
#   srun      one task per GPU on every node of the slurm allocation (RANK, WORLD_SIZE,
#             LOCAL_RANK from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; MASTER_ADDR = first
#             host of the allocation), optionally inside a container (pyxis/enroot)
#   torchrun  one node, GPUS_PER_NODE processes (no slurm needed)
#   cpu       this machine's CPUs, gloo (NPROC processes; the entry's CPU mode does the rest)
#   tool      a Python tool of this repository (conversion, data) as one process; under slurm
#             it runs as a single srun task (in the container when one is set)

# ------------------------------------------------------------------------------ basics
gem_log() { printf '[megatron-gem %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
gem_die() { printf '[megatron-gem] error: %s\n' "$*" >&2; exit 1; }

# The script that sourced us (for its #SBATCH header) and the checkout it belongs to.
GEM_SCRIPT=${BASH_SOURCE[1]:-$0}
: "${GEM_REPO:?set GEM_REPO to the megatron-gem checkout before sourcing common.sh}"
[[ -f "$GEM_REPO/megatron_gem/train/entry.py" ]] \
    || gem_die "GEM_REPO=$GEM_REPO is not a megatron-gem checkout (submit jobs from its root or set GEM_REPO)"

: "${DRY_RUN:=0}"
case "$DRY_RUN" in 0|1) ;; *) gem_die "DRY_RUN=$DRY_RUN: use 0 or 1" ;; esac

# Value of `#SBATCH --KEY=VALUE` (or `#SBATCH --KEY VALUE`) in the launching script's header.
gem_sbatch_header() {
    local key=$1
    sed -n -E "s/^#SBATCH[[:space:]]+--${key}[=[:space:]]+([^[:space:]]+).*/\\1/p" "$GEM_SCRIPT" | sed -n 1p  # not head: with pipefail, SIGPIPE would fail
}

gem_is_int() { [[ $1 =~ ^[0-9]+$ ]] && (( $1 > 0 )); }

# Python: the container's when a container is used, else this checkout's .venv, else python3.
gem_default_python() {
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        echo python
    elif [[ -x "$GEM_REPO/.venv/bin/python" ]]; then
        echo "$GEM_REPO/.venv/bin/python"
    else
        echo python3
    fi
}

# ------------------------------------------------------------------------------ job size
# gem_job_size [slurm]: NODES and GPUS_PER_NODE (and GEM_WORLD_SIZE = their product). With
# "slurm", inside a job: what slurm granted (sbatch --nodes=N overrides the header). Otherwise
# (and in a dry run) the environment, else the script's #SBATCH header, so a dry run checks the
# layout for the size the job asks for.
gem_job_size() {
    local header_nodes header_gpus
    header_nodes=$(gem_sbatch_header nodes)
    header_gpus=$(gem_sbatch_header ntasks-per-node)
    if [[ "${1:-}" == slurm && -n "${SLURM_JOB_NUM_NODES:-}" && "$DRY_RUN" == 0 ]]; then
        NODES=$SLURM_JOB_NUM_NODES
        GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${GPUS_PER_NODE:-${header_gpus:-8}}}
        GPUS_PER_NODE=${GPUS_PER_NODE%%(*}  # slurm may write "8(x2)"
    fi
    : "${NODES:=${header_nodes:-1}}"
    : "${GPUS_PER_NODE:=${header_gpus:-8}}"
    gem_is_int "$NODES" || gem_die "NODES=$NODES: must be a positive integer"
    gem_is_int "$GPUS_PER_NODE" || gem_die "GPUS_PER_NODE=$GPUS_PER_NODE: must be a positive integer"
    GEM_WORLD_SIZE=$(( NODES * GPUS_PER_NODE ))
}

# ------------------------------------------------------------------------------ environment
# What Megatron and NCCL expect on H100 clusters. Each value can be overridden from the
# environment (a site's own NCCL/IB settings win).
gem_cluster_env() {
    # TP/SP/CP communication must be queued before the compute it overlaps (Hopper and older).
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-19}"              # long IB retry: fewer spurious aborts at scale
    export NCCL_IB_SL="${NCCL_IB_SL:-1}"
    export NCCL_P2P_NET_CHUNKSIZE="${NCCL_P2P_NET_CHUNKSIZE:-2097152}"  # pipeline p2p across nodes
    export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"            # NVLink SHARP buffers cost GPU memory
    export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a hung collective kills the job
    export NVTE_FWD_LAYERNORM_SM_MARGIN="${NVTE_FWD_LAYERNORM_SM_MARGIN:-16}"   # leave SMs for overlapped comms
    export NVTE_BWD_LAYERNORM_SM_MARGIN="${NVTE_BWD_LAYERNORM_SM_MARGIN:-16}"
    export PYTHONUNBUFFERED=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
}

# ------------------------------------------------------------------------------ model presets
# gem_model_args PRESET: Megatron flags of the architecture -> MODEL_ARGS, and the tokenizer's
# vocabulary size -> GEM_VOCAB_SIZE (used only by the dry run's memory estimate; training reads
# the vocabulary from the tokenizer). The Llama presets are the flags
# megatron-gem-convert (megatron_gem.convert) writes to megatron_args.txt for the HF checkpoints.
gem_model_args() {
    local preset=$1
    local -a llama3=(
        --position-embedding-type rope --no-position-embedding --rotary-base 500000
        --rotary-percent 1.0 --normalization RMSNorm --norm-epsilon 1e-05 --swiglu
        --disable-bias-linear --untie-embeddings-and-output-weights
        --attention-dropout 0.0 --hidden-dropout 0.0 --make-vocab-size-divisible-by 128
        --kv-channels 128 --group-query-attention
    )
    local -a gpt=(
        --position-embedding-type rope --no-position-embedding --rotary-base 10000
        --normalization RMSNorm --swiglu --disable-bias-linear
        --untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0
        --init-method-std 0.02
    )
    case "$preset" in
        llama3-8b)
            MODEL_ARGS=("${llama3[@]}" --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
                        --num-attention-heads 32 --num-query-groups 8 --max-position-embeddings 8192)
            GEM_VOCAB_SIZE=128256 ;;
        llama3-70b)
            MODEL_ARGS=("${llama3[@]}" --num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672
                        --num-attention-heads 64 --num-query-groups 8 --max-position-embeddings 8192)
            GEM_VOCAB_SIZE=128256 ;;
        llama31-70b)  # Llama-3.1 70B: 128k context through Llama-3 RoPE scaling
            MODEL_ARGS=("${llama3[@]}" --num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672
                        --num-attention-heads 64 --num-query-groups 8
                        --max-position-embeddings 131072 --use-rope-scaling --rope-scaling-factor 8.0)
            GEM_VOCAB_SIZE=128256 ;;
        gpt-125m)
            MODEL_ARGS=("${gpt[@]}" --num-layers 12 --hidden-size 768 --ffn-hidden-size 2048
                        --num-attention-heads 12 --max-position-embeddings 4096)
            GEM_VOCAB_SIZE=${TOKENIZER_VOCAB_SIZE:-32000} ;;
        gpt-350m)
            MODEL_ARGS=("${gpt[@]}" --num-layers 24 --hidden-size 1024 --ffn-hidden-size 2816
                        --num-attention-heads 16 --max-position-embeddings 4096)
            GEM_VOCAB_SIZE=${TOKENIZER_VOCAB_SIZE:-32000} ;;
        gpt-1b)
            MODEL_ARGS=("${gpt[@]}" --num-layers 24 --hidden-size 2048 --ffn-hidden-size 5632
                        --num-attention-heads 16 --group-query-attention --num-query-groups 4
                        --max-position-embeddings 4096)
            GEM_VOCAB_SIZE=${TOKENIZER_VOCAB_SIZE:-32000} ;;
        tiny)  # the CPU smoke run
            MODEL_ARGS=("${gpt[@]}" --num-layers 2 --hidden-size 64 --ffn-hidden-size 128
                        --num-attention-heads 4 --max-position-embeddings 256)
            GEM_VOCAB_SIZE=${TOKENIZER_VOCAB_SIZE:-1024} ;;
        *) gem_die "MODEL=$preset: choose llama3-8b, llama3-70b, llama31-70b, gpt-125m, gpt-350m, gpt-1b or tiny" ;;
    esac
}

# ------------------------------------------------------------------------------ argument groups
# gem_parallel_args: TP, PP, VP (virtual stages per pipeline rank), CP, SP (0/1),
# DIST_OPT (0/1) -> PARALLEL_ARGS.
gem_parallel_args() {
    PARALLEL_ARGS=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
                   --context-parallel-size "${CP:-1}")
    if [[ -n "${VP:-}" && "${VP:-1}" != 1 ]]; then
        PARALLEL_ARGS+=(--num-virtual-stages-per-pipeline-rank "$VP")
    fi
    if [[ "${SP:-0}" == 1 ]]; then
        PARALLEL_ARGS+=(--sequence-parallel)
    fi
    if [[ "${DIST_OPT:-1}" == 1 ]]; then
        # sharded optimizer state; grad reduce-scatter / param all-gather overlap the backward/forward
        PARALLEL_ARGS+=(--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
    fi
}

# gem_precision_args: PRECISION (bf16 | fp8 | fp32), FP8_RECIPE (tensorwise = per-tensor current
# scaling | delayed) -> PRECISION_ARGS. FP8 uses Transformer Engine (H100 and newer); the LM
# head and the loss stay in BF16 (Megatron keeps the output layer out of FP8).
gem_precision_args() {
    case "${PRECISION:-bf16}" in
        bf16) PRECISION_ARGS=(--bf16) ;;
        fp8)
            PRECISION_ARGS=(--bf16 --fp8-format hybrid --fp8-recipe "${FP8_RECIPE:-tensorwise}")
            if [[ "${FP8_RECIPE:-tensorwise}" == delayed ]]; then
                PRECISION_ARGS+=(--fp8-amax-history-len 1024 --fp8-amax-compute-algo max)
            fi ;;
        fp32) PRECISION_ARGS=() ;;
        *) gem_die "PRECISION=${PRECISION}: choose bf16, fp8 or fp32" ;;
    esac
}

# gem_loss_args: LOSS (gem | ce), GEM_BETA, GEM_H, GEM_LINEAR_FUSION (0/1: the output layer
# and GEM as one op, --gem-linear-fusion; the entry refuses it with LOSS=ce) -> LOSS_ARGS.
gem_loss_args() {
    case "${LOSS:-gem}" in
        gem) LOSS_ARGS=(--loss gem)  # empty GEM_BETA / GEM_H: the entry's defaults
             if [[ -n "${GEM_BETA:-}" ]]; then LOSS_ARGS+=(--gem-beta "$GEM_BETA"); fi
             if [[ -n "${GEM_H:-}" ]]; then LOSS_ARGS+=(--gem-h "$GEM_H"); fi ;;
        ce) LOSS_ARGS=(--loss ce) ;;
        *) gem_die "LOSS=${LOSS}: choose gem or ce" ;;
    esac
    case "${GEM_LINEAR_FUSION:-0}" in
        0) ;;
        1) LOSS_ARGS+=(--gem-linear-fusion) ;;
        *) gem_die "GEM_LINEAR_FUSION=${GEM_LINEAR_FUSION}: use 0 or 1" ;;
    esac
}

# gem_extra_args "$@": EXTRA_ARGS (a string, split on whitespace) then the script's own
# arguments -> EXTRA. Any Megatron flag can be added or overridden this way (argparse keeps the
# last value of a repeated flag).
gem_extra_args() {
    local -a from_env=()
    if [[ -n "${EXTRA_ARGS:-}" ]]; then
        read -r -a from_env <<< "$EXTRA_ARGS"
    fi
    EXTRA=("${from_env[@]}" "$@")
}

# gem_sft_args: the SFT run's data, tokenizer, schedule, checkpoint and logging flags ->
# TRAIN_ARGS, from SFT_DATA (tools/prepare_sft_data.py prefix), HF_MODEL (the tokenizer: an HF
# directory, or with TOKENIZER_TYPE=SentencePieceTokenizer a SentencePiece model file),
# BASE_CKPT (the converted base model), CKPT_DIR, SEQ_LENGTH, MICRO_BATCH, GLOBAL_BATCH,
# TRAIN_ITERS, LR, MIN_LR, WARMUP_ITERS, SAVE_INTERVAL, EVAL_INTERVAL, EVAL_ITERS,
# LOG_INTERVAL and EXIT_DURATION_MINS (when set). --load and --save are the same directory,
# so any restart resumes; the first start (no checkpoint there yet) loads BASE_CKPT through
# --pretrained-checkpoint (Megatron then starts at iteration 0 with a fresh optimizer).
gem_sft_args() {
    TRAIN_ARGS=(
        --sft --data-path "$SFT_DATA" --split "${SPLIT:-98,2,0}"
        --tokenizer-type "${TOKENIZER_TYPE:-HuggingFaceTokenizer}" --tokenizer-model "$HF_MODEL"
        --pretrained-checkpoint "$BASE_CKPT"
    )
    gem_schedule_args
    TRAIN_ARGS+=("${SCHEDULE_ARGS[@]}")
}

# gem_pretrain_args: pre-training from scratch on PRETRAIN_DATA (tools/preprocess_data.py
# prefix, e.g. .../corpus_text_document) with the SentencePiece model TOKENIZER_MODEL
# (tools/train_tokenizer.py) -> TRAIN_ARGS; the same schedule variables as gem_sft_args.
gem_pretrain_args() {
    TRAIN_ARGS=(
        --data-path "$PRETRAIN_DATA" --split "${SPLIT:-99,1,0}"
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
    )
    gem_schedule_args
    TRAIN_ARGS+=("${SCHEDULE_ARGS[@]}")
}

gem_schedule_args() {
    SCHEDULE_ARGS=(
        --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
        --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
        --lr-warmup-iters "$WARMUP_ITERS" --weight-decay "${WEIGHT_DECAY:-0.1}" --clip-grad 1.0
        --adam-beta1 0.9 --adam-beta2 0.95 --seed "${SEED:-1234}"
        --load "$CKPT_DIR" --save "$CKPT_DIR" --save-interval "$SAVE_INTERVAL" --ckpt-format torch_dist
        --exit-signal-handler
        --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --log-interval "$LOG_INTERVAL"
        --log-throughput --tensorboard-dir "${TENSORBOARD_DIR:-$CKPT_DIR/tensorboard}"
    )
    if [[ -n "${EXIT_DURATION_MINS:-}" ]]; then
        SCHEDULE_ARGS+=(--exit-duration-in-mins "$EXIT_DURATION_MINS")
    fi
}

# gem_assemble: GEM_ARGS = model, layout, precision, loss, TRAIN_ARGS, then EXTRA (last wins).
gem_assemble() {
    GEM_ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" "${LOSS_ARGS[@]}"
              "${TRAIN_ARGS[@]}" "${EXTRA[@]}")
}

# gem_require PATH...: inputs a real run needs. A dry run only notes missing ones.
gem_require() {
    local path
    for path in "$@"; do
        if [[ ! -e "$path" && ! -e "$path.idx" && ! -e "$path.bin" ]]; then
            if [[ "$DRY_RUN" == 1 ]]; then
                gem_log "dry run: input $path does not exist here (a real run needs it)"
            else
                gem_die "input $path does not exist"
            fi
        fi
    done
}

# ------------------------------------------------------------------------------ launching
# gem_program: what srun/torchrun start in every task -> GEM_PROGRAM: the project's entry
# (python -m megatron_gem.train), or with GEM_RECIPE set that Python file (a Megatron-Bridge
# recipe script, e.g. examples/bridge_llama3_8b_sft.py), which gets GEM_ARGS as its arguments.
gem_program() {
    if [[ -n "${GEM_RECIPE:-}" ]]; then
        GEM_PROGRAM=("$GEM_RECIPE")
    else
        GEM_PROGRAM=(-m megatron_gem.train)
    fi
}

# gem_launch MODE: run GEM_ARGS (GEM_PROGRAM, or with MODE=tool the module GEM_TOOL) for
# this job, or dry-run them when DRY_RUN=1.
gem_launch() {
    local mode=$1
    gem_container_args
    gem_program
    local target=cluster
    [[ "$mode" == cpu ]] && target=host
    local python=${PYTHON:-$(gem_default_python)}
    if [[ "$DRY_RUN" == 1 ]]; then
        local kind=train what=megatron_gem.train
        if [[ "$mode" == tool ]]; then kind=tool; what=$GEM_TOOL; fi
        # a recipe is checked by its own parser; its Megatron settings are Bridge's (launch_check)
        if [[ "$mode" != tool && -n "${GEM_RECIPE:-}" ]]; then kind=recipe; what=$GEM_RECIPE; fi
        if [[ -n "${GEM_DRY_RUN_DUMP:-}" ]]; then
            # tools/dry_run_launch.py / the tests: hand the record to a Python process that
            # checks many scripts at once. NUL-separated: header fields, argc, argv.
            printf '%s\0' "$kind" "$what" "$target" "$NODES" "$GPUS_PER_NODE" "${GEM_VOCAB_SIZE:-}" \
                "$GEM_SCRIPT" "${CUDA_DEVICE_MAX_CONNECTIONS:-}" "${#GEM_ARGS[@]}" "${GEM_ARGS[@]}" \
                >> "$GEM_DRY_RUN_DUMP"
            return 0
        fi
        local -a check=(-m megatron_gem.train.launch_check --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE"
                        --target "$target" --script "$GEM_SCRIPT")
        [[ -n "${GEM_VOCAB_SIZE:-}" ]] && check+=(--vocab-size "$GEM_VOCAB_SIZE")
        [[ "$kind" == tool ]] && check+=(--tool "$GEM_TOOL")
        [[ "$kind" == recipe ]] && check+=(--recipe "$GEM_RECIPE")
        (cd "$GEM_REPO" && "$python" "${check[@]}" -- "${GEM_ARGS[@]}")
        return
    fi

    case "$mode" in
        srun) gem_srun_train "$python" ;;
        torchrun)
            (cd "$GEM_REPO" && "$python" -m torch.distributed.run --standalone --nnodes 1 \
                --nproc-per-node "$GPUS_PER_NODE" "${GEM_PROGRAM[@]}" "${GEM_ARGS[@]}") ;;
        cpu)  # torchrun for one process too: Megatron reads MASTER_ADDR/PORT from it
            (cd "$GEM_REPO" && "$python" -m torch.distributed.run --standalone --nnodes 1 \
                --nproc-per-node "${NPROC:-1}" -m megatron_gem.train "${GEM_ARGS[@]}") ;;
        tool)
            if [[ -n "${SLURM_JOB_ID:-}" ]]; then
                # shellcheck disable=SC2016  # $1, $@: the task's shell expands them
                srun --ntasks=1 --nodes=1 "${GEM_CONTAINER_ARGS[@]}" \
                    bash -c 'cd "$1" && shift && exec "$@"' _ "$GEM_REPO" "$python" -m "$GEM_TOOL" "${GEM_ARGS[@]}"
            else
                (cd "$GEM_REPO" && "$python" -m "$GEM_TOOL" "${GEM_ARGS[@]}")
            fi ;;
        *) gem_die "gem_launch: unknown mode $mode" ;;
    esac
}

# Container flags for srun (pyxis/enroot): set CONTAINER_IMAGE (e.g. an NGC PyTorch image with
# megatron-core and megatron-gem installed, or a .sqsh file); CONTAINER_MOUNTS adds mounts
# ("src:dst[,src:dst]"); the checkout itself is always mounted at the same path.
gem_container_args() {
    GEM_CONTAINER_ARGS=()
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        local mounts="$GEM_REPO:$GEM_REPO"
        [[ -n "${CONTAINER_MOUNTS:-}" ]] && mounts="$mounts,$CONTAINER_MOUNTS"
        GEM_CONTAINER_ARGS=(--container-image "$CONTAINER_IMAGE" --container-mounts "$mounts"
                            --container-workdir "$GEM_REPO")
    fi
}

# One task per GPU on every node. Megatron 0.19 takes its rank and world size from RANK /
# WORLD_SIZE / LOCAL_RANK (env://, with MASTER_ADDR / MASTER_PORT), not from slurm's variables,
# so each task maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID onto them.
gem_srun_train() {
    local python=$1
    [[ -n "${SLURM_JOB_ID:-}" ]] || gem_die "not inside a slurm job: submit with sbatch (or DRY_RUN=1 to check)"
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)}
    # a job-specific port, so two jobs sharing a node do not collide
    MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
    export MASTER_ADDR MASTER_PORT
    gem_log "srun: $NODES node(s) x $GPUS_PER_NODE GPU(s), master $MASTER_ADDR:$MASTER_PORT"
    # shellcheck disable=SC2016  # $SLURM_*, $1, $@: each task's shell expands them
    srun --nodes "$NODES" --ntasks-per-node "$GPUS_PER_NODE" --kill-on-bad-exit=1 \
        "${GEM_CONTAINER_ARGS[@]}" \
        bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID \
                     LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; cd "$1" && shift && exec "$@"' \
        _ "$GEM_REPO" "$python" "${GEM_PROGRAM[@]}" "${GEM_ARGS[@]}"
}

# ------------------------------------------------------------------------------ preemption
# Minutes in a slurm duration ("M", "M:S", "H:M:S", "D-H", "D-H:M", "D-H:M:S"); empty when
# unlimited or unparsable.
gem_duration_minutes() {
    local t=$1 days=0 h=0 m=0 s=0
    [[ -z "$t" || "$t" == UNLIMITED || "$t" == INVALID ]] && return 0
    if [[ "$t" == *-* ]]; then
        days=${t%%-*}; t=${t#*-}
        IFS=: read -r h m s <<< "$t"
    else
        case "$(tr -cd : <<< "$t" | wc -c)" in
            0) m=$t ;;
            1) IFS=: read -r m s <<< "$t" ;;
            *) IFS=: read -r h m s <<< "$t" ;;
        esac
    fi
    echo $(( 10#${days:-0} * 1440 + 10#${h:-0} * 60 + 10#${m:-0} + (10#${s:-0} > 0 ? 1 : 0) ))
}

# gem_exit_duration: EXIT_DURATION_MINS for Megatron's --exit-duration-in-mins = the job's time
# left (slurm; in a dry run the #SBATCH --time of the header) minus SAVE_MARGIN_MINS, so the
# run saves a checkpoint and exits cleanly before the time limit kills it.
gem_exit_duration() {
    local left=""
    if [[ -n "${SLURM_JOB_ID:-}" && "$DRY_RUN" == 0 ]]; then
        left=$(gem_duration_minutes "$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || true)")
    else
        left=$(gem_duration_minutes "$(gem_sbatch_header time)")
    fi
    if [[ -z "${EXIT_DURATION_MINS:-}" && -n "$left" ]]; then
        EXIT_DURATION_MINS=$(( left - ${SAVE_MARGIN_MINS:-15} ))
        (( EXIT_DURATION_MINS >= 5 )) || gem_die "time limit ${left} min leaves no time to train before the ${SAVE_MARGIN_MINS:-15} min save margin"
    fi
}

# gem_requeue_if_unfinished CKPT_DIR TRAIN_ITERS: after a clean exit (Megatron exits 0 after
# saving on --exit-duration-in-mins or on SIGTERM with --exit-signal-handler), put the job back
# in the queue when the last checkpoint is short of TRAIN_ITERS; the requeued job resumes from
# it (--load = --save). At most MAX_REQUEUES times (slurm's SLURM_RESTART_COUNT).
gem_requeue_if_unfinished() {
    local ckpt=$1 iters=$2 tracker last
    tracker="$ckpt/latest_checkpointed_iteration.txt"
    [[ -f "$tracker" ]] || { gem_log "no checkpoint in $ckpt: not requeueing"; return 0; }
    last=$(<"$tracker")
    if [[ "$last" =~ ^[0-9]+$ ]] && (( last < iters )); then
        if (( ${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-20} )); then
            gem_log "checkpoint at iteration $last < $iters but MAX_REQUEUES=${MAX_REQUEUES:-20} reached"
            return 0
        fi
        gem_log "checkpoint at iteration $last < $iters: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    else
        gem_log "training finished (checkpoint at iteration $last)"
    fi
}
