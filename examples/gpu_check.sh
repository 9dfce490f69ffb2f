#!/bin/bash
# The one-shot GPU check of megatron-gem: what a session on a lent GPU machine runs, in one go
# (under 10 minutes). That machine has torch, triton and pytest but no megatron-core and no
# network: megatron-core travels as a wheel in .whl/ of the working tree (see
# docs/benchmarks.md, "On a GPU"), installed here into a scratch folder on PYTHONPATH.
#
#   bash examples/gpu_check.sh                       # all steps; output in $OUT or ./gpu_check_out
#   GPU_CHECK_DRY_RUN=1 bash examples/gpu_check.sh   # print the commands only (any machine)
#   GPU_CHECK_STEPS="device bench" bash examples/gpu_check.sh   # some steps only
#   bash examples/gpu_check.sh --curve LOG           # iteration, ms/step, losses of a Megatron log
#
# Steps: setup (install the wheel), device (nvidia-smi, torch/triton versions), tests (pytest
# tests/ops: the CUDA tests at real sizes), bench (examples/benchmark_loss.py, 8192 tokens x
# V/tp 16032/32064/64128, bf16), bench_linear (the fused output layer + GEM, --linear, at
# 8192 tokens x H 4096 x V/tp 64128), train_gem / train_ce (a small Llama-style model, 20
# iterations, --bf16, local transformer spec, mock data, torchrun on 1 GPU). Each step has its
# own timeout, clipped to what is left of GPU_CHECK_BUDGET_S; a failing step does not stop the
# others. Every step's full log is in the output folder; the summary is the last thing printed.
set -uo pipefail  # no -e: one failing step must not stop the others

# Megatron's iteration lines -> "iteration  ms/step  losses...", one line per iteration.
loss_curve() {
    awk -F'|' '/ iteration +[0-9]+\/ *[0-9]+ \|/ {
        it = $1; sub(/.*iteration +/, "", it); sub(/\/.*/, "", it); line = sprintf("%5d", it)
        for (i = 2; i <= NF; i++) {
            f = $i; gsub(/^ +| +$/, "", f)
            if (f ~ /^elapsed time per iteration/) { sub(/.*: /, "", f); line = line "  ms/step " f }
            else if (f ~ /(loss|entropy|grad norm):/ && f !~ /^loss scale/) line = line "  " f
        }
        print line
    }' "$1"
}

if [[ "${1:-}" == --curve ]]; then  # bash examples/gpu_check.sh --curve LOG: a run's loss curve
    loss_curve "${2:?usage: gpu_check.sh --curve MEGATRON_LOG}"
    exit
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1

: "${GPU_CHECK_DRY_RUN:=0}"
: "${GPU_CHECK_STEPS:=setup device tests bench bench_linear train_gem train_ce}"
: "${GPU_CHECK_BUDGET_S:=560}"    # all steps together; the device tool's limit is 600 s
: "${PYTHON:=python3}"
: "${SCRATCH:=${TMPDIR:-/tmp}/gpu_check_scratch}"
: "${TRAIN_ITERS:=20}"
: "${BENCH_ARGS:=--tokens 8192 --local-vocab 16032 32064 64128 --tp 1 --dtypes bf16}"
# the fused output layer + GEM at the Llama-3 8B TP 2 shape (issue 14)
: "${BENCH_LINEAR_ARGS:=--linear --tokens 8192 --hidden 4096 --local-vocab 64128 --dtypes bf16 --repeats 10}"
OUT_DIR=$(realpath -m "${OUT:-$REPO/gpu_check_out}")
case "$GPU_CHECK_DRY_RUN" in 0|1) ;; *) echo "GPU_CHECK_DRY_RUN=$GPU_CHECK_DRY_RUN: use 0 or 1" >&2; exit 2 ;; esac
mkdir -p "$OUT_DIR" || exit 1
SUMMARY=()
DEADLINE=$(( SECONDS + GPU_CHECK_BUDGET_S ))

export PYTHONPATH="$REPO:$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export CUDA_DEVICE_MAX_CONNECTIONS=1

wanted() { [[ " $GPU_CHECK_STEPS " == *" $1 "* ]]; }

# run_step NAME TIMEOUT_S CMD...: CMD with its output in $OUT_DIR/NAME.log; records the result.
run_step() {
    local name=$1 limit=$2 left rc start
    shift 2
    left=$(( DEADLINE - SECONDS - 5 ))
    (( limit > left )) && limit=$left
    printf '\n===== %s (timeout %ss):' "$name" "$limit"
    printf ' %q' "$@"
    printf '\n'
    if [[ "$GPU_CHECK_DRY_RUN" == 1 ]]; then
        SUMMARY+=("$name: dry run")
        return 0
    fi
    if (( limit < 10 )); then
        SUMMARY+=("$name: SKIPPED (time budget spent)")
        return 1
    fi
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    if (( rc == 0 )); then
        SUMMARY+=("$name: PASSED ($(( SECONDS - start )) s)")
    elif (( rc == 124 || rc == 137 )); then
        SUMMARY+=("$name: FAILED (timed out after ${limit} s)")
    else
        SUMMARY+=("$name: FAILED (exit $rc, $(( SECONDS - start )) s)")
    fi
    return "$rc"
}

show_log() {  # the last lines of a step's log on stdout
    [[ "$GPU_CHECK_DRY_RUN" == 1 || ! -f "$OUT_DIR/$1.log" ]] && return 0
    tail -n "$2" "$OUT_DIR/$1.log"
}

echo "megatron-gem GPU check: $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'), output in $OUT_DIR, budget ${GPU_CHECK_BUDGET_S} s"

# ---------------------------------------------------------------- setup: megatron-core wheel
if wanted setup; then
    shopt -s nullglob
    wheels=("$REPO"/.whl/*.whl)
    shopt -u nullglob
    if (( ${#wheels[@]} )); then
        [[ "$GPU_CHECK_DRY_RUN" == 1 ]] || rm -rf "$SCRATCH/site"
        # pip where the machine has it, else unpack the wheels (zip files) with Python itself
        # shellcheck disable=SC2016  # $1, $2, $@: the inner shell's arguments
        run_step setup 90 bash -c 'py=$1 site=$2; shift 2
            if "$py" -m pip --version > /dev/null 2>&1; then
                exec "$py" -m pip install --no-index --no-deps --quiet --target "$site" "$@"
            fi
            echo "no pip here: unpacking the wheels with zipfile"
            for wheel in "$@"; do "$py" -m zipfile -e "$wheel" "$site" || exit 1; done
        ' _ "$PYTHON" "$SCRATCH/site" "${wheels[@]}"
    else
        echo "no wheels in $REPO/.whl: megatron-core must already import here"
        run_step setup 30 "$PYTHON" -c "import megatron.core; print(megatron.core.__version__)"
    fi
    show_log setup 20
fi

# ---------------------------------------------------------------- device
if wanted device; then
    # shellcheck disable=SC2016  # $0 is the inner shell's: the Python to run
    run_step device 60 bash -c 'nvidia-smi; exec "$0" -' "$PYTHON" <<'EOF'
import importlib

import torch
import triton

print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
for name in ("megatron.core", "megatron_gem", "psutil", "numpy", "sentencepiece",
             "transformer_engine", "liger_kernel"):
    try:
        module = importlib.import_module(name)
        print("import", name, getattr(module, "__version__", ""), "ok")
    except Exception as exc:
        print("import", name, "FAILED:", type(exc).__name__, exc)
assert torch.cuda.is_available(), "no CUDA device"
EOF
    show_log device 40
fi

# ---------------------------------------------------------------- tests: the op on CUDA
if wanted tests; then
    run_step tests 150 "$PYTHON" -m pytest tests/ops -q -p no:cacheprovider
    show_log tests 30
fi

# ---------------------------------------------------------------- bench
if wanted bench; then
    read -r -a bench_args <<< "$BENCH_ARGS"
    run_step bench 150 "$PYTHON" examples/benchmark_loss.py "${bench_args[@]}"
    show_log bench 45
fi

# ---------------------------------------------------------------- bench_linear: fused head + GEM
if wanted bench_linear; then
    read -r -a bench_linear_args <<< "$BENCH_LINEAR_ARGS"
    run_step bench_linear 120 "$PYTHON" examples/benchmark_loss.py "${bench_linear_args[@]}"
    show_log bench_linear 30
fi

# ---------------------------------------------------------------- train: GEM, then CE
# A small Llama-3-style model (RoPE, RMSNorm, SwiGLU, GQA, untied embeddings): 8192 tokens
# per step (micro-batch 4 x 2048) over a 32000 vocabulary, the benchmark's middle shape.
# No Transformer Engine and no Apex there: local spec, no gradient-accumulation fusion (an Apex
# or TE kernel; the entry adds the other host-dependent flags itself).
TRAIN_ARGS=(
    --transformer-impl local --no-gradient-accumulation-fusion
    --num-layers 4 --hidden-size 1024 --ffn-hidden-size 2816 --num-attention-heads 16
    --group-query-attention --num-query-groups 4 --kv-channels 64
    --position-embedding-type rope --no-position-embedding --rotary-base 500000
    --normalization RMSNorm --norm-epsilon 1e-05 --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0
    --init-method-std 0.02 --max-position-embeddings 2048
    --mock-data --split "98,1,1" --tokenizer-type NullTokenizer --vocab-size 32000
    --seq-length 2048 --micro-batch-size 4 --global-batch-size 4 --train-iters "$TRAIN_ITERS"
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2 --seed 1234
    --bf16 --log-interval 1 --eval-interval "$TRAIN_ITERS" --eval-iters 1 --num-workers 0
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
)
# the argument list, NUL-separated, for the dry-run test (it parses them with the entry's parser)
printf '%s\0' "${TRAIN_ARGS[@]}" > "$OUT_DIR/train_args.bin"
for loss in gem ce; do
    wanted "train_$loss" || continue
    run_step "train_$loss" 120 "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 \
        --nproc-per-node 1 -m megatron_gem.train "${TRAIN_ARGS[@]}" --loss "$loss"
    if [[ "$GPU_CHECK_DRY_RUN" == 0 && -f "$OUT_DIR/train_$loss.log" ]]; then
        loss_curve "$OUT_DIR/train_$loss.log" > "$OUT_DIR/train_$loss.curve"
        echo "--loss $loss: iteration, step time, losses"
        cat "$OUT_DIR/train_$loss.curve"
        [[ -s "$OUT_DIR/train_$loss.curve" ]] || show_log "train_$loss" 30
    fi
done

# ---------------------------------------------------------------- summary
{
    echo
    echo "===== summary ($SECONDS s in all)"
    printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT_DIR/summary.txt"
for line in "${SUMMARY[@]}"; do
    [[ "$line" == *": PASSED"* || "$line" == *": dry run" ]] || exit 1
done
exit 0
