"""The embedded synthetic world: default data for CE-vs-GEM studies, deterministic from a seed.

A tiny language about invented animals (pseudo-word names) with fixed attributes: a colour,
one or two abilities, a home place and one or two foods. From it we write

* a pre-training corpus (``{"text": ...}`` JSONL): short documents of facts and events, every
  animal mentioned about equally often, so a pre-trained model knows every valid answer;
* held-out documents from the same generator (a separate random stream, no document shared
  with the corpus): the text whose loss after SFT minus before measures forgetting;
* SFT chat data (``{"messages": [user, assistant]}``): instructions with a known, enumerable set
  of valid answers ("Name an animal that can fly." -> a dozen names), each shown with a few
  answers drawn from a skewed Zipf-like popularity over the valid set, as real SFT data is, so a
  model that memorises its SFT data collapses onto the popular answers;
* evaluation prompts (``{"id", "split", "messages", "valid"}``): every instruction, marked
  ``seen`` (it appears in the SFT data) or ``unseen`` (held out of SFT), with its full valid set.

Instructions come in three task groups (``TASK_GROUPS``, by family; ``task_group(id)``):

* ``open``: many valid answers ("Name an animal that can fly."): quality vs diversity;
* ``rare``: 1-3 valid answers ("Name an animal that is red and can dig."), so pass@k separates
  a model collapsed onto a few popular answers from one that still spreads over the rest;
* ``single``: one answer, asked in several wordings ("What colour is mapa?", "Where does mapa
  live?"), so a majority vote over k samples (maj@k) has a right answer. Their seen/unseen
  split is by animal and relation: an unseen animal's colour (or home) is asked in no wording
  in SFT, so answering it needs the pre-training facts.

Answers are short (1 word, or 3 for "Name two animals ..."; a test counts their tokens against
the default generation budget), the vocabulary is small, and the
default sizes keep a tiny GPT pre-train + SFT on 2 CPU cores within minutes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

ABILITIES = ("fly", "swim", "climb", "dig", "sing", "jump")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "grey")

# Task group of each instruction family (see the module docstring).
TASK_GROUPS = {
    **dict.fromkeys(("ability", "colour", "place", "food", "home", "diet", "pair"), "open"),
    "rare": "rare",
    "colour_of": "single",
    "home_of": "single",
}
# The wordings of the single-answer questions ({a}: the animal's name).
RELATION_WORDINGS = {
    "colour_of": (
        "What colour is {a}?",
        "Which colour does {a} have?",
        "Tell me the colour of {a}.",
    ),
    "home_of": (
        "Where does {a} live?",
        "In which place does {a} live?",
        "Tell me the home of {a}.",
    ),
}

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

# File names written by write_world(); a driver reads them through WorldFiles.
PRETRAIN_FILE = "pretrain.jsonl"
HELDOUT_FILE = "heldout.jsonl"
SFT_FILE = "sft.jsonl"
EVAL_FILE = "eval.jsonl"
FACTS_FILE = "world.json"


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and randomness of the embedded world (defaults: CPU-minutes scale)."""

    seed: int = 1234
    n_animals: int = 48
    n_places: int = 10
    n_foods: int = 12
    pretrain_docs: int = 4000
    heldout_docs: int = 200
    sentences_per_doc: tuple[int, int] = (3, 6)
    # How many SFT examples (one answer each) per seen instruction.
    sft_answers_per_prompt: int = 4
    # Popularity of answers in the SFT data: weight of the k-th most popular animal is k**-zipf_s.
    zipf_s: float = 1.5
    # Share of instructions held out of SFT (evaluated as "unseen").
    unseen_fraction: float = 0.3
    # Instructions with fewer valid answers are dropped (diversity needs a choice).
    min_valid: int = 2
    # Include "Name two animals that can X." (3-word answers, ordered pairs of distinct animals).
    pair_prompts: bool = True
    # "rare" group: "Name an animal that is C and can X." where 1..rare_max animals are valid.
    rare_max: int = 3
    # "single" group: the colour and home of this many animals, each in every wording
    # (0: none), each seen instruction in SFT this many times (it has one answer: repeating it
    # adds weight, not variety).
    relation_animals: int = 16
    sft_answers_per_single: int = 1

    def __post_init__(self):
        for name in (
            "n_animals",
            "n_places",
            "n_foods",
            "pretrain_docs",
            "sft_answers_per_prompt",
            "sft_answers_per_single",
            "rare_max",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.relation_animals <= self.n_animals:
            raise ValueError(
                f"WorldConfig.relation_animals must be in [0, n_animals={self.n_animals}], "
                f"got {self.relation_animals}"
            )
        if self.n_animals < 4:
            raise ValueError(f"WorldConfig.n_animals must be >= 4, got {self.n_animals}")
        if self.heldout_docs < 0:
            raise ValueError(f"WorldConfig.heldout_docs must be >= 0, got {self.heldout_docs}")
        lo, hi = self.sentences_per_doc
        if not 1 <= lo <= hi:
            raise ValueError(
                f"WorldConfig.sentences_per_doc must be (lo, hi) with 1 <= lo <= hi, "
                f"got {self.sentences_per_doc}"
            )
        if not self.zipf_s >= 0:
            raise ValueError(f"WorldConfig.zipf_s must be >= 0, got {self.zipf_s}")
        if not 0 <= self.unseen_fraction < 1:
            raise ValueError(
                f"WorldConfig.unseen_fraction must be in [0, 1), got {self.unseen_fraction}"
            )


@dataclass(frozen=True)
class Animal:
    name: str
    colour: str
    abilities: tuple[str, ...]
    place: str
    foods: tuple[str, ...]


@dataclass(frozen=True)
class Instruction:
    """One instruction with its complete set of valid answers; ``unit``: what is held out of SFT
    together (default: the instruction itself; for a single-answer question, its animal)."""

    id: str
    family: str
    text: str
    valid: tuple[str, ...]
    unit: str = ""


@dataclass
class World:
    config: WorldConfig
    animals: list[Animal]
    places: list[str]
    foods: list[str]
    popularity: dict[str, float]  # name -> SFT popularity weight (Zipf over a random order)
    instructions: list[Instruction]
    seen_ids: frozenset[str]

    # ---- text generation ------------------------------------------------------------------
    def documents(self, n: int, rng: random.Random) -> list[str]:
        lo, hi = self.config.sentences_per_doc
        return [" ".join(self._sentence(rng) for _ in range(rng.randint(lo, hi))) for _ in range(n)]

    def _sentence(self, rng: random.Random) -> str:
        a = rng.choice(self.animals)
        kind = rng.randrange(9)
        if kind == 0:
            return f"{a.name} is a {a.colour} animal."
        if kind == 1:
            ab = rng.choice(a.abilities)
            return rng.choice(
                [
                    f"{a.name} can {ab}.",
                    f"the {a.colour} {a.name} can {ab}.",
                    f"an animal that can {ab} is {a.name}.",
                ]
            )
        if kind == 2:
            return rng.choice(
                [f"{a.name} lives in {a.place}.", f"in {a.place} you can see {a.name}."]
            )
        if kind == 3:
            f = rng.choice(a.foods)
            return rng.choice([f"{a.name} eats {f}.", f"{f} is eaten by {a.name}."])
        if kind == 4:
            b = rng.choice([x for x in self.animals if x is not a])
            return f"{a.name} and {b.name} went to {rng.choice(self.places)}."
        if kind == 5:
            return f"in {a.place} lives a {a.colour} animal called {a.name}."
        if kind == 6:
            ab = rng.choice(ABILITIES)
            verb = "can" if ab in a.abilities else "can not"
            return f"{a.name} {verb} {ab}."
        if kind == 7:
            ab = rng.choice(a.abilities)
            return f"{a.name} went to {rng.choice(self.places)} to {ab}."
        return f"{a.name} likes {rng.choice(a.foods)} and lives in {a.place}."

    # ---- SFT ------------------------------------------------------------------------------
    def sft_examples(self, rng: random.Random) -> list[dict]:
        out = []
        for ins in self.instructions:
            if ins.id not in self.seen_ids:
                continue
            single = TASK_GROUPS[ins.family] == "single"
            reps = (
                self.config.sft_answers_per_single if single else self.config.sft_answers_per_prompt
            )
            for _ in range(reps):
                out.append(
                    {
                        "messages": [
                            {"role": "user", "content": ins.text},
                            {"role": "assistant", "content": self._popular_answer(ins, rng)},
                        ]
                    }
                )
        rng.shuffle(out)
        return out

    def _popular_answer(self, ins: Instruction, rng: random.Random) -> str:
        if ins.family == "pair":
            names = sorted({n for pair in ins.valid for n in pair.split(" and ")})
            first = _weighted_choice(rng, names, [self._weight(n) for n in names])
            rest = [n for n in names if n != first]
            second = _weighted_choice(rng, rest, [self._weight(n) for n in rest])
            return f"{first} and {second}"
        if len(ins.valid) == 1:  # a single answer (colours have no popularity)
            return ins.valid[0]
        return _weighted_choice(rng, list(ins.valid), [self._weight(v) for v in ins.valid])

    def _weight(self, answer: str) -> float:
        return self.popularity[answer]


def _weighted_choice(rng: random.Random, items: list[str], weights: list[float]) -> str:
    return rng.choices(items, weights=weights, k=1)[0]


def _pseudo_words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """n distinct pronounceable words of 2-3 consonant-vowel syllables, none in `taken`."""
    out: list[str] = []
    while len(out) < n:
        w = "".join(
            rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 2, 3)))
        )
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def task_group(instruction_id: str) -> str | None:
    """The task group ("open", "rare", "single") of an eval prompt id ("family:key"), or None
    for an id that is not the embedded world's."""
    return TASK_GROUPS.get(str(instruction_id).split(":", 1)[0])


def build_world(config: WorldConfig = WorldConfig()) -> World:
    """Build the world's facts and instructions (no files); deterministic from config.seed."""
    rng = random.Random(config.seed)
    taken = set(COLOURS) | set(ABILITIES)
    names = _pseudo_words(rng, config.n_animals, taken)
    places = _pseudo_words(rng, config.n_places, taken)
    foods = _pseudo_words(rng, config.n_foods, taken)
    animals = []
    for i, name in enumerate(names):
        # Round-robin first ability so every ability has about n_animals/6 (+ extras) animals.
        abilities = {ABILITIES[i % len(ABILITIES)]}
        if rng.random() < 0.5:
            abilities.add(rng.choice(ABILITIES))
        animals.append(
            Animal(
                name=name,
                colour=COLOURS[rng.randrange(len(COLOURS))],
                abilities=tuple(a for a in ABILITIES if a in abilities),
                place=places[rng.randrange(len(places))],
                foods=tuple(sorted(rng.sample(foods, k=min(len(foods), rng.choice((1, 2)))))),
            )
        )
    # SFT popularity: Zipf weights over a random order, separately for animals, places, foods.
    popularity: dict[str, float] = {}
    for group in (names, places, foods):
        order = group[:]
        rng.shuffle(order)
        popularity.update({n: (k + 1) ** -config.zipf_s for k, n in enumerate(order)})

    instructions: list[Instruction] = []

    def add(family: str, key: str, text: str, valid, min_valid=None, max_valid=None, unit=""):
        valid = tuple(sorted(set(valid)))
        lo = max(1, config.min_valid if min_valid is None else min_valid)
        if lo <= len(valid) <= (max_valid or len(valid)):
            iid = f"{family}:{key}"
            instructions.append(Instruction(iid, family, text, valid, unit or iid))

    for ab in ABILITIES:
        add(
            "ability",
            ab,
            f"Name an animal that can {ab}.",
            [a.name for a in animals if ab in a.abilities],
        )
    for c in COLOURS:
        add("colour", c, f"Name an animal that is {c}.", [a.name for a in animals if a.colour == c])
    for p in places:
        add(
            "place",
            p,
            f"Name an animal that lives in {p}.",
            [a.name for a in animals if a.place == p],
        )
    for f in foods:
        add("food", f, f"Name an animal that eats {f}.", [a.name for a in animals if f in a.foods])
    for c in COLOURS:
        add(
            "home",
            c,
            f"Name a place where a {c} animal lives.",
            [a.place for a in animals if a.colour == c],
        )
    for ab in ABILITIES:
        add(
            "diet",
            ab,
            f"Name a food eaten by an animal that can {ab}.",
            [f for a in animals if ab in a.abilities for f in a.foods],
        )
    if config.pair_prompts:
        for ab in ABILITIES:
            able = [a.name for a in animals if ab in a.abilities]
            add(
                "pair",
                ab,
                f"Name two animals that can {ab}.",
                [f"{x} and {y}" for x in able for y in able if x != y],
            )

    # Rare valid sets: the colour-and-ability combinations that 1..rare_max animals have.
    for c in COLOURS:
        for ab in ABILITIES:
            add(
                "rare",
                f"{c}-{ab}",
                f"Name an animal that is {c} and can {ab}.",
                [a.name for a in animals if a.colour == c and ab in a.abilities],
                min_valid=1,
                max_valid=config.rare_max,
            )
    # Single answers: one animal's colour or home, in every wording; held out by animal.
    for a in animals[: config.relation_animals]:
        for family, answer in (("colour_of", a.colour), ("home_of", a.place)):
            for w, text in enumerate(RELATION_WORDINGS[family]):
                add(family, f"{a.name}:{w}", text.format(a=a.name), [answer], 1, 1, a.name)

    # Hold out a share of each family's units, so every kind of instruction is seen in SFT.
    seen: set[str] = set()
    for family in dict.fromkeys(i.family for i in instructions):
        units = list(dict.fromkeys(i.unit for i in instructions if i.family == family))
        rng.shuffle(units)
        n_unseen = min(len(units) - 1, round(config.unseen_fraction * len(units)))
        seen_units = set(units[n_unseen:])
        seen.update(i.id for i in instructions if i.family == family and i.unit in seen_units)
    return World(config, animals, places, foods, popularity, instructions, frozenset(seen))


@dataclass(frozen=True)
class WorldFiles:
    """Paths of the files write_world() produced."""

    root: Path
    pretrain: Path
    heldout: Path
    sft: Path
    eval: Path
    facts: Path


def world_files(out_dir: str | os.PathLike) -> WorldFiles:
    root = Path(out_dir)
    return WorldFiles(
        root,
        root / PRETRAIN_FILE,
        root / HELDOUT_FILE,
        root / SFT_FILE,
        root / EVAL_FILE,
        root / FACTS_FILE,
    )


def generate(config: WorldConfig = WorldConfig()) -> dict:
    """All records of the world in memory: keys pretrain, heldout, sft, eval (lists of JSON
    records) and world (the World object)."""
    world = build_world(config)
    # Separate random streams per output, so changing one size leaves the others unchanged.
    pretrain = world.documents(config.pretrain_docs, random.Random(f"{config.seed}-pretrain"))
    seen_docs = set(pretrain)
    heldout: list[str] = []
    rng = random.Random(f"{config.seed}-heldout")
    for _ in range(100 * max(1, config.heldout_docs)):
        if len(heldout) == config.heldout_docs:
            break
        doc = world.documents(1, rng)[0]
        if doc not in seen_docs:
            seen_docs.add(doc)
            heldout.append(doc)
    sft = world.sft_examples(random.Random(f"{config.seed}-sft"))
    evals = [
        {
            "id": ins.id,
            "split": "seen" if ins.id in world.seen_ids else "unseen",
            "messages": [{"role": "user", "content": ins.text}],
            "valid": list(ins.valid),
        }
        for ins in world.instructions
    ]
    return {
        "pretrain": [{"text": t} for t in pretrain],
        "heldout": [{"text": t} for t in heldout],
        "sft": sft,
        "eval": evals,
        "world": world,
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_world(
    out_dir: str | os.PathLike, config: WorldConfig = WorldConfig(), overwrite: bool = False
) -> WorldFiles:
    """Write the world's JSONL files (and world.json: config + facts) into out_dir.

    Refuses to replace existing files unless overwrite=True; a driver that resumes can check
    ``world_files(out_dir).facts.exists()`` and compare the stored config instead.
    """
    files = world_files(out_dir)
    files.root.mkdir(parents=True, exist_ok=True)
    paths = [files.pretrain, files.heldout, files.sft, files.eval, files.facts]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"write_world: {', '.join(existing)} already exist(s); pass overwrite=True"
        )
    data = generate(config)
    world: World = data["world"]
    for path, key in (
        (files.pretrain, "pretrain"),
        (files.heldout, "heldout"),
        (files.sft, "sft"),
        (files.eval, "eval"),
    ):
        _write_jsonl(path, data[key])
    facts = {
        "config": dataclasses.asdict(config),
        "animals": [dataclasses.asdict(a) for a in world.animals],
        "places": world.places,
        "foods": world.foods,
        "popularity": world.popularity,
        "counts": {k: len(data[k]) for k in ("pretrain", "heldout", "sft", "eval")},
    }
    tmp = files.facts.with_name(files.facts.name + ".tmp")
    tmp.write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, files.facts)
    return files


def read_config(facts_path: str | os.PathLike) -> WorldConfig:
    """The WorldConfig stored in a world.json (for a resuming driver to compare)."""
    cfg = json.loads(Path(facts_path).read_text(encoding="utf-8"))["config"]
    cfg["sentences_per_doc"] = tuple(cfg["sentences_per_doc"])
    return WorldConfig(**cfg)
