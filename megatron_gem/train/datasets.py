"""Datasets for the training entry: Megatron's GPT datasets (``--data-path``, ``--mock-data``),
or the packed SFT datasets with ``--sft`` (``megatron_gem.data.sft``)."""

from __future__ import annotations

from functools import partial

__all__ = [
    "is_dataset_built_on_rank",
    "gpt_dataset_config_from_args",
    "train_valid_test_datasets_provider",
]


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
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    args = get_args()
    if args.sft:
        from megatron_gem.data.sft import build_sft_datasets
        from megatron_gem.train.checks import InputError

        print_rank_0("> building packed SFT datasets (megatron_gem.data.sft) ...")
        try:
            return build_sft_datasets(
                args,
                train_val_test_num_samples,
                is_built_on_rank=partial(is_dataset_built_on_rank, vp_stage=vp_stage),
            )
        except ValueError as err:  # sft_data's errors name the data and the fix: one line (main)
            raise InputError(str(err)) from err

    config = gpt_dataset_config_from_args(args)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    train_ds, valid_ds, test_ds = BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        partial(is_dataset_built_on_rank, vp_stage=vp_stage),
        config,
    ).build()
    print_rank_0("> finished creating GPT datasets ...")
    return train_ds, valid_ds, test_ds


# the core datasets coordinate across ranks themselves (build where is_dataset_built_on_rank says)
train_valid_test_datasets_provider.is_distributed = True
