"""The GEM loss op: pure torch (no Megatron import), and its settings."""

from megatron_gem.ops.config import DEFAULT_BETA, DEFAULT_H, GEM_H_CHOICES, IMPL_CHOICES, GemConfig
from megatron_gem.ops.gem_loss import gem_loss, raise_deferred_errors, vocab_parallel_gem_loss
from megatron_gem.ops.linear_gem import vocab_parallel_linear_gem_loss

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_H",
    "GEM_H_CHOICES",
    "IMPL_CHOICES",
    "GemConfig",
    "gem_loss",
    "raise_deferred_errors",
    "vocab_parallel_gem_loss",
    "vocab_parallel_linear_gem_loss",
]
