"""The output layer and the GEM loss in one op, without the ``[tokens, V/tp]`` logits.

``vocab_parallel_linear_gem_loss(hidden, weight, target)`` equals
``vocab_parallel_gem_loss(hidden @ weight.T, target)`` (same reductions, same two collectives),
but works over tiles of the logits: token blocks (``chunk_tokens``, default all tokens) times
vocabulary chunks (``chunk_vocab``). Per tile it computes the local logits
``hidden_block @ weight_chunk.T`` (one GEMM in the input dtype, as Megatron's output layer does)
into one reused buffer, takes their per-row sums in fp32, and merges them into the running sums
with the online rescale the op uses across ranks (``_rescale_to_max``). Saved for the backward:
``hidden``, ``weight``, ``target`` and per row ``m``, ``z_y``, ``1/S``, ``A``; no logits beyond one
tile, forward or backward.

Backward: per tile, recompute the logits, form the gradient in place in the tile's buffer (fp32
until ``grad_output / S`` is applied, then one cast), and take both GEMMs from it: the chunk's
rows of ``dweight`` (complete with one token block: one GEMM over all tokens, rounded once, as
on the materialised path) and ``dhidden``'s part, summed over the vocabulary chunks in fp32
(low-precision inputs: an fp32 ``[tokens, H]`` buffer, 16 MiB at 4096 x 1024, the one buffer
that grows with the tokens). With several token blocks ``dweight`` is summed in fp32
(``[V/tp, H]``), or straight into ``weight.main_grad`` with ``gradient_accumulation_fusion``.

Cost: one extra GEMM of the output layer's size (the recompute; ``logsigmoid`` pays a second one
in the forward: it needs the global row max before the sums). Forming the gradient in the
forward instead (Liger-Kernel's way, possible at TP 1 where each tile's statistics are final)
saves no GEMM here: ``dhidden`` could be scaled by the per-token ``grad_output`` afterwards, but
``dweight = G^T diag(grad_output) hidden`` cannot, so the backward would recompute ``G`` anyway.

Tensor parallelism: ``weight`` is this rank's vocabulary shard and ``hidden`` the full sequence
(as Megatron's ColumnParallelLinear sees it). The returned ``dhidden`` is this rank's PARTIAL sum;
reducing it over the tensor-parallel group is the output layer's job, as in ColumnParallelLinear.
Tied embeddings are the caller's business: pass the embedding weight and autograd accumulates.

Host synchronisation and the Triton kernels: as ``vocab_parallel_gem_loss`` (``sync_checks``,
``impl``); with ``impl="triton"`` each tile's sums and gradient are the kernels of
``megatron_gem.ops.gem_triton``, the GEMMs stay torch's.
"""

from __future__ import annotations

import torch

from megatron_gem.ops.config import DEFAULT_BETA, DEFAULT_H
from megatron_gem.ops.gem_loss import (
    LOGSIGMOID_SCALE,
    _chunk_sums,
    _complete_sums,
    _default_tp_group,
    _finish,
    _grad_chunk,
    _group_rank_size,
    _input_checks,
    _neg_scaled_shift,
    _nvtx,
    _raise_on_checks,
    _reduce_max,
    _rescale_to_max,
    _validate,
    resolve_impl,
)

__all__ = ["vocab_parallel_linear_gem_loss"]

# Logits per tile (one GEMM's output, in the input dtype). CPU: 4 MiB of bf16, 512 vocabulary
# columns at 4096 tokens: 256 was ~20% slower (dhidden's fp32 accumulation is one pass over
# [tokens, H] per chunk), 1024 would break the memory target. CUDA: full-speed GEMMs.
_TILE_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 23}
# fp32 elements per elementwise block of a tile (the torch impl's scratch): 1 MiB on CPU (in L2).
_SCRATCH_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 23}
_MIN_CHUNK_VOCAB = 128  # narrower GEMMs lose more speed than they save memory
_ADD_ROW_ELEMENTS = 1 << 18  # CPU: dhidden's fp32 accumulation goes through a 1 MiB block


def _budget(table: dict, device: torch.device) -> int:
    return table.get(device.type, table["cuda"])


class _Tiles:
    """Token blocks x vocabulary chunks of the logits, and the one buffer a tile's logits go to."""

    def __init__(self, x2, weight, chunk_tokens, chunk_vocab):
        n, v_local = x2.shape[0], weight.shape[0]
        dev = x2.device
        self.x2, self.weight = x2, weight
        self.tb = max(1, min(n, chunk_tokens or n))
        self.vc = chunk_vocab or max(_MIN_CHUNK_VOCAB, _budget(_TILE_ELEMENTS, dev) // self.tb)
        self.vc = min(self.vc, v_local)
        self.rows = [slice(i, min(i + self.tb, n)) for i in range(0, n, self.tb)]
        self.cols = [slice(j, min(j + self.vc, v_local)) for j in range(0, v_local, self.vc)]
        self.sub = max(1, _budget(_SCRATCH_ELEMENTS, dev) // self.vc)  # rows per fp32 block
        self._buffer = torch.empty(self.tb * self.vc, dtype=x2.dtype, device=dev)

    def logits(self, rows, cols):
        """This tile's local logits ``hidden[rows] @ weight[cols].T`` ([r, w], contiguous),
        in the reused buffer: valid until the next call."""
        r, w = rows.stop - rows.start, cols.stop - cols.start
        z = self._buffer[: r * w].view(r, w)
        return torch.mm(self.x2[rows], self.weight[cols].T, out=z)

    def blocks(self, r):
        """Row blocks of a tile of r rows for the fp32 elementwise passes."""
        return [slice(i, min(i + self.sub, r)) for i in range(0, r, self.sub)]

    def scratch(self, count):
        """``count`` flat fp32 buffers, each enough for one row block (shape it with _view)."""
        size = min(self.sub, self.tb) * self.vc
        return [torch.empty(size, dtype=torch.float32, device=self.x2.device) for _ in range(count)]


def workspace_bytes(
    tokens: int,
    hidden_size: int,
    v_local: int,
    dtype_bytes: int = 2,
    device: str = "cuda",
    impl: str = "auto",
) -> int:
    """Peak bytes the op holds beyond its inputs, outputs and the two gradients, at the default
    tiles (all tokens in one block): one tile of logits in the input dtype, the torch impl's two
    fp32 scratch blocks (the Triton kernels, ``auto`` on CUDA, need none), and ``dhidden``'s fp32
    accumulator for low-precision inputs. For memory estimates (the launch dry run); the
    benchmark measures it."""
    dev = torch.device(device)
    vc = min(v_local, max(_MIN_CHUNK_VOCAB, _budget(_TILE_ELEMENTS, dev) // tokens))
    sub = max(1, _budget(_SCRATCH_ELEMENTS, dev) // vc)
    tile = tokens * vc * dtype_bytes
    triton = impl == "triton" or (impl == "auto" and dev.type == "cuda")
    scratch = 0 if triton else 2 * min(sub, tokens) * vc * 4
    accumulator = tokens * hidden_size * 4 if dtype_bytes < 4 else 0
    return tile + scratch + accumulator


def _view(flat, like):
    """The first ``like.numel()`` elements of a flat scratch buffer, shaped like ``like``."""
    return flat[: like.numel()].view(like.shape)


def _gather_target(z, local_t, col0, out):
    """Into ``out`` (fp32 [r]), the logit of each row whose target falls in this chunk
    (columns ``col0 ..``); other rows keep their value."""
    w = z.shape[1]
    lc = local_t - col0
    here = (lc >= 0) & (lc < w)
    value = z.gather(1, lc.clamp(0, w - 1).unsqueeze(1)).squeeze(1).float()
    out.copy_(torch.where(here, value, out))


def _merge_sums(run, run_shift, part, part_shift, beta):
    """Running sums (relative to ``run_shift``) += a chunk's (relative to ``part_shift``), both
    re-expressed with the larger shift first, in place (the op's cross-rank rescale)."""
    new = torch.maximum(run_shift, part_shift)
    _rescale_to_max(run, run_shift, new, beta)
    _rescale_to_max(part, part_shift, new, beta)
    run.add_(part)
    run_shift.copy_(new)


def _add_into(acc, part, tmp):
    """acc (fp32) += part (low precision). On CPU through the small fp32 block ``tmp``: a
    mixed-dtype add is ~3-6x slower there than a cast plus an fp32 add in cache."""
    if tmp is None:
        acc.add_(part)
        return
    step = tmp.shape[0]
    for i in range(0, acc.shape[0], step):
        block = part[i : i + step]
        acc[i : i + step].add_(tmp[: block.shape[0]].copy_(block))


def _accumulate_mm(acc, a, b):
    """acc += a @ b, accumulated in acc's dtype (fp32 main_grad or accumulator)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:  # a low-precision GEMM with an fp32 output
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:  # CPU has no mixed-dtype mm: the product is rounded once, then added
        acc.add_(a @ b)


class _LinearGEM(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        target,
        beta,
        h,
        group,
        ignore_index,
        with_stats,
        sync_checks,
        impl,
        fusion,
        chunk_tokens,
        chunk_vocab,
    ):
        rank, world = _group_rank_size(group)
        x2 = hidden.reshape(-1, hidden.shape[-1])
        t = target.reshape(-1)
        n, v_local = x2.shape[0], weight.shape[0]
        start = rank * v_local
        logsigmoid = h == "logsigmoid"
        inv_beta = 1.0 / beta
        dev = x2.device
        triton = impl == "triton"
        if triton:
            from megatron_gem.ops import gem_triton

        local_t = t - start
        valid = t != ignore_index
        bad_target = ((t < 0) | (t >= v_local * world)) & (t != ignore_index)
        shard_key = (v_local, group)
        checks = _input_checks(t, bad_target, v_local, shard_key, world, sync_checks, ignore_index)
        tiles = _Tiles(x2, weight, chunk_tokens, chunk_vocab)
        fp32 = x2.dtype == torch.float32

        # linear: each row's running max over this shard (its sums are relative to it);
        # logsigmoid: the global row max, found by a first pass
        shift = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
        zy_local = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)  # -inf off
        sums = torch.zeros(5 if with_stats else 3, n, dtype=torch.float32, device=dev)

        def reduce_max(m_local):
            """The op's collective 1 (MAX); with the checks packed, its one host sync."""
            m, zy, reduced = _reduce_max(m_local, zy_local, checks, valid, group, world)
            if checks is not None:
                _raise_on_checks(
                    reduced, "weight", shard_key, sync_checks, t, bad_target, ignore_index
                )
            return m, zy

        if logsigmoid:  # the weights need the global max and z_y inside the pass: a first pass
            for rows in tiles.rows:
                for cols in tiles.cols:
                    z = tiles.logits(rows, cols)
                    torch.maximum(shift[rows], z.amax(-1).float(), out=shift[rows])
                    _gather_target(z, local_t[rows], cols.start, zy_local[rows])
            m, zy = reduce_max(shift)
            shift = m
        x_flat, e_flat = (None, None) if triton else tiles.scratch(2)
        part_shift = torch.empty(tiles.tb, dtype=torch.float32, device=dev)
        for rows in tiles.rows:
            r = rows.stop - rows.start
            for cols in tiles.cols:
                z = tiles.logits(rows, cols)
                if not logsigmoid:
                    _gather_target(z, local_t[rows], cols.start, zy_local[rows])
                if triton:  # the sums come back completed (A = S, beta 1)
                    part, p_shift = gem_triton.local_row_sums(
                        z,
                        beta=beta,
                        logsigmoid=logsigmoid,
                        with_stats=with_stats,
                        shift=shift[rows] if logsigmoid else None,
                        zy=zy[rows] if logsigmoid else None,
                    )
                else:
                    part = torch.empty(sums.shape[0], r, dtype=torch.float32, device=dev)
                    p_shift = shift[rows] if logsigmoid else part_shift[:r]
                    for b in tiles.blocks(r):
                        z_b = z[b]
                        _chunk_sums(
                            z_b,
                            p_shift[b],
                            zy[rows][b] if logsigmoid else None,
                            inv_beta,
                            beta,
                            logsigmoid,
                            with_stats,
                            z_b if fp32 else _view(x_flat, z_b),  # fp32: in the tile itself
                            _view(e_flat, z_b),
                            part[:, b],
                        )
                    _complete_sums(part, with_stats, beta, logsigmoid)
                if logsigmoid:  # relative to the global max already
                    sums[:, rows] += part
                else:
                    _merge_sums(sums[:, rows], shift[rows], part, p_shift, beta)
        del x_flat, e_flat
        if not logsigmoid:
            m, zy = reduce_max(shift)
            _rescale_to_max(sums, shift, m, beta)

        # The op's collective 2 (SUM): all rows' sums, packed, once.
        loss, inv_s, sum_ew, ce, entropy = _finish(
            sums, m, zy, valid, beta, group, world, with_stats
        )
        ctx.save_for_backward(hidden, weight, t, m, zy, inv_s, sum_ew)
        # as Megatron's LinearWithGradAccumulationAndAsyncCommunication: main_grad is kept on
        # ctx, not saved (a weight shared by several calls would trip the in-place checks)
        ctx.main_grad = weight.main_grad if fusion and hasattr(weight, "main_grad") else None
        ctx.meta = (start, inv_beta, beta, logsigmoid, impl, chunk_tokens, chunk_vocab)

        shape = target.shape
        if not with_stats:
            return loss.view(shape)
        ctx.mark_non_differentiable(ce, entropy)
        return loss.view(shape), ce.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        hidden, weight, t, m, zy, inv_s, sum_ew = ctx.saved_tensors
        start, inv_beta, beta, logsigmoid, impl, chunk_tokens, chunk_vocab = ctx.meta
        main_grad = ctx.main_grad
        triton = impl == "triton"
        if triton:
            from megatron_gem.ops import gem_triton
        with _nvtx("megatron_gem/linear_gem_loss/backward"):
            x2 = hidden.reshape(-1, hidden.shape[-1])
            n, hid = x2.shape
            dev = x2.device
            fp32 = x2.dtype == torch.float32
            tiles = _Tiles(x2, weight, chunk_tokens, chunk_vocab)
            # as the op's backward: grad = (e w - (sum e w) onehot(y)) * grad_output / S
            row_scale = grad_loss.reshape(-1).float() * inv_s  # 0 on ignored rows
            local_t = t - start
            col = _neg_scaled_shift(m, inv_beta)
            w_col = (LOGSIGMOID_SCALE * (m - zy)).unsqueeze(-1) if logsigmoid else None
            need_dx, need_dw = ctx.needs_input_grad[:2]

            dhidden = torch.empty_like(x2) if need_dx else None
            # low precision: dhidden is summed over the vocabulary chunks in fp32; each chunk's
            # GEMM writes its (rounded) part into dhidden's rows first
            acc = tmp = None
            if need_dx and not fp32:
                acc = torch.empty(tiles.tb, hid, dtype=torch.float32, device=dev)
            if acc is not None and not x2.is_cuda:
                rows_per_add = max(1, _ADD_ROW_ELEMENTS // hid)
                tmp = torch.empty(rows_per_add, hid, dtype=torch.float32, device=dev)
            # dweight: one token block writes each chunk's rows once; several accumulate, in
            # main_grad (gradient-accumulation fusion) or an fp32 buffer
            dweight = dw_acc = None
            if need_dw and main_grad is not None:
                dw_acc = main_grad
            elif need_dw and len(tiles.rows) == 1:
                dweight = torch.empty_like(weight)  # written chunk by chunk
            elif need_dw and fp32:
                dweight = dw_acc = torch.zeros_like(weight)
            elif need_dw:
                dw_acc = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
            x_flat = None if triton or fp32 else tiles.scratch(1)[0]

            for rows in tiles.rows:
                r = rows.stop - rows.start
                h_rows = x2[rows]
                for cols in tiles.cols:
                    z = tiles.logits(rows, cols)  # the recompute: the extra GEMM
                    c0, w = cols.start, cols.stop - cols.start
                    if triton:  # the gradient over the tile's logits
                        gem_triton.gem_grad(
                            z,
                            local_t[rows] - c0,
                            row_scale[rows],
                            sum_ew[rows],
                            beta=beta,
                            logsigmoid=logsigmoid,
                            m=m[rows],
                            zy=zy[rows] if logsigmoid else None,
                            out=z,
                        )
                    else:
                        lc = local_t[rows] - c0
                        here = (lc >= 0) & (lc < w)
                        target_col = lc.clamp(0, w - 1).unsqueeze(-1)
                        target_add = torch.where(here, -sum_ew[rows], 0.0).unsqueeze(-1)
                        scale = row_scale[rows].unsqueeze(-1)
                        col_r = col[rows]
                        w_col_r = w_col[rows] if logsigmoid else None
                        for b in tiles.blocks(r):
                            z_b = z[b]
                            _grad_chunk(
                                z_b,
                                z_b,  # in place: the gradient over the tile's logits
                                col_r[b],
                                target_col[b],
                                target_add[b],
                                scale[b],
                                None if w_col_r is None else w_col_r[b],
                                inv_beta,
                                beta,
                                z_b if fp32 else _view(x_flat, z_b),
                            )
                    g, w_chunk = z, weight[cols]
                    if need_dx:
                        out = dhidden[rows]
                        if fp32 and c0 > 0:
                            out.addmm_(g, w_chunk)
                        else:
                            torch.mm(g, w_chunk, out=out)
                            if acc is not None and c0 == 0:
                                acc[:r].copy_(out)
                            elif acc is not None:
                                _add_into(acc[:r], out, tmp)
                    if dw_acc is not None:
                        _accumulate_mm(dw_acc[cols], g.T, h_rows)
                    elif need_dw:  # all tokens in one GEMM: each element rounded once
                        torch.mm(g.T, h_rows, out=dweight[cols])
                if acc is not None:
                    dhidden[rows].copy_(acc[:r])

        dx = dhidden.view_as(hidden) if need_dx else None
        if not need_dw:
            dw = None
        elif main_grad is not None:
            # Megatron's contract (tensor_parallel/layers.py): the gradient went into main_grad;
            # autograd gets a dummy where the parameter tracks grad_added_to_main_grad (so the
            # DDP hook runs on this thread and does not add it again), else None
            dw = None
            if hasattr(weight, "grad_added_to_main_grad"):
                make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
                dw = make(main_grad.shape, dtype=hidden.dtype, device=dev)
                weight.grad_added_to_main_grad = True
        else:
            dw = dweight if dweight is not None else dw_acc.to(weight.dtype)
        return dx, dw, *([None] * 11)


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
    *,
    chunk_vocab: int | None = None,
    sync_checks: bool = True,
    impl: str = "auto",
    gradient_accumulation_fusion: bool = False,
):
    """Per-token GEM loss of the logits ``hidden @ weight.T``, without materialising them.

    Args:
        hidden: ``[..., H]`` output-layer input, the full sequence (Megatron: ``[s, b, H]``).
        weight: ``[V/tp, H]`` this rank's contiguous vocabulary shard of the output weight.
        target: ``[...]`` global vocabulary ids; ``ignore_index`` marks positions without loss.
        beta, h, tp_group, ignore_index, return_stats, sync_checks, impl: as in
            ``vocab_parallel_gem_loss`` (``impl="auto"``: the Triton kernels per tile on CUDA).
        chunk_tokens: tokens per block (default: all). Fewer bound ``dhidden``'s fp32
            accumulator (``[chunk_tokens, H]``) but make ``dweight`` accumulate over the blocks,
            in an fp32 ``[V/tp, H]`` buffer unless it goes to ``main_grad``.
        chunk_vocab: vocabulary columns per tile (default: about 2^21 logits per tile on CPU,
            2^23 on CUDA, at least 128 columns).
        gradient_accumulation_fusion: as Megatron's flag of that name: where ``weight`` has a
            ``main_grad`` (fp32, Megatron's DDP buffer), the backward adds ``dweight`` into it
            and returns no real weight gradient (a dummy, flagging ``grad_added_to_main_grad``,
            where the parameter has that attribute; else None).

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
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    main_grad = getattr(weight, "main_grad", None) if gradient_accumulation_fusion else None
    if main_grad is not None and (
        not isinstance(main_grad, torch.Tensor)
        or main_grad.shape != weight.shape
        or main_grad.device != weight.device
    ):
        raise ValueError(
            f"weight.main_grad must be a tensor of weight's shape {tuple(weight.shape)} on "
            f"{weight.device}, got {getattr(main_grad, 'shape', type(main_grad).__name__)}"
        )
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
            bool(sync_checks),
            resolve_impl(impl, hidden),
            bool(gradient_accumulation_fusion),
            chunk_tokens,
            chunk_vocab,
        )
