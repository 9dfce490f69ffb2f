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
import re
from typing import Callable, Hashable, Iterable, Sequence

import torch

from megatron_gem.eval import answers as A
from megatron_gem.eval import metrics as M
from megatron_gem.eval import testtime as T
from megatron_gem.eval.execution import ExecResult, SandboxConfig, run_many
from megatron_gem.eval.formats import ChatFormat
from megatron_gem.eval.prompts import EvalPrompt
from megatron_gem.eval.sampling import SamplingConfig, sample
from megatron_gem.eval.scoring import heldout_loss, score_valid

__all__ = [
    "METRIC_NAMES",
    "TESTTIME_METRICS",
    "default_ks",
    "evaluate",
    "flat_metrics",
    "is_curve",
    "judge",
    "metric_order",
    "prompt_metrics",
    "summarise",
]

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
# Test-time scaling curves: "<family>@<k>" for k in default_ks(N) (pass@1, pass@2, ..., maj@16).
TESTTIME_METRICS = (
    "pass",
    "maj",
    "best_of_k_reward",
    "best_of_k_win_rate",
    "best_of_k_quality",
)
_TESTTIME_RE = re.compile(r"^(%s)@(\d+)$" % "|".join(TESTTIME_METRICS))


def default_ks(n: int) -> list[int]:
    """The sampling budgets of the curves for N samples: 1, 2, 4, ... (powers of two below N)
    and N."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"default_ks: n must be a positive integer, got {n!r}")
    return [1 << i for i in range(n.bit_length()) if 1 << i < n] + [n]


def is_curve(name: str) -> bool:
    """Whether ``name`` is a point of a test-time curve (``pass@4``, ``best_of_k_reward@8``)."""
    return _TESTTIME_RE.match(name) is not None


def metric_order(names: Iterable[str]) -> list[str]:
    """``names`` in table order: METRIC_NAMES, then the test-time curves by family and k, then
    anything else alphabetically."""

    def key(name: str):
        if name in METRIC_NAMES:
            return (0, METRIC_NAMES.index(name), 0, "")
        m = _TESTTIME_RE.match(name)
        if m:
            return (1, TESTTIME_METRICS.index(m.group(1)), int(m.group(2)), "")
        return (2, 0, 0, name)

    return sorted(set(names), key=key)


def judge(
    prompt: EvalPrompt,
    samples: Sequence[str],
    sandbox: SandboxConfig | None = None,
    runs: Sequence[ExecResult] | None = None,
) -> dict | None:
    """Per-sample correctness of one prompt's samples, and the answers that vote in maj@k.

    ``{"correct": [bool], "answers": [key | None] | None, "right": set | None, ...}``; None for
    a prompt without a criterion. valid: a sample is correct when ``is_valid``, its answer is
    its normalised text; math: the extracted answer (``answers.extract_answer``) matches the
    reference; code: the completion passes the task's tests (``execution.run_many``, or the
    ``runs`` already made; no maj@k, answers None, ``status`` per sample).
    """
    if prompt.code is not None:
        res = runs
        if res is None:
            res = run_many([(prompt.code, s) for s in samples], sandbox or SandboxConfig())
        return {
            "correct": [r.passed for r in res],
            "answers": None,
            "right": None,
            "status": [r.status for r in res],
        }
    if prompt.answer is not None:
        written = [A.extract_answer(s) for s in samples]
        keys = [A.answer_key(a) for a in written]
        if A.has_math_verify():
            # symbolic equivalence is not a key: each answer votes for the first earlier
            # distinct answer it is equivalent to
            reps: list[str] = []
            rep_of: dict[str, str] = {}
            for k in dict.fromkeys(x for x in keys if x is not None):
                rep_of[k] = next((r for r in reps if A.answers_match(k, r)), k)
                if rep_of[k] == k:
                    reps.append(k)
            keys = [None if k is None else rep_of[k] for k in keys]
        right = {k for k in keys if k is not None and A.answers_match(k, prompt.answer)}
        return {
            "correct": [k in right for k in keys],
            "answers": keys,
            "right": right,
            "extracted": written,
        }
    if prompt.valid:
        valid = {M.normalize_answer(v) for v in prompt.valid}
        keys = [M.normalize_answer(s) for s in samples]
        return {"correct": [k in valid for k in keys], "answers": keys, "right": valid}
    return None


def _testtime(
    correct: Sequence[bool] | None,
    answers: Sequence[Hashable | None] | None,
    right: set | None,
    rewards: Sequence[float] | None,
    n: int,
    maj_draws: int,
    seed: int,
) -> dict:
    m: dict = {}
    ks = default_ks(n)
    if correct is not None:
        if len(correct) != n:
            raise ValueError(f"prompt_metrics: {len(correct)} correctness flags for {n} samples")
        c = sum(map(bool, correct))
        m["quality"] = c / n
        for k in ks:
            m[f"pass@{k}"] = T.pass_at_k(n, c, k)
        if answers is not None:
            if len(answers) != n:
                raise ValueError(f"prompt_metrics: {len(answers)} answers for {n} samples")
            for k in ks:
                m[f"maj@{k}"] = T.maj_at_k(answers, set(right or ()), k, maj_draws, seed)
    if rewards is not None:
        if len(rewards) != n:
            raise ValueError(f"prompt_metrics: {len(rewards)} rewards for {n} samples")
        for k in ks:
            b = T.best_of_k(rewards, k, correct)
            m[f"best_of_k_reward@{k}"] = b["reward"]
            m[f"best_of_k_win_rate@{k}"] = b["win_rate"]
            if "quality" in b:
                m[f"best_of_k_quality@{k}"] = b["quality"]
    return m


def prompt_metrics(
    samples: Sequence[str],
    valid: Sequence[str] | None = None,
    valid_logprobs: Sequence[float] | None = None,
    embedder=None,
    *,
    correct: Sequence[bool] | None = None,
    answers: Sequence[Hashable | None] | None = None,
    right: set | None = None,
    rewards: Sequence[float] | None = None,
    maj_draws: int = T.MAJ_EXACT_SUBSETS,
    seed: int = 0,
) -> dict:
    """Metrics of one prompt's samples (response text only); absent when undefined.

    With a valid set and no ``correct``, correctness is ``is_valid`` (as ``judge``). Given
    per-sample ``correct`` flags: ``quality`` (their mean) and ``pass@k``; with ``answers``
    (in sample order, None = no answer) and the ``right`` ones: ``maj@k``; with ``rewards``:
    ``best_of_k_reward@k``, ``best_of_k_win_rate@k`` (and ``best_of_k_quality@k`` with
    ``correct``); k over ``default_ks(N)``.
    """
    if not samples:
        raise ValueError("prompt_metrics: no samples")
    m: dict = {}
    if valid and correct is None:
        j = judge(EvalPrompt("", [], list(valid)), samples)
        correct, answers, right = j["correct"], j["answers"], j["right"]
    m.update(_testtime(correct, answers, right, rewards, len(samples), maj_draws, seed))
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
    *,
    rewards: Sequence[Sequence[float] | None] | None = None,
    sandbox: SandboxConfig | None = None,
    maj_draws: int = T.MAJ_EXACT_SUBSETS,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """(per-set means, per-prompt records). Sets: each prompt's ``split`` plus "all".

    A set's metric is the mean over the prompts where it is defined; ``n_<metric>`` says over how
    many (e.g. quality only over prompts with a correctness criterion). Correctness per sample
    is ``judge``'s (code samples run in ``sandbox``); ``rewards`` (one list per prompt, per
    sample) add the best-of-k curves. A record keeps each sample's ``correct`` flag and, for
    math, the ``answers`` extracted, for code the run ``status``.
    """
    if len(generations) != len(prompts):
        raise ValueError(
            f"summarise: {len(generations)} generation lists for {len(prompts)} prompts"
        )
    if rewards is not None and len(rewards) != len(prompts):
        raise ValueError(f"summarise: {len(rewards)} reward lists for {len(prompts)} prompts")
    # every code sample of every prompt in one pool (sandbox.workers at a time)
    code = [k for k, p in enumerate(prompts) if p.code is not None]
    flat = run_many(
        [(prompts[k].code, s) for k in code for s in generations[k]], sandbox or SandboxConfig()
    )
    runs: dict[int, list[ExecResult]] = {}
    for k in code:
        runs[k], flat = flat[: len(generations[k])], flat[len(generations[k]) :]
    per_prompt = []
    for k, (p, g) in enumerate(zip(prompts, generations)):
        lps = valid_logprobs[k] if valid_logprobs is not None else None
        j = judge(p, g, sandbox, runs.get(k)) if g else None
        rec = {"id": p.id, "split": p.split, "task": p.task, "n_samples": len(g)}
        rec["metrics"] = prompt_metrics(
            g,
            p.valid,
            lps,
            embedder,
            correct=j["correct"] if j else None,
            answers=j["answers"] if j else None,
            right=j["right"] if j else None,
            rewards=rewards[k] if rewards is not None else None,
            maj_draws=maj_draws,
            seed=seed,
        )
        if j:
            rec["correct"] = j["correct"]
            for extra in ("extracted", "status"):
                if extra in j:
                    rec[extra] = j[extra]
        if rewards is not None and rewards[k] is not None:
            rec["rewards"] = list(rewards[k])
        per_prompt.append(rec)
    sets: dict[str, dict] = {}
    names = ["all"] + sorted({p.split for p in prompts} - {"all"})
    present = metric_order(m for r in per_prompt for m in r["metrics"])
    for name in names:
        recs = [r for r in per_prompt if name == "all" or r["split"] == name]
        s: dict = {"n_prompts": len(recs), "n_samples": sum(r["n_samples"] for r in recs)}
        for metric in present:
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
    reward=None,
    sandbox: SandboxConfig | None = None,
    maj_draws: int = T.MAJ_EXACT_SUBSETS,
) -> dict:
    """Evaluate one model: sample (unless ``generations`` are given), score valid sets,
    held-out loss, run code samples, reward samples.

    Returns ``{"sets": {set: {metric: mean}}, "heldout_loss", "forgetting", "prompts": [...],
    "sampling": {...}}``; ``forgetting`` needs ``heldout_loss_before`` (the loss of the model
    before SFT on the same texts). With ``model=None`` only the metrics of ``generations`` that
    need no model. ``reward``: ``f(messages, response) -> float`` (``megatron_gem.eval.reward``)
    for the best-of-k curves.
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
    rewards = None
    if reward is not None:
        from megatron_gem.eval.reward import compute_rewards

        say("rewarding samples")
        rewards = compute_rewards(reward, prompts, generations)
    n_code = sum(len(g) for p, g in zip(prompts, generations) if p.code is not None)
    if n_code:
        say(f"running {n_code} code samples")
    sets, per_prompt = summarise(
        prompts,
        generations,
        lps,
        embedder,
        rewards=rewards,
        sandbox=sandbox,
        maj_draws=maj_draws,
        seed=sampling.seed,
    )
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
