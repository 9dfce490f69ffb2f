"""Training entry: Megatron-LM's ``pretrain_gpt.py`` on ``megatron.training.pretrain``, with GEM.

    torchrun --nproc-per-node N -m megatron_gem.train [Megatron-LM flags] [--loss gem --gem-beta 0.7]

Every Megatron-LM flag works (it is Megatron's parser, loop, checkpointing and logging); the
additions are ``--loss {ce,gem}``, ``--gem-beta``, ``--gem-h`` (``megatron_gem.train.arguments``).
Logged each ``--log-interval`` by Megatron (stdout, tensorboard): ``lm loss`` = cross-entropy
(comparable between CE and GEM runs), and with ``--loss gem`` also ``gem loss`` (the optimised
loss) and ``entropy`` (mean token entropy of ``p = softmax(z)``).

Data: Megatron's GPT datasets from ``--data-path`` (``--mock-data`` for smoke tests); with
``--sft``, ``megatron_gem.data.sft.build_sft_datasets`` (prompt-masked, packed samples), read on
every pipeline stage (``get_sft_batch``): the local spec gets the block-diagonal causal mask,
Transformer Engine THD ``packed_seq_params`` (``cu_seqlens`` from the restarts of position_ids).

Without CUDA the same command runs on CPUs with gloo (``megatron_gem.megatron.cpu``).

Module import stays light (no Megatron import at module level): Megatron's checkpoint writer
starts a helper process that re-imports the entry module.
"""

from __future__ import annotations

import sys
import time
from functools import partial

_PROGRAM_START_TIME = time.time()

__all__ = [
    "main",
    "parse_args",
    "forward_step",
    "loss_func",
    "get_batch",
    "get_sft_batch",
    "cu_seqlens_from_position_ids",
    "packed_seq_params_from_cu_seqlens",
    "train_valid_test_datasets_provider",
    "fix_dataset_helpers_compile",
]

SPIKY_LOSS_FACTOR = 10  # as upstream: a loss 10x the largest seen so far is "spiky"

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def parse_args(argv=None, **kwargs):
    """Megatron's validated args for ``argv`` without initialising anything (see arguments.py)."""
    from megatron_gem.train.arguments import parse_args as _parse_args

    return _parse_args(argv, **kwargs)


def fix_dataset_helpers_compile() -> None:
    """Skip Megatron's start-up ``make`` of the dataset helpers when the prebuilt one imports.

    ``initialize_megatron`` always runs ``make -C megatron/core/datasets`` on rank 0 and exits on
    failure; the PyPI wheel ships the compiled ``helpers_cpp`` but no Makefile, so a plain
    ``pip install`` fails there, on GPU hosts too. Source checkouts (no prebuilt helper) still
    compile as before.
    """
    import megatron.core.datasets.utils as dataset_utils

    original = getattr(dataset_utils.compile_helpers, "__wrapped_original__", dataset_utils.compile_helpers)

    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            return original()
        return None

    compile_helpers.__wrapped_original__ = original
    dataset_utils.compile_helpers = compile_helpers


def log_negative_losses() -> None:
    """Make Megatron's stdout iteration line show negative averages (e.g. ``gem loss``).

    ``training_log`` prints a loss only ``if avg >= 0.0`` (tensorboard/wandb get every value);
    the GEM loss ``E_q[z] - z_y`` is negative once the model fits. This wrapper keeps the same
    running averages over the same iterations and appends the negative ones to the same line.
    """
    import megatron.training.training as mtraining

    original = getattr(mtraining.training_log, "__wrapped_original__", mtraining.training_log)
    sums: dict = {}  # key -> running sum (a tensor: no host sync until a log line)
    state = {"count": 0}

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag,
                     skipped_iter, *args, **kwargs):
        from megatron.training import get_args

        if not skipped_iter:
            state["count"] += 1
            for key, value in loss_dict.items():
                value = value.detach().float() if hasattr(value, "detach") else float(value)
                sums[key] = sums.get(key, 0.0) + value
        log_interval = get_args().log_interval
        first = kwargs.get("is_first_iteration", False)
        extra = ""
        if iteration % log_interval == 0 or first:
            for key, total in sums.items():
                avg = float(total) / max(1, state["count"])
                if avg < 0.0:
                    extra += f" {key}: {avg:.6E} |"
            if not first:
                sums.clear()
                state["count"] = 0
        if not extra:
            return original(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                            report_memory_flag, skipped_iter, *args, **kwargs)
        print_rank_last = mtraining.print_rank_last

        def print_with_extra(message):
            if " iteration " in message and " consumed samples: " in message:
                at = message.find(" loss scale:")  # right after the losses Megatron printed
                message = message[:at] + extra + message[at:] if at >= 0 else message + extra
            print_rank_last(message)

        mtraining.print_rank_last = print_with_extra
        try:
            return original(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                            report_memory_flag, skipped_iter, *args, **kwargs)
        finally:
            mtraining.print_rank_last = print_rank_last

    training_log.__wrapped_original__ = original
    mtraining.training_log = training_log


# --------------------------------------------------------------------------- batches and loss
def _mtp_on_this_stage(args, vp_stage):
    """Whether this pipeline stage (virtual chunk) holds multi-token-prediction layers."""
    from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank

    return bool(args.mtp_num_layers) and mtp_on_this_rank(
        layout=getattr(args, "pipeline_model_parallel_layout", None),
        mtp_num_layers=args.mtp_num_layers, ignore_virtual=False, vp_stage=vp_stage,
    )


def _broadcast_over_tp(batch, args, *, tp_rank, mtp_here, first, last, thd, dense_mask):
    """Megatron's ``get_batch_on_this_tp_rank`` with this run's shapes and groups: tensor-parallel
    rank 0 sends its micro-batch (``dense_mask``: with the ``[b, 1, s, s]`` mask; ``thd``: with
    ``cu_seqlens`` / ``max_seqlen``) to the other ranks of its group."""
    from megatron.core import mpu
    from megatron.core.utils import get_batch_on_this_tp_rank

    return get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=thd,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=dense_mask,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=mtp_here,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=first,
        is_pipeline_last_stage=last,
    )


def get_batch(data_iterator, vp_stage=None):
    """One micro-batch on this rank: TP rank 0 reads, broadcasts over TP, slices for CP.

    Returns ``(tokens, labels, loss_mask, attention_mask, position_ids)`` (None where this
    pipeline stage does not need them). ``attention_mask`` is ``[b, 1, s, s]`` bool, True =
    masked: causal for pre-training, block-diagonal causal for packed SFT samples.
    """
    import torch
    from megatron.core import mpu
    from megatron.core.parallel_state import get_context_parallel_group
    from megatron.core.utils import get_batch_on_this_cp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    args = get_args()
    mtp_here = _mtp_on_this_stage(args, vp_stage)
    if not is_first_or_last_pipeline_stage(vp_stage) and not mtp_here:
        return None, None, None, None, None

    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        batch = next(data_iterator)
        for key in BATCH_KEYS:
            value = batch.get(key)
            batch[key] = value.cuda(non_blocking=True) if value is not None else None
        if args.sft and batch["attention_mask"] is None:
            raise ValueError("SFT batches must carry 'attention_mask' (packed samples)")
    batch = _broadcast_over_tp(
        batch, args, tp_rank=tp_rank, mtp_here=mtp_here,
        first=mpu.is_pipeline_first_stage(), last=mpu.is_pipeline_last_stage(),
        thd=False,  # packed SFT uses a dense block-diagonal mask, not THD
        dense_mask=args.create_attention_mask_in_dataloader,
    )
    batch = {key: batch.get(key) for key in BATCH_KEYS}
    if batch["attention_mask"] is not None and batch["attention_mask"].dtype != torch.bool:
        batch["attention_mask"] = batch["attention_mask"].bool()
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=get_context_parallel_group())
    return tuple(batch[key] for key in BATCH_KEYS)


# --------------------------------------------------------------------------- packed SFT batches
def sft_uses_thd(args) -> bool:
    """Packed SFT with Transformer Engine: THD ``packed_seq_params`` instead of the dense mask.

    Megatron's TE layer spec builds causal attention and TE ignores a dense mask, so the
    per-sample boundaries must reach TE as ``cu_seqlens`` (as upstream Megatron's SFT does).
    """
    return bool(getattr(args, "sft", False)) and getattr(args, "transformer_impl", None) == "transformer_engine"


def cu_seqlens_from_position_ids(position_ids):
    """``(cu_seqlens int32 [n + 1], max_seqlen)`` of one packed sequence.

    ``position_ids`` (``[S]`` or ``[1, S]``) restart at 0 at every packed sample and at the
    padding tail (``megatron_gem.data.sft``); each restart opens a segment.
    """
    import torch

    if position_ids.dim() == 2:
        if position_ids.shape[0] != 1:
            raise ValueError(
                f"packed SFT with THD attention needs --micro-batch-size 1, got position_ids of shape "
                f"{tuple(position_ids.shape)}"
            )
        position_ids = position_ids[0]
    if position_ids.dim() != 1 or position_ids.numel() == 0 or int(position_ids[0]) != 0:
        raise ValueError(
            "position_ids must be a non-empty [S] or [1, S] tensor starting at 0, got shape "
            f"{tuple(position_ids.shape)}"
        )
    starts = torch.nonzero(position_ids == 0).view(-1)
    end = torch.tensor([position_ids.numel()], dtype=starts.dtype, device=starts.device)
    cu_seqlens = torch.cat([starts, end]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def packed_seq_params_from_cu_seqlens(cu_seqlens, max_seqlen: int):
    """Megatron's ``PackedSeqParams`` (THD) for self-attention over one packed sequence."""
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = cu_seqlens.reshape(-1).to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen),
    )


def get_sft_batch(data_iterator, vp_stage=None):
    """One packed SFT micro-batch on this rank, on EVERY pipeline stage (``--sft``).

    Returns ``(tokens, labels, loss_mask, attention_mask, position_ids, packed_seq_params)``.
    Unlike pre-training, middle stages run attention that must respect the packing, so the
    SFT data is read on every stage's TP rank 0 (``is_dataset_built_on_rank``; each stage and
    virtual chunk draws the same micro-batch sequence) and broadcast over TP: the dense
    block-diagonal mask (local spec), or ``cu_seqlens`` for THD (Transformer Engine; then
    ``attention_mask`` is None and ``packed_seq_params`` is set; Megatron's broadcast already
    sends THD metadata to middle stages). Context parallelism is refused for --sft (arguments).
    """
    import torch
    from megatron.core import mpu
    from megatron.training import get_args

    args = get_args()
    thd = sft_uses_thd(args)
    ignore_virtual = vp_stage is None
    first = mpu.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage)
    last = mpu.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage)
    mtp_here = _mtp_on_this_stage(args, vp_stage)
    middle = args.pipeline_model_parallel_size > 1 and not (first or last or mtp_here)
    tp_rank = mpu.get_tensor_model_parallel_rank()
    src, group = mpu.get_tensor_model_parallel_src_rank(), mpu.get_tensor_model_parallel_group()

    batch = {}
    if tp_rank == 0:
        if data_iterator is None:
            raise RuntimeError("--sft: no data iterator on this pipeline stage (is_dataset_built_on_rank)")
        raw = next(data_iterator)
        if thd:
            cu_seqlens, max_seqlen = cu_seqlens_from_position_ids(raw["position_ids"])  # on the host: no sync
            raw = dict(raw, attention_mask=None, cu_seqlens=cu_seqlens,
                       max_seqlen=torch.tensor([max_seqlen], dtype=torch.int32))
        elif raw.get("attention_mask") is None:
            raise ValueError("SFT batches must carry 'attention_mask' (packed samples)")
        for key in BATCH_KEYS + (("cu_seqlens", "max_seqlen") if thd else ()):
            value = raw.get(key)
            batch[key] = value.cuda(non_blocking=True) if value is not None else None

    if middle and not thd:
        # Megatron's broadcast sends nothing to a middle stage without THD metadata.
        shape = (args.micro_batch_size, 1, args.seq_length, args.seq_length)
        if tp_rank == 0:
            mask = batch["attention_mask"].bool().contiguous()
        else:
            mask = torch.empty(shape, dtype=torch.bool, device=torch.cuda.current_device())
        if mpu.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.broadcast(mask, src, group=group)
        return None, None, None, mask, None, None

    batch = _broadcast_over_tp(
        batch, args, tp_rank=tp_rank, mtp_here=mtp_here, first=first, last=last, thd=thd, dense_mask=not thd
    )
    out = [batch.get(key) for key in BATCH_KEYS]
    if middle:  # THD: Megatron sent only cu_seqlens / max_seqlen
        out = [None] * len(BATCH_KEYS)
    packed_seq_params = None
    if thd:
        out[BATCH_KEYS.index("attention_mask")] = None
        packed_seq_params = packed_seq_params_from_cu_seqlens(
            batch["cu_seqlens"], int(batch["max_seqlen"].max().item())
        )
    elif out[BATCH_KEYS.index("attention_mask")] is not None:
        out[BATCH_KEYS.index("attention_mask")] = out[BATCH_KEYS.index("attention_mask")].bool()
    return (*out, packed_seq_params)


def loss_func(loss_mask, output_tensor, model=None):
    """Reduce per-token losses as upstream: ``(sum(loss * mask), num_tokens, report)``.

    ``report`` holds ``[sum, num_tokens]`` pairs that Megatron sums over micro-batches and
    data-parallel ranks and divides: ``lm loss`` (cross-entropy), and with GEM ``gem loss`` and
    ``entropy`` from the same loss call.
    """
    import torch
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    from megatron_gem.megatron.model import unwrap_gem_model

    args = get_args()
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    count = num_tokens.view(1)

    def pair(total):
        return torch.cat([total.clone().detach().view(1), count])

    gem_model = unwrap_gem_model(model) if model is not None else None
    stats = gem_model.pop_token_stats() if gem_model is not None else None
    if getattr(args, "loss", "ce") == "gem":
        if stats is None:
            raise RuntimeError("--loss gem: the model returned no GEM statistics (not a GemGPTModel?)")
        ce, entropy = stats
        report = {
            "lm loss": pair(torch.sum(ce.reshape(-1).float() * mask)),
            "gem loss": pair(loss),
            "entropy": pair(torch.sum(entropy.reshape(-1).float() * mask)),
        }
    else:
        report = {"lm loss": pair(loss)}

    rerun_state_machine = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        rerun_state_machine.validate_result(
            result=loss, rejection_func=torch.isnan,
            message="found NaN in local forward loss calculation", tolerance=0.0, fatal=True,
        )
        rerun_state_machine.validate_result(
            result=loss, rejection_func=torch.isinf,
            message="found Inf in local forward loss calculation", tolerance=0.0, fatal=True,
        )
    if args.check_for_spiky_loss:
        rerun_state_machine.validate_result(
            result=loss,
            rejection_func=partial(rerun_state_machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR, context="loss"),
            message="Spiky loss", tolerance=0.0, fatal=False,
        )
    return loss, num_tokens, report


def forward_step(data_iterator, model):
    """Megatron forward step: batch -> per-token losses ``[b, s]`` and the loss function."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_args, get_timers

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
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask, **extra)
    return output_tensor, partial(loss_func, loss_mask, model=model)


# --------------------------------------------------------------------------- datasets
def is_dataset_built_on_rank(vp_stage=None):
    """TP rank 0 of the first/last stage (pre-training, as upstream); with ``--sft`` TP rank 0 of
    every stage and virtual chunk: their attention needs each micro-batch's packing."""
    from megatron.core import parallel_state
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return False
    return bool(getattr(get_args(), "sft", False)) or is_first_or_last_pipeline_stage(vp_stage)


def gpt_dataset_config_from_args(args):
    """Megatron's ``GPTDatasetConfig`` from args, as upstream ``pretrain_gpt.py`` builds it."""
    import dataclasses
    import json

    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training import get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    tokenizer = get_tokenizer()  # built by Megatron's set_global_variables from the args
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if getattr(args, "per_dataset_sequences_path", None):
        with open(args.per_dataset_sequences_path) as f:
            sequences_per_dataset = json.load(f)
    wanted = {
        "random_seed": args.seed,
        "sequence_length": args.seq_length,
        "blend": blend,
        "blend_per_split": blend_per_split,
        "split": args.split,
        "multiple_validation_sets": getattr(args, "multiple_validation_sets", None),
        "full_validation": getattr(args, "full_validation", None),
        "num_dataset_builder_threads": args.num_dataset_builder_threads,
        "path_to_cache": args.data_cache_path,
        "mmap_bin_files": args.mmap_bin_files,
        "tokenizer": tokenizer,
        "reset_position_ids": args.reset_position_ids,
        "reset_attention_mask": args.reset_attention_mask,
        "eod_mask_loss": args.eod_mask_loss,
        "create_attention_mask": args.create_attention_mask_in_dataloader,
        "object_storage_cache_path": getattr(args, "object_storage_cache_path", None),
        "mid_level_dataset_surplus": args.mid_level_dataset_surplus,
        "allow_ambiguous_pad_tokens": getattr(args, "allow_ambiguous_pad_tokens", False),
        "fast_cache_load": getattr(args, "dataloader_fast_cache_load", False),
        "sequences_per_dataset": sequences_per_dataset,
        "defer_npy_index_mmap": getattr(args, "dataloader_defer_npy_index_mmap", False),
        "context_parallel_size": args.context_parallel_size,
        "data_parallel_size": args.data_parallel_size,
    }
    names = {f.name for f in dataclasses.fields(GPTDatasetConfig) if f.init}
    return GPTDatasetConfig(**{k: v for k, v in wanted.items() if k in names})


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Train/valid/test datasets: Megatron's GPT datasets, or the SFT datasets with ``--sft``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    args = get_args()
    if args.sft:
        from megatron_gem.data.sft import build_sft_datasets
        from megatron_gem.train.checks import InputError

        print_rank_0("> building packed SFT datasets (megatron_gem.data.sft) ...")
        try:
            return build_sft_datasets(
                args, train_val_test_num_samples, is_built_on_rank=partial(is_dataset_built_on_rank, vp_stage=vp_stage)
            )
        except ValueError as err:  # sft_data's errors name the data and the fix: one line (main)
            raise InputError(str(err)) from err

    config = gpt_dataset_config_from_args(args)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    train_ds, valid_ds, test_ds = BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, partial(is_dataset_built_on_rank, vp_stage=vp_stage), config
    ).build()
    print_rank_0("> finished creating GPT datasets ...")
    return train_ds, valid_ds, test_ds


# the core datasets coordinate across ranks themselves (build where is_dataset_built_on_rank says)
train_valid_test_datasets_provider.is_distributed = True


# --------------------------------------------------------------------------- main
def main(argv=None) -> None:
    """``python -m megatron_gem.train`` / ``megatron-gem-train``."""
    main_entry_time = time.time()
    from megatron_gem.megatron import cpu as cpu_mode

    cpu_mode.enable_cpu_mode()  # no-op when CUDA is available

    from megatron.core.enums import ModelType
    from megatron.training import pretrain, set_startup_timestamps
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_gem.train.arguments import PROG, _swapped_argv, adapt_argv_to_host, add_gem_arguments, validate_gem_args
    from megatron_gem.megatron.model import gem_model_config_from_args
    from megatron_gem.train.checks import InputError, check_inputs

    fix_dataset_helpers_compile()
    log_negative_losses()
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=main_entry_time)

    argv = adapt_argv_to_host(list(sys.argv[1:] if argv is None else argv))
    with _swapped_argv(argv):
        args = parse_and_validate_args(
            extra_args_provider=add_gem_arguments, args_defaults={"tokenizer_type": "GPT2BPETokenizer"}
        )
    validate_gem_args(args)
    try:
        check_inputs(args)  # before anything starts: a bad path or file is one line, not a trace or a hang
        if args.rank == 0:
            loss = f"GEM (beta={args.gem_beta}, h={args.gem_h})" if args.loss == "gem" else "cross-entropy"
            print(f"> megatron_gem: loss = {loss}", flush=True)
        cfg = pretrain_cfg_container_from_args(args, gem_model_config_from_args(args))
        pretrain(cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)
    except InputError as err:
        if args.rank == 0:  # every rank stops; one prints
            print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
