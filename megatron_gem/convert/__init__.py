"""HuggingFace <-> Megatron checkpoint conversion (Llama, Qwen2): the public API.

``hf_to_megatron`` / ``megatron_to_hf`` run on CPUs, one worker process per model shard, and
publish their output only when it is complete (``megatron_gem.paths``).
"""

from megatron_gem.convert.api import (
    ArchSpec,
    arch_from_hf_config,
    arch_from_megatron_args,
    check_output_dir,
    hf_config_from_arch,
    hf_to_megatron,
    megatron_checkpoint_dir,
    megatron_full_state_to_hf,
    megatron_model_args,
    megatron_to_hf,
    padded_vocab_size,
    read_megatron_args,
    read_megatron_tensors,
)

__all__ = [
    "ArchSpec", "arch_from_hf_config", "arch_from_megatron_args", "check_output_dir",
    "hf_config_from_arch", "hf_to_megatron", "megatron_checkpoint_dir", "megatron_full_state_to_hf",
    "megatron_model_args", "megatron_to_hf", "padded_vocab_size", "read_megatron_args",
    "read_megatron_tensors",
]
