"""CE-vs-GEM studies: pre-train (or import) -> SFT with CE and GEM -> export -> evaluate -> report.

A study is a list of stages, each with an output directory under the study folder ``OUT``:

    data                     OUT/data/        the embedded world (or copies of the user's JSONL)
    prep                     OUT/prep/        SentencePiece model, pre-training and SFT data
    pretrain:SIZE            OUT/SIZE/pretrain/        Megatron checkpoint (training entry)
    import:SIZE              OUT/SIZE/base/            (instead: an HF base model, converted)
    export:SIZE:base         OUT/SIZE/base-hf/         the pre-trained model as HF
    eval:SIZE:base           OUT/SIZE/base-eval/       its metrics, the held-out loss "before"
    sft:SIZE:RUN             OUT/SIZE/RUN/ckpt/        SFT from the base, intermediate saves
    export:SIZE:RUN:STEP     OUT/SIZE/RUN/hf/STEP/     each saved checkpoint as HF
    eval:SIZE:RUN:STEP       OUT/SIZE/RUN/eval/STEP/   quality, diversity, forgetting
    report                   OUT/report/      results.csv, report.md, PNG plots

RUN is ``ce`` or ``gem-b<beta>`` (``-s<seed>`` with several seeds). Every run of a size uses
the same lr, steps, batch and seed, so they differ only in the loss.

Resume: a stage is done iff its output holds the marker ``.stage.json``, written last (temp
name, then rename) and recording a token of every input stage; a stage whose input was redone
since is stale and runs again (its old output is removed first). Directories written whole
(data, prep, exports, evals, report) are built under a hidden temporary name and renamed into
place when complete; training checkpoints are written in place by Megatron (an interrupted
training run resumes from its last checkpoint).

Executors: ``local`` runs the pending stages in sequence in this process (training as
``torch.distributed.run`` subprocesses: CPU mode with gloo without CUDA, or one GPU node);
``slurm`` submits them as ``sbatch`` jobs chained with ``--dependency=afterok`` through the
launch scripts (``launch_scripts/gpt_pretrain.sbatch``, ``llama3_8b_sft.sbatch``,
``convert_*.sbatch``; the Python stages as ``sbatch --wrap`` of ``python -m megatron_gem.study
run-stage``), and collects the results in its ``report`` job (or when run again).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from megatron_gem.ops.config import DEFAULT_BETA, check_beta
from megatron_gem.data.jsonl import BadLine, is_blank, iter_lines, read_jsonl
from megatron_gem.paths import check_output_apart, publish, temp_sibling

REPO = Path(__file__).resolve().parents[2]
MARKER = ".stage.json"
INPUTS = ".stage-inputs.json"
CONFIG_FILE = "study.json"
DATA_KEYS = ("pretrain_data", "sft_data", "eval_data", "heldout_data")  # StudyConfig's JSONL files


# ---- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """A Llama-style GPT (RoPE, SwiGLU, RMSNorm, no bias, untied embeddings, no dropout), or,
    with ``hf_model``, an HF Llama/Qwen2 directory imported as the pre-trained base."""

    name: str
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None       # default 4 x hidden / ... (SwiGLU: 8/3 x hidden)
    num_query_groups: int | None = None      # GQA groups (None: multi-head attention)
    hf_model: str | None = None

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"model size name {self.name!r}: use letters, digits, '-', '_', '.'")
        if self.hf_model is None:
            for k in ("num_layers", "hidden_size", "num_attention_heads"):
                if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                    raise ValueError(f"model size {self.name}: {k} must be a positive integer, "
                                     f"got {getattr(self, k)!r}")
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"model size {self.name}: hidden_size {self.hidden_size} is not "
                                 f"divisible by num_attention_heads {self.num_attention_heads}")

    def megatron_args(self, max_positions: int) -> list[str]:
        ffn = self.ffn_hidden_size or 4 * self.hidden_size
        a = ["--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden_size),
             "--num-attention-heads", str(self.num_attention_heads), "--ffn-hidden-size", str(ffn),
             "--max-position-embeddings", str(max_positions),
             "--position-embedding-type", "rope", "--no-position-embedding", "--swiglu",
             "--normalization", "RMSNorm", "--disable-bias-linear",
             "--untie-embeddings-and-output-weights", "--attention-dropout", "0.0",
             "--hidden-dropout", "0.0", "--init-method-std", "0.02"]
        if self.num_query_groups:
            a += ["--group-query-attention", "--num-query-groups", str(self.num_query_groups)]
        return a


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study's results depend on (stored as OUT/study.json)."""

    sizes: tuple[ModelSize, ...]
    betas: tuple[float, ...] = (DEFAULT_BETA,)  # GEM runs; CE is always run
    seeds: tuple[int, ...] = (1234,)           # SFT seeds (one run per method and seed)
    # data: None = the embedded world from world_seed (world_overrides: WorldConfig fields)
    world_seed: int = 1234
    world_overrides: dict = field(default_factory=dict)
    pretrain_data: str | None = None           # {"text"} JSONL
    sft_data: str | None = None                # {"messages"} JSONL
    eval_data: str | None = None               # {"messages", "valid"?} JSONL
    heldout_data: str | None = None            # {"text"} JSONL (default: 2% of pretrain_data)
    vocab_size: int = 256                      # SentencePiece (when pre-training)
    seq_length: int = 64
    tp: int = 2
    nproc: int = 2                             # processes (GPUs) per training run
    pretrain_iters: int = 200
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 16                   # global batch (micro-batch: micro_batch)
    sft_iters: int = 60
    sft_lr: float = 1e-3
    sft_batch: int = 8
    save_interval: int = 20                    # SFT checkpoints evaluated every this many steps
    micro_batch: int = 4
    # evaluation: N samples per prompt
    n_samples: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 12
    prompt_set: str = "unseen"                 # the set of the plots and curves
    extra_train_args: tuple[str, ...] = ()     # any Megatron flags, for every training run
    precision: str = "fp32"                    # fp32 (CPU) | bf16 (GPU)

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
        for k in ("vocab_size", "seq_length", "tp", "nproc", "pretrain_iters", "pretrain_batch",
                  "sft_iters", "sft_batch", "save_interval", "micro_batch", "n_samples",
                  "max_new_tokens"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if self.nproc % self.tp:
            raise ValueError(f"nproc {self.nproc} must be a multiple of tp {self.tp}")
        dp = self.nproc // self.tp
        for k in ("pretrain_batch", "sft_batch"):
            if getattr(self, k) % (self.micro_batch * dp):
                raise ValueError(f"{k} {getattr(self, k)} must be a multiple of micro_batch x "
                                 f"data-parallel size = {self.micro_batch * dp}")
        if self.save_interval > self.sft_iters:
            raise ValueError(f"save_interval {self.save_interval} > sft_iters {self.sft_iters}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        imported = [s.hf_model is not None for s in self.sizes]
        if any(imported) and not all(imported):
            raise ValueError("either every model size imports an HF model (hf_model) or none")
        if all(imported) and self.sft_data is None:
            raise ValueError("importing HF base models needs your SFT data (--sft-data) and "
                             "evaluation prompts (--eval-data)")
        user = [self.pretrain_data, self.sft_data, self.eval_data]
        if any(user) and not all(user[1:]) :
            raise ValueError("user data needs at least --sft-data and --eval-data "
                             "(and --pretrain-data to pre-train)")
        if any(user) and not all(imported) and self.pretrain_data is None:
            raise ValueError("pre-training on user data needs --pretrain-data")
        for k in DATA_KEYS:
            p = getattr(self, k)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"--{k.replace('_', '-')} {p!r}: no such file")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("sampling: temperature >= 0, top_p in (0, 1], top_k >= 0")

    @property
    def imports(self) -> bool:
        return self.sizes[0].hf_model is not None

    @property
    def embedded(self) -> bool:
        return self.sft_data is None

    def sft_steps(self) -> list[int]:
        steps = list(range(self.save_interval, self.sft_iters + 1, self.save_interval))
        return steps if steps[-1] == self.sft_iters else steps + [self.sft_iters]

    def runs(self) -> list[tuple[str, str, float | None, int]]:
        """(run name, method, beta, seed) per SFT run of one size."""
        out = []
        for seed in self.seeds:
            suffix = f"-s{seed}" if len(self.seeds) > 1 else ""
            out.append((f"ce{suffix}", "ce", None, seed))
            out += [(f"gem-b{b:g}{suffix}", "gem", float(b), seed) for b in self.betas]
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
        for k in ("betas", "seeds", "extra_train_args"):
            d[k] = tuple(d[k])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"study config: unknown key(s) {sorted(unknown)}")
        return cls(**d)


# The README's main command: one tiny GPT, CE and GEM at two betas, on 2 CPU cores in minutes.
PRESETS = {
    "default": dict(sizes=(ModelSize("tiny", 2, 64, 4, 176, 2),), betas=(DEFAULT_BETA, 0.5)),
    # The test suite's: 2 sizes x {CE, GEM beta=1}: GEM at beta = 1 has CE's gradient. One
    # process per training run (TP=1) halves the CPU cost of Megatron's start-up.
    "ci": dict(sizes=(ModelSize("xs", 1, 32, 2, 64), ModelSize("s", 1, 48, 2, 96)), betas=(1.0,),
               tp=1, nproc=1,
               world_overrides={"n_animals": 16, "n_places": 4, "n_foods": 5, "pretrain_docs": 400,
                                "heldout_docs": 20},
               vocab_size=128, seq_length=48, pretrain_iters=12, pretrain_batch=8, sft_iters=6,
               sft_batch=8, save_interval=3, micro_batch=4, n_samples=4, max_new_tokens=6),
}


def preset(name: str, **overrides) -> StudyConfig:
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: choose one of {sorted(PRESETS)}")
    return StudyConfig(**{**PRESETS[name], **overrides})


# ---- stages ----------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    kind: str                      # data | prep | pretrain | import | sft | export | eval | report
    out: Path
    deps: list[str]
    info: dict = field(default_factory=dict)
    # Directory outputs built under a temporary name (False: training checkpoints, in place).
    atomic: bool = True

    @property
    def slug(self) -> str:
        return self.name.replace(":", "-")


def step_dir(step: int) -> str:
    return f"iter_{step:07d}"


def plan(cfg: StudyConfig, out: Path) -> list[Stage]:
    """Every stage of the study, in an order that respects dependencies."""
    out = Path(out)
    st = [Stage("data", "data", out / "data", [])]
    st.append(Stage("prep", "prep", out / "prep", ["data"]))
    for size in cfg.sizes:
        z = size.name
        if cfg.imports:
            base = Stage(f"import:{z}", "import", out / z / "base", ["prep"], {"size": size})
            st.append(base)
            base_eval_deps = [base.name]
            base_hf = Path(size.hf_model)
        else:
            base = Stage(f"pretrain:{z}", "pretrain", out / z / "pretrain", ["prep"], {"size": size},
                         atomic=False)
            exp = Stage(f"export:{z}:base", "export", out / z / "base-hf", [base.name],
                        {"size": size, "ckpt": base.out, "step": cfg.pretrain_iters})
            st += [base, exp]
            base_eval_deps = [exp.name]
            base_hf = exp.out
        base_eval = Stage(f"eval:{z}:base", "eval", out / z / "base-eval", ["prep", *base_eval_deps],
                          {"size": size, "hf": base_hf, "base": True})
        st.append(base_eval)
        for run, method, beta, seed in cfg.runs():
            sft = Stage(f"sft:{z}:{run}", "sft", out / z / run / "ckpt", ["prep", base.name],
                        {"size": size, "run": run, "method": method, "beta": beta, "seed": seed,
                         "base": base.out}, atomic=False)
            st.append(sft)
            for step in cfg.sft_steps():
                exp = Stage(f"export:{z}:{run}:{step}", "export", out / z / run / "hf" / step_dir(step),
                            [sft.name], {"size": size, "ckpt": sft.out, "step": step})
                ev = Stage(f"eval:{z}:{run}:{step}", "eval", out / z / run / "eval" / step_dir(step),
                           ["prep", exp.name, base_eval.name],
                           {"size": size, "hf": exp.out, "run": run, "method": method, "beta": beta,
                            "seed": seed, "step": step, "base_eval": base_eval.out})
                st += [exp, ev]
    evals = [s.name for s in st if s.kind == "eval"]
    st.append(Stage("report", "report", out / "report", evals))
    return st


# ---- markers ---------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Study:
    """A study folder: its config, stages and their state."""

    def __init__(self, cfg: StudyConfig, out: str | os.PathLike, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out = Path(out).resolve()
        # The study replaces stage folders under --out (rmtree of stale outputs): refuse an
        # --out that is, contains or lies inside the user's data or an HF base model.
        inputs = [(f"--{k.replace('_', '-')}", getattr(cfg, k)) for k in DATA_KEYS]
        inputs += [(f"--sizes {z.name}=HF_DIR", z.hf_model) for z in cfg.sizes]
        check_output_apart(self.out, inputs, "--out")
        self.stages = plan(cfg, self.out)
        self.by_name = {s.name: s for s in self.stages}
        self.log = log or _print

    # -- study.json: a folder holds one study; a different config is refused, never mixed in
    def init_folder(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CONFIG_FILE
        want = json.loads(json.dumps(self.cfg.to_json()))  # tuples -> lists, as stored
        have = _read_json(path)
        if have is None:
            if any(p.name != "logs" for p in self.out.iterdir()):
                raise ValueError(f"--out {self.out}: not empty and holds no {CONFIG_FILE}; "
                                 "choose a new folder (nothing was changed)")
            _write_json_atomic(path, want)
        elif have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(f"--out {self.out} holds a study with a different configuration "
                             f"(differs in: {', '.join(diff)}); use another --out folder to keep both")

    def marker(self, stage: Stage) -> dict | None:
        return _read_json(stage.out / MARKER)

    def done(self, stage: Stage, _memo: dict | None = None) -> bool:
        """Done: its marker exists and records the current token of every input stage."""
        memo = {} if _memo is None else _memo
        if stage.name in memo:
            return memo[stage.name]
        m = self.marker(stage)
        ok = m is not None
        if ok:
            for d in stage.deps:
                dep = self.by_name[d]
                dm = self.marker(dep)
                if not self.done(dep, memo) or dm is None or m.get("deps", {}).get(d) != dm["token"]:
                    ok = False
                    break
        memo[stage.name] = ok
        return ok

    def pending(self) -> list[Stage]:
        memo: dict = {}
        return [s for s in self.stages if not self.done(s, memo)]

    def dep_tokens(self, stage: Stage) -> dict:
        return {d: self.marker(self.by_name[d])["token"] for d in stage.deps}

    def mark(self, stage: Stage, seconds: float | None = None, exclusive: bool = False) -> None:
        """Write the stage's marker (temp name, then rename). ``exclusive``: keep a marker that
        another process (a concurrent slurm job adopting the same stage) wrote first."""
        rec = {"stage": stage.name, "token": uuid.uuid4().hex, "deps": self.dep_tokens(stage),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds}
        if not exclusive:
            _write_json_atomic(stage.out / MARKER, rec)
            return
        tmp = stage.out / f".{MARKER}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
        try:
            os.link(tmp, stage.out / MARKER)   # fails if it exists: first writer wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()

    def complete(self, stage: Stage) -> bool:
        """The output a stage run outside this process (a slurm job) leaves when it succeeded."""
        if stage.kind in ("pretrain", "sft"):
            iters = self.cfg.pretrain_iters if stage.kind == "pretrain" else self.cfg.sft_iters
            t = stage.out / "latest_checkpointed_iteration.txt"
            return t.is_file() and t.read_text().strip() == str(iters)
        if stage.kind in ("export",):
            return (stage.out / "config.json").is_file()
        if stage.kind == "import":
            return (stage.out / "latest_checkpointed_iteration.txt").is_file()
        return False

    def prepare_output(self, stage: Stage) -> None:
        """Before running a stage: remove a stale output (its inputs were redone), keep a
        partial training run of the same inputs (Megatron resumes it)."""
        if not stage.out.exists():
            return
        rec = _read_json(stage.out / INPUTS)
        tokens = self.dep_tokens(stage)
        if stage.atomic or (rec is not None and rec != tokens) or self.marker(stage) is not None:
            self.log(f"removing the stale output of {stage.name}: {stage.out}")
            shutil.rmtree(stage.out)

    def adopt_finished(self) -> list[str]:
        """Mark stages whose job finished elsewhere (slurm) and left a complete output."""
        adopted = []
        memo: dict = {}
        for s in self.stages:
            if self.done(s, memo) or self.marker(s) is not None:
                continue
            if all(self.done(self.by_name[d], memo) for d in s.deps) and self.complete(s):
                rec = _read_json(s.out / INPUTS)
                if rec is None or rec == self.dep_tokens(s):
                    self.mark(s, exclusive=True)
                    adopted.append(s.name)
                    memo = {}
        return adopted

    def records(self) -> list[dict]:
        from megatron_gem.study.report import make_record

        recs = []
        for s in self.stages:
            if s.kind == "eval" and not s.info.get("base"):
                res = _read_json(s.out / "result.json")
                if res is None:
                    continue
                recs.append(make_record(s.info["method"], s.info["beta"], s.info["size"].name,
                                        s.info["step"], res["result"], params=res.get("params"),
                                        seed=s.info["seed"]))
        return recs


def _print(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- local execution -------------------------------------------------------------------------


def run_local(study: Study, only: Sequence[str] | None = None) -> list[str]:
    """Run every pending stage in order (``only``: just these, for ``run-stage``); returns the
    names of the stages run."""
    study.init_folder()
    todo = [s for s in study.pending() if only is None or s.name in only]
    ran = []
    if not todo:
        study.log(f"nothing to do: every stage of {study.out} is done")
        return ran
    study.log(f"{len(todo)} of {len(study.stages)} stages to run in {study.out}")
    for i, s in enumerate(todo, 1):
        missing = [d for d in s.deps if not study.done(study.by_name[d])]
        if missing:
            raise RuntimeError(f"stage {s.name}: input stage(s) {missing} are not done")
        study.log(f"({i}/{len(todo)}) {s.name}: {_describe(study.cfg, s)}")
        t0 = time.time()
        study.prepare_output(s)
        RUNNERS[s.kind](study, s)
        study.mark(s, round(time.time() - t0, 1))
        study.log(f"({i}/{len(todo)}) {s.name} done in {time.time() - t0:.0f} s")
        ran.append(s.name)
    return ran


def _describe(cfg: StudyConfig, s: Stage) -> str:
    if s.kind == "data":
        return "the embedded world" if cfg.embedded else "copying your data"
    if s.kind == "prep":
        return "tokenizer, pre-training and SFT data"
    if s.kind == "pretrain":
        z = s.info["size"]
        return (f"pre-training {z.num_layers} layers x {z.hidden_size} for {cfg.pretrain_iters} steps "
                f"(TP={cfg.tp}, {cfg.nproc} processes)")
    if s.kind == "sft":
        b = f" beta={s.info['beta']:g}" if s.info["method"] == "gem" else ""
        return (f"SFT with {s.info['method'].upper()}{b}, {cfg.sft_iters} steps, lr {cfg.sft_lr:g}, "
                f"checkpoints every {cfg.save_interval}")
    if s.kind == "export":
        return f"checkpoint -> HF ({s.out})"
    if s.kind == "eval":
        return f"{cfg.n_samples} samples per prompt, scoring, held-out loss"
    return str(s.out)


def _building(stage: Stage) -> Path:
    tmp = stage.out.parent / f".{stage.out.name}.incomplete"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def _run_data(study: Study, s: Stage) -> None:
    from megatron_gem.study import world as W

    cfg = study.cfg
    tmp = _building(s)
    if cfg.embedded:
        W.write_world(tmp, W.WorldConfig(seed=cfg.world_seed, **cfg.world_overrides))
    else:
        for k in DATA_KEYS:  # the first bad line, with the user's file:line (copies renumber)
            if getattr(cfg, k):
                check_jsonl(getattr(cfg, k), f"--{k.replace('_', '-')}")
        for src, name in ((cfg.pretrain_data, W.PRETRAIN_FILE), (cfg.sft_data, W.SFT_FILE),
                          (cfg.eval_data, W.EVAL_FILE)):
            if src:
                shutil.copyfile(src, tmp / name)
        if cfg.heldout_data:
            shutil.copyfile(cfg.heldout_data, tmp / W.HELDOUT_FILE)
        elif cfg.pretrain_data:  # hold out every 50th document (not trained on)
            lines = [raw for _, raw in iter_lines(cfg.pretrain_data) if not is_blank(raw)]
            (tmp / W.HELDOUT_FILE).write_bytes(b"".join(l + b"\n" for i, l in enumerate(lines) if i % 50 == 49))
            (tmp / W.PRETRAIN_FILE).write_bytes(b"".join(l + b"\n" for i, l in enumerate(lines) if i % 50 != 49))
    _publish(tmp, s.out)


def check_jsonl(path: str, arg: str) -> None:
    """Fail on the first line of ``path`` that is not a JSON object (not UTF-8, invalid JSON)."""
    for lineno, obj in read_jsonl(path):
        reason = obj.reason if isinstance(obj, BadLine) else (
            None if isinstance(obj, dict) else f"not a JSON object (got {type(obj).__name__})")
        if reason:
            raise ValueError(f"{arg} {path}:{lineno}: {reason}")


def _tokenizer_flags(study: Study) -> list[str]:
    if study.cfg.imports:
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                str(Path(study.cfg.sizes[0].hf_model).resolve())]
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            str(study.by_name["prep"].out / "spm.model")]


def _run_prep(study: Study, s: Stage) -> None:
    from megatron_gem.study import world as W
    from megatron_gem.data.sft import prepare_sft_data
    from megatron_gem.data.text import preprocess_jsonl
    from megatron_gem.data.tokenizer import build_tokenizer, iter_training_text, train_sentencepiece

    cfg, data = study.cfg, W.world_files(study.by_name["data"].out)
    tmp = _building(s)
    if cfg.imports:
        tok = build_tokenizer("HuggingFaceTokenizer", str(Path(cfg.sizes[0].hf_model).resolve()))
    else:
        sp = train_sentencepiece(iter_training_text([str(data.pretrain), str(data.sft), str(data.eval)]),
                                 tmp / "spm", cfg.vocab_size)
        tok = build_tokenizer("SentencePieceTokenizer", sp)
        rep = preprocess_jsonl(str(data.pretrain), str(tmp / "pretrain"), "SentencePieceTokenizer", sp)
        study.log(f"   pre-training data: {rep.format().splitlines()[0]}")
    rep = prepare_sft_data(str(data.sft), str(tmp / "sft"), tok, cfg.seq_length)
    study.log(f"   SFT data: {rep.format().splitlines()[0]}")
    _write_json_atomic(tmp / "tokenizer.json.info", {"vocab_size": int(tok.vocab_size)})
    _publish(tmp, s.out)


def vocab_size(study: Study) -> int:
    return int(_read_json(study.by_name["prep"].out / "tokenizer.json.info")["vocab_size"])


def train_argv(study: Study, s: Stage) -> list[str]:
    """The training entry's flags for a pretrain or SFT stage (the same on CPU and GPU)."""
    cfg = study.cfg
    prep = study.by_name["prep"].out
    size: ModelSize = s.info["size"]
    pre = s.kind == "pretrain"
    iters = cfg.pretrain_iters if pre else cfg.sft_iters
    if cfg.imports:
        flags = (Path(s.info["base"]) / "megatron_args.txt").read_text().splitlines()[-1].split()
    else:
        flags = size.megatron_args(cfg.seq_length)
    a = flags + [
        "--tensor-model-parallel-size", str(cfg.tp), "--seq-length", str(cfg.seq_length),
        "--micro-batch-size", str(cfg.micro_batch),
        "--global-batch-size", str(cfg.pretrain_batch if pre else cfg.sft_batch),
        "--train-iters", str(iters), "--lr", str(cfg.pretrain_lr if pre else cfg.sft_lr),
        "--min-lr", str((cfg.pretrain_lr if pre else cfg.sft_lr) / 10), "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, iters // 20)), "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        "--seed", str(cfg.world_seed if pre else s.info["seed"]),
        "--log-interval", str(max(1, iters // 10)), "--eval-iters", "0", "--eval-interval", str(iters),
        "--num-workers", "0",
        "--save", str(s.out), "--load", str(s.out), "--ckpt-format", "torch_dist",
        "--save-interval", str(iters if pre else cfg.save_interval), "--split", "100,0,0",
        *_tokenizer_flags(study),
    ]
    if cfg.precision == "bf16":
        a.append("--bf16")
    if pre:
        a += ["--data-path", str(prep / "pretrain_text_document"), "--loss", "ce"]
    else:
        a += ["--sft", "--data-path", str(prep / "sft"), "--pretrained-checkpoint", str(s.info["base"])]
        a += ["--loss", "ce"] if s.info["method"] == "ce" else \
             ["--loss", "gem", "--gem-beta", f"{s.info['beta']:g}", "--gem-h", "linear"]
    return a + list(cfg.extra_train_args)


def _logfile(study: Study, s: Stage) -> Path:
    d = study.out / "logs"
    d.mkdir(exist_ok=True)
    return d / f"{s.slug}.log"


def _cpu_flag() -> list[str]:
    """The entry's CPU mode is opt-in: a local run on a machine without CUDA asks for it."""
    import torch

    return [] if torch.cuda.is_available() else ["--cpu"]


def _run_train(study: Study, s: Stage) -> None:
    s.out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(s.out / INPUTS, study.dep_tokens(s))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           f"--nproc-per-node={study.cfg.nproc}", "-m", "megatron_gem.train", *_cpu_flag(),
           *train_argv(study, s)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    log = _logfile(study, s)
    study.log(f"   log: {log}")
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            f.write(line)
            if " iteration " in line and "lm loss" in line:
                study.log("   " + _short_iteration_line(line))
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-40:])
        raise RuntimeError(f"stage {s.name}: training failed (exit {rc}); log {log}:\n{tail}")
    if not study.complete(s):
        raise RuntimeError(f"stage {s.name}: training ended without its final checkpoint; log {log}")


def _short_iteration_line(line: str) -> str:
    keep = []
    for part in line.split("|"):
        p = part.strip()
        if "iteration" in p and not keep:
            keep.append(" ".join(p[p.index("iteration"):].split()))
        elif p.split(":")[0] in ("lm loss", "gem loss", "entropy"):
            keep.append(" ".join(p.split()))
    return " | ".join(keep)


def _run_import(study: Study, s: Stage) -> None:
    from megatron_gem.convert import hf_to_megatron

    hf_to_megatron(s.info["size"].hf_model, s.out, tp=study.cfg.tp)


# Models up to this many parameters are exported in this process (export_small); larger ones
# by the converter's worker processes.
IN_PROCESS_EXPORT_MAX_PARAMS = 50_000_000


def _run_export(study: Study, s: Stage) -> None:
    from megatron_gem.convert import megatron_to_hf

    cfg = study.cfg
    kw = {"tokenizer_dir": s.info["size"].hf_model} if cfg.imports else {"vocab_size": vocab_size(study)}
    if cfg.imports or _params_estimate(s.info["size"], vocab_size(study)) > IN_PROCESS_EXPORT_MAX_PARAMS:
        megatron_to_hf(s.info["ckpt"], s.out, iteration=s.info["step"], dtype="fp32", **kw)
    else:
        export_small(s.info["ckpt"], s.out, s.info["step"], kw["vocab_size"])


def _params_estimate(size: ModelSize, vocab: int) -> int:
    h, f = size.hidden_size, size.ffn_hidden_size or 4 * size.hidden_size
    return size.num_layers * (4 * h * h + 3 * h * f) + 2 * vocab * h


def export_small(load_dir, out_dir, iteration: int, vocab_size: int) -> Path:
    """A small torch_dist checkpoint -> an HF directory, in this process.

    The same tensors as ``convert.megatron_to_hf`` (its mapping functions, on the checkpoint's
    global tensors read with ``convert.read_megatron_tensors``; a test checks the two agree bit
    for bit), without its worker processes: each of those initialises Megatron (10-40 s on a
    CPU), which would dominate a CPU study that exports a dozen tiny checkpoints.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from megatron_gem import convert as C

    ckpt_dir, _ = C.megatron_checkpoint_dir(load_dir, iteration)
    arch = C.arch_from_megatron_args(C.read_megatron_args(ckpt_dir), vocab_size)
    state = {}
    for name, t in C.read_megatron_tensors(ckpt_dir).items():
        if name.startswith("optimizer."):
            continue
        if name.startswith("decoder.layers."):  # layers stacked on a leading axis
            suffix = name[len("decoder.layers."):]
            for i in range(t.shape[0]):
                state[f"decoder.layers.{i}.{suffix}"] = t[i]
        else:
            state[name] = t
    hf = {k: v.to(torch.float32).contiguous() for k, v in C.megatron_full_state_to_hf(state, arch).items()}
    out = C.check_output_dir(out_dir, overwrite=False)
    tmp = temp_sibling(out)
    try:
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = C.hf_config_from_arch(arch, torch.float32, {})
        cfg.save_pretrained(str(tmp))
        GenerationConfig(**{k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
                         ).save_pretrained(str(tmp))
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sampling(cfg: StudyConfig):
    from megatron_gem.eval import SamplingConfig

    return SamplingConfig(n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          max_new_tokens=cfg.max_new_tokens, seed=0)


def _run_eval(study: Study, s: Stage) -> None:
    import torch

    import megatron_gem.eval as E
    from megatron_gem.study import world as W
    from megatron_gem.data.tokenizer import build_tokenizer

    cfg = study.cfg
    data = W.world_files(study.by_name["data"].out)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, hf_tok = E.load_hf(s.info["hf"], device=dev, dtype=torch.float32)
    if hf_tok is not None:
        fmt = E.hf_chat_format(hf_tok)
    else:
        tf = _tokenizer_flags(study)
        fmt = E.megatron_chat_format(build_tokenizer(tf[1], tf[3]))
    prompts = E.read_prompts(data.eval)
    heldout = E.read_texts(data.heldout) if data.heldout.is_file() else None
    before = None
    if not s.info.get("base") and heldout:
        before = _read_json(s.info["base_eval"] / "result.json")["result"]["heldout_loss"]
    torch.manual_seed(0)
    res = E.evaluate(model, fmt, prompts, _sampling(cfg), heldout_texts=heldout,
                     heldout_loss_before=before, progress=None)
    tmp = _building(s)
    _write_json_atomic(tmp / "result.json", {"stage": s.name, "params": model.num_parameters(),
                                             "result": res})
    _publish(tmp, s.out)
    st = res["sets"].get(cfg.prompt_set) or res["sets"]["all"]
    parts = [f"{k} {st[k]:.3f}" for k in ("quality", "effective_valid", "ngram_diversity") if k in st]
    if res.get("heldout_loss") is not None:
        parts.append(f"held-out loss {res['heldout_loss']:.3f}")
    if res.get("forgetting") is not None:
        parts.append(f"forgetting {res['forgetting']:+.3f}")
    study.log(f"   {cfg.prompt_set if cfg.prompt_set in res['sets'] else 'all'}: " + ", ".join(parts))


def report_notes(study: Study) -> list[str]:
    cfg = study.cfg
    notes = []
    if cfg.embedded:
        notes.append(f"Data: the embedded synthetic world (seed {cfg.world_seed}"
                     + (f", {cfg.world_overrides}" if cfg.world_overrides else "") + ").")
    else:
        notes.append(f"Data: SFT {cfg.sft_data}, evaluation {cfg.eval_data}"
                     + (f", pre-training {cfg.pretrain_data}" if cfg.pretrain_data else "") + ".")
    if cfg.imports:
        notes.append("Base models: " + ", ".join(f"{s.name} = {s.hf_model}" for s in cfg.sizes) + ".")
    else:
        notes.append(f"Pre-training: {cfg.pretrain_iters} steps, global batch {cfg.pretrain_batch} x "
                     f"{cfg.seq_length} tokens, lr {cfg.pretrain_lr:g} (cross-entropy).")
    notes.append(f"SFT: every run of a size starts from the same base checkpoint with the same lr "
                 f"{cfg.sft_lr:g} (cosine), {cfg.sft_iters} steps, global batch {cfg.sft_batch}, seed(s) "
                 f"{', '.join(map(str, cfg.seeds))}; checkpoints at steps "
                 f"{', '.join(map(str, cfg.sft_steps()))}. Methods: CE, "
                 + ", ".join(f"GEM beta={b:g} (linear)" for b in cfg.betas) + ".")
    notes.append(f"Sampling: {cfg.n_samples} responses per prompt, temperature {cfg.temperature:g}, "
                 f"top-p {cfg.top_p:g}, top-k {cfg.top_k or 'off'}, at most {cfg.max_new_tokens} new tokens.")
    for size in cfg.sizes:
        res = _read_json(study.by_name[f"eval:{size.name}:base"].out / "result.json")
        if res:
            r = res["result"]
            st = r["sets"].get(cfg.prompt_set, r["sets"]["all"])
            q = f"quality {st['quality']:.3f}, " if "quality" in st else ""
            ev = f"effective valid answers {st['effective_valid']:.2f}, " if "effective_valid" in st else ""
            hl = f"held-out loss {r['heldout_loss']:.3f}" if r.get("heldout_loss") is not None else ""
            notes.append(f"Base model `{size.name}` ({res['params']:,} parameters) before SFT, prompt set "
                         f"`{cfg.prompt_set}`: {q}{ev}{hl} (forgetting is measured against this loss).")
    return notes


def _run_report(study: Study, s: Stage) -> None:
    from megatron_gem.study.report import write_report

    recs = study.records()
    tmp = _building(s)
    sets = {k.split("/")[0] for r in recs for k in r if "/" in k}
    ps = study.cfg.prompt_set if study.cfg.prompt_set in sets else "all"
    paths = write_report(recs, tmp, prompt_set=ps, notes=report_notes(study))
    if s.out.exists():
        shutil.rmtree(s.out)
    _publish(tmp, s.out)
    study.log(f"   report: {s.out / paths['report'].name}")


RUNNERS = {"data": _run_data, "prep": _run_prep, "pretrain": _run_train, "sft": _run_train,
           "import": _run_import, "export": _run_export, "eval": _run_eval, "report": _run_report}


# ---- slurm -----------------------------------------------------------------------------------

SCRIPTS = {"pretrain": "gpt_pretrain.sbatch", "sft": "llama3_8b_sft.sbatch",
           "export": "convert_megatron_to_hf.sbatch", "import": "convert_hf_to_megatron.sbatch"}
JOBS_FILE = "slurm_jobs.json"


@dataclass
class SlurmOptions:
    sbatch: str = "sbatch"
    python: str | None = None            # interpreter of the Python stages (default: this one)
    partition: str | None = None
    account: str | None = None
    cpu_args: tuple[str, ...] = ("--nodes=1", "--ntasks=1", "--cpus-per-task=8", "--time=02:00:00")
    gpus_per_node: int | None = None     # training jobs: GPUs (= processes) per node (default: nproc)
    extra_sbatch: tuple[str, ...] = ()   # for every job (e.g. --qos=...)


def _sbatch(opts: SlurmOptions, args: list[str], env: dict | None = None) -> str:
    cmd = [opts.sbatch, "--parsable", *args]
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr}")
    job = proc.stdout.strip().splitlines()[-1].split(";")[0] if proc.stdout.strip() else ""
    if not job.isdigit():
        raise RuntimeError(f"sbatch printed no job id: {proc.stdout!r}")
    return job


def slurm_job(study: Study, s: Stage, opts: SlurmOptions) -> tuple[list[str], dict]:
    """(sbatch arguments after the dependency, environment) of one stage's job."""
    cfg = study.cfg
    py = opts.python or sys.executable
    logs = study.out / "logs"
    common = [f"--job-name=gem-study-{s.slug}"[:120], f"--output={logs}/{s.slug}-%j.out"]
    if opts.partition:
        common.append(f"--partition={opts.partition}")
    if opts.account:
        common.append(f"--account={opts.account}")
    common += list(opts.extra_sbatch)
    env = {"GEM_REPO": str(REPO)}
    if s.kind in ("pretrain", "sft"):
        gpus = opts.gpus_per_node or cfg.nproc
        common += ["--nodes=1", f"--ntasks-per-node={gpus}", f"--gpus-per-node={gpus}"]
        argv = train_argv(study, s)
        it = cfg.pretrain_iters if s.kind == "pretrain" else cfg.sft_iters
        # The script's own defaults are replaced by the study's flags (extra flags come last).
        env.update(NODES="1", GPUS_PER_NODE=str(gpus), MODEL="tiny", TP=str(cfg.tp), PP="1", SP="0", DIST_OPT="0",
                   PRECISION="fp32" if cfg.precision == "fp32" else "bf16", CKPT_DIR=str(s.out),
                   TRAIN_ITERS=str(it), SEQ_LENGTH=str(cfg.seq_length), MICRO_BATCH=str(cfg.micro_batch),
                   GLOBAL_BATCH=str(cfg.pretrain_batch if s.kind == "pretrain" else cfg.sft_batch),
                   SAVE_INTERVAL=str(it if s.kind == "pretrain" else cfg.save_interval),
                   EVAL_INTERVAL=str(it), EVAL_ITERS="0", LOG_INTERVAL=str(max(1, it // 10)),
                   LR=str(cfg.pretrain_lr if s.kind == "pretrain" else cfg.sft_lr),
                   MIN_LR=str((cfg.pretrain_lr if s.kind == "pretrain" else cfg.sft_lr) / 10),
                   WARMUP_ITERS=str(max(1, it // 20)), GEM_WORK=str(study.out))
        prep = study.by_name["prep"].out
        tf = _tokenizer_flags(study)
        if s.kind == "pretrain":
            env.update(TOKENIZER_MODEL=tf[3], PRETRAIN_DATA=str(prep / "pretrain_text_document"),
                       LOSS="ce", SPLIT="100,0,0", TOKENIZER_VOCAB_SIZE=str(cfg.vocab_size))
        else:
            # Packed SFT under Transformer Engine passes each pack as one THD sequence: Megatron
            # needs micro-batch 1 there (the global batch, hence the schedule, is unchanged).
            env.update(MICRO_BATCH="1")
            env.update(TOKENIZER_TYPE=tf[1], HF_MODEL=tf[3], SFT_DATA=str(prep / "sft"),
                       BASE_CKPT=str(s.info["base"]), LOSS=s.info["method"],
                       SPLIT="100,0,0")
            if s.info["method"] == "gem":
                env.update(GEM_BETA=f"{s.info['beta']:g}", GEM_H="linear")
        # Flags not set by the script's variables (architecture, seed, ...) go as script
        # arguments, last, so they win over the preset.
        return common + [str(REPO / "launch_scripts" / SCRIPTS[s.kind]), *_script_extra(argv)], env
    if s.kind == "export":
        env.update(CKPT_DIR=str(s.info["ckpt"]), HF_OUT=str(s.out), ITERATION=str(s.info["step"]),
                   TOKENIZER=str(s.info["size"].hf_model or ""), CONVERT_PP="1", DTYPE="fp32")
        extra = [] if cfg.imports else ["--vocab-size", "VOCAB"]
        return common + [str(REPO / "launch_scripts" / SCRIPTS["export"]), *extra], env
    if s.kind == "import":
        env.update(HF_MODEL=str(s.info["size"].hf_model), BASE_CKPT=str(s.out), MODEL=s.info["size"].name,
                   CONVERT_TP=str(cfg.tp), CONVERT_PP="1", DTYPE="")
        return common + [str(REPO / "launch_scripts" / SCRIPTS["import"])], env
    wrap = f"cd {shlex.quote(str(REPO))} && {shlex.quote(py)} -m megatron_gem.study run-stage " \
           f"--out {shlex.quote(str(study.out))} --stage {shlex.quote(s.name)}"
    return common + list(opts.cpu_args) + [f"--wrap={wrap}"], env


# Flags the launch scripts set from their variables (given to them through the environment).
_SCRIPT_FLAGS = {"--tensor-model-parallel-size", "--eval-interval", "--seq-length", "--micro-batch-size",
                 "--global-batch-size", "--train-iters", "--lr", "--min-lr", "--lr-decay-style",
                 "--lr-warmup-iters", "--save", "--load", "--save-interval", "--log-interval",
                 "--eval-iters", "--data-path", "--split", "--tokenizer-type", "--tokenizer-model",
                 "--pretrained-checkpoint", "--loss", "--gem-beta", "--gem-h", "--ckpt-format"}
_SCRIPT_SWITCHES = {"--sft", "--bf16"}


def _script_extra(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in _SCRIPT_FLAGS:
            i += 2
            continue
        if a in _SCRIPT_SWITCHES:
            i += 1
            continue
        out.append(a)
        i += 1
    return out


def run_slurm(study: Study, opts: SlurmOptions = SlurmOptions()) -> dict[str, str]:
    """Submit every pending stage as a slurm job, chained with --dependency=afterok on the jobs
    of its pending inputs; returns {stage: job id} (also in OUT/slurm_jobs.json). Stages that
    jobs finished since the last call are adopted first, so calling it again only submits what
    is still missing (and, when nothing is, writes nothing)."""
    study.init_folder()
    (study.out / "logs").mkdir(exist_ok=True)
    adopted = study.adopt_finished()
    if adopted:
        study.log(f"finished by earlier jobs: {', '.join(adopted)}")
    todo = study.pending()
    if not todo:
        study.log(f"nothing to submit: every stage of {study.out} is done; report in "
                  f"{study.by_name['report'].out}")
        return {}
    jobs: dict[str, str] = {}
    for s in todo:
        if s.out.exists():
            # Its inputs are pending (or it failed): the old output cannot be reused, except a
            # partial training run of the same inputs (the job resumes it).
            if not (not s.atomic and all(d not in jobs for d in s.deps) and study.marker(s) is None
                    and _read_json(s.out / INPUTS) in (None, _deps_or_none(study, s))):
                study.log(f"removing the stale output of {s.name}: {s.out}")
                shutil.rmtree(s.out)
        if not s.atomic and all(d not in jobs for d in s.deps):
            s.out.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(s.out / INPUTS, study.dep_tokens(s))
        args, env = slurm_job(study, s, opts)
        if "VOCAB" in args:  # the tokenizer's size is known once prep has run
            args[args.index("VOCAB")] = str(vocab_size(study)) if study.done(study.by_name["prep"]) \
                else str(study.cfg.vocab_size)
        after = sorted({jobs[d] for d in s.deps if d in jobs}, key=int)
        dep = [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"] if after else []
        jobs[s.name] = _sbatch(opts, dep + args, env)
        study.log(f"submitted {s.name}: job {jobs[s.name]}" + (f" (after {', '.join(after)})" if after else ""))
    _write_json_atomic(study.out / JOBS_FILE, {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "jobs": jobs})
    study.log(f"{len(jobs)} jobs submitted; the report job ({jobs.get('report')}) writes "
              f"{study.by_name['report'].out}/report.md")
    return jobs


def _deps_or_none(study: Study, s: Stage):
    try:
        return study.dep_tokens(s)
    except TypeError:
        return None


def wait_slurm(study: Study, jobs: dict[str, str], squeue: str = "squeue", poll_s: float = 30) -> None:
    """Wait until none of ``jobs`` is queued or running (squeue), then adopt finished stages."""
    ids = set(jobs.values())
    while ids:
        proc = subprocess.run([squeue, "-h", "-o", "%i", "-j", ",".join(sorted(ids, key=int))],
                              capture_output=True, text=True)
        live = {l.strip().split("_")[0] for l in proc.stdout.splitlines() if l.strip()}
        ids &= live
        if ids:
            study.log(f"waiting for {len(ids)} job(s)")
            time.sleep(poll_s)
    study.adopt_finished()
    left = [s.name for s in study.pending()]
    if left:
        raise RuntimeError(f"jobs ended but stage(s) {left} are not done: see {study.out / 'logs'}")


# ---- command line ----------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def _size(text: str) -> ModelSize:
    """NAME:LAYERSxHIDDEN[xHEADS[xGROUPS]] or NAME=HF_DIR."""
    if "=" in text:
        name, hf = text.split("=", 1)
        return ModelSize(name, hf_model=str(Path(hf).resolve()))
    try:
        name, shape = text.split(":")
        dims = [int(x) for x in shape.lower().split("x")]
        heads = dims[2] if len(dims) > 2 else max(1, dims[1] // 16)
        groups = dims[3] if len(dims) > 3 else None
        return ModelSize(name, dims[0], dims[1], heads, None, groups)
    except (ValueError, IndexError):
        raise ValueError(f"--sizes entry {text!r}: use NAME:LAYERSxHIDDEN[xHEADS[xGROUPS]] "
                         "(e.g. tiny:2x64x4) or NAME=HF_MODEL_DIR") from None


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m megatron_gem.study",
        description="CE-vs-GEM study: pre-train (or import) -> SFT with CE and GEM -> export -> "
                    "evaluate -> report (results.csv, report.md, PNG plots). See docs/study.md.")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run (or resume) a study")
    r.add_argument("--out", required=True, help="study folder (created; rerun to resume)")
    r.add_argument("--preset", default="default", choices=sorted(PRESETS))
    r.add_argument("--config", help="a JSON file of StudyConfig fields (overrides the preset)")
    r.add_argument("--sizes", help="comma-separated NAME:LAYERSxHIDDEN[xHEADS[xGROUPS]] or NAME=HF_DIR")
    r.add_argument("--betas", help="GEM betas, comma-separated (CE always runs)")
    r.add_argument("--seeds", help="SFT seeds, comma-separated")
    for k in ("pretrain-data", "sft-data", "eval-data", "heldout-data"):
        r.add_argument(f"--{k}", help="JSONL (default: the embedded world)")
    for k in ("pretrain-iters", "sft-iters", "save-interval", "n-samples", "tp", "nproc",
              "seq-length", "vocab-size", "world-seed"):
        r.add_argument(f"--{k}", type=int)
    for k in ("pretrain-lr", "sft-lr", "temperature"):
        r.add_argument(f"--{k}", type=float)
    r.add_argument("--executor", choices=("local", "slurm"), default="local")
    r.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then check")
    r.add_argument("--partition")
    r.add_argument("--account")
    r.add_argument("--stage-sbatch-args", default=None,
                   help="slurm: sbatch options of the Python stages (data, prep, eval, report), "
                        "default '--nodes=1 --ntasks=1 --cpus-per-task=8 --time=02:00:00'; "
                        "add e.g. --gpus=1 to evaluate large models on a GPU")
    s = sub.add_parser("run-stage", help="run one stage of an existing study (slurm jobs use it)")
    s.add_argument("--out", required=True)
    s.add_argument("--stage", required=True)
    st = sub.add_parser("status", help="which stages of a study are done")
    st.add_argument("--out", required=True)
    return p


def _read_config_file(path: str) -> dict:
    """StudyConfig fields from a --config JSON file; every mistake named with the file."""
    try:
        over = json.loads(Path(path).read_bytes().decode("utf-8-sig"))  # a BOM is harmless
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not UTF-8 (byte {err.start + 1} of the file)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {path}:{err.lineno}: invalid JSON ({err.msg} at column "
                         f"{err.colno})") from None
    if not isinstance(over, dict):
        raise ValueError(f"--config {path}: must be a JSON object of StudyConfig fields, "
                         f"got {type(over).__name__}")
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    if set(over) - known:
        raise ValueError(f"--config {path}: unknown key(s) {sorted(set(over) - known)} "
                         f"(known: {', '.join(sorted(known))})")
    try:
        if "sizes" in over:
            over["sizes"] = tuple(ModelSize(**z) for z in over["sizes"])
        for k in ("betas", "seeds", "extra_train_args"):
            if k in over:
                over[k] = tuple(over[k])
    except TypeError as err:  # a size that is not an object of ModelSize fields, a number list
        raise ValueError(f"--config {path}: {err}") from None
    return over


def config_from_args(args) -> StudyConfig:
    over: dict = {}
    if args.config:
        over.update(_read_config_file(args.config))
    if args.sizes:
        over["sizes"] = tuple(_size(t.strip()) for t in args.sizes.split(",") if t.strip())
    if args.betas:
        over["betas"] = _floats(args.betas)
    if args.seeds:
        over["seeds"] = tuple(int(x) for x in _floats(args.seeds))
    for k in DATA_KEYS:
        if getattr(args, k):
            over[k] = str(Path(getattr(args, k)).resolve())
    for k in ("pretrain_iters", "sft_iters", "save_interval", "n_samples", "tp", "nproc", "seq_length",
              "vocab_size", "world_seed", "pretrain_lr", "sft_lr", "temperature"):
        if getattr(args, k) is not None:
            over[k] = getattr(args, k)
    return preset(args.preset, **over)


def load_study(out: str | os.PathLike) -> Study:
    cfg = _read_json(Path(out) / CONFIG_FILE)
    if cfg is None:
        raise ValueError(f"--out {out}: no {CONFIG_FILE} (not a study folder)")
    return Study(StudyConfig.from_json(cfg), out)


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    # Megatron's "Transformer Engine / Apex not installed" notes would bury the progress lines.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            study = Study(config_from_args(args), args.out)
            if args.executor == "slurm":
                opts = SlurmOptions(partition=args.partition, account=args.account)
                if args.stage_sbatch_args:
                    opts.cpu_args = tuple(shlex.split(args.stage_sbatch_args))
                jobs = run_slurm(study, opts)
                if args.wait:
                    wait_slurm(study, jobs)
                    print_outputs(study)
            else:
                run_local(study)
                print_outputs(study)
        elif args.command == "run-stage":
            study = load_study(args.out)
            if args.stage not in study.by_name:
                raise ValueError(f"--stage {args.stage!r}: not a stage of this study "
                                 f"({', '.join(s.name for s in study.stages[:4])}, ...)")
            study.adopt_finished()
            if not study.done(study.by_name[args.stage]):
                run_local(study, only=[args.stage])
        elif args.command == "status":
            study = load_study(args.out)
            study.adopt_finished()
            memo: dict = {}
            for s in study.stages:
                print(f"{'done' if study.done(s, memo) else 'todo':5} {s.name}")
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def print_outputs(study: Study) -> None:
    rep = study.by_name["report"].out
    study.log(f"report:  {rep / 'report.md'}")
    study.log(f"table:   {rep / 'results.csv'}")
    for png in sorted(rep.glob("*.png")):
        study.log(f"plot:    {png}")


if __name__ == "__main__":
    sys.exit(main())
