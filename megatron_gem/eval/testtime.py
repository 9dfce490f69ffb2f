"""Test-time scaling metrics over one prompt's N samples: pass@k, maj@k and best-of-k.

Each is the expectation over a k-subset of the N samples drawn uniformly without replacement,
computed exactly by counting subsets (closed forms; maj@k by a product of per-answer
polynomials), never by sampling or enumerating them. Pure Python: the inputs are per-sample
booleans, answers and rewards.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Sequence

__all__ = [
    "best_of_k",
    "maj_at_k",
    "majority_answer",
    "pass_at_k",
]


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


def _poly_mul(p: list[int], q: list[int], degree: int) -> list[int]:
    out = [0] * min(len(p) + len(q) - 1, degree + 1)
    for i, a in enumerate(p[: degree + 1]):
        if a:
            for j, b in enumerate(q[: degree + 1 - i]):
                out[i + j] += a * b
    return out


def maj_at_k(answers: Sequence[Hashable | None], correct: Hashable | set, k: int) -> float:
    """maj@k: the probability that the majority answer of k of the samples is correct.

    ``answers`` are the samples' extracted answers in generation order (``None`` where none was
    extracted: it does not vote; a subset without any vote is wrong), ``correct`` the right
    answer or a set of right answers. A tie goes to the tied answer that occurs first among all
    N samples (generation order is random, so the rule favours no answer; on the whole list it is
    ``majority_answer``'s rule).

    Exact, without enumerating the C(N, k) subsets: answer ``a`` (N_a samples) wins with j votes
    when every answer before it (by first occurrence) gets at most j - 1 and every answer after
    it at most j, so the number of such subsets is C(N_a, j) times the coefficient of x^(k-j)
    in (1+x)^N_none * prod_before sum_{c<j} C(N_b, c) x^c * prod_after sum_{c<=j} C(N_b, c) x^c.
    Integer arithmetic throughout; one correctly rounded division at the end.
    """
    n = len(answers)
    if n == 0:
        raise ValueError("maj_at_k: no answers")
    _check_k(n, k)
    right = correct if isinstance(correct, (set, frozenset)) else {correct}
    counts = Counter(a for a in answers if a is not None)  # insertion order = first occurrence
    groups = list(counts.items())
    none_poly = [math.comb(n - sum(counts.values()), c) for c in range(k + 1)]

    def at_most(size: int, t: int) -> list[int]:
        return [math.comb(size, c) for c in range(min(t, size) + 1)]

    wins = 0
    for rank, (answer, size) in enumerate(groups):
        if answer not in right:
            continue
        for j in range(1, min(size, k) + 1):
            poly = none_poly
            for other, (_, other_size) in enumerate(groups):
                if other != rank:
                    poly = _poly_mul(poly, at_most(other_size, j - 1 if other < rank else j), k - j)
            if k - j < len(poly):
                wins += math.comb(size, j) * poly[k - j]
    return wins / math.comb(n, k)


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
