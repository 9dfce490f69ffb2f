"""HuggingFace <-> Megatron checkpoint conversion (Llama, Qwen2): the public API.

``hf_to_megatron`` / ``megatron_to_hf`` run on CPUs, one worker process per model shard, and
publish their output only when it is complete (``megatron_gem.paths``).

Modules, from the bottom up:

* ``arch``: `ArchSpec` (what both formats must agree on), read from an HF config or saved
  Megatron args, written as Megatron flags or an HF config;
* ``mapping``: Megatron <-> HF tensor names and tensors (QKV, fc1, vocabulary padding, the
  tensor-parallel shards), pure torch;
* ``hf_files``: reading HF directories (config.json, safetensors, token ids);
* ``checkpoints``: Megatron checkpoints on disk, the import record, the completeness checks;
* ``workers``: the worker processes (Megatron is imported only there);
* ``api``: the two conversions; ``cli``: ``python -m megatron_gem.convert``.
"""

from megatron_gem.convert.api import hf_to_megatron, megatron_to_hf
from megatron_gem.convert.arch import (
    ArchSpec,
    arch_from_hf_config,
    arch_from_megatron_args,
    hf_config_from_arch,
    megatron_model_args,
    padded_vocab_size,
)
from megatron_gem.convert.checkpoints import (
    IncompleteOutputError,
    check_output_dir,
    megatron_checkpoint_dir,
    read_megatron_args,
    read_megatron_tensors,
)
from megatron_gem.convert.hf_files import SafetensorsReader
from megatron_gem.convert.mapping import megatron_full_state_to_hf

__all__ = [
    "ArchSpec",
    "IncompleteOutputError",
    "SafetensorsReader",
    "arch_from_hf_config",
    "arch_from_megatron_args",
    "check_output_dir",
    "hf_config_from_arch",
    "hf_to_megatron",
    "megatron_checkpoint_dir",
    "megatron_full_state_to_hf",
    "megatron_model_args",
    "megatron_to_hf",
    "padded_vocab_size",
    "read_megatron_args",
    "read_megatron_tensors",
]
