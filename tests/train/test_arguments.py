"""Arguments of the training entry: GEM flags, invalid combinations, parse_args without init."""

from __future__ import annotations

import pytest
import torch

from megatron_gem.train.arguments import adapt_argv_to_host, parse_args

BASE = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 --train-iters 5 "
    "--lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 100 --eval-interval 5"
).split()


@pytest.fixture(autouse=True)
def _tp_env(monkeypatch):
    # Megatron asserts this for TP > 1 (set by launch scripts on GPU clusters)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def test_defaults_and_gem_values():
    ce = parse_args(BASE)
    assert ce.loss == "ce" and ce.gem_beta is None and ce.gem_h is None
    gem = parse_args(BASE + ["--loss", "gem"])
    assert (gem.loss, gem.gem_beta, gem.gem_h) == ("gem", 0.7, "linear")
    gem = parse_args(BASE + ["--loss", "gem", "--gem-beta", "1", "--gem-h", "logsigmoid"])
    assert (gem.gem_beta, gem.gem_h) == (1.0, "logsigmoid")
    assert parse_args(BASE + ["--loss", "gem", "--gem-beta=0.05"]).gem_beta == 0.05
    assert ce.gem_impl is None and gem.gem_impl == "auto"
    assert parse_args(BASE + ["--loss", "gem", "--gem-impl", "torch"]).gem_impl == "torch"
    from megatron_gem.megatron.model import gem_model_config_from_args

    cfg = gem_model_config_from_args(parse_args(BASE + ["--loss", "gem", "--gem-impl", "triton"]))
    assert cfg.gem.impl == "triton"  # the flag reaches the model's GemConfig
    assert cfg.gem_linear_fusion is False and ce.gem_linear_fusion is False
    fused = parse_args(BASE + ["--loss", "gem", "--gem-linear-fusion"])
    assert gem_model_config_from_args(fused).gem_linear_fusion is True  # reaches the builder


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss", "gem", "--gem-beta", "0"], "argument --gem-beta: must be in (0, 1]"),
        (["--loss", "gem", "--gem-beta", "1.5"], "argument --gem-beta: must be in (0, 1]"),
        (["--loss", "gem", "--gem-beta", "nan"], "argument --gem-beta: must be in (0, 1]"),
        (["--loss", "gem", "--gem-beta", "x"], "argument --gem-beta: must be a number"),
        (["--loss", "gem", "--gem-h", "tanh"], "argument --gem-h: invalid choice: 'tanh'"),
        (["--loss", "gem", "--gem-impl", "cuda"], "argument --gem-impl: invalid choice: 'cuda'"),
        (["--loss", "mse"], "argument --loss: invalid choice: 'mse'"),
        (["--gem-beta", "0.5"], "argument --gem-beta: only applies with --loss gem"),
        (["--loss", "ce", "--gem-h", "linear"], "argument --gem-h: only applies with --loss gem"),
        (["--gem-impl", "torch"], "argument --gem-impl: only applies with --loss gem"),
        (
            ["--loss", "ce", "--gem-linear-fusion"],
            "argument --gem-linear-fusion: only applies with --loss gem (got --loss ce)",
        ),
        (
            ["--loss", "gem", "--gem-linear-fusion", "--use-mup"],
            "argument --use-mup: not supported with --gem-linear-fusion",
        ),
        (
            ["--loss", "gem", "--gem-linear-fusion", "--defer-embedding-wgrad-compute"],
            "argument --defer-embedding-wgrad-compute: not supported with --gem-linear-fusion",
        ),
        (["--loss", "gem", "--cross-entropy-loss-fusion"], "argument --cross-entropy-loss-fusion"),
        (["--loss", "gem", "--fp16-lm-cross-entropy"], "argument --fp16-lm-cross-entropy"),
        (
            ["--sft", "--no-create-attention-mask-in-dataloader"],
            "--sft needs the dataloader's attention mask",
        ),
    ],
)
def test_invalid_arguments_exit_like_argparse(extra, message, capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(BASE + extra)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_eval_interval_is_an_argument_error(capsys):
    no_interval = BASE[:-2]
    assert BASE[-2:] == ["--eval-interval", "5"]
    with pytest.raises(SystemExit):
        parse_args(no_interval)
    assert "argument --eval-interval: required with --eval-iters 100" in capsys.readouterr().err
    no_eval = parse_args(no_interval + ["--eval-iters", "0"])
    assert (
        no_eval.eval_iters == 0 and no_eval.eval_interval == no_eval.train_iters
    )  # Megatron divides by it


def test_world_size_without_distributed_init():
    args = parse_args(
        BASE + "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2".split(),
        world_size=8,
    )
    assert (args.world_size, args.data_parallel_size) == (8, 2)
    assert not torch.distributed.is_initialized()
    with pytest.raises(AssertionError, match="not divisible"):
        parse_args(BASE + ["--tensor-model-parallel-size", "3"], world_size=4)


def test_host_adaptation_only_fills_unset_flags(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("host without CUDA expected")
    adapted = adapt_argv_to_host(["--transformer-impl", "transformer_engine"])
    assert (
        adapted[:2] == ["--transformer-impl", "transformer_engine"]
        and adapted.count("--transformer-impl") == 1
    )
    assert {
        "--no-rope-fusion",
        "--distributed-backend",
        "gloo",
        "--no-gradient-accumulation-fusion",
    } <= set(adapted)
    assert parse_args(BASE).transformer_impl == "local"
    # a CUDA node without Apex or TE has no fused weight-gradient kernel either
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: True)
        on_bare_gpu = adapt_argv_to_host([])
    assert "--no-gradient-accumulation-fusion" in on_bare_gpu and "gloo" not in on_bare_gpu
    as_written = parse_args(BASE, adapt_to_host=False)
    assert (
        as_written.transformer_impl == "transformer_engine"
        and as_written.distributed_backend == "nccl"
    )


def test_model_config_keeps_the_rope_scaling_factor():
    # megatron-core 0.19.2's gpt_config_from_args drops it (Llama 3.2 uses 32, the default is 8)
    from megatron_gem.megatron.model import gem_model_config_from_args

    args = parse_args(
        BASE
        + ["--position-embedding-type", "rope", "--use-rope-scaling", "--rope-scaling-factor", "32"]
    )
    cfg = gem_model_config_from_args(args)
    assert cfg.rope_scaling and cfg.rope_scaling_factor == 32.0


def test_cpu_mode_is_opt_in(monkeypatch):
    """Without CUDA and without --cpu the entry stops at once with one line; --cpu is taken out
    of the arguments Megatron parses, and refused where CUDA is available."""
    import subprocess
    import sys

    import torch

    from conftest import REPO
    from megatron_gem.train.arguments import take_cpu_flag

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_gem.train", "--num-layers", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "megatron-gem-train: error: CUDA is not available on this machine; pass --cpu to train on "
        "CPUs (gloo, for tests and smoke runs)"
    ]
    assert take_cpu_flag(["--num-layers", "2", "--cpu"]) == (["--num-layers", "2"], True)
    assert (
        parse_args(BASE + ["--cpu"]).cpu is True
    )  # the launch dry run parses a CPU script's flags
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert take_cpu_flag(["--num-layers", "2"]) == (["--num-layers", "2"], False)
    with pytest.raises(SystemExit):
        take_cpu_flag(["--cpu"])


def test_entry_help_lists_megatron_and_gem_flags(capsys):
    """Megatron 0.19.2's own --help raises on a '%' in one help text; the entry's does not."""
    from megatron_gem.train.entry import main

    main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: megatron-gem-train")
    for flag in (
        "--gem-beta",
        "--gem-h",
        "--loss",
        "--cpu",
        "--tensor-model-parallel-size",
        "--moe-paged-stash-buffer-size-factor-cuda",
    ):
        assert flag in out
    assert "10%)" in out  # the escaped help text reads as written
