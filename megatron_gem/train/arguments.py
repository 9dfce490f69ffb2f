"""Command-line arguments of the training entry: Megatron-LM's own, plus the GEM loss.

``add_gem_arguments(parser)`` is an ``extra_args_provider`` for Megatron's argument parser:

* ``--loss {ce,gem}`` (default ``ce``): Megatron's cross-entropy, or GEM;
* ``--gem-beta B`` (default ``DEFAULT_BETA``, 0.7), the temperature of GEM's
  ``q = softmax(z / B)``, in (0, 1];
* ``--gem-h {linear,logsigmoid}`` (default ``linear``);
* ``--gem-impl {auto,torch,triton}`` (default ``auto``: the Triton kernels on CUDA, torch on CPU);
* ``--gem-linear-fusion``: the main head's output layer and GEM in one op, without the logits.

``parse_args(argv)`` returns Megatron's fully parsed and validated arguments for an argv
without initialising torch.distributed, building a tokenizer or touching any device: the
launch-script dry-run uses it to check cluster flags on a laptop.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys

from megatron_gem.megatron import patches
from megatron_gem.ops.config import DEFAULT_BETA, DEFAULT_H, GEM_H_CHOICES, IMPL_CHOICES, check_beta

__all__ = [
    "add_gem_arguments",
    "parse_entry_args",
    "take_cpu_flag",
    "validate_gem_args",
    "adapt_argv_to_host",
    "parse_args",
    "LOSS_CHOICES",
    "DEFAULT_GEM_BETA",
    "DEFAULT_GEM_H",
]

LOSS_CHOICES = ("ce", "gem")
DEFAULT_GEM_BETA = DEFAULT_BETA  # one definition: megatron_gem.ops.config
DEFAULT_GEM_H = DEFAULT_H
PROG = "megatron-gem-train"


def _gem_beta(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    try:
        return check_beta(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}") from None


def add_gem_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--loss``, ``--gem-beta``, ``--gem-h`` to Megatron's parser (returns it)."""
    group = parser.add_argument_group(title="GEM loss (megatron-gem)")
    group.add_argument(
        "--loss",
        choices=LOSS_CHOICES,
        default="ce",
        help="Token loss: 'ce' = Megatron's cross-entropy (default), 'gem' = the GEM loss "
        "(Li et al., ICLR 2025). 'lm loss' in the logs is the cross-entropy either way.",
    )
    # None = not given, so that --gem-* with --loss ce is caught instead of silently ignored.
    group.add_argument(
        "--gem-beta",
        type=_gem_beta,
        default=None,
        metavar="BETA",
        help=f"GEM temperature beta in (0, 1] (default {DEFAULT_GEM_BETA}); needs --loss gem. "
        "beta=1 with --gem-h linear has exactly the cross-entropy gradient.",
    )
    group.add_argument(
        "--gem-h",
        choices=GEM_H_CHOICES,
        default=None,
        help=f"GEM weighting h (default {DEFAULT_GEM_H}); needs --loss gem. 'logsigmoid' weights "
        "each term by sigmoid(0.01 (z_v - z_y)) as in the authors' code.",
    )
    group.add_argument(
        "--gem-impl",
        choices=IMPL_CHOICES,
        default=None,
        help="GEM implementation (default auto): 'triton' = the fused kernels (one read of the "
        "logits forward, one read and one write backward), 'torch' = chunked eager torch, "
        "'auto' = Triton on CUDA where it imports, torch otherwise; needs --loss gem.",
    )
    group.add_argument(
        "--gem-linear-fusion",
        action="store_true",
        help="Fuse the main head's output layer with GEM (vocab_parallel_linear_gem_loss): the "
        "[s, b, V/tp] logits are never materialised, at the price of one extra output-layer "
        "GEMM (the backward recomputes them). For large vocabularies and long sequences; the "
        "MTP depths stay unfused; needs --loss gem.",
    )
    # Taken out of argv before Megatron parses it (take_cpu_flag): listed here for --help and
    # so that the launch dry run accepts the flags a CPU script passes.
    parser.add_argument_group(title="CPU mode (megatron-gem)").add_argument(
        "--cpu",
        action="store_true",
        help="Train on CPUs with gloo (tests, smoke runs; megatron_gem.megatron.cpu). Required "
        "without CUDA; refused where CUDA is available.",
    )
    return parser


def _error(message: str):
    """Exit like argparse does for a bad argument (status 2, message on stderr)."""
    print(
        f"usage: {PROG} [Megatron-LM arguments] [--loss {{ce,gem}}] [--gem-beta BETA] [--gem-h H]",
        file=sys.stderr,
    )
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def validate_gem_args(args: argparse.Namespace) -> argparse.Namespace:
    """Reject invalid combinations with an argparse-style error; fill the GEM defaults."""
    if args.loss == "ce":
        given = [
            f
            for f, v in (
                ("--gem-beta", args.gem_beta),
                ("--gem-h", args.gem_h),
                ("--gem-impl", args.gem_impl),
                ("--gem-linear-fusion", getattr(args, "gem_linear_fusion", False) or None),
            )
            if v is not None
        ]
        if given:
            _error(f"argument {', '.join(given)}: only applies with --loss gem (got --loss ce)")
    else:
        if getattr(args, "fp16_lm_cross_entropy", False):
            _error(
                "argument --fp16-lm-cross-entropy: selects Megatron's fp16 cross-entropy, "
                "which --loss gem replaces (GEM reduces in fp32); drop one of them"
            )
        if getattr(args, "cross_entropy_loss_fusion", False):
            _error(
                "argument --cross-entropy-loss-fusion: selects Megatron's fused cross-entropy, "
                "which --loss gem replaces; drop one of them"
            )
        if getattr(args, "gem_linear_fusion", False):
            validate_linear_fusion_args(args)
        if args.gem_beta is None:
            args.gem_beta = DEFAULT_GEM_BETA
        if args.gem_h is None:
            args.gem_h = DEFAULT_GEM_H
        if args.gem_impl is None:
            args.gem_impl = "auto"
    # Megatron 0.19 has no --eval-interval default but evaluates by default (--eval-iters 100),
    # and sizes its validation set with train_iters // eval_interval whenever it trains, so a
    # missing interval fails deep in the data setup (int // None), even with --eval-iters 0.
    if getattr(args, "eval_interval", 0) is None and not getattr(args, "skip_train", False):
        if getattr(args, "eval_iters", 0):
            _error(
                f"argument --eval-interval: required with --eval-iters {args.eval_iters} "
                "(Megatron's default); give --eval-interval N, or --eval-iters 0 for no evaluation"
            )
        args.eval_interval = args.train_iters or 10**9  # --eval-iters 0: never evaluates
    if getattr(args, "sft", False) and not getattr(
        args, "create_attention_mask_in_dataloader", True
    ):
        _error(
            "argument --no-create-attention-mask-in-dataloader: --sft needs the dataloader's "
            "attention mask (it keeps packed samples from attending to each other)"
        )
    validate_sft_packing_args(args)
    return args


def validate_linear_fusion_args(args: argparse.Namespace) -> None:
    """``--gem-linear-fusion`` beside flags the fused output layer cannot honour."""
    if getattr(args, "defer_embedding_wgrad_compute", False):
        _error(
            "argument --defer-embedding-wgrad-compute: not supported with --gem-linear-fusion "
            "(the fused op computes the output weight's gradient in its own backward); drop "
            "one of them"
        )
    if getattr(args, "use_mup", False):
        _error(
            "argument --use-mup: not supported with --gem-linear-fusion (the fused op applies "
            "no MuP output multiplier to the logits); drop one of them"
        )


def validate_sft_packing_args(args: argparse.Namespace) -> None:
    """Packed ``--sft`` limits: context parallelism and micro-batch 1 with Transformer Engine.

    With TE the packing reaches attention as THD ``cu_seqlens`` of one packed sequence (the
    entry's ``get_sft_batch``), split per sub-sequence over CP ranks
    (``megatron_gem.train.context_parallel``); the local spec's dense mask is not split.
    """
    if not getattr(args, "sft", False):
        return
    cp = getattr(args, "context_parallel_size", 1) or 1
    if cp > 1 and getattr(args, "transformer_impl", None) != "transformer_engine":
        _error(
            f"argument --context-parallel-size: packed --sft with context parallelism (got {cp}) "
            "needs --transformer-impl transformer_engine (THD); use --context-parallel-size 1"
        )
    mbs = getattr(args, "micro_batch_size", 1)
    if getattr(args, "transformer_impl", None) == "transformer_engine" and mbs != 1:
        _error(
            f"argument --micro-batch-size: packed --sft with --transformer-impl transformer_engine "
            "passes each packed sequence as THD (cu_seqlens) and needs --micro-batch-size 1, "
            f"got {mbs}; raise --seq-length or --global-batch-size instead"
        )


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports (checked without importing it: that can raise)."""
    return importlib.util.find_spec("transformer_engine") is not None


def adapt_argv_to_host(argv: list[str]) -> list[str]:
    """Host-dependent defaults a user did not set explicitly.

    Without CUDA or without Transformer Engine, Megatron's defaults ``--transformer-impl
    transformer_engine`` and RoPE fusion cannot run: use the local implementation and unfused
    RoPE (and non-persistent norms without Apex). Without CUDA, use the gloo backend; without
    Apex's or TE's fused weight-gradient kernel (a GPU node with neither, too), no
    gradient-accumulation fusion. Without CUDA or the fused softmax extension, the unfused
    attention softmax (so ``--bf16``/``--fp16`` run). Explicit flags win where Megatron has a
    flag for both choices.
    """
    import torch

    argv = list(argv)
    has_cuda = torch.cuda.is_available()
    has_te = has_cuda and transformer_engine_available()
    if not _has_flag(argv, "--transformer-impl") and not has_te:
        argv += ["--transformer-impl", "local"]
    if not has_te and not _has_flag(argv, "--no-rope-fusion"):
        argv += ["--no-rope-fusion"]  # the fused RoPE kernel is Transformer Engine's
    if (
        not has_te
        and importlib.util.find_spec("fused_layer_norm_cuda") is None
        and not _has_flag(argv, "--no-persist-layer-norm")
    ):
        argv += ["--no-persist-layer-norm"]  # persistent LayerNorm needs Apex or TE
    if not has_cuda and not _has_flag(argv, "--distributed-backend"):
        argv += ["--distributed-backend", "gloo"]
    fused_wgrad = has_te or importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    if not fused_wgrad and not _has_flag(argv, "--no-gradient-accumulation-fusion"):
        argv += ["--no-gradient-accumulation-fusion"]  # a fused CUDA kernel of Apex or TE
    if (
        not has_cuda or importlib.util.find_spec("scaled_masked_softmax_cuda") is None
    ) and not _has_flag(argv, "--no-masked-softmax-fusion"):
        # fp16/bf16 attention softmax would call this CUDA extension (FusedScaleMaskSoftmax);
        # unfused it is torch's softmax. fp32 never takes the fused path: unchanged.
        argv += ["--no-masked-softmax-fusion"]
    return argv


def take_cpu_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``(argv without --cpu, whether --cpu was given)``. CPU mode is opt-in: without CUDA and
    without ``--cpu`` this exits at once with one line (a GPU job on a node whose GPUs are not
    visible must fail, not train on CPUs); ``--cpu`` where CUDA is available is refused too
    (CPU mode never runs beside CUDA)."""
    import torch

    cpu = "--cpu" in argv
    argv = [a for a in argv if a != "--cpu"]
    if cpu and torch.cuda.is_available():
        _error("argument --cpu: CUDA is available here; drop --cpu to train on the GPUs")
    if not cpu and not torch.cuda.is_available():
        print(
            f"{PROG}: error: CUDA is not available on this machine; pass --cpu to train on "
            "CPUs (gloo, for tests and smoke runs)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return argv, cpu


def print_entry_help() -> None:
    """The entry's ``--help``: Megatron's arguments and the GEM ones. Megatron 0.19.2's own
    ``--help`` raises (a bare ``%`` in the help of
    ``--moe-paged-stash-buffer-size-factor-cuda``), so the parser is built here and such texts
    are escaped in this copy only."""
    from megatron.training.arguments import add_megatron_arguments

    parser = add_gem_arguments(
        add_megatron_arguments(
            argparse.ArgumentParser(
                prog=PROG,
                description="Megatron-LM arguments, plus the GEM loss",
                allow_abbrev=False,
            )
        )
    )
    for action in parser._actions:
        if action.help and "%" in action.help:
            try:
                action.help % dict(vars(action), prog=PROG)
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")
    parser.print_help()


def parse_entry_args(argv: list[str]) -> argparse.Namespace:
    """The entry's arguments: Megatron's ``parse_and_validate_args`` (which reads ``sys.argv``)
    on ``argv``, plus the GEM arguments and their checks."""
    from megatron.training.arguments import parse_and_validate_args

    with _swapped_argv(argv):
        args = parse_and_validate_args(
            extra_args_provider=add_gem_arguments,
            args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        )
    return validate_gem_args(args)


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


@contextlib.contextmanager
def _swapped_argv(argv: list[str]):
    saved = sys.argv
    sys.argv = [saved[0] if saved else PROG] + list(argv)
    try:
        yield
    finally:
        sys.argv = saved


def parse_args(
    argv: list[str] | None = None,
    *,
    world_size: int | None = None,
    rank: int = 0,
    adapt_to_host: bool = True,
    device_arch: int = 9,
) -> argparse.Namespace:
    """Megatron's parsed + validated arguments for ``argv``, GEM arguments included.

    No torch.distributed, no tokenizer, no global state: safe to call many times in one
    process. ``world_size`` defaults to env ``WORLD_SIZE`` (else 1), as in Megatron.
    ``adapt_to_host=False`` validates the flags as written (e.g. a GPU cluster's script on a
    laptop); True applies the defaults ``megatron_gem.train`` applies on this machine.
    ``device_arch``: the GPU architecture major (9 = Hopper, 10 = Blackwell) Megatron's
    checks assume when this machine has no CUDA. ``--use-checkpoint-args`` is not resolved
    here (that needs the checkpoint). Megatron's own checks raise ``AssertionError``.
    """
    from megatron.training.arguments import parse_args as megatron_parse_args
    from megatron.training.arguments import validate_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if adapt_to_host:
        argv = adapt_argv_to_host(argv)
    with _swapped_argv(argv):
        args = megatron_parse_args(extra_args_provider=add_gem_arguments)
    if world_size is not None:
        args.world_size = int(world_size)
    args.rank = rank
    validate_gem_args(args)
    with patches.device_arch(device_arch):
        validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    return args
