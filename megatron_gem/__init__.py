"""megatron-gem: the GEM loss for NVIDIA Megatron-Core.

The op (``gem_loss``, ``vocab_parallel_gem_loss``) is pure torch; the Megatron integration,
training entry and tools live in submodules that import Megatron only when used.
"""

from megatron_gem.ops.gem_loss import GEM_H_CHOICES, gem_loss, vocab_parallel_gem_loss

__all__ = ["GEM_H_CHOICES", "gem_loss", "vocab_parallel_gem_loss"]
__version__ = "0.1.0"
