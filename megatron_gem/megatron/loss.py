"""The loss function a Megatron forward step returns, with explicit settings.

``reduce_token_losses(loss_mask, output_tensor, model=..., loss="gem")`` takes everything it
needs as arguments (no ``megatron.training.get_args()``), so any trainer built on megatron-core
can use it: Megatron-LM's loop (the entry's ``loss_func`` passes the run's flags) or another
one, e.g. Megatron-Bridge's forward step::

    from functools import partial
    from megatron_gem.megatron.loss import reduce_token_losses

    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(reduce_token_losses, loss_mask, model=model, loss="gem")
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_gem.megatron.model import LOSS_CHOICES, unwrap_gem_model
from megatron_gem.ops import raise_deferred_errors

__all__ = ["SPIKY_LOSS_FACTOR", "reduce_token_losses"]

SPIKY_LOSS_FACTOR = 10  # as upstream: a loss 10x the largest seen so far is "spiky"


def reduce_token_losses(
    loss_mask,
    output_tensor,
    *,
    model=None,
    loss: str = "ce",
    check_nan: bool = True,
    check_spiky: bool = False,
):
    """Reduce per-token losses as upstream: ``(sum(loss * mask), num_tokens, report)``.

    ``output_tensor``: the model's per-token losses ``[b, s]``. ``report`` holds ``[sum,
    num_tokens]`` pairs that Megatron sums over micro-batches and data-parallel ranks and
    divides: ``lm loss`` (cross-entropy), and with ``loss="gem"`` also ``gem loss`` and
    ``entropy``, which the ``GemGPTModel`` (``model``, any wrapper around it) computed in the
    same loss call. ``check_nan`` / ``check_spiky``: Megatron's rerun-state-machine checks
    (``--check-for-nan-in-loss-and-grad``, ``--check-for-spiky-loss``); with ``check_nan`` and
    ``loss="gem"`` the GEM op's deferred errors (``raise_deferred_errors``) are raised first.
    """
    if loss not in LOSS_CHOICES:
        raise ValueError(f"loss must be one of {LOSS_CHOICES}, got loss={loss!r}")
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    total = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    count = num_tokens.view(1)

    def pair(value):
        return torch.cat([value.clone().detach().view(1), count])

    if loss == "gem":
        gem_model = unwrap_gem_model(model) if model is not None else None
        stats = gem_model.pop_token_stats() if gem_model is not None else None
        if stats is None:
            raise RuntimeError(
                "loss='gem': the model returned no GEM statistics (pass model=, "
                "a GemGPTModel or a wrapper around one)"
            )
        ce, entropy = stats
        report = {
            "lm loss": pair(torch.sum(ce.reshape(-1).float() * mask)),
            "gem loss": pair(total),
            "entropy": pair(torch.sum(entropy.reshape(-1).float() * mask)),
        }
    else:
        report = {"lm loss": pair(total)}

    if check_nan and loss == "gem":
        # Megatron's checks below wait for the device anyway: an out-of-vocabulary label (which
        # makes the loss inf) raises its own ValueError first, not "found Inf".
        raise_deferred_errors()
    if check_nan or check_spiky:
        from megatron.core.rerun_state_machine import get_rerun_state_machine

        machine = get_rerun_state_machine()
        if check_nan:
            machine.validate_result(
                result=total,
                rejection_func=torch.isnan,
                tolerance=0.0,
                message="found NaN in local forward loss calculation",
                fatal=True,
            )
            machine.validate_result(
                result=total,
                rejection_func=torch.isinf,
                tolerance=0.0,
                message="found Inf in local forward loss calculation",
                fatal=True,
            )
        if check_spiky:
            machine.validate_result(
                result=total,
                message="Spiky loss",
                tolerance=0.0,
                fatal=False,
                rejection_func=partial(
                    machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR, context="loss"
                ),
            )
    return total, num_tokens, report
