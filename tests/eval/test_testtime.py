"""pass@k, maj@k and best-of-k against brute-force enumeration and hand-computed cases."""

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from megatron_gem.eval.testtime import best_of_k, maj_at_k, majority_answer, pass_at_k


def _subsets(n, k):
    return list(itertools.combinations(range(n), k))


@pytest.mark.parametrize("n", [1, 2, 5, 9, 13])
def test_pass_at_k_equals_enumeration_and_closed_form(n):
    rng = random.Random(n)
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        rng.shuffle(correct)
        for k in range(1, n + 1):
            hits = sum(any(correct[i] for i in s) for s in _subsets(n, k))
            brute = Fraction(hits, math.comb(n, k))
            closed = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
            assert brute == closed
            assert pass_at_k(n, c, k) == pytest.approx(float(brute), rel=1e-15, abs=1e-15)


def test_pass_at_k_large_n_is_exact_where_the_product_form_cancels():
    # n = 10^4, c = 1, k = 1: exactly 1e-4; k = n: exactly 1; c = 0: exactly 0
    assert pass_at_k(10_000, 1, 1) == pytest.approx(1e-4, rel=1e-15)
    assert pass_at_k(10_000, 1, 10_000) == 1.0
    assert pass_at_k(10_000, 0, 5_000) == 0.0
    n, c, k = 5000, 3, 2000
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-15)


@pytest.mark.parametrize(
    "args, words",
    [
        ((0, 0, 1), "n must be at least 1"),
        ((4, 5, 1), "c must be at most n=4"),
        ((4, 1, 0), "k must be an integer in [1, n=4]"),
        ((4, 1, 5), "k=5"),
        ((4, -1, 1), "c must be a non-negative integer"),
        ((4, 1, 1.0), "k=1.0"),
    ],
)
def test_pass_at_k_bad_arguments_are_named(args, words):
    with pytest.raises(ValueError, match=None) as err:
        pass_at_k(*args)
    assert words in str(err.value)


def test_majority_answer_ties_go_to_the_first_and_none_does_not_vote():
    assert majority_answer(["5", "4", "4"]) == "4"
    assert majority_answer(["5", "4", "4", "5"]) == "5"
    assert majority_answer([None, None, "7"]) == "7"
    assert majority_answer([None, None]) is None


def test_maj_at_k_hand_computed():
    answers = ["4", "4", "5", None]
    assert maj_at_k(answers, "4", 1) == pytest.approx(2 / 4)
    # k=2: {0,1} 4, {0,2} tie -> 4, {0,3} 4, {1,2} tie -> 4, {1,3} 4, {2,3} 5
    assert maj_at_k(answers, "4", 2) == pytest.approx(5 / 6)
    assert maj_at_k(answers, "5", 2) == pytest.approx(1 / 6)
    assert maj_at_k(answers, "4", 3) == 1.0
    assert maj_at_k(answers, {"4", "5"}, 2) == 1.0
    assert maj_at_k([None] * 3, "4", 2) == 0.0
    # ties go to the answer that came first among ALL samples ("5"), also in {1, 3} = (4, 5)
    answers = ["5", "4", "4", "5"]
    assert maj_at_k(answers, "5", 2) == pytest.approx(5 / 6)  # only {1, 2} votes 4
    assert maj_at_k(answers, "5", 3) == pytest.approx(1 / 2)  # {0,1,3}, {0,2,3}
    assert maj_at_k(answers, "5", 4) == 1.0  # 2-2 tie
    assert maj_at_k(answers, "4", 4) == 0.0


def _maj_brute(answers, right, k):
    first = {}
    for i, a in enumerate(answers):
        first.setdefault(a, i)
    hits = 0
    for s in _subsets(len(answers), k):
        votes = Counter(answers[i] for i in s if answers[i] is not None)
        if votes:
            top = max(votes.values())
            winner = min((a for a in votes if votes[a] == top), key=first.__getitem__)
            hits += winner in right
    return Fraction(hits, math.comb(len(answers), k))


@pytest.mark.parametrize("n", [1, 5, 8, 11])
def test_maj_at_k_equals_enumeration(n):
    rng = random.Random(100 + n)
    for trial in range(4):
        answers = [rng.choice(["a", "b", "c", "d", None][: 2 + trial]) for _ in range(n)]
        for right in ({"a"}, {"b", "c"}):
            for k in range(1, n + 1):
                expected = float(_maj_brute(answers, right, k))
                assert maj_at_k(answers, right, k) == pytest.approx(expected, abs=1e-15)


def test_maj_at_k_large_n_against_hypergeometric_closed_forms():
    n, c = 300, 40
    # one answer and no-answers: some vote for it iff a subset holds one of its samples = pass@k
    answers = [None] * (n - c) + ["a"] * c
    for k in (1, 7, 150, 300):
        assert maj_at_k(answers, "a", k) == pytest.approx(pass_at_k(n, c, k), rel=1e-12)
    # two answers, "a" first: a wins with j >= k - j votes (a tie goes to a)
    na, nb = 130, 170
    answers = ["a", "b"] * na + ["b"] * (nb - na)
    for k in (1, 2, 9, 64, 299):
        wins = sum(math.comb(na, j) * math.comb(nb, k - j) for j in range(k + 1) if 2 * j >= k)
        assert maj_at_k(answers, "a", k) == pytest.approx(wins / math.comb(n, k), rel=1e-12)


def _best_of_k_brute(rewards, k, correct):
    n, subsets = len(rewards), _subsets(len(rewards), k)
    reward = win = quality = Fraction(0)
    for s in subsets:
        best = max(s, key=lambda i: (rewards[i], -i))  # earlier sample wins a tie
        reward += Fraction(rewards[best])
        win += (
            sum(
                Fraction(1)
                if rewards[best] > r
                else Fraction(1, 2)
                if rewards[best] == r
                else Fraction(0)
                for r in rewards
            )
            / n
        )
        quality += correct[best]
    m = len(subsets)
    return float(reward / m), float(win / m), float(quality / m)


def test_best_of_k_hand_computed():
    out = best_of_k([1, 3, 2], 2, correct=[True, False, True])
    assert out["reward"] == pytest.approx(8 / 3)
    assert out["win_rate"] == pytest.approx(13 / 18)
    assert out["quality"] == pytest.approx(1 / 3)  # only {0, 2} picks a correct sample (2)


@pytest.mark.parametrize("n", [1, 4, 7, 10])
def test_best_of_k_equals_enumeration_with_ties(n):
    rng = random.Random(10 + n)
    rewards = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
    correct = [rng.random() < 0.5 for _ in range(n)]
    for k in range(1, n + 1):
        out = best_of_k(rewards, k, correct)
        reward, win, quality = _best_of_k_brute(rewards, k, correct)
        assert out["reward"] == pytest.approx(reward, rel=1e-12)
        assert out["win_rate"] == pytest.approx(win, rel=1e-12)
        assert out["quality"] == pytest.approx(quality, rel=1e-12, abs=1e-15)
    assert best_of_k(rewards, 1)["win_rate"] == pytest.approx(0.5)


def test_best_of_k_bad_input_is_named():
    with pytest.raises(ValueError, match="NaN"):
        best_of_k([1.0, float("nan")], 1)
    with pytest.raises(ValueError, match="correct has 1 entries, rewards 2"):
        best_of_k([1.0, 2.0], 1, correct=[True])
    with pytest.raises(ValueError, match=r"k=3"):
        best_of_k([1.0, 2.0], 3)
