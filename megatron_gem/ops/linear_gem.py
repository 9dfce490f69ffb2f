"""The output layer and the GEM loss in one op, without the ``[tokens, V/tp]`` logits.

``vocab_parallel_linear_gem_loss(hidden, weight, target)`` equals
``vocab_parallel_gem_loss(hidden @ weight.T, target)`` (same reductions, same two collectives),
but works over chunks of tokens: per chunk it computes the local logits ``hidden_c @ weight.T``
(in the input dtype, then upcast to fp32, as Megatron's output layer does) and their per-row sums,
and drops them. Saved for the backward: ``hidden``, ``weight``, ``target`` and per row ``m``,
``z_y``, ``1/S``, ``A``; no logits beyond one chunk at a time, forward or backward.

Cost: the backward recomputes each chunk's logits, one extra GEMM of the output layer's size
(``logsigmoid`` pays a second one in the forward: it needs the global row max before the sums).
Use it where the logits dominate activation memory: large vocabularies, long sequences.

Tensor parallelism: ``weight`` is this rank's vocabulary shard and ``hidden`` the full sequence
(as Megatron's ColumnParallelLinear sees it). The returned ``dhidden`` is this rank's PARTIAL sum;
reducing it over the tensor-parallel group is the output layer's job, as in ColumnParallelLinear.
Tied embeddings are the caller's business: pass the embedding weight and autograd accumulates.
"""

from __future__ import annotations

import torch

from megatron_gem.ops.config import DEFAULT_BETA, DEFAULT_H
from megatron_gem.ops.gem_loss import (
    _CHUNK_ELEMENTS,
    LOGSIGMOID_SCALE,
    _bad_target_message,
    _chunk_sums,
    _complete_sums,
    _default_tp_group,
    _finish,
    _group_rank_size,
    _neg_scaled_shift,
    _nvtx,
    _reduce_max,
    _rescale_to_max,
    _validate,
)

__all__ = ["vocab_parallel_linear_gem_loss"]


def _default_chunk_tokens(v_local: int, device: torch.device) -> int:
    """Rows per chunk: about the op's fp32 budget of logits per chunk (2^20 on CPU)."""
    return max(1, _CHUNK_ELEMENTS.get(device.type, 1 << 25) // max(1, v_local))


def _weight_grad_chunk(grad_c, hidden_c):
    """grad_c.T @ hidden_c in fp32 (accumulated over chunks in fp32, cast once at the end)."""
    if hidden_c.dtype == torch.float32:
        return grad_c.T @ hidden_c
    if grad_c.is_cuda:  # a low-precision GEMM with an fp32 output
        return torch.mm(grad_c.T, hidden_c, out_dtype=torch.float32)
    return grad_c.T.float() @ hidden_c.float()  # CPU has no mixed-dtype mm


class _LinearGEM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, beta, h, group, ignore_index, with_stats, chunk):
        rank, world = _group_rank_size(group)
        x2 = hidden.reshape(-1, hidden.shape[-1])
        t = target.reshape(-1)
        n = x2.shape[0]
        v_local = weight.shape[0]
        start = rank * v_local
        logsigmoid = h == "logsigmoid"
        inv_beta = 1.0 / beta
        dev = x2.device

        local_t = t - start
        in_shard = (local_t >= 0) & (local_t < v_local)
        target_col = local_t.clamp(0, v_local - 1).unsqueeze(-1)
        valid = t != ignore_index
        vocab = v_local * world
        bad_target = ((t < 0) | (t >= vocab)) & (t != ignore_index)

        def logits(rows):  # this chunk's local logits, in the input dtype (as the output layer)
            return x2[rows] @ weight.T

        spans = [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
        shift = torch.empty(n, dtype=torch.float32, device=dev)  # linear: per-shard row max
        zy_local = torch.empty(n, dtype=torch.float32, device=dev)
        sums = torch.empty(5 if with_stats else 3, n, dtype=torch.float32, device=dev)
        x, e = torch.empty(2, min(chunk, n), v_local, dtype=torch.float32, device=dev)

        def reduce_max():
            """The op's collective 1 (MAX) of [row max, target logit, shard checks]; as the op
            with sync_checks=True, its one host sync reads the checks.
            (the pack, collective and guards are the op's _reduce_max.)"""
            checks = torch.full((3,), float(v_local), dtype=torch.float32, device=dev)
            checks[2:].neg_()
            checks[0] = bad_target.any()
            zy_shard = zy_local.masked_fill(~in_shard, float("-inf"))
            m, zy, reduced = _reduce_max(shift, zy_shard, checks, valid, group, world)
            any_bad, v_max, v_min_neg = reduced.tolist()
            if v_max != -v_min_neg:
                raise ValueError(
                    "weight: the vocabulary shard size differs across tensor-parallel ranks "
                    f"(this rank has {v_local}, others up to {int(v_max)} / down to "
                    f"{int(-v_min_neg)}); Megatron pads the vocabulary so every rank holds an "
                    "equal shard"
                )
            if any_bad:
                raise ValueError(
                    _bad_target_message(vocab, ignore_index, t[bad_target][:5].tolist())
                )
            return m, zy

        if logsigmoid:  # the weights need the global max and z_y inside the pass: a first pass
            for rows in spans:
                z_c = logits(rows)
                shift[rows] = z_c.amax(-1).float()
                zy_local[rows] = z_c.gather(-1, target_col[rows]).squeeze(-1).float()
            m, zy = reduce_max()
            shift = m
        for rows in spans:
            z_c = logits(rows)
            if not logsigmoid:
                zy_local[rows] = z_c.gather(-1, target_col[rows]).squeeze(-1).float()
            r = z_c.shape[0]
            _chunk_sums(
                z_c,
                shift[rows],
                zy[rows] if logsigmoid else None,
                inv_beta,
                beta,
                logsigmoid,
                with_stats,
                x[:r],
                e[:r],
                sums[:, rows],
            )
        del x, e
        _complete_sums(sums, with_stats, beta, logsigmoid)
        if not logsigmoid:
            m, zy = reduce_max()
            _rescale_to_max(sums, shift, m, beta)

        # The op's collective 2 (SUM): all rows' sums, packed, once.
        loss, inv_s, sum_ew, ce, entropy = _finish(
            sums, m, zy, valid, beta, group, world, with_stats
        )
        ctx.save_for_backward(hidden, weight, t, m, zy, inv_s, sum_ew)
        ctx.meta = (start, inv_beta, beta, logsigmoid, chunk)

        shape = target.shape
        if not with_stats:
            return loss.view(shape)
        ctx.mark_non_differentiable(ce, entropy)
        return loss.view(shape), ce.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        hidden, weight, t, m, zy, inv_s, sum_ew = ctx.saved_tensors
        start, inv_beta, beta, logsigmoid, chunk = ctx.meta
        with _nvtx("megatron_gem/linear_gem_loss/backward"):
            x2 = hidden.reshape(-1, hidden.shape[-1])
            n, v_local = x2.shape[0], weight.shape[0]
            lowp = weight.dtype != torch.float32
            # as the op's backward: grad = (e w - (sum e w) onehot(y)) * grad_output / S
            row_scale = (grad_loss.reshape(-1).float() * inv_s).unsqueeze(-1)
            local_t = t - start
            own = (local_t >= 0) & (local_t < v_local)
            target_col = local_t.clamp(0, v_local - 1).unsqueeze(-1)
            target_add = torch.where(own, -sum_ew, torch.zeros_like(sum_ew)).unsqueeze(-1)
            col = _neg_scaled_shift(m, inv_beta)
            w_col = (LOGSIGMOID_SCALE * (m - zy)).unsqueeze(-1) if logsigmoid else None
            need_dx, need_dw = ctx.needs_input_grad[:2]
            dhidden = torch.empty_like(x2) if need_dx else None
            dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            scratch = torch.empty(min(chunk, n), v_local, dtype=torch.float32, device=x2.device)
            for i in range(0, n, chunk):
                rows = slice(i, min(i + chunk, n))
                h_c = x2[rows]
                z_c = h_c @ weight.T  # the recompute: the extra GEMM
                g = scratch[: z_c.shape[0]]
                torch.add(col[rows], g.copy_(z_c), alpha=inv_beta, out=g)
                del z_c
                if logsigmoid:
                    w = torch.add(w_col[rows], g, alpha=LOGSIGMOID_SCALE * beta)
                    g.exp_().mul_(w.sigmoid_())
                    del w
                else:
                    g.exp_()
                g.scatter_add_(1, target_col[rows], target_add[rows])
                g.mul_(row_scale[rows])  # fp32 until grad_output / S is applied, then one cast
                g_c = g.to(weight.dtype) if lowp else g
                if need_dx:  # the GEMM accumulates in fp32 (CUDA), output in hidden's dtype
                    torch.mm(g_c, weight, out=dhidden[rows])
                if need_dw:
                    dweight += _weight_grad_chunk(g_c, h_c)
        dx = dhidden.view_as(hidden) if need_dx else None
        dw = dweight.to(weight.dtype) if need_dw else None
        return dx, dw, None, None, None, None, None, None, None


def vocab_parallel_linear_gem_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    beta: float = DEFAULT_BETA,
    h: str = DEFAULT_H,
    tp_group=None,
    ignore_index: int = -100,
    return_stats: bool = False,
    chunk_tokens: int | None = None,
):
    """Per-token GEM loss of the logits ``hidden @ weight.T``, without materialising them.

    Args:
        hidden: ``[..., H]`` output-layer input, the full sequence (Megatron: ``[s, b, H]``).
        weight: ``[V/tp, H]`` this rank's contiguous vocabulary shard of the output weight.
        target: ``[...]`` global vocabulary ids; ``ignore_index`` marks positions without loss.
        beta, h, tp_group, ignore_index, return_stats: as in ``vocab_parallel_gem_loss``.
        chunk_tokens: tokens per chunk (default: about 2^20 fp32 logits per chunk on CPU).

    Returns:
        As ``vocab_parallel_gem_loss``. The gradient wrt ``hidden`` is this rank's partial sum
        (reduce it over the tensor-parallel group, as ColumnParallelLinear's backward does).
    """
    # the op's checks, with hidden in the logits' place; first the ones that should name hidden
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise ValueError(
            "hidden must be a floating-point [..., H] tensor, got "
            f"dtype={getattr(hidden, 'dtype', type(hidden).__name__)}"
        )
    if isinstance(target, torch.Tensor) and tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal hidden shape without its last "
            f"dimension, {tuple(hidden.shape[:-1])}"
        )
    _validate(hidden, target, beta, h, ignore_index)
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dim() != 2
        or weight.shape[0] == 0
        or weight.shape[1] != hidden.shape[-1]
    ):
        raise ValueError(
            f"weight must be a non-empty [V/tp, H={hidden.shape[-1]}] tensor, got "
            f"shape={tuple(getattr(weight, 'shape', ()))}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"weight ({weight.dtype}, {weight.device}) must match hidden's dtype and device "
            f"({hidden.dtype}, {hidden.device})"
        )
    if chunk_tokens is None:
        chunk_tokens = _default_chunk_tokens(weight.shape[0], hidden.device)
    elif isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got chunk_tokens={chunk_tokens!r}")
    group = _default_tp_group() if tp_group is None else tp_group
    with _nvtx("megatron_gem/linear_gem_loss/forward"):
        return _LinearGEM.apply(
            hidden,
            weight,
            target,
            float(beta),
            h,
            group,
            ignore_index,
            bool(return_stats),
            chunk_tokens,
        )
