"""The embedded world: deterministic, valid sets right, SFT skewed, held-out text disjoint."""

import collections
import dataclasses
import json
import random

import pytest

from megatron_gem.study import world as W

SMALL = W.WorldConfig(
    seed=5, n_animals=20, n_places=5, n_foods=6, pretrain_docs=300, heldout_docs=40
)


def test_deterministic_from_seed_and_sizes_respected():
    a, b = W.generate(SMALL), W.generate(SMALL)
    for k in ("pretrain", "heldout", "sft", "eval"):
        assert a[k] == b[k]
    c = W.generate(dataclasses.replace(SMALL, seed=6))
    assert c["pretrain"] != a["pretrain"] and c["eval"] != a["eval"]
    assert len(a["pretrain"]) == 300 and len(a["heldout"]) == 40
    n_seen = sum(e["split"] == "seen" for e in a["eval"])
    assert len(a["sft"]) == n_seen * SMALL.sft_answers_per_prompt
    # More pre-training documents leave the SFT and eval data unchanged.
    d = W.generate(dataclasses.replace(SMALL, pretrain_docs=500))
    assert d["sft"] == a["sft"] and d["eval"] == a["eval"] and d["pretrain"][:300] == a["pretrain"]


def _expected_valid(world, text):
    """Valid sets recomputed from the facts, independently of build_world's code."""
    an = world.animals
    for ab in W.ABILITIES:
        able = sorted(a.name for a in an if ab in a.abilities)
        if text == f"Name an animal that can {ab}.":
            return able
        if text == f"Name two animals that can {ab}.":
            return sorted(f"{x} and {y}" for x in able for y in able if x != y)
        if text == f"Name a food eaten by an animal that can {ab}.":
            return sorted({f for a in an if ab in a.abilities for f in a.foods})
    for c in W.COLOURS:
        if text == f"Name an animal that is {c}.":
            return sorted(a.name for a in an if a.colour == c)
        if text == f"Name a place where a {c} animal lives.":
            return sorted({a.place for a in an if a.colour == c})
    for p in world.places:
        if text == f"Name an animal that lives in {p}.":
            return sorted(a.name for a in an if a.place == p)
    for f in world.foods:
        if text == f"Name an animal that eats {f}.":
            return sorted(a.name for a in an if f in a.foods)
    raise AssertionError(f"unknown instruction {text!r}")


def test_valid_sets_splits_and_sft_answers():
    data = W.generate(SMALL)
    world = data["world"]
    evals = {e["messages"][0]["content"]: e for e in data["eval"]}
    assert len(evals) == len(data["eval"])  # one eval record per instruction
    for text, e in evals.items():
        assert e["valid"] == _expected_valid(world, text)
        assert len(e["valid"]) >= SMALL.min_valid
    sft_prompts = set()
    for ex in data["sft"]:
        user, asst = ex["messages"]
        assert user["role"] == "user" and asst["role"] == "assistant"
        assert asst["content"] in evals[user["content"]]["valid"]
        assert 1 <= len(asst["content"].split()) <= 3
        sft_prompts.add(user["content"])
    assert sft_prompts == {t for t, e in evals.items() if e["split"] == "seen"}
    splits = collections.Counter(e["split"] for e in data["eval"])
    assert splits["seen"] > 0 and splits["unseen"] > 0
    # Every family of instruction is seen in SFT.
    fams = {e["id"].split(":")[0] for e in data["eval"]}
    assert fams == {e["id"].split(":")[0] for e in data["eval"] if e["split"] == "seen"}


def test_sft_answers_follow_zipf_popularity():
    world = W.build_world(dataclasses.replace(SMALL, sft_answers_per_prompt=3000))
    ins = max(
        (i for i in world.instructions if i.id in world.seen_ids and i.family == "ability"),
        key=lambda i: len(i.valid),
    )
    world.instructions = [ins]  # only this instruction's SFT examples
    counts = collections.Counter(
        ex["messages"][1]["content"] for ex in world.sft_examples(random.Random(0))
    )
    assert sum(counts.values()) == 3000
    z = sum(world.popularity[v] for v in ins.valid)
    for v in ins.valid:
        assert counts[v] / 3000 == pytest.approx(world.popularity[v] / z, abs=0.03)
    top = max(ins.valid, key=world.popularity.get)
    assert counts[top] / 3000 > 2 / len(ins.valid)  # clearly skewed, not uniform


def test_heldout_disjoint_and_text_small():
    data = W.generate(SMALL)
    pre = {r["text"] for r in data["pretrain"]}
    assert not pre & {r["text"] for r in data["heldout"]}
    vocab = {w for r in data["pretrain"] for w in r["text"].split()}
    assert len(vocab) < 120
    # Every fact of every animal is stated somewhere in the default-sized corpus.
    full = W.generate(W.WorldConfig())
    text = " ".join(r["text"] for r in full["pretrain"])
    for a in full["world"].animals:
        assert f"{a.name} lives in {a.place}." in text or f"you can see {a.name}." in text


def test_write_world_files_and_no_overwrite(tmp_path):
    files = W.write_world(tmp_path / "w", SMALL)
    recs = [json.loads(line) for line in files.eval.read_text().splitlines()]
    assert recs == W.generate(SMALL)["eval"]
    assert sum(1 for _ in files.pretrain.open()) == 300
    assert W.read_config(files.facts) == SMALL
    with pytest.raises(FileExistsError, match="overwrite=True"):
        W.write_world(tmp_path / "w", SMALL)
    W.write_world(tmp_path / "w", SMALL, overwrite=True)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n_animals": 2}, "n_animals"),
        ({"zipf_s": -1.0}, "zipf_s"),
        ({"unseen_fraction": 1.0}, "unseen_fraction"),
        ({"sentences_per_doc": (4, 2)}, "sentences_per_doc"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        W.WorldConfig(**kw)
