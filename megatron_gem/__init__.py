"""megatron-gem: the GEM loss for NVIDIA Megatron-Core.

The op (``gem_loss``, ``vocab_parallel_gem_loss``) and its settings (``GemConfig``) are pure
torch (``megatron_gem.ops``); the Megatron layer (``megatron_gem.megatron``), the training entry
(``train``), data, conversion, evaluation and study packages import Megatron only when used.
"""

from megatron_gem.ops import (
    DEFAULT_BETA,
    DEFAULT_H,
    GEM_H_CHOICES,
    GemConfig,
    gem_loss,
    raise_deferred_errors,
    vocab_parallel_gem_loss,
    vocab_parallel_linear_gem_loss,
)

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_H",
    "GEM_H_CHOICES",
    "GemConfig",
    "gem_loss",
    "raise_deferred_errors",
    "vocab_parallel_gem_loss",
    "vocab_parallel_linear_gem_loss",
]
__version__ = "0.1.0"
