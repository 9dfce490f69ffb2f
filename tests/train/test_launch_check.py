"""megatron_gem.train.launch_check: the memory estimate against an independent parameter count, the
dry-run record format, and common.sh's slurm-duration parser."""

from __future__ import annotations

import argparse
import math
import subprocess

import pytest

from megatron_gem.train import launch_check as lc

from conftest import REPO

MIB = 2**20

LLAMA3_8B = dict(L=32, h=4096, ffn=14336, nh=32, g=8, d=128, V=128256)
LLAMA3_70B = dict(L=80, h=8192, ffn=28672, nh=64, g=8, d=128, V=128256)


def _llama_argv(m, tp, pp, vp=None, seq=4096, gbs=128):
    argv = (
        f"--num-layers {m['L']} --hidden-size {m['h']} --ffn-hidden-size {m['ffn']} "
        f"--num-attention-heads {m['nh']} --group-query-attention --num-query-groups {m['g']} "
        f"--kv-channels {m['d']} --max-position-embeddings 8192 --position-embedding-type rope "
        "--normalization RMSNorm --swiglu --disable-bias-linear "
        "--untie-embeddings-and-output-weights "
        f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp} "
        "--sequence-parallel "
        f"--use-distributed-optimizer --seq-length {seq} --micro-batch-size 1 "
        f"--global-batch-size {gbs} "
        "--train-iters 10 --eval-iters 0 --lr 1e-5 --bf16 --tokenizer-type NullTokenizer "
        f"--vocab-size {m['V']} --mock-data --loss gem"
    ).split()
    if vp:
        argv += ["--num-virtual-stages-per-pipeline-rank", str(vp)]
    return argv


def _params(m):
    """Exact Llama parameter counts from the architecture (float64-free: integers)."""
    attn = m["h"] * m["d"] * (m["nh"] + 2 * m["g"]) + m["nh"] * m["d"] * m["h"]  # qkv + o
    mlp = 3 * m["h"] * m["ffn"]  # gate, up, down
    norms = 2 * m["h"]
    return attn, mlp, norms


@pytest.mark.parametrize("m,published", [(LLAMA3_8B, 8_030_261_248), (LLAMA3_70B, 70_553_706_496)])
def test_reference_count_matches_published_sizes(m, published):
    attn, mlp, norms = _params(m)
    assert m["L"] * (attn + mlp + norms) + m["h"] + 2 * m["V"] * m["h"] == published


def test_memory_estimate_8b_against_independent_count():
    m, tp, world = LLAMA3_8B, 2, 8
    args = lc.parse_train_args(_llama_argv(m, tp, 1), world)
    est = lc.estimate_memory(args, m["V"], num_microbatches=128 // 4)
    dp = world // tp
    vp = math.ceil(m["V"] / (128 * tp)) * 128 * tp
    assert est["padded_vocab_size"] == vp
    attn, mlp, norms = _params(m)
    tp_sharded = (m["L"] * (attn + mlp) + 2 * vp * m["h"]) / tp  # untied: embedding + output layer
    replicated = m["L"] * norms + m["h"]
    bytes_per_param = (
        6 + 12 / dp
    )  # bf16 weight + fp32 grad, fp32 main weight + Adam sharded over DP
    assert est["weights_and_optimizer"] == pytest.approx(
        (tp_sharded + replicated) * bytes_per_param / MIB, rel=1e-12
    )
    # activations, Korthikanti et al. (2022) Table 2 with SP (no attention scores kept), first
    # stage with PP=1: layers + embedding input/dropout + final norm/output layer/loss, all / TP
    s, b, h = 4096, 1, m["h"]
    act = (
        s * b * h * (18 + 4 * m["ffn"] / h) * m["L"]
        + 8 * s * b
        + s * b * h
        + s * b * h * 4 * (1 + vp / h)
    ) / tp
    assert est["method"] == "SP, fused attention"
    assert est["activations"] == pytest.approx(act / MIB, rel=1e-12)
    assert est["total"] == pytest.approx(
        est["weights_and_optimizer"] + est["activations"], rel=1e-12
    )


def test_memory_estimate_70b_pipeline_most_loaded_stage():
    m, tp, pp, vpp, world = LLAMA3_70B, 4, 4, 5, 64
    args = lc.parse_train_args(_llama_argv(m, tp, pp, vpp), world)
    est = lc.estimate_memory(args, m["V"], num_microbatches=32)
    vp = math.ceil(m["V"] / (128 * tp)) * 128 * tp
    attn, mlp, norms = _params(m)
    # the last stage: L/PP layers + output layer + final norm (the first has the embedding instead)
    last = (m["L"] // pp * (attn + mlp) + vp * m["h"]) / tp + m["L"] // pp * norms + m["h"]
    expected = last * (6 + 12 / (world // (tp * pp))) / MIB
    # Megatron spreads the final norm over the stages (h/PP instead of h): 6144 params of 4.7e9
    assert est["weights_and_optimizer"] == pytest.approx(expected, rel=2e-6)


def test_memory_method_without_sequence_parallel_is_megatrons_upper_bound():
    argv = [a for a in _llama_argv(LLAMA3_8B, 2, 1) if a != "--sequence-parallel"]
    est = lc.estimate_memory(lc.parse_train_args(argv, 8), LLAMA3_8B["V"], 32)
    assert est["method"] == "no SP"
    s, b, h, L, tp = 4096, 1, 4096, 32, 2
    vp = 128256
    act = (
        s * b * h * (10 + 24 / tp) * L + 8 * s * b + s * b * h + (s * b * vp / tp + s * b * h) * 2
    ) * 1.05
    assert est["activations"] == pytest.approx(act / MIB, rel=1e-12)


# Llama-3 8B at TP 2 with 8192 tokens a micro-batch: [8192, 64128] logits per rank, 1 GiB in bf16
FUSION_SEQ, V_LOCAL = 8192, 128256 // 2


def _fusion_estimates(sp=True, pp=1):
    argv = _llama_argv(LLAMA3_8B, 2, pp, seq=FUSION_SEQ)
    if not sp:
        argv.remove("--sequence-parallel")
    plain = lc.estimate_memory(lc.parse_train_args(argv, 8), LLAMA3_8B["V"], 32)
    args = lc.parse_train_args(argv + ["--gem-linear-fusion"], 8)
    assert args.gem_linear_fusion
    return plain, lc.estimate_memory(args, LLAMA3_8B["V"], 32)


@pytest.mark.parametrize(
    "sp,logit_bytes",
    [
        (True, 4),  # Korthikanti's SP formula: bf16 logits + the loss's fp32 work, 4 B a logit
        (False, 2 * 1.05),  # Megatron's no-SP formula: the bf16 logits, with its 5% overhead
    ],
)
def test_linear_fusion_takes_the_logits_out_of_the_estimate(sp, logit_bytes):
    plain, fused = _fusion_estimates(sp)
    bf16_logits = FUSION_SEQ * V_LOCAL * 2
    assert bf16_logits / 2**30 == pytest.approx(1.0, abs=0.03)  # the "1 GiB"
    # the op's tiles on a GPU: 2^23 logits a tile, all 8192 tokens -> 1024 vocabulary columns;
    # a bf16 tile (16 MiB) and dhidden's fp32 accumulator [8192, 4096] (128 MiB); the Triton
    # kernels (the GPU's default impl) need no fp32 scratch
    workspace = 8192 * 1024 * 2 + 8192 * 4096 * 4
    assert workspace / MIB == 144
    counted = FUSION_SEQ * V_LOCAL * logit_bytes
    drop = plain["activations"] - fused["activations"]
    assert drop == pytest.approx((counted - workspace) / MIB, rel=1e-9)
    assert plain["total"] - fused["total"] == pytest.approx(drop, rel=1e-9)
    assert fused["weights_and_optimizer"] == plain["weights_and_optimizer"]
    assert "fused output layer + GEM" in fused["method"]
    assert "fused output layer" not in plain["method"]


def test_linear_fusion_leaves_a_pipelined_estimate_alone():
    """With PP > 1 the estimate is the first stage's, which has no output layer (Megatron's
    formula counts the logits only with PP = 1): nothing to take out."""
    plain, fused = _fusion_estimates(pp=2)
    assert fused["activations"] == plain["activations"]
    assert "fused output layer" not in fused["method"]


def test_estimate_does_not_modify_args():
    args = lc.parse_train_args(_llama_argv(LLAMA3_8B, 2, 1), 8)
    before = dict(vars(args))
    lc.estimate_memory(args, 1000, 4)
    assert vars(args) == before


def test_read_dump_round_trip_and_truncation():
    argv = ["--tensorboard-dir", "/a b/c", "", "--x=ü", "-"]
    rec = [
        "train",
        "megatron_gem.train",
        "cluster",
        "2",
        "8",
        "128256",
        "s.sbatch",
        "1",
        str(len(argv)),
        *argv,
    ]
    tool = ["tool", "tools/t.py", "cluster", "1", "1", "", "t.sbatch", "", "0"]
    data = "".join(f + "\0" for f in rec + tool).encode()
    a, b = lc.read_dump(data)
    assert a.argv == argv and a.world_size == 16 and a.vocab_size == 128256
    assert a.env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert b.kind == "tool" and b.argv == [] and b.vocab_size is None and b.env == {}
    with pytest.raises(ValueError, match="truncated"):
        lc.read_dump(data[:-8])


@pytest.mark.parametrize("field,value", [("nodes", 0), ("gpus_per_node", -1), ("nodes", True)])
def test_launch_spec_rejects_bad_sizes(field, value):
    kw = dict(kind="train", program="p", target="cluster", nodes=1, gpus_per_node=8, argv=[])
    kw[field] = value
    with pytest.raises(ValueError, match=f"{field}="):
        lc.LaunchSpec(**kw)


def test_layout_problems_reports_each_split():
    ns = argparse.Namespace
    spec = lc.LaunchSpec("train", "megatron_gem.train", "cluster", 1, 6, [], env={})
    args = ns(
        tensor_model_parallel_size=3,
        pipeline_model_parallel_size=2,
        context_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        data_parallel_size=1,
        world_size=6,
        num_attention_heads=32,
        num_query_groups=8,
        group_query_attention=True,
        ffn_hidden_size=14336,
        num_layers=31,
        seq_length=4096,
        max_position_embeddings=2048,
        sequence_parallel=True,
        use_torch_fsdp2=False,
        use_megatron_fsdp=False,
        fp8=None,
        exit_signal_handler=True,
        exit_duration_in_mins=None,
        save=None,
        load=None,
        save_interval=None,
        sft=True,
        data_path=None,
        train_data_path=None,
        mock_data=False,
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=None,
    )
    errors, warns = lc.layout_problems(args, spec)
    text = "\n".join(errors)
    for piece in (
        "--num-attention-heads 32 is not divisible by --tensor-model-parallel-size 3",
        "--num-query-groups 8",
        "--ffn-hidden-size 14336",
        "--num-layers 31 is not divisible by PP x VP = 2 x 1",
        "--seq-length 4096 is not divisible by 3",
        "exceeds --max-position-embeddings 2048",
        "without --save",
        "--sft needs --data-path",
        "needs --tokenizer-model",
    ):
        assert piece in text, piece
    assert any("CUDA_DEVICE_MAX_CONNECTIONS" in w for w in warns)


@pytest.mark.parametrize(
    "duration,minutes",
    [
        ("30", "30"),
        ("10:30", "11"),
        ("10:00", "10"),
        ("2:00:00", "120"),
        ("04:00:00", "240"),
        ("1-0", "1440"),
        ("1-02:03", "1563"),
        ("1-02:03:04", "1564"),
        ("UNLIMITED", ""),
        ("", ""),
    ],
)
def test_slurm_duration_minutes(duration, minutes):
    out = subprocess.run(
        [
            "bash",
            "-c",
            'GEM_REPO="$1"; source "$1/launch_scripts/common.sh"; gem_duration_minutes "$2"',
            "_",
            str(REPO),
            duration,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == minutes
