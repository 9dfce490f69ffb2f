"""``--gem-linear-fusion`` in Megatron's real loop: TP 2 x PP 2 with sequence parallelism on CPU.

Two launches of ``python -m megatron_gem.train`` (4 gloo ranks each), the same tiny GPT with
tied embeddings (the last stage's output weight is its own copy, kept equal to the embedding
through Megatron's embedding group), 2 micro-batches per step, mock data; one run unfused, one
with the main head through the fused op. Megatron's logged ``lm loss``, ``gem loss``,
``entropy`` and ``grad norm`` agree over the 10 iterations (must-hold 2 of issue 14).
"""

from __future__ import annotations

import pytest

from conftest import parse_megatron_log, run_train

ARGV = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --ffn-hidden-size 128 --seq-length 32 --max-position-embeddings 32 "
    "--position-embedding-type rope --swiglu --normalization RMSNorm --disable-bias-linear "
    "--micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine "
    "--lr-warmup-iters 2 --seed 1234 --log-interval 1 --eval-iters 0 --num-workers 0 "
    "--mock-data --split 98,1,1 --tokenizer-type NullTokenizer --vocab-size 250 "
    "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel "
    "--train-iters 10 --loss gem --gem-beta 0.7"
).split()
FUSED_LOG_LINE = "megatron_gem: main head fused with the GEM loss"
ITERS = range(1, 11)


@pytest.fixture(scope="module")
def runs():
    unfused = run_train(4, ARGV)
    fused = run_train(4, ARGV + ["--gem-linear-fusion"])
    return (unfused, parse_megatron_log(unfused)), (fused, parse_megatron_log(fused))


def test_fused_head_runs_only_with_the_flag(runs):
    """The fused path announces itself once per model, on the last stage's two TP ranks."""
    (unfused, _), (fused, _) = runs
    assert FUSED_LOG_LINE not in unfused
    lines = [line for line in fused.splitlines() if FUSED_LOG_LINE in line]
    # the sequence-parallel shard of [32, 2, 64] is gathered; V 250 pads to 256: 128 per rank
    assert len(lines) == 2 and all(
        "hidden (32, 2, 64), output weight (128, 64)" in x for x in lines
    )


def test_lm_loss_with_and_without_fusion_agrees_over_10_iterations(runs):
    (_, ref), (_, fused) = runs
    assert sorted(ref["train"]) == sorted(fused["train"]) == list(ITERS)
    lm = [ref["train"][i]["lm loss"] for i in ITERS]
    assert len(set(lm)) == len(lm)  # it trains: the comparison is over 10 different steps
    for i in ITERS:
        a, b = ref["train"][i], fused["train"][i]
        assert b["lm loss"] == pytest.approx(a["lm loss"], rel=1e-5, abs=0), i
        assert b["gem loss"] == pytest.approx(a["gem loss"], rel=1e-5, abs=1e-6), i
        assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-5, abs=0), i
        assert b["grad norm"] == pytest.approx(a["grad norm"], rel=1e-3, abs=0), i  # 4 digits
