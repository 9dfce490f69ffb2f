"""The GEM loss (Li et al., ICLR 2025), exact under vocabulary (tensor) parallelism.

Pure torch: no Megatron import. Per token, with logits ``z`` over the whole vocabulary,
target ``y``, ``q = softmax(z / beta)`` and weights ``w`` (1 for ``h="linear"``,
``sigmoid(0.01 (z_v - z_y))`` for ``h="logsigmoid"``), both held constant::

    loss = sum_v q_v w_v (z_v - z_y)        grad = q * w - (sum_v q_v w_v) * onehot(y)

Each tensor-parallel rank holds a contiguous shard of the vocabulary. Every statistic is
reduced over the WHOLE vocabulary with two collectives in the forward:

1. MAX all-reduce of ``[row max m, target logit z_y or -inf, shard checks]`` (the rank that owns
   ``y`` contributes ``z_y``, the others ``-inf``, so the max *is* ``z_y``);
2. one packed SUM all-reduce of the per-row sums ``S = sum e``, ``A = sum e w``,
   ``U = sum e w x`` (and the statistics' ``S1``, ``U1``), with ``x = (z - m) / beta`` and
   ``e = exp(x)``; then ``loss = (beta U + (m - z_y) A) / S``.

For ``h="linear"`` the logits are read once in the forward: each row is shifted by its max
over this shard while the sums are taken, and the sums are rescaled to the global max after
collective 1 (``logsigmoid`` needs ``z_y`` inside the pass, so it reduces first). The backward
needs no collective: it recomputes ``e`` from the saved logits (in their own dtype) with the
saved per-row ``m``, ``1/S`` and ``A``, so no fp32 copy of the logits is kept alive between
forward and backward. The two passes over the logits have two implementations (``impl``):
``"torch"`` works in row chunks with reused fp32 scratch (the CPU path and the reference);
``"triton"`` runs the fused kernels of ``megatron_gem.ops.gem_triton`` (one read of the logits
forward, one read and one write backward). The reductions around them are the same code.

Host synchronisation: with ``sync_checks=True`` (the default) the forward copies its shard check to
the device and reads the checks back, so bad input raises at once. With ``sync_checks=False`` the
forward and backward never wait for the device (what a training step wants: the host queues
ahead, CUDA graphs can capture it): the cross-rank shard-size check runs once per
``(V_local, group)`` and is cached, and an out-of-vocabulary target is only recorded on the device;
``raise_deferred_errors()`` (one sync, e.g. at a log line) raises it as the same ValueError.
"""

from __future__ import annotations

import contextlib
import itertools
import sys

import torch
import torch.distributed as dist

from megatron_gem.ops.config import (
    DEFAULT_BETA,
    DEFAULT_H,
    GEM_H_CHOICES,
    IMPL_CHOICES,
    check_beta,
    check_h,
)

__all__ = [
    "gem_loss",
    "vocab_parallel_gem_loss",
    "raise_deferred_errors",
    "resolve_impl",
    "GEM_H_CHOICES",
]

LOGSIGMOID_SCALE = 0.01  # the authors' weight: sigmoid(0.01 * (z_v - z_y))
_FP32_MAX = torch.finfo(torch.float32).max

# fp32 elements per chunk of temporaries. CPU: 4 MB, measured best (smaller chunks pay more in
# per-op overhead than they gain in cache; larger ones fall out of L3). CUDA: large enough that
# kernel launches are negligible, small enough to bound memory.
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


# (V_local, group) pairs whose equal shard sizes across the group were checked (sync_checks=False
# checks each pair once, with a sync, then trusts it).
_CHECKED_SHARDS: set = set()
# (device, vocab, ignore_index) -> int64 [bad target seen (0/1), first bad id seen]: written by
# sync-free calls on the device, read (and cleared) by raise_deferred_errors.
_DEFERRED_BAD_TARGETS: dict = {}


def _bad_target_message(vocab, ignore_index, examples) -> str:
    return (
        f"target/labels hold ids outside the vocabulary [0, {vocab}) that are not "
        f"ignore_index={ignore_index}: e.g. {examples}"
    )


def _record_bad_targets(t, bad_target, vocab, ignore_index) -> None:
    """Remember on the device, without a sync, whether `t` holds a bad target, and the first one
    (argmax of the mask: its first True)."""
    if t.numel() == 0:
        return
    key = (t.device, vocab, ignore_index)
    state = _DEFERRED_BAD_TARGETS.get(key)
    if state is None:
        state = _DEFERRED_BAD_TARGETS[key] = torch.zeros(2, dtype=torch.long, device=t.device)
    seen = bad_target.any().long()
    example = t.gather(0, bad_target.to(torch.uint8).argmax().view(1)).squeeze(0)
    first = (state[0] == 0) & (seen == 1)
    state.copy_(torch.stack([state[0] | seen, torch.where(first, example, state[1])]))


def _input_checks(t, bad_target, v_local, shard_key, world, sync_checks, ignore_index):
    """The checks collective 1 carries, ``[any bad target, v_local, -v_local]`` on the device (a
    tensor from Python data would be a host-to-device copy: a sync), or None where they are not
    needed: ``sync_checks=False`` after the shard sizes of ``shard_key`` were checked once. With
    ``sync_checks=False`` a bad target is recorded on the device instead."""
    if not sync_checks:
        _record_bad_targets(t, bad_target, v_local * world, ignore_index)
    if not (sync_checks or (world > 1 and shard_key not in _CHECKED_SHARDS)):
        return None
    checks = torch.full((3,), float(v_local), dtype=torch.float32, device=t.device)
    checks[2:].neg_()
    checks[0] = bad_target.any()
    return checks


def _raise_on_checks(reduced, name, shard_key, sync_checks, t, bad_target, ignore_index):
    """Read the reduced checks (the op's one host sync): unequal shards raise a ValueError naming
    ``name`` (the check is cached once it passed), and with ``sync_checks`` so do bad targets."""
    v_local, group = shard_key
    any_bad, v_max, v_min_neg = reduced.tolist()
    if v_max != -v_min_neg:
        raise ValueError(
            f"{name}: the vocabulary shard size differs across tensor-parallel ranks (this rank "
            f"has {v_local}, others up to {int(v_max)} / down to {int(-v_min_neg)}); "
            "Megatron pads the vocabulary so every rank holds an equal shard"
        )
    _CHECKED_SHARDS.add(shard_key)
    if any_bad and sync_checks:
        vocab = v_local * _group_rank_size(group)[1]
        raise ValueError(_bad_target_message(vocab, ignore_index, t[bad_target][:5].tolist()))


def raise_deferred_errors() -> None:
    """Raise the ValueError a ``sync_checks=False`` call deferred (an out-of-vocabulary target
    since the last call of this function), and reset. One host sync per vocabulary size seen:
    call it where the host waits anyway (a log line), not per step."""
    pending = list(_DEFERRED_BAD_TARGETS.items())
    _DEFERRED_BAD_TARGETS.clear()
    for (_, vocab, ignore_index), state in pending:
        seen, example = state.tolist()
        if seen:
            raise ValueError(_bad_target_message(vocab, ignore_index, [example]))


def _validate(logits, target, beta, h, ignore_index) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        dtype = getattr(logits, "dtype", type(logits).__name__)
        raise ValueError(f"logits must be a floating-point tensor, got dtype={dtype}")
    if (
        not isinstance(target, torch.Tensor)
        or target.is_floating_point()
        or target.is_complex()
        or target.dtype == torch.bool
    ):
        dtype = getattr(target, "dtype", type(target).__name__)
        raise ValueError(f"target/labels must be an integer tensor, got dtype={dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(
            "logits must have a non-empty last (vocabulary) dimension, "
            f"got shape={tuple(logits.shape)}"
        )
    if tuple(logits.shape[:-1]) != tuple(target.shape):
        raise ValueError(
            f"target/labels shape {tuple(target.shape)} must equal logits shape without its "
            f"vocabulary dimension, {tuple(logits.shape[:-1])} (logits shape={tuple(logits.shape)})"
        )
    if target.device != logits.device:
        raise ValueError(f"target/labels are on {target.device} but logits on {logits.device}")
    check_beta(beta)
    check_h(h)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got ignore_index={ignore_index!r}")


def _as_fp32(z, out):
    """z in fp32: z itself, or converted into the scratch `out`. (Mixed-dtype torch ops convert
    through a fresh temporary: an allocation, and page faults on CPU.)"""
    return z if z.dtype == out.dtype else out.copy_(z)


def _neg_scaled_shift(shift, inv_beta):
    """-shift / beta as a column. A row that is all -inf on this shard (shift -inf) has no mass
    here: its column is clamped finite, so its logits give x = -inf and e = 0, never NaN."""
    return torch.mul(shift, -inv_beta).clamp_max_(_FP32_MAX).unsqueeze(-1)


def _chunk_sums(z, shift, zy, inv_beta, beta, logsigmoid, with_stats, x, e, out):
    """Per-row sums over one chunk of rows of the local vocabulary shard, in fp32.

    z: [r, V_local] logits (any float dtype). shift: [r] row shift; for h = linear it is
    filled with each row's max over this shard (nothing is reduced before this pass), for
    logsigmoid it holds the global row max. zy: [r] global target logit (logsigmoid only).
    x, e: fp32 [r, V_local] scratch, reused across chunks. out: [k, r] views of the op's sums.
    With x = (z - shift) / beta, e = exp(x) and p = exp(z - shift), fills S = sum e, A = sum e w
    (logsigmoid only; linear's A is S), U = sum e w x, and with stats at beta != 1 (at beta = 1
    p = e and they are copied after the loop) S1 = sum p, U1 / beta = sum p x. Padded -inf
    logits give e = 0, and their 0 * (-inf) products are skipped by nansum (a NaN logit still
    poisons S, as it should).
    """
    # Copy first, fp32 logits too: the logits are read from memory once, and every later pass
    # over the chunk stays in cache (two reads of fp32 logits cost more than the copy).
    x.copy_(z)
    if not logsigmoid:
        torch.amax(x, -1, out=shift)
    torch.add(_neg_scaled_shift(shift, inv_beta), x, alpha=inv_beta, out=x)
    if with_stats and beta != 1.0:  # p = exp(beta x), in e before e is needed
        p = torch.mul(x, beta, out=e).exp_()
        torch.sum(p, -1, out=out[3])
        torch.nansum(p.mul_(x), -1, out=out[4])
    torch.exp(x, out=e)
    torch.sum(e, -1, out=out[0])
    if logsigmoid:
        if with_stats and beta == 1.0:
            torch.nansum(e * x, -1, out=out[4])
        # w = sigmoid(0.01 (z - z_y)), with z - z_y = beta x + (shift - z_y)
        w = torch.add(
            (LOGSIGMOID_SCALE * (shift - zy)).unsqueeze(-1), x, alpha=LOGSIGMOID_SCALE * beta
        )
        e.mul_(w.sigmoid_())
        del w
        torch.sum(e, -1, out=out[1])
    torch.nansum(x.mul_(e), -1, out=out[2])


def _grad_chunk(z, out, col, target_col, target_add, row_scale, w_col, inv_beta, beta, x):
    """The gradient of one block of rows of logits ``z`` (any float dtype) into ``out`` (``z``
    itself for an in-place gradient: each element is read before it is written), through the
    fp32 scratch ``x`` (``z`` itself when ``z`` is fp32 and in place): ``(e w - A onehot(y)) *
    grad_output / S`` with the per-row columns ``col = -m / beta``, ``target_col``,
    ``target_add`` (``-A`` on the rank, or chunk, that owns y, else 0), ``row_scale`` and, for
    logsigmoid, ``w_col = 0.01 (m - z_y)`` (None for linear)."""
    torch.add(col, _as_fp32(z, x), alpha=inv_beta, out=x)
    if w_col is not None:  # w = sigmoid(0.01 (z - z_y)), with z - z_y = beta x + (m - z_y)
        w = torch.add(w_col, x, alpha=LOGSIGMOID_SCALE * beta)
        x.exp_().mul_(w.sigmoid_())
        del w
    else:
        x.exp_()
    # subtract (sum e w) on the rank that owns y (a scatter: no host sync)
    x.scatter_add_(1, target_col, target_add)
    # times grad_output / S, still in fp32, then the one cast to the logits' dtype (fp32:
    # straight into the gradient; a mixed-dtype mul would go through a temporary)
    if out.dtype == torch.float32:
        torch.mul(x, row_scale, out=out)
    else:
        out.copy_(x.mul_(row_scale))


def _rescale_to_max(sums, shift, m, beta):
    """Sums taken with a per-shard row shift, re-expressed with the global row max m, in place:
    e = c e_shard and x = x_shard + d, with d = (shift - m) / beta and c = exp(d) (exp(beta d)
    for the statistics of p). A row that is all -inf on this shard (shift -inf) gives 0; a NaN
    shift (NaN logits) stays NaN."""
    no_mass = shift == float("-inf")
    d = torch.where(no_mass, 0.0, (shift - m) / beta)
    c = torch.where(no_mass, 0.0, torch.exp(d))
    s, a, u = sums[:3]
    u.add_(d * a).mul_(c)
    s.mul_(c)
    a.mul_(c)
    if len(sums) > 3:
        c1 = torch.where(no_mass, 0.0, torch.exp(beta * d))
        s1, u1 = sums[3:]
        u1.add_(d * s1).mul_(c1)  # U1 / beta, like the shard's
        s1.mul_(c1)


def _reduce_max(m_local, zy_local, checks, valid, group, world):
    """Collective 1 (MAX) of ``[row max, target logit (-inf off its shard)(, checks)]``.
    Returns ``(m, z_y, reduced checks or None)``; rows fully -inf (m) and ignored rows
    (z_y = -inf) are guarded to keep the math finite."""
    n = m_local.shape[0]
    packed = torch.cat([m_local, zy_local] if checks is None else [m_local, zy_local, checks])
    if world > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    m = packed[:n]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    reduced = None if checks is None else packed[2 * n :]
    return m, torch.where(valid, packed[n : 2 * n], m), reduced


def _complete_sums(sums, with_stats, beta, logsigmoid) -> None:
    """The sums the chunk passes leave implicit: at beta = 1, p = q (S1 = S, and U1 = U for
    linear); for linear, A = S."""
    if with_stats and beta == 1.0:
        sums[3] = sums[0]
        if not logsigmoid:
            sums[4] = sums[2]
    if not logsigmoid:
        sums[1] = sums[0]


def _finish(sums, m, zy, valid, beta, group, world, with_stats):
    """Collective 2 (SUM) of the packed per-row sums, then per row: the loss, what the backward
    saves (1/S and sum e w, both 0 on ignored rows, which zeroes their gradient) and, with
    stats, cross-entropy and entropy. Returns ``(loss, inv_s, sum_ew, ce, entropy)``."""
    if world > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    s, a, u = sums[0], sums[1], sums[2]
    s_safe = torch.where(valid, s, torch.ones_like(s))
    zero = torch.zeros_like(s)
    # sum e w (z - z_y) = beta * sum e w x + (m - z_y) * sum e w
    loss = torch.where(valid, (beta * u + (m - zy) * a) / s_safe, zero)
    inv_s, sum_ew = torch.where(valid, 1.0 / s_safe, zero), torch.where(valid, a, zero)
    if not with_stats:
        return loss, inv_s, sum_ew, None, None
    s1, u1 = sums[3], beta * sums[4]
    s1_safe = torch.where(valid, s1, torch.ones_like(s1))
    ce = torch.where(valid, torch.log(s1_safe) + (m - zy), zero)
    entropy = torch.where(valid, torch.log(s1_safe) - u1 / s1_safe, zero)
    return loss, inv_s, sum_ew, ce, entropy


class _VocabParallelGEM(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, target, beta, h, group, ignore_index, with_stats, sync_checks, impl, inplace
    ):
        rank, world = _group_rank_size(group)
        z = logits.reshape(-1, logits.shape[-1])
        t = target.reshape(-1)
        n, v_local = z.shape
        start = rank * v_local
        logsigmoid = h == "logsigmoid"
        inv_beta = 1.0 / beta

        # Target logit (the rank that owns y gives it, the others -inf) and shard checks.
        local_t = t - start
        in_shard = (local_t >= 0) & (local_t < v_local)
        zy_local = z.gather(-1, local_t.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1).float()
        zy_local = zy_local.masked_fill(~in_shard, float("-inf"))
        bad_target = ((t < 0) | (t >= v_local * world)) & (t != ignore_index)
        valid = t != ignore_index
        shard_key = (v_local, group)
        checks = _input_checks(t, bad_target, v_local, shard_key, world, sync_checks, ignore_index)

        def reduce_max(m_local):
            """Collective 1; with the checks packed, the op's one host sync reads them."""
            m, zy, reduced = _reduce_max(m_local, zy_local, checks, valid, group, world)
            if checks is not None:
                _raise_on_checks(
                    reduced,
                    "vocab_parallel_logits",
                    shard_key,
                    sync_checks,
                    t,
                    bad_target,
                    ignore_index,
                )
            return m, zy

        # logsigmoid weights need the global max and z_y inside the pass, so they are reduced
        # first (an extra read of the logits, for the max). linear shifts each row by its shard
        # max during the pass and rescales the sums after the reduction: one read.
        if logsigmoid:
            m, zy = reduce_max(z.amax(-1).float())
            shift = m
        else:
            zy = None
            shift = torch.empty(n, dtype=torch.float32, device=z.device)
        if impl == "triton":  # one kernel pass; the sums come back completed (A = S, beta 1)
            from megatron_gem.ops import gem_triton

            sums, shift = gem_triton.local_row_sums(
                z.contiguous(),
                beta=beta,
                logsigmoid=logsigmoid,
                with_stats=with_stats,
                shift=shift if logsigmoid else None,
                zy=zy,
            )
        else:
            sums = torch.empty(5 if with_stats else 3, n, dtype=torch.float32, device=z.device)
            step = _chunk_rows(z)
            x, e = torch.empty(2, min(step, n), v_local, dtype=torch.float32, device=z.device)
            chunks = zip(
                z.split(step),
                shift.split(step),
                sums.split(step, dim=1),
                zy.split(step) if logsigmoid else itertools.repeat(None),
            )
            for z_c, shift_c, sums_c, zy_c in chunks:
                r = z_c.shape[0]
                _chunk_sums(
                    z_c,
                    shift_c,
                    zy_c,
                    inv_beta,
                    beta,
                    logsigmoid,
                    with_stats,
                    x[:r],
                    e[:r],
                    sums_c,
                )
            del x, e
            _complete_sums(sums, with_stats, beta, logsigmoid)
        if not logsigmoid:
            m, zy = reduce_max(shift)
            _rescale_to_max(sums, shift, m, beta)

        loss, inv_s, sum_ew, ce, entropy = _finish(
            sums, m, zy, valid, beta, group, world, with_stats
        )
        ctx.save_for_backward(logits, t, m, zy, inv_s, sum_ew)
        ctx.meta = (start, inv_beta, beta, logsigmoid, impl, inplace)

        shape = target.shape
        if not with_stats:
            return loss.view(shape)
        ctx.mark_non_differentiable(ce, entropy)
        return loss.view(shape), ce.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        logits, t, m, zy, inv_s, sum_ew = ctx.saved_tensors
        start, inv_beta, beta, logsigmoid, impl, inplace = ctx.meta
        with _nvtx("megatron_gem/gem_loss/backward"):
            # grad = (e w - (sum e w) onehot(y)) * grad_output / S, with e recomputed from the
            # logits
            z = logits.reshape(-1, logits.shape[-1])
            n, v_local = z.shape
            row_scale = (grad_loss.reshape(-1).float() * inv_s).unsqueeze(-1)  # 0 on ignored rows
            local_t = t - start
            if impl == "triton":  # one read of the logits, one write of the gradient
                from megatron_gem.ops import gem_triton

                grad = gem_triton.gem_grad(
                    z.contiguous(),
                    local_t,
                    row_scale.view(-1),
                    sum_ew,
                    beta=beta,
                    logsigmoid=logsigmoid,
                    m=m,
                    zy=zy if logsigmoid else None,
                    out=z if inplace and z.is_contiguous() else None,
                )
                return grad.view_as(logits), None, None, None, None, None, None, None, None, None
            own = (local_t >= 0) & (local_t < v_local)
            target_col = local_t.clamp(0, v_local - 1).unsqueeze(-1)
            target_add = torch.where(own, -sum_ew, torch.zeros_like(sum_ew)).unsqueeze(-1)
            # logsigmoid: w = sigmoid(0.01 (z - z_y)), with z - z_y = beta x + (m - z_y)
            w_col = (LOGSIGMOID_SCALE * (m - zy)).unsqueeze(-1) if logsigmoid else None
            grad = z if inplace else torch.empty_like(z)  # in place: each chunk is read first
            step = _chunk_rows(z)
            # fp32 scratch, reused across chunks (it stays in cache; fresh gradient memory does not)
            scratch = torch.empty(min(step, n), v_local, dtype=torch.float32, device=z.device)
            chunks = zip(
                z.split(step),
                grad.split(step),
                _neg_scaled_shift(m, inv_beta).split(step),
                target_col.split(step),
                target_add.split(step),
                row_scale.split(step),
                w_col.split(step) if logsigmoid else itertools.repeat(None),
            )
            for z_c, grad_c, col_c, target_col_c, target_add_c, row_scale_c, w_col_c in chunks:
                _grad_chunk(
                    z_c,
                    grad_c,
                    col_c,
                    target_col_c,
                    target_add_c,
                    row_scale_c,
                    w_col_c,
                    inv_beta,
                    beta,
                    scratch[: z_c.shape[0]],
                )
        return grad.view_as(logits), None, None, None, None, None, None, None, None, None


def vocab_parallel_gem_loss(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    beta: float = DEFAULT_BETA,
    h: str = DEFAULT_H,
    tp_group=None,
    ignore_index: int = -100,
    return_stats: bool = False,
    sync_checks: bool = True,
    impl: str = "auto",
    inplace_backward: bool = False,
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
        sync_checks: ``True``: bad targets and unequal shards raise here, at the cost of a host
            sync per call. ``False``: no host sync in forward or backward; the shard check runs
            once per (shard size, group), and an out-of-vocabulary target raises the same
            ValueError from the next ``raise_deferred_errors()``.
        impl: ``"torch"`` (chunked eager torch: the CPU path and the reference), ``"triton"``
            (``megatron_gem.ops.gem_triton``: one read of the logits forward, one read and one
            write backward; on CPU only under ``TRITON_INTERPRET=1``), or ``"auto"``: Triton
            for CUDA logits where it is available, torch otherwise.
        inplace_backward: write the gradient over the logits (as Megatron's cross-entropy
            does), saving a logits-sized buffer; only where the caller never reads the logits
            after the backward (``GemGPTModel`` does so for the output layer's logits).

    Returns:
        fp32 loss of ``target``'s shape (0 at ignored positions); with ``return_stats``,
        ``(loss, cross_entropy, entropy)``.
    """
    _validate(vocab_parallel_logits, target, beta, h, ignore_index)
    group = _default_tp_group() if tp_group is None else tp_group
    with _nvtx("megatron_gem/gem_loss/forward"):
        out = _VocabParallelGEM.apply(
            vocab_parallel_logits,
            target,
            float(beta),
            h,
            group,
            ignore_index,
            bool(return_stats),
            bool(sync_checks),
            resolve_impl(impl, vocab_parallel_logits),
            bool(inplace_backward),
        )
    return out


def gem_loss(
    logits,
    labels,
    beta: float = DEFAULT_BETA,
    h: str = DEFAULT_H,
    ignore_index: int = -100,
    sync_checks: bool = True,
    impl: str = "auto",
):
    """Single-device per-token GEM loss for logits ``[..., V]`` and labels ``[...]``, unreduced
    (fp32). ``sync_checks``, ``impl``: as in ``vocab_parallel_gem_loss``."""
    _validate(logits, labels, beta, h, ignore_index)
    impl = resolve_impl(impl, logits)
    with _nvtx("megatron_gem/gem_loss/forward"):
        return _VocabParallelGEM.apply(
            logits,
            labels,
            float(beta),
            h,
            None,
            ignore_index,
            False,
            bool(sync_checks),
            impl,
            False,
        )


def resolve_impl(impl: str, logits: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for ``impl`` on these logits (``"auto"``: Triton on CUDA where
    it imports); a ValueError names an unknown value or a Triton that cannot run here."""
    if impl not in IMPL_CHOICES:
        raise ValueError(f"impl must be one of {IMPL_CHOICES}, got impl={impl!r}")
    if impl == "torch":
        return impl
    from megatron_gem.ops import gem_triton

    if impl == "auto":
        return "triton" if logits.is_cuda and gem_triton.available() else "torch"
    if not gem_triton.available() or not (logits.is_cuda or gem_triton._INTERPRETED):
        raise ValueError(
            f"impl='triton': Triton cannot run on these {logits.device.type} logits here (it "
            "needs CUDA, or TRITON_INTERPRET=1 set before megatron_gem.ops.gem_triton is imported)"
        )
    return impl
