"""Metric functions against hand-computed examples and, for BLEU, against sacrebleu."""

import builtins
import math
import random

import pytest
import sacrebleu
import torch

from megatron_gem.eval import metrics as M


def test_quality_and_coverage_hand_examples():
    # Normalisation: case, spaces and edge punctuation do not matter.
    assert M.quality(["zorba", " Zorba.", "miko", "xx"], ["zorba", "miko", "pelo"]) == 3 / 4
    assert M.coverage(["zorba", " Zorba.", "miko", "xx"], ["zorba", "miko", "pelo"]) == 2 / 3
    assert M.coverage(["a and b"], ["a and b", "b and a"]) == 1 / 2
    assert M.quality(["b and a"], ["a and b"]) == 0.0
    assert M.is_valid("  Fafa and   Kulu! ", ["fafa and kulu"])


def test_valid_mass_and_effective_valid_hand_examples():
    assert M.valid_mass([math.log(0.2), math.log(0.3)]) == pytest.approx(0.5, abs=1e-15)
    assert M.valid_mass([-math.inf, math.log(0.25)]) == pytest.approx(0.25, abs=1e-15)
    # Renormalised to the valid set: (0.1, 0.05, 0.05) -> (1/2, 1/4, 1/4), H = 1.5 ln 2.
    assert M.effective_valid([math.log(0.1), math.log(0.05), math.log(0.05)]) == pytest.approx(
        2**1.5, rel=1e-12
    )
    assert M.effective_valid([math.log(1e-30)] * 7) == pytest.approx(7.0, rel=1e-12)
    assert M.effective_valid([0.0, -math.inf, -math.inf]) == pytest.approx(1.0)
    assert math.isnan(M.effective_valid([-math.inf, -math.inf]))


def test_effective_valid_matches_float64_reference():
    g = torch.Generator().manual_seed(7)
    lps = (torch.randn(13, generator=g, dtype=torch.float64) * 4 - 20).tolist()
    p = torch.tensor(lps, dtype=torch.float64).exp()
    p = p / p.sum()
    ref = math.exp(-(p * p.log()).sum().item())
    assert M.effective_valid(lps) == pytest.approx(ref, rel=1e-12)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="valid set is empty"):
        M.quality(["a"], [])
    with pytest.raises(ValueError, match="no samples"):
        M.quality([], ["a"])
    with pytest.raises(ValueError, match="<= 0"):
        M.valid_mass([0.5])
    with pytest.raises(ValueError, match="NaN"):
        M.effective_valid([float("nan")])
    with pytest.raises(ValueError, match="at least 2"):
        M.self_bleu(["only one"])
    with pytest.raises(ValueError, match="heldout_loss_after"):
        M.forgetting(1.0, float("nan"))


def test_ngram_diversity_hand_example():
    d = M.ngram_diversity(["a b a", "a b"])
    # unigrams a b a a b: 2/5; bigrams (a b) (b a) (a b): 2/3; trigram (a b a): 1/1
    assert d[1] == pytest.approx(2 / 5) and d[2] == pytest.approx(2 / 3) and d[3] == 1.0
    assert d["mean"] == pytest.approx((2 / 5 + 2 / 3 + 1) / 3)
    # Single words: only n=1 is defined; punctuation is its own token.
    d = M.ngram_diversity(["x", "x", "y"])
    assert d == {1: pytest.approx(2 / 3), "mean": pytest.approx(2 / 3)}
    assert M.ngram_diversity(["x.", "x"])[1] == pytest.approx(2 / 3)
    assert M.ngram_diversity(["", ""])["mean"] is None


def _random_sentences(rng, n):
    words = ["a", "b", "c", "d", "the", "cat", "sat", ".", ","]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) for _ in range(n)]


def test_sentence_bleu_matches_sacrebleu_multi_reference():
    rng = random.Random(3)
    for _ in range(300):
        hyp, *refs = _random_sentences(rng, rng.randint(2, 7))
        ref = sacrebleu.sentence_bleu(hyp, refs, tokenize="none").score
        assert M.sentence_bleu(hyp, refs) == pytest.approx(ref, rel=1e-12, abs=1e-12), (hyp, refs)


def test_self_bleu_is_each_sample_against_all_others():
    rng = random.Random(5)
    for n in (2, 3, 8, 17):
        samples = _random_sentences(rng, n)
        samples[-1] = samples[0]  # duplicates are references like any other sample
        ref = (
            sum(
                sacrebleu.sentence_bleu(s, samples[:i] + samples[i + 1 :], tokenize="none").score
                for i, s in enumerate(samples)
            )
            / n
        )
        assert M.self_bleu(samples) == pytest.approx(ref, rel=1e-12, abs=1e-12)
        assert M.self_bleu_diversity(samples) == pytest.approx(1 - ref / 100, rel=1e-12, abs=1e-12)
    assert M.self_bleu_diversity(["the cat sat down"] * 4) == pytest.approx(0.0, abs=1e-12)
    assert M.self_bleu_diversity(["a b", "c d", "e f"]) == 1.0


def test_tokenize_separates_punctuation_like_bleu_inputs():
    assert M.tokenize("Hello, world!") == ["Hello", ",", "world", "!"]
    # Our tokens joined by spaces give sacrebleu (tokenize="none") the same BLEU.
    h, r = "Hello, world!", ["Hello world !", "hello, World"]
    ref = sacrebleu.sentence_bleu(
        " ".join(M.tokenize(h)), [" ".join(M.tokenize(x)) for x in r], tokenize="none"
    ).score
    assert M.sentence_bleu(h, r) == pytest.approx(ref, rel=1e-12)


def test_embedding_diversity_hand_and_reference():
    # cos(e1, e2) = 0, cos(e1, e3) = cos(e2, e3) = 1/sqrt(2)
    assert M.embedding_diversity([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]) == pytest.approx(
        1 - math.sqrt(2) / 3
    )
    g = torch.Generator().manual_seed(0)
    e = torch.randn(9, 5, generator=g, dtype=torch.float64)
    cos = [
        float(e[i] @ e[j] / (e[i].norm() * e[j].norm())) for i in range(9) for j in range(i + 1, 9)
    ]
    assert M.embedding_diversity(e.float()) == pytest.approx(1 - sum(cos) / len(cos), rel=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        M.embedding_diversity([[1.0, 2.0]])


def test_sentence_embedder_skips_cleanly(monkeypatch):
    assert M.sentence_embedder(None) is None
    real_import = builtins.__import__

    def no_st(name, *a, **k):
        if name.startswith("sentence_transformers"):
            raise ImportError("not installed")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_st)
    assert M.sentence_embedder("some/model") is None


def test_forgetting():
    assert M.forgetting(2.25, 2.5) == 0.25
    assert M.forgetting(2.5, 2.25) == -0.25
