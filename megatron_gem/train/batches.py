"""Micro-batches for the training entry: pre-training (``get_batch``) and packed SFT
(``get_sft_batch``, on every pipeline stage), as upstream ``pretrain_gpt.py`` reads them.

Tensor-parallel rank 0 reads and broadcasts over its group; context parallelism slices the
sequence (packed SFT: per sub-sequence, ``megatron_gem.train.context_parallel``). Packed SFT
reaches attention as a dense block-diagonal mask (local spec) or as THD ``cu_seqlens``
(Transformer Engine; the dataset then builds no dense mask).
"""

from __future__ import annotations

__all__ = [
    "BATCH_KEYS",
    "get_batch",
    "get_sft_batch",
    "sft_uses_thd",
    "cu_seqlens_from_position_ids",
    "packed_seq_params_from_cu_seqlens",
]

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def _mtp_on_this_stage(args, vp_stage):
    """Whether this pipeline stage (virtual chunk) holds multi-token-prediction layers."""
    from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank

    return bool(args.mtp_num_layers) and mtp_on_this_rank(
        layout=getattr(args, "pipeline_model_parallel_layout", None),
        mtp_num_layers=args.mtp_num_layers,
        ignore_virtual=False,
        vp_stage=vp_stage,
    )


def _broadcast_over_tp(batch, args, *, tp_rank, mtp_here, first, last, thd, dense_mask):
    """Megatron's ``get_batch_on_this_tp_rank`` with this run's shapes and groups: tensor-parallel
    rank 0 sends its micro-batch (``dense_mask``: with the ``[b, 1, s, s]`` mask; ``thd``: with
    ``cu_seqlens`` / ``max_seqlen``) to the other ranks of its group."""
    from megatron.core import mpu
    from megatron.core.utils import get_batch_on_this_tp_rank

    return get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=thd,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=dense_mask,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=mtp_here,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=first,
        is_pipeline_last_stage=last,
    )


def get_batch(data_iterator, vp_stage=None):
    """One micro-batch on this rank: TP rank 0 reads, broadcasts over TP, slices for CP.

    Returns ``(tokens, labels, loss_mask, attention_mask, position_ids)`` (None where this
    pipeline stage does not need them). ``attention_mask`` is ``[b, 1, s, s]`` bool, True =
    masked: causal for pre-training, block-diagonal causal for packed SFT samples.
    """
    import torch
    from megatron.core import mpu
    from megatron.core.parallel_state import get_context_parallel_group
    from megatron.core.utils import get_batch_on_this_cp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    args = get_args()
    mtp_here = _mtp_on_this_stage(args, vp_stage)
    if not is_first_or_last_pipeline_stage(vp_stage) and not mtp_here:
        return None, None, None, None, None

    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        batch = next(data_iterator)
        for key in BATCH_KEYS:
            value = batch.get(key)
            batch[key] = value.cuda(non_blocking=True) if value is not None else None
        if args.sft and batch["attention_mask"] is None:
            raise ValueError("SFT batches must carry 'attention_mask' (packed samples)")
    batch = _broadcast_over_tp(
        batch,
        args,
        tp_rank=tp_rank,
        mtp_here=mtp_here,
        first=mpu.is_pipeline_first_stage(),
        last=mpu.is_pipeline_last_stage(),
        thd=False,  # packed SFT uses a dense block-diagonal mask, not THD
        dense_mask=args.create_attention_mask_in_dataloader,
    )
    batch = {key: batch.get(key) for key in BATCH_KEYS}
    if batch["attention_mask"] is not None and batch["attention_mask"].dtype != torch.bool:
        batch["attention_mask"] = batch["attention_mask"].bool()
    batch = get_batch_on_this_cp_rank(
        batch, is_hybrid_cp=False, cp_group=get_context_parallel_group()
    )
    return tuple(batch[key] for key in BATCH_KEYS)


def sft_uses_thd(args) -> bool:
    """Packed SFT with Transformer Engine: THD ``packed_seq_params`` instead of the dense mask.

    Megatron's TE layer spec builds causal attention and TE ignores a dense mask, so the
    per-sample boundaries must reach TE as ``cu_seqlens`` (as upstream Megatron's SFT does).
    """
    return (
        bool(getattr(args, "sft", False))
        and getattr(args, "transformer_impl", None) == "transformer_engine"
    )


def cu_seqlens_from_position_ids(position_ids):
    """``(cu_seqlens int32 [n + 1], max_seqlen)`` of one packed sequence.

    ``position_ids`` (``[S]`` or ``[1, S]``) restart at 0 at every packed sample and at the
    padding tail (``megatron_gem.data.sft``); each restart opens a segment.
    """
    import torch

    if position_ids.dim() == 2:
        if position_ids.shape[0] != 1:
            raise ValueError(
                "packed SFT with THD attention needs --micro-batch-size 1, got position_ids of "
                f"shape {tuple(position_ids.shape)}"
            )
        position_ids = position_ids[0]
    if position_ids.dim() != 1 or position_ids.numel() == 0 or int(position_ids[0]) != 0:
        raise ValueError(
            "position_ids must be a non-empty [S] or [1, S] tensor starting at 0, got shape "
            f"{tuple(position_ids.shape)}"
        )
    starts = torch.nonzero(position_ids == 0).view(-1)
    end = torch.tensor([position_ids.numel()], dtype=starts.dtype, device=starts.device)
    cu_seqlens = torch.cat([starts, end]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def packed_seq_params_from_cu_seqlens(cu_seqlens, max_seqlen: int, padded: bool = False):
    """Megatron's ``PackedSeqParams`` (THD) for self-attention over one packed sequence.

    ``cu_seqlens``: the sub-sequence boundaries; ``max_seqlen``: the longest sub-sequence.
    ``padded`` (context parallelism): the boundaries include each sample's padding to a multiple
    of 2*cp, and are also passed as ``cu_seqlens_*_padded`` (how TE and Megatron's THD RoPE find
    each rank's chunks). As upstream ``pretrain_gpt.py`` (0.19) does, attention then treats the
    padding as part of its sample: it comes after the sample's real tokens, so under the causal
    mask no real token sees it, and its loss mask is 0 (TE's separate real-length path,
    ``pad_between_seqs``, is avoided: upstream notes a bug there). All values are global (the
    whole packed sequence): TE's CP attention and the RoPE divide them by the CP size.
    """
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = cu_seqlens.reshape(-1).to(torch.int32)
    extra = dict(cu_seqlens_q_padded=cu_seqlens, cu_seqlens_kv_padded=cu_seqlens) if padded else {}
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=int(max_seqlen),
        max_seqlen_kv=int(max_seqlen),
        **extra,
    )


def _thd_metadata(raw, cp: int):
    """``(cu_seqlens, cu_seqlens_padded, max_seqlen)`` of a packed sample on the host.

    From the dataset's ``cu_seqlens`` / ``cu_seqlens_padded`` (``megatron_gem.data.sft`` on the
    THD path), else from the restarts of ``position_ids`` (no padding). With context
    parallelism the layout is checked here, on the host, before anything reaches the device.
    """
    from megatron_gem.train.context_parallel import check_thd_cp_layout

    if raw.get("cu_seqlens") is not None:
        cu = raw["cu_seqlens"].reshape(-1).int()
        padded = raw.get("cu_seqlens_padded")
        padded = cu if padded is None else padded.reshape(-1).int()
    else:
        cu, _ = cu_seqlens_from_position_ids(raw["position_ids"])
        padded = cu
    if cp > 1:
        check_thd_cp_layout(cu, padded, cp, int(raw["position_ids"].shape[-1]))
    return cu, padded, int((padded[1:] - padded[:-1]).max())


def get_sft_batch(data_iterator, vp_stage=None):
    """One packed SFT micro-batch on this rank, on EVERY pipeline stage (``--sft``).

    Returns ``(tokens, labels, loss_mask, attention_mask, position_ids, packed_seq_params)``.
    Unlike pre-training, middle stages run attention that must respect the packing, so the
    SFT data is read on every stage's TP rank 0 (``is_dataset_built_on_rank``; each stage and
    virtual chunk draws the same micro-batch sequence) and broadcast over TP: the dense
    block-diagonal mask (local spec), or ``cu_seqlens`` for THD (Transformer Engine; then
    ``attention_mask`` is None and ``packed_seq_params`` is set; Megatron's broadcast already
    sends THD metadata to middle stages). With context parallelism (THD only; arguments
    refuse it for the local spec) each CP rank then keeps its two chunks of every packed
    sub-sequence (``megatron_gem.train.context_parallel``) and attention gets the global padded
    boundaries (``packed_seq_params_from_cu_seqlens``).
    """
    import torch
    from megatron.core import mpu
    from megatron.training import get_args

    args = get_args()
    thd = sft_uses_thd(args)
    cp = args.context_parallel_size
    if cp > 1 and not thd:  # arguments refuse it; a dense mask cannot be split per CP rank here
        raise ValueError(
            f"packed --sft with --context-parallel-size {cp} needs "
            "--transformer-impl transformer_engine (THD)"
        )
    ignore_virtual = vp_stage is None
    first = mpu.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage)
    last = mpu.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage)
    mtp_here = _mtp_on_this_stage(args, vp_stage)
    middle = args.pipeline_model_parallel_size > 1 and not (first or last or mtp_here)
    tp_rank = mpu.get_tensor_model_parallel_rank()
    src, group = mpu.get_tensor_model_parallel_src_rank(), mpu.get_tensor_model_parallel_group()

    batch = {}
    host_max_seqlen = None  # THD on TP rank 0: known on the host before the broadcast
    if tp_rank == 0:
        if data_iterator is None:
            raise RuntimeError(
                "--sft: no data iterator on this pipeline stage (is_dataset_built_on_rank)"
            )
        raw = next(data_iterator)
        if thd:
            # from the loader's host tensors: no device sync
            cu_seqlens, cu_seqlens_padded, host_max_seqlen = _thd_metadata(raw, cp)
            raw = dict(
                raw,
                attention_mask=None,
                cu_seqlens=cu_seqlens,
                cu_seqlens_padded=cu_seqlens_padded if cp > 1 else None,
                max_seqlen=torch.tensor([host_max_seqlen], dtype=torch.int32),
            )
        elif raw.get("attention_mask") is None:
            raise ValueError("SFT batches must carry 'attention_mask' (packed samples)")
        for key in BATCH_KEYS + (("cu_seqlens", "cu_seqlens_padded", "max_seqlen") if thd else ()):
            value = raw.get(key)
            batch[key] = value.cuda(non_blocking=True) if value is not None else None

    if middle and not thd:
        # Megatron's broadcast sends nothing to a middle stage without THD metadata.
        shape = (args.micro_batch_size, 1, args.seq_length, args.seq_length)
        if tp_rank == 0:
            mask = batch["attention_mask"].bool().contiguous()
        else:
            mask = torch.empty(shape, dtype=torch.bool, device=torch.cuda.current_device())
        if mpu.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.broadcast(mask, src, group=group)
        return None, None, None, mask, None, None

    batch = _broadcast_over_tp(
        batch,
        args,
        tp_rank=tp_rank,
        mtp_here=mtp_here,
        first=first,
        last=last,
        thd=thd,
        dense_mask=not thd,
    )
    if thd and cp > 1:
        from megatron_gem.train.context_parallel import partition_thd_batch

        batch = partition_thd_batch(batch, cp, mpu.get_context_parallel_rank())
    out = [batch.get(key) for key in BATCH_KEYS]
    if middle:  # THD: Megatron sent only cu_seqlens / max_seqlen
        out = [None] * len(BATCH_KEYS)
    packed_seq_params = None
    if thd:
        out[BATCH_KEYS.index("attention_mask")] = None
        # PackedSeqParams takes max_seqlen as a host int (TE sizes its kernels and picks its
        # backend with it; every TP rank must pass the same). TP rank 0 has it; the others got it
        # on the device in the broadcast, and reading it back is a sync they cannot avoid.
        if host_max_seqlen is None:
            host_max_seqlen = int(batch["max_seqlen"].max().item())
        if cp > 1:  # the padded boundaries (see packed_seq_params_from_cu_seqlens)
            packed_seq_params = packed_seq_params_from_cu_seqlens(
                batch["cu_seqlens_padded"], host_max_seqlen, padded=True
            )
        else:
            packed_seq_params = packed_seq_params_from_cu_seqlens(
                batch["cu_seqlens"], host_max_seqlen
            )
    elif out[BATCH_KEYS.index("attention_mask")] is not None:
        out[BATCH_KEYS.index("attention_mask")] = out[BATCH_KEYS.index("attention_mask")].bool()
    return (*out, packed_seq_params)
