"""End-to-end runs of ``python -m megatron_gem.train`` on CPU (gloo), as subprocesses.

Five launches, shared by the checks (module-scoped fixtures):

* ``ce``: --loss ce, TP=2, 10 iterations;
* ``gem1``: --loss gem --gem-beta 1.0 --gem-h linear, TP=2, 10 iterations, saves at 5 and 10;
* ``resumed``: ``gem1`` reloaded at iteration 5 and continued to 10;
* ``pp``: --loss gem (beta 0.7), TP=2 x PP=2, 10 iterations;
* ``sft``: --finetune from ``gem1``'s checkpoint, then SFT with GEM (beta 0.7), TP=2, 12 iterations.

The model is a tiny Llama-style GPT: RoPE, SwiGLU, RMSNorm, GQA (4 heads, 2 groups), no bias,
untied embeddings, dropout on (Megatron's defaults), fp32.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import parse_megatron_log, run_train

TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --ffn-hidden-size 128 --seq-length 32 --max-position-embeddings 32 "
    "--position-embedding-type rope --swiglu --normalization RMSNorm --disable-bias-linear "
    "--untie-embeddings-and-output-weights --micro-batch-size 2 --global-batch-size 4 "
    "--lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 2 --seed 1234 "
    "--log-interval 1 --eval-iters 1 --eval-interval 1000 --num-workers 0"
).split()
# Pre-training: mock data; vocab 250 and the SFT tokenizer's 128 both pad to 256 at TP=2.
PRETRAIN = (
    TINY + "--mock-data --split 98,1,1 --tokenizer-type NullTokenizer --vocab-size 250".split()
)
TP2 = ["--tensor-model-parallel-size", "2"]
ITERS = 10


@pytest.fixture(scope="module")
def ce_log():
    return parse_megatron_log(
        run_train(2, PRETRAIN + TP2 + ["--train-iters", str(ITERS), "--loss", "ce"])
    )


@pytest.fixture(scope="module")
def gem1(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("gem1") / "ckpt"
    # --ckpt-format torch: one file per rank, so the test can compare ranks' tensors
    out = run_train(
        2,
        PRETRAIN
        + TP2
        + [
            "--train-iters",
            str(ITERS),
            "--loss",
            "gem",
            "--gem-beta",
            "1.0",
            "--gem-h",
            "linear",
            "--save",
            str(ckpt),
            "--save-interval",
            "5",
            "--ckpt-format",
            "torch",
        ],
    )
    return parse_megatron_log(out), ckpt


@pytest.fixture(scope="module")
def resumed_log(gem1):
    _, ckpt = gem1
    out = run_train(
        2,
        PRETRAIN
        + TP2
        + [
            "--train-iters",
            str(ITERS),
            "--loss",
            "gem",
            "--gem-beta",
            "1.0",
            "--gem-h",
            "linear",
            "--load",
            str(ckpt),
            "--ckpt-step",
            "5",
            "--ckpt-format",
            "torch",
        ],
    )
    assert "successfully loaded checkpoint" in out and "at iteration 5" in out
    return parse_megatron_log(out)


@pytest.fixture(scope="module")
def pp_log():
    return parse_megatron_log(
        run_train(
            4,
            PRETRAIN
            + TP2
            + [
                "--pipeline-model-parallel-size",
                "2",
                "--train-iters",
                str(ITERS),
                "--loss",
                "gem",
            ],
            timeout=480,
        )
    )


def _write_chat(path, n=64, seed=0):
    """Question/answer chats whose answer is a fixed function of the question."""
    rng = random.Random(seed)
    things = ["apple", "sky", "grass", "sun", "night", "snow", "carrot", "grape"]
    colors = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
    chats = []
    for _ in range(n):
        i = rng.randrange(len(things))
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": f"What color is the {things[i]}?"},
                    {"role": "assistant", "content": f"The {things[i]} is {colors[i]}."},
                ]
            }
        )
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    return chats


@pytest.fixture(scope="module")
def sft_run(gem1, tmp_path_factory):
    from megatron_gem.data.sft import prepare_sft_data
    from megatron_gem.data.tokenizer import build_tokenizer, train_sentencepiece

    _, ckpt = gem1
    d = tmp_path_factory.mktemp("sft")
    chats = _write_chat(d / "chat.jsonl")
    text = [m["content"] for c in chats for m in c["messages"]] * 4
    model = train_sentencepiece(text, d / "tok", 128)
    tok = build_tokenizer("SentencePieceTokenizer", model)
    prepare_sft_data(str(d / "chat.jsonl"), str(d / "chat"), tok, 32)
    out = run_train(
        2,
        TINY
        + TP2
        + [
            "--split",
            "80,10,10",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            model,
            "--sft",
            "--data-path",
            str(d / "chat"),
            "--train-iters",
            "12",
            "--loss",
            "gem",
            "--finetune",
            "--load",
            str(ckpt),
            "--ckpt-format",
            "torch",
        ],
    )
    return out, parse_megatron_log(out)


def _series(log, key):
    return [log["train"][i][key] for i in sorted(log["train"])]


def _assert_gem_run(log, iters):
    assert sorted(log["train"]) == list(range(1, iters + 1))
    for i, row in log["train"].items():
        for key in ("lm loss", "gem loss", "entropy"):
            assert key in row, f"iteration {i}: {key!r} missing from the log line {row}"
        assert row["entropy"] > 0
    lm, gem = _series(log, "lm loss"), _series(log, "gem loss")
    # loss falls: the last 3 iterations against the first 3
    assert sum(lm[-3:]) < sum(lm[:3]) - 0.3, lm
    assert sum(gem[-3:]) < sum(gem[:3]) - 0.1, gem
    for split in ("validation", "test"):
        assert {"lm loss", "gem loss", "entropy"} <= set(log[split][iters])


# --------------------------------------------------------------------------------------- checks
def test_gem_beta1_linear_lm_loss_equals_ce_run(ce_log, gem1):
    gem_log, _ = gem1
    assert sorted(ce_log["train"]) == sorted(gem_log["train"]) == list(range(1, ITERS + 1))
    for i in range(1, ITERS + 1):
        ce, gem = ce_log["train"][i], gem_log["train"][i]
        assert abs(ce["lm loss"] - gem["lm loss"]) <= 1e-5, (i, ce, gem)
        assert "gem loss" not in ce and "entropy" not in ce
        # at beta = 1 (linear) per token GEM = E_p[z] - z_y = CE - H(p): an independent identity
        assert abs(gem["gem loss"] - (gem["lm loss"] - gem["entropy"])) <= 2e-5, (i, gem)
    assert _series(ce_log, "lm loss")[-1] < _series(ce_log, "lm loss")[0] - 0.3


@pytest.fixture(scope="module")
def triton_log():
    """The GEM beta=1 run with the Triton kernels (Triton's CPU interpreter without CUDA)."""
    argv = ["--train-iters", str(ITERS), "--loss", "gem", "--gem-beta", "1.0"]
    out = run_train(
        2, PRETRAIN + TP2 + argv + ["--gem-impl", "triton"], env={"TRITON_INTERPRET": "1"}
    )
    return parse_megatron_log(out)


def test_triton_kernels_train_as_the_torch_op_and_ce(ce_log, gem1, triton_log):
    """In the real loop at TP=2 the kernels' run equals the torch op's and, at beta = 1,
    cross-entropy's: the same lm loss per iteration (the gradient drives every later step)."""
    torch_log, _ = gem1
    assert sorted(triton_log["train"]) == list(range(1, ITERS + 1))
    for i in range(1, ITERS + 1):
        tri, ref, ce = triton_log["train"][i], torch_log["train"][i], ce_log["train"][i]
        for key in ("lm loss", "gem loss", "entropy"):
            assert abs(tri[key] - ref[key]) <= 1e-5, (i, key, tri, ref)
        assert abs(tri["lm loss"] - ce["lm loss"]) <= 1e-5, (i, tri, ce)


def test_resume_reproduces_uninterrupted_run(gem1, resumed_log):
    full, _ = gem1
    assert sorted(resumed_log["train"]) == list(range(6, ITERS + 1))
    for i in (6, 8, 9, 10):
        for key in ("lm loss", "gem loss", "entropy", "grad norm"):
            assert resumed_log["train"][i][key] == full["train"][i][key], (
                i,
                key,
                resumed_log["train"][i],
                full["train"][i],
            )
    # Megatron logs the first iteration of a run without resetting its running sums, so the
    # next line (here 7) shows the mean of 6 and 7 (as line 2 of the uninterrupted run does).
    seven = (full["train"][6]["lm loss"] + full["train"][7]["lm loss"]) / 2
    assert resumed_log["train"][7]["lm loss"] == pytest.approx(seven, abs=2e-6)
    for split in ("validation", "test"):
        assert resumed_log[split][ITERS] == full[split][ITERS]


def test_tp_replicated_weights_equal_and_shards_distinct(gem1):
    _, ckpt = gem1
    for it in ("iter_0000005", "iter_0000010"):
        ranks = [
            torch.load(
                ckpt / it / f"mp_rank_0{r}" / "model_optim_rng.pt",
                map_location="cpu",
                weights_only=False,
            )
            for r in (0, 1)
        ]
        m0, m1 = ranks[0]["model"], ranks[1]["model"]
        assert m0.keys() == m1.keys()
        replicated = [k for k in m0 if "layernorm" in k]
        sharded = [k for k in m0 if "layernorm" not in k and not k.endswith("_extra_state")]
        assert len(replicated) == 5 and len(sharded) == 10, sorted(m0)
        for k in replicated:
            assert torch.equal(m0[k], m1[k]), f"{it}: TP-replicated {k} differs across TP ranks"
        for k in sharded:
            # Megatron draws each rank's shard from its own tracker seed; one shared stream
            # (the CPU RNG bug) would make them identical.
            assert m0[k].shape == m1[k].shape and not torch.equal(m0[k], m1[k]), (
                f"{it}: shards of {k} equal"
            )
        rng0, rng1 = ranks[0]["rng_state"][0], ranks[1]["rng_state"][0]
        t0, t1 = rng0["rng_tracker_states"], rng1["rng_tracker_states"]
        assert not torch.equal(t0["model-parallel-rng"], t1["model-parallel-rng"])
        assert torch.equal(t0["data-parallel-rng"], t1["data-parallel-rng"])
        assert torch.equal(rng0["torch_rng_state"], rng1["torch_rng_state"])


def test_gem_tp2_pp2_trains_and_logs_gem_ce_entropy(pp_log):
    _assert_gem_run(pp_log, ITERS)


def test_finetune_from_pretraining_checkpoint_then_sft_with_gem(sft_run, gem1):
    out, log = sft_run
    _, ckpt = gem1
    # --finetune: the pre-training weights load, the iteration count restarts
    assert f"successfully loaded checkpoint from {ckpt}" in out and "at iteration 0" in out
    assert "loss = GEM (beta=0.7, h=linear)" in out
    _assert_gem_run(log, 12)
