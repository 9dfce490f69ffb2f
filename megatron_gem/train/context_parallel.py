"""Context parallelism for packed (THD) SFT sequences, in plain torch (no Transformer Engine).

The layout is the one Transformer Engine's THD context-parallel attention expects (TE's
``thd_get_partitioned_indices``, which Megatron's ``get_batch_on_this_cp_rank`` calls for
batches with ``cu_seqlens``; TE's ``get_cu_seqlens_on_cp_rank`` for what each rank holds):

* every packed sub-sequence ``i`` occupies ``[P_i, P_{i+1})`` of the packed sequence
  (``cu_seqlens_padded`` = ``P``); its padded length is a multiple of ``2 * cp``; its
  first ``L_i`` positions are real tokens (``cu_seqlens`` = cumulative ``L``, TE's
  convention: it counts real tokens only), the rest padding placed by the dataset;
* sub-sequence ``i`` is cut into ``2 * cp`` equal chunks of ``c_i = (P_{i+1} - P_i) / (2 cp)``;
  CP rank ``r`` keeps chunks ``r`` and ``2 cp - 1 - r`` (causal load balance: an early and a late
  chunk), and its local sequence is, sub-sequence after sub-sequence, chunk ``r`` then chunk
  ``2 cp - 1 - r``: ``T / cp`` tokens, sub-sequence ``i`` at ``[P_i / cp, P_{i+1} / cp)``;
* attention gets GLOBAL metadata on every CP rank (TE divides ``cu_seqlens*`` and
  ``max_seqlen`` by ``cp`` itself, Megatron's THD RoPE ``cu_seqlens_padded``): the entry passes
  the padded boundaries (``megatron_gem.train.batches.packed_seq_params_from_cu_seqlens``);
  ``cu_seqlens_on_cp_rank`` gives what the metadata means on one rank, including how many of
  each sub-sequence's real tokens the rank holds.

Why not Megatron's ``get_batch_on_this_cp_rank``: it needs ``transformer_engine_torch`` for the
index, so it cannot run (or be tested) without TE; this index is the same, built from torch ops
on the batch's device without a host sync.
"""

from __future__ import annotations

__all__ = [
    "SEQUENCE_KEYS",
    "cp_pad_multiple",
    "check_thd_cp_layout",
    "thd_partition_index",
    "cu_seqlens_on_cp_rank",
    "partition_thd_batch",
]

# batch tensors laid out along the sequence ([b, s]); metadata (cu_seqlens...) is not split
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def cp_pad_multiple(cp_size: int) -> int:
    """What each packed sub-sequence is padded to a multiple of: ``2 * cp`` (1 without CP)."""
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive integer, got {cp_size!r}")
    return 2 * cp_size if cp_size > 1 else 1


def check_thd_cp_layout(cu_seqlens, cu_seqlens_padded, cp_size: int, total: int) -> None:
    """Raise ``ValueError`` (one line) unless the packed layout can be split over ``cp_size``.

    Host-side check (it reads the values): ``cu_seqlens_padded`` runs from 0 to ``total``,
    every padded length is a multiple of ``2 * cp``, and every real length lies within it.
    """
    import torch

    padded = torch.as_tensor(cu_seqlens_padded).reshape(-1).tolist()
    real = torch.as_tensor(cu_seqlens).reshape(-1).tolist()
    m = cp_pad_multiple(cp_size)
    if len(padded) < 2 or padded[0] != 0 or padded[-1] != total:
        raise ValueError(
            f"cu_seqlens_padded must run from 0 to the sequence length {total}, got {padded}"
        )
    if len(real) != len(padded) or real[0] != 0:
        raise ValueError(
            f"cu_seqlens {real} must start at 0 and have as many entries as "
            f"cu_seqlens_padded {padded}"
        )
    for i in range(len(padded) - 1):
        p, n = padded[i + 1] - padded[i], real[i + 1] - real[i]
        if p <= 0 or p % m:
            raise ValueError(
                f"cu_seqlens_padded: sub-sequence {i} has padded length {p}, not a positive "
                f"multiple of 2 x context-parallel size = {m} ({padded})"
            )
        if not 0 <= n <= p:
            raise ValueError(
                f"cu_seqlens: sub-sequence {i} has {n} real tokens but a padded length of {p}"
            )


def thd_partition_index(cu_seqlens_padded, cp_size: int, cp_rank: int, total: int):
    """``int64 [total / cp]``: positions of the packed sequence that CP rank ``cp_rank`` keeps.

    The same index as TE's ``thd_get_partitioned_indices(cu_seqlens_padded, total, cp, rank)``
    (see the module doc), computed with torch ops on ``cu_seqlens_padded``'s device; the
    layout is assumed valid (``check_thd_cp_layout``).
    """
    import torch

    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    if total % cp_size:
        raise ValueError(f"sequence length {total} is not divisible by cp_size {cp_size}")
    cu = cu_seqlens_padded.reshape(-1).to(torch.int64)
    if cp_size == 1:  # no split (and no padding needed: lengths may be odd)
        return torch.arange(total, device=cu.device)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    chunk = lengths // (2 * cp_size)
    local = total // cp_size
    # for each local position j: its sub-sequence, and where that sub-sequence starts locally
    seq = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu.device), 2 * chunk, output_size=local
    )
    j = torch.arange(local, device=cu.device) - (starts // cp_size)[seq]
    c = chunk[seq]
    # first half: chunk r at r*c; second half: chunk 2cp-1-r at (2cp-1-r)*c, entered at j = c
    second = j >= c
    offset = torch.where(second, (2 * cp_size - 1 - cp_rank) * c - c, cp_rank * c)
    return starts[seq] + offset + j


def cu_seqlens_on_cp_rank(cu_seqlens, cu_seqlens_padded, cp_size: int, cp_rank: int):
    """``(local cu_seqlens, local cu_seqlens_padded)`` of CP rank ``cp_rank``, as TE derives them.

    ``local cu_seqlens_padded = cu_seqlens_padded / cp``: where each sub-sequence lies in the
    rank's local sequence. ``local cu_seqlens``: the cumulative number of REAL tokens of each
    sub-sequence on this rank (TE's ``get_cu_seqlens_on_cp_rank`` with both halves): of the
    ``L_i`` real tokens, those falling into chunks ``r`` and ``2 cp - 1 - r``.
    """
    import torch

    cu = cu_seqlens.reshape(-1).to(torch.int64)
    cup = cu_seqlens_padded.reshape(-1).to(torch.int64)
    if cp_size == 1:
        return cu.to(torch.int32), cup.to(torch.int32)
    real = cu[1:] - cu[:-1]
    chunk = (cup[1:] - cup[:-1]) // (2 * cp_size)
    zero = torch.zeros_like(real)
    first = torch.minimum(torch.maximum(real - cp_rank * chunk, zero), chunk)
    late = torch.minimum(torch.maximum(real - (2 * cp_size - 1 - cp_rank) * chunk, zero), chunk)
    local = torch.cat([zero[:1], torch.cumsum(first + late, 0)])
    return local.to(torch.int32), (cup // cp_size).to(torch.int32)


def partition_thd_batch(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """``batch`` with its sequence tensors (``SEQUENCE_KEYS``, ``[b, s]``) cut to CP rank
    ``cp_rank``'s positions (``thd_partition_index`` over ``batch["cu_seqlens_padded"]``, or
    ``batch["cu_seqlens"]`` when there is no padding); other entries are kept as they are.
    Megatron's ``_get_batch_on_this_cp_rank_per_document_balancing`` without TE."""
    if cp_size == 1:
        return batch
    cu = batch.get("cu_seqlens_padded")
    if cu is None:
        cu = batch["cu_seqlens"]
    present = [k for k in SEQUENCE_KEYS if batch.get(k) is not None]
    if not present:  # a middle pipeline stage: metadata only
        return batch
    total = batch[present[0]].shape[1]
    index = thd_partition_index(cu, cp_size, cp_rank, total)
    out = dict(batch)
    for key in present:
        out[key] = batch[key].index_select(1, index.to(batch[key].device))
    return out
