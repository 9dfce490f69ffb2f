"""Evaluation of one model or one set of generations: metrics per prompt and per prompt set.

``evaluate`` is the whole run: sample (``megatron_gem.eval.sampling``) unless generations are
given, score the valid sets and the held-out loss (``megatron_gem.eval.scoring``), then the
metrics (``megatron_gem.eval.metrics``) per prompt (``prompt_metrics``) and their means per
prompt set (``summarise``); ``flat_metrics`` flattens a result for a results table.

All metrics are computed on the response text (the tokens generated after the prompt), never on
the prompt.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from megatron_gem.eval import metrics as M
from megatron_gem.eval.formats import ChatFormat
from megatron_gem.eval.prompts import EvalPrompt
from megatron_gem.eval.sampling import SamplingConfig, sample
from megatron_gem.eval.scoring import heldout_loss, score_valid

__all__ = ["METRIC_NAMES", "evaluate", "flat_metrics", "prompt_metrics", "summarise"]

METRIC_NAMES = (
    "quality",
    "valid_mass",
    "effective_valid",
    "coverage",
    "ngram_diversity",
    "distinct_1",
    "distinct_2",
    "distinct_3",
    "self_bleu_diversity",
    "embedding_diversity",
)


def prompt_metrics(
    samples: Sequence[str],
    valid: Sequence[str] | None = None,
    valid_logprobs: Sequence[float] | None = None,
    embedder=None,
) -> dict:
    """Metrics of one prompt's samples (response text only); absent when undefined."""
    if not samples:
        raise ValueError("prompt_metrics: no samples")
    m: dict = {}
    if valid:
        m["quality"] = M.quality(samples, valid)
        m["coverage"] = M.coverage(samples, valid)
    if valid_logprobs is not None:
        if not valid or len(valid_logprobs) != len(valid):
            raise ValueError(
                f"prompt_metrics: {len(valid_logprobs)} log-probabilities for "
                f"{len(valid or [])} valid responses"
            )
        # One probability per distinct answer: a response listed twice counts once; responses
        # that normalise to the same answer ("Owl", "owl") are different sequences whose
        # probabilities add up.
        groups: dict[str, list[float]] = {}
        for v, lp in dict(zip(valid, valid_logprobs)).items():
            groups.setdefault(M.normalize_answer(v), []).append(lp)
        answers = [
            torch.logsumexp(torch.tensor(g, dtype=torch.float64), 0).item() for g in groups.values()
        ]
        m["valid_mass"] = M.valid_mass(answers)
        ev = M.effective_valid(answers)
        if math.isfinite(ev):
            m["effective_valid"] = ev
    ng = M.ngram_diversity(samples)
    if ng["mean"] is not None:
        m["ngram_diversity"] = ng["mean"]
        for n in (1, 2, 3):
            if n in ng:
                m[f"distinct_{n}"] = ng[n]
    if len(samples) >= 2:
        m["self_bleu_diversity"] = M.self_bleu_diversity(samples)
        if embedder is not None:
            m["embedding_diversity"] = M.embedding_diversity(embedder(list(samples)))
    return m


def summarise(
    prompts: Sequence[EvalPrompt],
    generations: Sequence[Sequence[str]],
    valid_logprobs: Sequence[Sequence[float] | None] | None = None,
    embedder=None,
) -> tuple[dict, list[dict]]:
    """(per-set means, per-prompt records). Sets: each prompt's ``split`` plus "all".

    A set's metric is the mean over the prompts where it is defined; ``n_<metric>`` says over how
    many (e.g. quality only over prompts with a valid list).
    """
    if len(generations) != len(prompts):
        raise ValueError(
            f"summarise: {len(generations)} generation lists for {len(prompts)} prompts"
        )
    per_prompt = []
    for k, (p, g) in enumerate(zip(prompts, generations)):
        lps = valid_logprobs[k] if valid_logprobs is not None else None
        per_prompt.append(
            {
                "id": p.id,
                "split": p.split,
                "n_samples": len(g),
                "metrics": prompt_metrics(g, p.valid, lps, embedder),
            }
        )
    sets: dict[str, dict] = {}
    names = ["all"] + sorted({p.split for p in prompts} - {"all"})
    for name in names:
        recs = [r for r in per_prompt if name == "all" or r["split"] == name]
        s: dict = {"n_prompts": len(recs), "n_samples": sum(r["n_samples"] for r in recs)}
        for metric in METRIC_NAMES:
            vals = [r["metrics"][metric] for r in recs if metric in r["metrics"]]
            if vals:
                s[metric] = math.fsum(vals) / len(vals)
                s[f"n_{metric}"] = len(vals)
        sets[name] = s
    return sets, per_prompt


def evaluate(
    model,
    fmt: ChatFormat,
    prompts: Sequence[EvalPrompt],
    sampling: SamplingConfig = SamplingConfig(),
    *,
    generations: Sequence[Sequence[str]] | None = None,
    heldout_texts: Sequence[str] | None = None,
    heldout_loss_before: float | None = None,
    score: bool = True,
    embedder=None,
    batch_size: int = 32,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate one model: sample (unless ``generations`` are given), score valid sets,
    held-out loss.

    Returns ``{"sets": {set: {metric: mean}}, "heldout_loss", "forgetting", "prompts": [...],
    "sampling": {...}}``; ``forgetting`` needs ``heldout_loss_before`` (the loss of the model
    before SFT on the same texts). With ``model=None`` only the text metrics of ``generations``.
    """
    say = progress or (lambda msg: None)
    sampled = generations is None
    if sampled:
        if model is None:
            raise ValueError("evaluate: give a model to sample from or generations")
        say(f"sampling {sampling.n} responses for {len(prompts)} prompts")
        generations = sample(
            model,
            fmt,
            [p.messages for p in prompts],
            sampling,
            progress=lambda k, n: say(f"sampled {k}/{n} prompts"),
        )
    lps = None
    if model is not None and score and any(p.valid for p in prompts):
        say("scoring valid responses")
        lps = score_valid(model, fmt, prompts, batch_size)
    sets, per_prompt = summarise(prompts, generations, lps, embedder)
    for rec, g in zip(per_prompt, generations):
        rec["generations"] = list(g)
    result = {
        "sets": sets,
        "heldout_loss": None,
        "forgetting": None,
        "prompts": per_prompt,
        "sampling": vars(sampling).copy() if sampled else None,
    }
    if model is not None and heldout_texts:
        say(f"held-out loss on {len(heldout_texts)} documents")
        result["heldout_loss"] = heldout_loss(model, fmt, heldout_texts, batch_size=batch_size)
        if heldout_loss_before is not None:
            result["forgetting"] = M.forgetting(heldout_loss_before, result["heldout_loss"])
    return result


def flat_metrics(result: dict) -> dict[str, float]:
    """``{"<set>/<metric>": value, "heldout_loss": ..., "forgetting": ...}`` for a results table."""
    out = {f"{s}/{k}": v for s, d in result["sets"].items() for k, v in d.items()}
    for k in ("heldout_loss", "forgetting"):
        if result.get(k) is not None:
            out[k] = result[k]
    return out
