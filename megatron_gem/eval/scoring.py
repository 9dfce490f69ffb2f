"""Exact scoring with teacher forcing: sequence log-probabilities, valid sets, held-out loss.

Log-softmax in fp32, sums in fp64, whatever the model's dtype. Valid responses are scored as
their canonical tokenisation plus the end token (``ChatFormat.response_ids``); held-out
documents as Megatron's pre-training data sees them (``ChatFormat.document_ids``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from megatron_gem.eval.formats import ChatFormat
from megatron_gem.eval.prompts import EvalPrompt
from megatron_gem.eval.sampling import model_device

__all__ = ["heldout_loss", "score_valid", "sequence_logprobs"]


@torch.no_grad()
def sequence_logprobs(
    model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 32
) -> list[float]:
    """log p(target | context) summed over the target tokens, for each (context_ids, target_ids).

    Teacher forcing in right-padded batches (sorted by length); log-softmax in fp32, sums in fp64.
    """
    dev = model_device(model)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in idx]
        for i in idx:
            if not pairs[i][0] or not pairs[i][1]:
                raise ValueError(f"sequence_logprobs: pair {i} has an empty context or target")
        width = max(len(s) for s in seqs)
        tokens = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        # positions whose token is a target
        tmask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for r, (i, s) in enumerate(zip(idx, seqs)):
            tokens[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
            tmask[r, len(pairs[i][0]) : len(s)] = True
        logits = model(input_ids=tokens.to(dev), attention_mask=mask.to(dev)).logits[:, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None].to(dev))[..., 0]
        lp = (lp.double() * tmask[:, 1:].to(dev)).sum(dim=1).tolist()
        for i, v in zip(idx, lp):
            out[i] = v
    return out


def score_valid(
    model, fmt: ChatFormat, prompts: Sequence[EvalPrompt], batch_size: int = 32
) -> list[list[float] | None]:
    """Exact log-probability of each valid response (its canonical tokenisation + end token) per
    prompt; None for prompts without a valid set."""
    pairs, owner = [], []
    for k, p in enumerate(prompts):
        if p.valid:
            ctx = fmt.prompt_ids(p.messages)
            for v in p.valid:
                pairs.append((ctx, fmt.response_ids(v, p.messages)))
                owner.append(k)
    lps = sequence_logprobs(model, pairs, batch_size)
    out: list[list[float] | None] = [[] if p.valid else None for p in prompts]
    for k, v in zip(owner, lps):
        out[k].append(v)
    return out


@torch.no_grad()
def heldout_loss(
    model, fmt: ChatFormat, texts: Sequence[str], max_len: int | None = None, batch_size: int = 16
) -> float:
    """Mean next-token cross-entropy (nats/token, weighted by tokens) of documents
    ``[bos]? + text + [eos]``; documents longer than ``max_len`` (default: the model's
    max_position_embeddings) are split into windows of max_len tokens."""
    if not texts:
        raise ValueError("heldout_loss: no texts")
    if max_len is None:
        max_len = getattr(model.config, "max_position_embeddings", None) or 2048
    if max_len < 2:
        raise ValueError(f"heldout_loss: max_len must be >= 2, got {max_len}")
    windows = []
    for t in texts:
        ids = fmt.document_ids(t)
        windows += [
            ids[i : i + max_len]
            for i in range(0, len(ids), max_len)
            if len(ids[i : i + max_len]) >= 2
        ]
    # Each window's first token is context, the rest are targets.
    lps = sequence_logprobs(model, [(w[:1], w[1:]) for w in windows], batch_size)
    n_tok = sum(len(w) - 1 for w in windows)
    if n_tok == 0:
        raise ValueError("heldout_loss: the texts have no token to predict (all empty?)")
    return -math.fsum(lps) / n_tok
