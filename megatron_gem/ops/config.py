"""The GEM loss's settings, defined and validated in one place (pure Python: no Megatron, no torch).

``GemConfig`` travels from the command line (``--gem-beta``, ``--gem-h``) through the model to
the op; every layer that takes a beta or an h validates it here.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = [
    "GEM_H_CHOICES",
    "IMPL_CHOICES",
    "DEFAULT_BETA",
    "DEFAULT_H",
    "GemConfig",
    "check_beta",
    "check_h",
]

GEM_H_CHOICES = ("linear", "logsigmoid")
DEFAULT_BETA = 0.7  # the authors' default (their recipes' --gem_beta)
DEFAULT_H = "linear"  # the authors' current default (it was logsigmoid)
IMPL_CHOICES = ("auto", "torch", "triton")  # auto: Triton on CUDA where it imports, else torch


def check_beta(beta, name: str = "beta") -> float:
    """``beta`` as a float in (0, 1], or a ValueError naming ``name`` and the value."""
    if (
        isinstance(beta, bool)
        or not isinstance(beta, (int, float))
        or not math.isfinite(beta)
        or not 0.0 < beta <= 1.0
    ):
        raise ValueError(f"{name} must be a number in (0, 1], got {name}={beta!r}")
    return float(beta)


def check_h(h, name: str = "h") -> str:
    """``h`` if it is one of ``GEM_H_CHOICES``, else a ValueError naming ``name`` and the value."""
    if h not in GEM_H_CHOICES:
        raise ValueError(f"{name} must be one of {GEM_H_CHOICES}, got {name}={h!r}")
    return h


@dataclasses.dataclass(frozen=True)
class GemConfig:
    """GEM's settings: ``q = softmax(z / beta)``, weights ``h`` (``linear``: 1; ``logsigmoid``:
    ``sigmoid(0.01 (z_v - z_y))``), and the implementation ``impl`` (see ``IMPL_CHOICES``).
    Validated on construction."""

    beta: float = DEFAULT_BETA
    h: str = DEFAULT_H
    impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "beta", check_beta(self.beta))
        check_h(self.h)
        if self.impl not in IMPL_CHOICES:
            raise ValueError(f"impl must be one of {IMPL_CHOICES}, got impl={self.impl!r}")
