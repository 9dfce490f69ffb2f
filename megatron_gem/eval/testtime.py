"""Test-time scaling metrics over one prompt's N samples: pass@k, maj@k and best-of-k.

Each is the expectation over a k-subset of the N samples drawn uniformly without replacement,
computed exactly (closed forms over sorted samples) where one exists; maj@k, which has none,
enumerates every subset when there are few and otherwise averages a fixed, seeded set of draws.
Pure Python: the inputs are per-sample booleans, answers and rewards.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from typing import Hashable, Sequence

__all__ = [
    "MAJ_EXACT_SUBSETS",
    "best_of_k",
    "maj_at_k",
    "majority_answer",
    "pass_at_k",
]

# maj@k enumerates all C(N, k) subsets up to this many, and samples this many draws beyond.
MAJ_EXACT_SUBSETS = 20_000


def _check_k(n: int, k: int, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"{name} must be an integer in [1, n={n}], got {name}={k!r}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``.

    The probability that a k-subset of n samples, c of them correct, holds at least one correct
    sample. Exact for any n: Python's big integers carry the binomials and their quotient is
    correctly rounded, so there is no product-form cancellation at large n.
    """
    for name, value in (("n", n), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {name}={value!r}")
    if n == 0:
        raise ValueError("n must be at least 1 (no samples), got n=0")
    if c > n:
        raise ValueError(f"c must be at most n={n} (correct samples among n), got c={c}")
    _check_k(n, k)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent answer; a tie goes to the tied answer that occurs first (samples keep
    their generation order, so the tie-break favours no answer). ``None`` (nothing extracted)
    does not vote; all ``None`` gives ``None``."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def maj_at_k(
    answers: Sequence[Hashable | None],
    correct: Hashable | set,
    k: int,
    draws: int = MAJ_EXACT_SUBSETS,
    seed: int = 0,
) -> float:
    """maj@k: the probability that the majority answer of k of the samples is correct.

    ``answers`` are the samples' extracted answers in generation order (``None`` where none was
    extracted), ``correct`` the right answer or a set of right answers. Every k-subset is
    enumerated when there are at most ``draws`` of them; otherwise the mean is over ``draws``
    subsets drawn with ``random.Random(seed)`` (the same subsets for every method compared).
    """
    n = len(answers)
    if n == 0:
        raise ValueError("maj_at_k: no answers")
    _check_k(n, k)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got draws={draws!r}")
    right = correct if isinstance(correct, (set, frozenset)) else {correct}

    def hit(subset) -> bool:
        return majority_answer([answers[i] for i in subset]) in right

    if math.comb(n, k) <= draws:
        subsets = itertools.combinations(range(n), k)
        return sum(map(hit, subsets)) / math.comb(n, k)
    rng = random.Random(seed)
    # sorted: a subset keeps generation order, so the tie-break is the same as in enumeration
    return sum(hit(sorted(rng.sample(range(n), k))) for _ in range(draws)) / draws


def best_of_k(
    rewards: Sequence[float], k: int, correct: Sequence[bool] | None = None
) -> dict[str, float]:
    """Best-of-k by a reward: the sample with the highest reward among k of the N samples.

    Returns, as exact expectations over the k-subsets:
      ``reward``:   the mean reward of the chosen sample;
      ``win_rate``: P(chosen sample's reward > an independent single sample's) + P(equal) / 2,
                    the win rate of best-of-k against the same method's one sample (0.5 at k=1);
      ``quality``:  (with ``correct``) the probability the chosen sample is correct.
    Equal rewards go to the earlier sample, as in ``majority_answer``.

    Closed form: order the samples by (reward, earlier first among equals); the j-th of n
    (1-based, ascending) is chosen by exactly C(j-1, k-1) of the C(n, k) subsets.
    """
    values = [float(r) for r in rewards]
    n = len(values)
    if n == 0:
        raise ValueError("best_of_k: no rewards")
    if any(math.isnan(r) for r in values):
        raise ValueError("best_of_k: a reward is NaN")
    _check_k(n, k)
    if correct is not None and len(correct) != n:
        raise ValueError(f"correct has {len(correct)} entries, rewards {n}")
    # ascending by reward; among equal rewards the EARLIER sample ranks higher (it wins the tie)
    order = sorted(range(n), key=lambda i: (values[i], -i))
    total = math.comb(n, k)
    weights = [math.comb(j, k - 1) / total for j in range(n)]  # j = 0-based ascending rank
    out = {"reward": sum(w * values[i] for w, i in zip(weights, order))}
    # a single independent sample: uniform over the n samples
    below = {r: sum(v < r for v in values) for r in set(values)}
    equal = Counter(values)
    out["win_rate"] = sum(
        w * (below[values[i]] + 0.5 * equal[values[i]]) / n for w, i in zip(weights, order)
    )
    if correct is not None:
        out["quality"] = sum(w * bool(correct[i]) for w, i in zip(weights, order))
    return out
