"""The GEM loss op: pure torch (no Megatron import)."""

from megatron_gem.ops.gem_loss import GEM_H_CHOICES, gem_loss, vocab_parallel_gem_loss

__all__ = ["GEM_H_CHOICES", "gem_loss", "vocab_parallel_gem_loss"]
