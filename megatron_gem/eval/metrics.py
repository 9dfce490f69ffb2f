"""Quality, diversity and forgetting metrics for SFT studies (pure Python; torch only for
embeddings).

Every function works on one prompt: its N sampled responses (strings, the response text only,
never the prompt) and, where the prompt has an enumerable valid set, that set and the model's
exact log-probabilities of each valid response (from ``evaluation.score_responses``).
Aggregation over prompts and prompt sets is in ``evaluation.summarise``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Iterable, Sequence

_PUNCT_EDGES = " \t\n\r.,;:!?\"'`()[]{}"
_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Canonical form for validity checks: lower case, single spaces, no edge punctuation."""
    return " ".join(text.lower().split()).strip(_PUNCT_EDGES)


def tokenize(text: str) -> list[str]:
    """Word tokens for the text metrics: runs of word characters, each punctuation mark alone."""
    return _TOKEN_RE.findall(text)


# ---- quality and valid-set diversity --------------------------------------------------------


def _valid_set(valid: Iterable[str]) -> set[str]:
    out = {normalize_answer(v) for v in valid}
    if not out:
        raise ValueError("valid set is empty: a prompt's 'valid' list needs at least one answer")
    return out


def is_valid(sample: str, valid: Iterable[str]) -> bool:
    return normalize_answer(sample) in _valid_set(valid)


def quality(samples: Sequence[str], valid: Iterable[str]) -> float:
    """Fraction of samples whose normalised text is in the normalised valid set."""
    if not samples:
        raise ValueError("quality: no samples")
    vs = _valid_set(valid)
    return sum(normalize_answer(s) in vs for s in samples) / len(samples)


def coverage(samples: Sequence[str], valid: Iterable[str]) -> float:
    """Fraction of the valid set that appears at least once among the samples."""
    vs = _valid_set(valid)
    return len(vs & {normalize_answer(s) for s in samples}) / len(vs)


def _check_logprobs(logprobs: Sequence[float], name: str) -> list[float]:
    lps = [float(x) for x in logprobs]
    if not lps:
        raise ValueError(f"{name}: no log-probabilities given")
    bad = [x for x in lps if math.isnan(x) or x > 1e-6]
    if bad:
        raise ValueError(f"{name}: log-probabilities must be <= 0 and not NaN, got {bad[:3]}")
    return [min(x, 0.0) for x in lps]


def valid_mass(valid_logprobs: Sequence[float]) -> float:
    """Probability the model puts on the valid set: sum of exp(log p(response)) over valid
    responses.

    Exact when each log-prob is that of the whole response including its end-of-response token
    and the valid responses are distinct token sequences.
    """
    return math.fsum(math.exp(x) for x in _check_logprobs(valid_logprobs, "valid_mass"))


def effective_valid(valid_logprobs: Sequence[float]) -> float:
    """Effective number of valid answers: exp(entropy) of the model's distribution restricted to
    the valid set and renormalised. 1 = all mass on one answer; len(valid) = uniform."""
    lps = _check_logprobs(valid_logprobs, "effective_valid")
    m = max(lps)
    if m == -math.inf:
        return float("nan")  # no mass on the valid set at all: undefined
    w = [math.exp(x - m) for x in lps]
    z = math.fsum(w)
    ent = -math.fsum((wi / z) * (x - m - math.log(z)) for wi, x in zip(w, lps) if wi > 0)
    return math.exp(ent)


# ---- text diversity -------------------------------------------------------------------------


def ngram_diversity(samples: Sequence[str], orders: Sequence[int] = (1, 2, 3)) -> dict:
    """Distinct n-grams / total n-grams, pooled over the samples (n-grams never cross samples).

    Returns {n: ratio} for each order with at least one n-gram, and "mean": the mean of those
    ratios (None when no sample has any token).
    """
    toks = [tokenize(s) for s in samples]
    out: dict = {}
    for n in orders:
        grams = [tuple(t[i : i + n]) for t in toks for i in range(len(t) - n + 1)]
        if grams:
            out[n] = len(set(grams)) / len(grams)
    defined = [out[n] for n in orders if n in out]
    out["mean"] = sum(defined) / len(defined) if defined else None
    return out


def _ngram_counts(tokens: Sequence[str], max_order: int) -> Counter:
    return Counter(
        tuple(tokens[i : i + n])
        for n in range(1, max_order + 1)
        for i in range(len(tokens) - n + 1)
    )


def _bleu_from_counts(
    hyp: Counter, hyp_len: int, ref_max: Counter, ref_lens: Sequence[int], max_order: int
) -> float:
    # Sentence BLEU as sacrebleu.sentence_bleu computes it (exp smoothing, effective order,
    # closest reference length, shorter on ties); hand-written so the N references are counted
    # once per prompt instead of once per hypothesis, and metrics need no optional package.
    correct = [0] * max_order
    total = [0] * max_order
    for g, c in hyp.items():
        total[len(g) - 1] += c
        correct[len(g) - 1] += min(c, ref_max.get(g, 0))
    if not any(correct):
        return 0.0
    ref_len = min(ref_lens, key=lambda r: (abs(hyp_len - r), r))
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    logs, smooth = [], 1.0
    for n in range(max_order):
        if total[n] == 0:
            break
        if correct[n] == 0:
            smooth *= 2
            logs.append(math.log(100.0 / (smooth * total[n])))
        else:
            logs.append(math.log(100.0 * correct[n] / total[n]))
    return bp * math.exp(sum(logs) / len(logs))


def sentence_bleu(hypothesis: str, references: Sequence[str], max_order: int = 4) -> float:
    """BLEU (0-100) of one hypothesis against several references, on ``tokenize`` tokens."""
    if not references:
        raise ValueError("sentence_bleu: no references")
    refs = [tokenize(r) for r in references]
    ref_max: Counter = Counter()
    for r in refs:
        ref_max |= _ngram_counts(r, max_order)  # max count over references
    hyp = tokenize(hypothesis)
    return _bleu_from_counts(
        _ngram_counts(hyp, max_order), len(hyp), ref_max, [len(r) for r in refs], max_order
    )


def self_bleu(samples: Sequence[str], max_order: int = 4) -> float:
    """Mean over samples of the BLEU (0-100) of each sample against ALL the other samples."""
    if len(samples) < 2:
        raise ValueError(f"self_bleu needs at least 2 samples, got {len(samples)}")
    toks = [tokenize(s) for s in samples]
    counts = [_ngram_counts(t, max_order) for t in toks]
    scores = []
    for i in range(len(toks)):
        ref_max: Counter = Counter()
        for j, c in enumerate(counts):
            if j != i:
                ref_max |= c
        scores.append(
            _bleu_from_counts(
                counts[i],
                len(toks[i]),
                ref_max,
                [len(t) for j, t in enumerate(toks) if j != i],
                max_order,
            )
        )
    return sum(scores) / len(scores)


def self_bleu_diversity(samples: Sequence[str]) -> float:
    """1 - self-BLEU / 100: 0 = all samples identical, 1 = no shared n-gram."""
    return 1.0 - self_bleu(samples) / 100.0


def embedding_diversity(embeddings) -> float:
    """1 - mean cosine similarity over all pairs i < j of the rows of ``embeddings`` [N, d]."""
    import torch

    e = torch.as_tensor(embeddings, dtype=torch.float64)
    if e.dim() != 2 or e.shape[0] < 2:
        raise ValueError(
            f"embedding_diversity needs an [N >= 2, d] matrix, got shape {tuple(e.shape)}"
        )
    e = torch.nn.functional.normalize(e, dim=1)
    sim = e @ e.T
    n = e.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    return float(1.0 - sim[iu[0], iu[1]].mean())


def sentence_embedder(model_name_or_path: str | None) -> Callable[[list[str]], object] | None:
    """A function texts -> [N, d] embeddings from sentence-transformers, or None when the
    package is not installed or no model is given (embedding diversity is then skipped)."""
    if not model_name_or_path:
        return None
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(model_name_or_path)
    return lambda texts: model.encode(list(texts), convert_to_tensor=True, show_progress_bar=False)


# ---- forgetting -----------------------------------------------------------------------------


def forgetting(heldout_loss_before: float, heldout_loss_after: float) -> float:
    """Held-out pre-training loss (nats/token) after SFT minus before: > 0 means forgotten."""
    for name, v in (
        ("heldout_loss_before", heldout_loss_before),
        ("heldout_loss_after", heldout_loss_after),
    ):
        if not math.isfinite(v):
            raise ValueError(f"forgetting: {name} must be finite, got {v}")
    return heldout_loss_after - heldout_loss_before
