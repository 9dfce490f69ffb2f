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
    seen = [e for e in a["eval"] if e["split"] == "seen"]
    n_single = sum(W.task_group(e["id"]) == "single" for e in seen)
    assert n_single > 0
    assert len(a["sft"]) == (
        (len(seen) - n_single) * SMALL.sft_answers_per_prompt
        + n_single * SMALL.sft_answers_per_single
    )
    # More pre-training documents leave the SFT and eval data unchanged.
    d = W.generate(dataclasses.replace(SMALL, pretrain_docs=500))
    assert d["sft"] == a["sft"] and d["eval"] == a["eval"] and d["pretrain"][:300] == a["pretrain"]


def _expected_valid(world, text):
    """Valid sets recomputed from the facts, independently of build_world's code."""
    an = world.animals
    for a in an:
        if text in ("What colour is %s?" % a.name, "Tell me the colour of %s." % a.name):
            return [a.colour]
        if text in ("Where does %s live?" % a.name, "Tell me the home of %s." % a.name):
            return [a.place]
        if text == "Which colour does %s have?" % a.name:
            return [a.colour]
        if text == "In which place does %s live?" % a.name:
            return [a.place]
    for c in W.COLOURS:
        for ab in W.ABILITIES:
            if text == f"Name an animal that is {c} and can {ab}.":
                return sorted(a.name for a in an if a.colour == c and ab in a.abilities)
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
        group = W.task_group(e["id"])
        if group == "open":
            assert len(e["valid"]) >= SMALL.min_valid
        elif group == "rare":
            assert 1 <= len(e["valid"]) <= SMALL.rare_max
        else:
            assert group == "single" and len(e["valid"]) == 1
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


def test_rare_and_single_answer_tasks_are_complete_and_held_out_by_animal():
    data = W.generate(SMALL)
    world = data["world"]
    ev = {e["id"]: e for e in data["eval"]}
    # rare: exactly the colour-and-ability combinations that 1..rare_max animals have
    want = set()
    for c in W.COLOURS:
        for ab in W.ABILITIES:
            n = sum(a.colour == c and ab in a.abilities for a in world.animals)
            if 1 <= n <= SMALL.rare_max:
                want.add(f"Name an animal that is {c} and can {ab}.")
    rare = [e for e in data["eval"] if W.task_group(e["id"]) == "rare"]
    assert {e["messages"][0]["content"] for e in rare} == want
    assert any(len(e["valid"]) == 1 for e in rare)  # needles: one valid answer
    # single: every wording of colour and home for the first relation_animals animals
    single = [e for e in data["eval"] if W.task_group(e["id"]) == "single"]
    assert len(single) == SMALL.relation_animals * 2 * 3
    names = {a.name for a in world.animals}
    asked = {w for e in single for w in e["messages"][0]["content"].rstrip("?.").split()}
    assert asked & names == {a.name for a in world.animals[: SMALL.relation_animals]}
    # held out by (relation, animal): all wordings of one share their split
    by_unit = collections.defaultdict(set)
    for e in single:
        fam, name, _ = e["id"].split(":")
        by_unit[fam, name].add(e["split"])
    assert all(len(s) == 1 for s in by_unit.values())
    for group in ("rare", "single"):
        assert {ev[i]["split"] for i in ev if W.task_group(i) == group} == {"seen", "unseen"}
    # SFT shows a single-answer question with its one answer, sft_answers_per_single times
    sft = collections.Counter(
        (x["messages"][0]["content"], x["messages"][1]["content"]) for x in data["sft"]
    )
    for e in single:
        n = sft[e["messages"][0]["content"], e["valid"][0]]
        assert n == (SMALL.sft_answers_per_single if e["split"] == "seen" else 0)
    assert W.task_group("nope:x") is None
    # no relation questions: no single group
    none = W.generate(dataclasses.replace(SMALL, relation_animals=0))["eval"]
    assert not [e for e in none if W.task_group(e["id"]) == "single"]


def test_every_valid_answer_fits_the_default_generation_budget(tmp_path):
    """Each valid response of the default world, in the default tokenizer (SentencePiece,
    vocabulary 256, trained as the study's prep stage trains it), with its end token, fits in
    the default max_new_tokens: no answer is cut off before it can be correct."""
    from megatron_gem.data.tokenizer import build_tokenizer, iter_training_text
    from megatron_gem.data.tokenizer import train_sentencepiece
    from megatron_gem.eval import megatron_chat_format
    from megatron_gem.study.config import preset

    cfg = preset("default")  # the default preset's world (its overrides of WorldConfig)
    files = W.write_world(tmp_path / "w", W.WorldConfig(seed=cfg.world_seed, **cfg.world_overrides))
    texts = iter_training_text([str(files.pretrain), str(files.sft), str(files.eval)])
    sp = train_sentencepiece(texts, tmp_path / "spm", cfg.vocab_size)
    fmt = megatron_chat_format(build_tokenizer("SentencePieceTokenizer", sp))
    evals = [json.loads(line) for line in files.eval.read_text().splitlines()]
    longest = max((len(fmt.response_ids(v, e["messages"])), v) for e in evals for v in e["valid"])
    assert longest[0] <= cfg.max_new_tokens, longest
    assert longest[0] > 2  # counted in tokens, not characters or words


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
        ({"relation_animals": 49}, "relation_animals"),
        ({"rare_max": 0}, "rare_max"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        W.WorldConfig(**kw)
