"""The GEM loss (Li et al., ICLR 2025), exact under vocabulary (tensor) parallelism.

Pure torch: no Megatron import. Per token, with logits ``z`` over the whole vocabulary,
target ``y``, ``q = softmax(z / beta)`` and weights ``w`` (1 for ``h="linear"``,
``sigmoid(0.01 (z_v - z_y))`` for ``h="logsigmoid"``), both held constant::

    loss = sum_v q_v w_v (z_v - z_y)        grad = q * w - (sum_v q_v w_v) * onehot(y)

Each tensor-parallel rank holds a contiguous shard of the vocabulary. Every statistic is
reduced over the WHOLE vocabulary with two collectives in the forward:

1. MAX all-reduce of ``[row max m, target logit z_y or -inf, shard checks]`` (the rank that owns
   ``y`` contributes ``z_y``, the others ``-inf``, so the max *is* ``z_y``);
2. one packed SUM all-reduce of the per-row sums ``[S, sum e w (z-z_y), sum e w (, S1, U1)]``
   with ``e = exp((z - m) / beta)``.

The backward needs no collective: it recomputes ``e`` from the saved logits (in their own
dtype) with the saved per-row ``m``, ``1/S`` and ``A``, so no fp32 copy of the logits is kept
alive between forward and backward. Work is done in row chunks so fp32 temporaries stay small
(and cache-resident on CPUs).
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist

__all__ = ["gem_loss", "vocab_parallel_gem_loss", "GEM_H_CHOICES"]

GEM_H_CHOICES = ("linear", "logsigmoid")
LOGSIGMOID_SCALE = 0.01  # the authors' weight: sigmoid(0.01 * (z_v - z_y))

# fp32 elements per chunk of temporaries. CPU: ~4 MB, stays in L2/L3 across the passes.
# CUDA: large enough that kernel launches are negligible, small enough to bound memory.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


def _chunk_rows(logits_2d: torch.Tensor) -> int:
    budget = _CHUNK_ELEMENTS.get(logits_2d.device.type, 1 << 25)
    return max(1, budget // max(1, logits_2d.shape[-1]))


@contextlib.contextmanager
def _nvtx(name: str):
    """NVTX range for Nsight Systems / Megatron's --profile; a no-op without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def _default_tp_group():
    """Megatron's tensor-model-parallel group if Megatron is loaded and initialised, else None.

    Looked up through ``sys.modules`` so this module never imports Megatron itself.
    """
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _group_rank_size(group) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _validate(logits, target, beta, h, ignore_index) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        dtype = getattr(logits, "dtype", type(logits).__name__)
        raise ValueError(f"logits must be a floating-point tensor, got dtype={dtype}")
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        dtype = getattr(target, "dtype", type(target).__name__)
        raise ValueError(f"target/labels must be an integer tensor, got dtype={dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape={tuple(logits.shape)}")
    if tuple(logits.shape[:-1]) != tuple(target.shape):
        raise ValueError(
            f"target/labels shape {tuple(target.shape)} must equal logits shape without its vocabulary "
            f"dimension, {tuple(logits.shape[:-1])} (logits shape={tuple(logits.shape)})"
        )
    if target.device != logits.device:
        raise ValueError(f"target/labels are on {target.device} but logits on {logits.device}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < float(beta) <= 1.0):
        raise ValueError(f"beta must be a number in (0, 1], got beta={beta!r}")
    if h not in GEM_H_CHOICES:
        raise ValueError(f"h must be one of {GEM_H_CHOICES}, got h={h!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got ignore_index={ignore_index!r}")


def _shifted_scaled(z, m, inv_beta, out):
    """out = (z - m) / beta in fp32. Mixed-dtype torch ops convert through a fresh temporary
    (an allocation, and page faults on CPU): convert into `out` first, then work in place."""
    col = (-m * inv_beta).unsqueeze(-1)
    if z.dtype == out.dtype:
        return torch.add(col, z, alpha=inv_beta, out=out)
    out.copy_(z)
    return torch.add(col, out, alpha=inv_beta, out=out)


def _row_sums(z, m, zy, inv_beta, beta, logsigmoid, with_stats, x, e, p):
    """Per-row sums over one chunk of the local vocabulary shard, in fp32.

    z: [r, V_local] logits (any float dtype); m, zy: [r] global row max and target logit;
    x, e (and p, with stats at beta != 1): fp32 [r, V_local] scratch buffers, reused across
    chunks so the CPU pays no page faults for fresh allocations.
    Returns [r, k]: S = sum e, B = sum e w (z - z_y), A = sum e w, and with stats
    S1 = sum exp(z - m), U1 = sum exp(z - m) (z - m). Padded -inf logits give e = 0 and their
    0 * (-inf) products are skipped by nansum (a NaN logit still poisons S, as it should).
    """
    _shifted_scaled(z, m, inv_beta, x)
    stats = []
    if with_stats and beta != 1.0:
        torch.mul(x, beta, out=e)  # z - m
        torch.exp(e, out=p)
        stats = [p.sum(-1), torch.nansum(p.mul_(e), -1)]
    torch.exp(x, out=e)
    s = e.sum(-1)
    if logsigmoid:
        if with_stats and beta == 1.0:
            stats = [s, torch.nansum(e * x, -1)]
        # w = sigmoid(0.01 (z - z_y)), with z - z_y = beta x + (m - z_y)
        w = torch.add((LOGSIGMOID_SCALE * (m - zy)).unsqueeze(-1), x, alpha=LOGSIGMOID_SCALE * beta)
        e.mul_(w.sigmoid_())
        del w
        a = e.sum(-1)
    else:
        a = s
    ewx = torch.nansum(x.mul_(e), -1)
    if with_stats and beta == 1.0 and not logsigmoid:
        stats = [s, ewx]  # p = q: S1 = S, U1 = sum e x
    # sum e w (z - z_y) = beta * sum e w x + (m - z_y) * sum e w
    b = beta * ewx + (m - zy) * a
    return torch.stack([s, b, a] + stats, dim=-1)


class _VocabParallelGEM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, beta, h, group, ignore_index, with_stats):
        rank, world = _group_rank_size(group)
        z = logits.reshape(-1, logits.shape[-1])
        t = target.reshape(-1)
        n, v_local = z.shape
        start = rank * v_local
        logsigmoid = h == "logsigmoid"
        inv_beta = 1.0 / beta

        # Collective 1 (MAX): row max, target logit (owner gives it, others -inf), shard checks.
        local_t = t - start
        in_shard = (local_t >= 0) & (local_t < v_local)
        zy_local = z.gather(-1, local_t.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1).float()
        zy_local = zy_local.masked_fill(~in_shard, float("-inf"))
        vocab = v_local * world
        bad_target = ((t < 0) | (t >= vocab)) & (t != ignore_index)
        m_local = z.amax(-1).float()
        checks = torch.tensor([0.0, v_local, -v_local], dtype=torch.float32, device=z.device)
        checks[0] = bad_target.any()
        packed = torch.cat([m_local, zy_local, checks])
        if world > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        any_bad, v_max, v_min_neg = packed[2 * n :].tolist()  # the op's one host sync
        if v_max != -v_min_neg:
            raise ValueError(
                f"vocab_parallel_logits: the vocabulary shard size differs across tensor-parallel ranks "
                f"(this rank has {v_local}, others up to {int(v_max)} / down to {int(-v_min_neg)}); "
                "Megatron pads the vocabulary so every rank holds an equal shard"
            )
        if any_bad:
            bad = t[bad_target]
            raise ValueError(
                f"target/labels hold ids outside the vocabulary [0, {vocab}) that are not "
                f"ignore_index={ignore_index}: e.g. {bad[:5].tolist()}"
            )
        m = packed[:n]
        valid = t != ignore_index
        # Guard rows that are fully -inf (m) and ignored rows (z_y = -inf): keep the math finite.
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        zy = torch.where(valid, packed[n : 2 * n], m)

        # Collective 2 (SUM): the packed per-row sums.
        k = 5 if with_stats else 3
        sums = torch.empty(n, k, dtype=torch.float32, device=z.device)
        step = _chunk_rows(z)
        scratch = torch.empty(3 if with_stats and beta != 1.0 else 2, min(step, n), v_local, dtype=torch.float32, device=z.device)
        for i in range(0, n, step):
            j = min(n, i + step)
            bufs = [b[: j - i] for b in scratch] + [None]
            sums[i:j] = _row_sums(z[i:j], m[i:j], zy[i:j], inv_beta, beta, logsigmoid, with_stats, *bufs[:3])
        del scratch
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)

        s, b, a = sums[:, 0], sums[:, 1], sums[:, 2]
        s_safe = torch.where(valid, s, torch.ones_like(s))
        zero = torch.zeros_like(s)
        loss = torch.where(valid, b / s_safe, zero)

        # Saved per row: m, z_y, 1/S and sum e w (both 0 on ignored rows, which zeroes their gradient).
        ctx.save_for_backward(logits, t, m, zy, torch.where(valid, 1.0 / s_safe, zero), torch.where(valid, a, zero))
        ctx.meta = (start, inv_beta, beta, logsigmoid)

        shape = target.shape
        if not with_stats:
            return loss.view(shape)
        s1, u1 = sums[:, 3], sums[:, 4]
        s1_safe = torch.where(valid, s1, torch.ones_like(s1))
        ce = torch.where(valid, torch.log(s1_safe) + (m - zy), zero)
        entropy = torch.where(valid, torch.log(s1_safe) - u1 / s1_safe, zero)
        ctx.mark_non_differentiable(ce, entropy)
        return loss.view(shape), ce.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        logits, t, m, zy, inv_s, sum_ew = ctx.saved_tensors
        start, inv_beta, beta, logsigmoid = ctx.meta
        with _nvtx("megatron_gem/gem_loss/backward"):
            # grad = (e w - (sum e w) onehot(y)) * grad_output / S, with e recomputed from the logits
            z = logits.reshape(-1, logits.shape[-1])
            n, v_local = z.shape
            row_scale = (grad_loss.reshape(-1).float() * inv_s).unsqueeze(-1)  # 0 on ignored rows
            local_t = t - start
            own = (local_t >= 0) & (local_t < v_local)
            target_col = local_t.clamp(0, v_local - 1).unsqueeze(-1)
            target_add = torch.where(own, -sum_ew, torch.zeros_like(sum_ew)).unsqueeze(-1)
            grad = torch.empty_like(z)
            step = _chunk_rows(z)
            fp32 = grad.dtype == torch.float32
            # fp32 logits: work directly in the gradient's memory; else in an fp32 scratch chunk.
            scratch = None if fp32 else torch.empty(min(step, n), v_local, dtype=torch.float32, device=z.device)
            for i in range(0, n, step):
                j = min(n, i + step)
                x = _shifted_scaled(z[i:j], m[i:j], inv_beta, grad[i:j] if fp32 else scratch[: j - i])
                if logsigmoid:  # w = sigmoid(0.01 (z - z_y)), z - z_y = beta x + (m - z_y)
                    w = torch.add((LOGSIGMOID_SCALE * (m[i:j] - zy[i:j])).unsqueeze(-1), x, alpha=LOGSIGMOID_SCALE * beta)
                    x.exp_().mul_(w.sigmoid_())
                    del w
                else:
                    x.exp_()
                # subtract (sum e w) on the rank that owns y (a scatter: no host sync)
                x.scatter_add_(1, target_col[i:j], target_add[i:j])
                x.mul_(row_scale[i:j])  # times grad_output / S, still in fp32
                if not fp32:
                    grad[i:j].copy_(x)  # the one cast to the logits' dtype
        return grad.view_as(logits), None, None, None, None, None, None


def vocab_parallel_gem_loss(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    beta: float = 0.7,
    h: str = "linear",
    tp_group=None,
    ignore_index: int = -100,
    return_stats: bool = False,
):
    """Per-token GEM loss over a vocabulary sharded across tensor-parallel ranks.

    Args:
        vocab_parallel_logits: ``[..., V/tp]`` logits of this rank's contiguous vocabulary shard
            (Megatron: ``[s, b, V/tp]``), bf16/fp16/fp32. Never modified.
        target: ``[...]`` global vocabulary ids; ``ignore_index`` marks positions without loss.
        beta: temperature of the constant ``q = softmax(z / beta)``, in (0, 1].
        h: ``"linear"`` or ``"logsigmoid"`` (weights ``sigmoid(0.01 (z_v - z_y))``).
        tp_group: process group over which the vocabulary is sharded; ``None`` means Megatron's
            tensor-model-parallel group when it is initialised, else no reduction.
        return_stats: also return per-token cross-entropy and entropy of ``p = softmax(z)``,
            from the same reductions, for logging (no gradient).

    Returns:
        fp32 loss of ``target``'s shape (0 at ignored positions); with ``return_stats``,
        ``(loss, cross_entropy, entropy)``.
    """
    _validate(vocab_parallel_logits, target, beta, h, ignore_index)
    group = _default_tp_group() if tp_group is None else tp_group
    with _nvtx("megatron_gem/gem_loss/forward"):
        out = _VocabParallelGEM.apply(
            vocab_parallel_logits, target, float(beta), h, group, ignore_index, bool(return_stats)
        )
    return out


def gem_loss(logits, labels, beta: float = 0.7, h: str = "linear", ignore_index: int = -100):
    """Single-device per-token GEM loss for logits ``[..., V]`` and labels ``[...]``, unreduced (fp32)."""
    _validate(logits, labels, beta, h, ignore_index)
    with _nvtx("megatron_gem/gem_loss/forward"):
        return _VocabParallelGEM.apply(logits, labels, float(beta), h, None, ignore_index, False)
