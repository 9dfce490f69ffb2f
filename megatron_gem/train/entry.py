"""Training entry: Megatron-LM's ``pretrain_gpt.py`` on ``megatron.training.pretrain``, with GEM.

    torchrun --nproc-per-node N -m megatron_gem.train [Megatron-LM flags]
        [--loss gem --gem-beta 0.7]

Every Megatron-LM flag works (it is Megatron's parser, loop, checkpointing and logging); the
additions are ``--loss {ce,gem}``, ``--gem-beta``, ``--gem-h`` (``megatron_gem.train.arguments``).
Logged each ``--log-interval`` by Megatron (stdout, tensorboard): ``lm loss`` = cross-entropy
(comparable between CE and GEM runs), and with ``--loss gem`` also ``gem loss`` (the optimised
loss) and ``entropy`` (mean token entropy of ``p = softmax(z)``). The GEM loss makes no host sync;
a label outside the vocabulary stops the run with its ValueError at once under Megatron's NaN check
(``reduce_token_losses``), else before the next log line (the ``negative-loss-logging`` patch).

Data: Megatron's GPT datasets from ``--data-path`` (``--mock-data`` for smoke tests); with
``--sft``, ``megatron_gem.data.sft.build_sft_datasets`` (prompt-masked, packed samples), read on
every pipeline stage (``get_sft_batch``): the local spec gets the block-diagonal causal mask,
Transformer Engine THD ``packed_seq_params`` (the dataset's ``cu_seqlens``, no dense mask; with
``--context-parallel-size`` each CP rank keeps its chunks: ``megatron_gem.train.context_parallel``).

``--cpu`` runs the same command on CPUs with gloo (``megatron_gem.megatron.cpu``); without CUDA
and without ``--cpu`` the entry stops at once with one line saying so.

Module import stays light (no Megatron import at module level): Megatron's checkpoint writer
starts a helper process that re-imports the entry module.
"""

from __future__ import annotations

import sys
import time
from functools import partial

_PROGRAM_START_TIME = time.time()

__all__ = ["main", "forward_step", "loss_func"]


def loss_func(loss_mask, output_tensor, model=None):
    """``megatron_gem.megatron.loss.reduce_token_losses`` with this run's flags."""
    from megatron.training import get_args

    from megatron_gem.megatron.loss import reduce_token_losses

    args = get_args()
    return reduce_token_losses(
        loss_mask,
        output_tensor,
        model=model,
        loss=getattr(args, "loss", "ce"),
        check_nan=args.check_for_nan_in_loss_and_grad,
        check_spiky=args.check_for_spiky_loss,
    )


def forward_step(data_iterator, model):
    """Megatron forward step: batch -> per-token losses ``[b, s]`` and the loss function."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_args, get_timers

    from megatron_gem.train.batches import get_batch, get_sft_batch

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    packed_seq_params = None
    if get_args().sft:
        tokens, labels, loss_mask, attention_mask, position_ids, packed_seq_params = get_sft_batch(
            data_iterator, vp_stage
        )
    else:
        tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    timers("batch-generator").stop()
    extra = {} if packed_seq_params is None else {"packed_seq_params": packed_seq_params}
    output_tensor = model(
        tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask, **extra
    )
    return output_tensor, partial(loss_func, loss_mask, model=model)


def main(argv=None) -> None:
    """``python -m megatron_gem.train`` / ``megatron-gem-train``."""
    main_entry_time = time.time()
    from megatron_gem.train.arguments import (
        PROG,
        adapt_argv_to_host,
        parse_entry_args,
        print_entry_help,
        take_cpu_flag,
    )

    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print_entry_help()
        return
    argv, cpu = take_cpu_flag(argv)  # exits with one line without CUDA and without --cpu
    if cpu:
        from megatron_gem.megatron import cpu as cpu_mode

        cpu_mode.enable_cpu_mode()

    from megatron.core.enums import ModelType
    from megatron.training import pretrain, set_startup_timestamps
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_gem.megatron import patches
    from megatron_gem.megatron.model import gem_model_config_from_args
    from megatron_gem.train.checks import InputError, check_inputs
    from megatron_gem.train.datasets import train_valid_test_datasets_provider

    patches.prebuilt_dataset_helpers()
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=main_entry_time)
    args = parse_entry_args(adapt_argv_to_host(argv))
    if args.loss == "gem":
        patches.negative_loss_logging()
    try:
        check_inputs(
            args
        )  # before anything starts: a bad path or file is one line, not a trace or a hang
        if args.rank == 0:
            loss = (
                f"GEM (beta={args.gem_beta}, h={args.gem_h})"
                if args.loss == "gem"
                else "cross-entropy"
            )
            print(f"> megatron_gem: loss = {loss}", flush=True)
        cfg = pretrain_cfg_container_from_args(args, gem_model_config_from_args(args))
        pretrain(
            cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step
        )
    except InputError as err:
        if args.rank == 0:  # every rank stops; one prints
            print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    _destroy_process_groups()


def _destroy_process_groups() -> None:
    """Tear the process groups down before the interpreter does.

    Megatron's ``pretrain`` returns with its groups alive; left to interpreter shutdown, gloo's
    worker threads are destroyed while joinable and now and then abort a rank that finished
    cleanly ("terminate called without an active exception", SIGABRT, rc 1 from torchrun).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks
        dist.destroy_process_group()
