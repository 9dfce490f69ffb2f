"""A study's plan and state: its stages (``plan``), and the study folder (``Study``): its
study.json, each stage's marker, what is done, pending or stale, and the resume rules.

Resume: a stage is done iff its output holds the marker ``.stage.json``, written last (temp
name, then rename) and recording a token of every input stage; a stage whose input was redone
since is stale and runs again (its old output is removed first). Inputs are fingerprinted: the
``data`` stage's marker records the SHA-256 of each user JSONL file (done only while they are
unchanged) and of each file it wrote, and a stage that reads those files (``info["data_files"]``)
records their hashes instead of the data stage's token, so an edited input reruns the stages
that read what changed (and what depends on them), nothing else. Directories written whole
(data, prep, exports, evals, report) are built under a hidden temporary name and renamed into
place when complete; training checkpoints are written in place by Megatron (an interrupted
training run resumes from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_gem.paths import check_output_apart
from megatron_gem.study import world as W
from megatron_gem.study.config import DATA_KEYS, StudyConfig

MARKER = ".stage.json"
INPUTS = ".stage-inputs.json"
CONFIG_FILE = "study.json"


@dataclass
class Stage:
    name: str
    kind: str  # data | prep | pretrain | import | sft | export | eval | report
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
    # The files of OUT/data each stage reads (their hashes, not data's token, make it stale).
    prep_reads = [W.PRETRAIN_FILE, W.SFT_FILE, W.EVAL_FILE]  # tokenizer, data, budget check
    eval_reads = [W.EVAL_FILE, W.HELDOUT_FILE]
    st.append(Stage("prep", "prep", out / "prep", ["data"], {"data_files": prep_reads}))
    for size in cfg.sizes:
        z = size.name
        if cfg.imports:
            base = Stage(f"import:{z}", "import", out / z / "base", ["prep"], {"size": size})
            st.append(base)
            base_eval_deps = [base.name]
            base_hf = Path(size.hf_model)
        else:
            base = Stage(
                f"pretrain:{z}",
                "pretrain",
                out / z / "pretrain",
                ["prep"],
                {"size": size},
                atomic=False,
            )
            exp = Stage(
                f"export:{z}:base",
                "export",
                out / z / "base-hf",
                [base.name],
                {"size": size, "ckpt": base.out, "step": cfg.pretrain_iters},
            )
            st += [base, exp]
            base_eval_deps = [exp.name]
            base_hf = exp.out
        base_eval = Stage(
            f"eval:{z}:base",
            "eval",
            out / z / "base-eval",
            ["data", "prep", *base_eval_deps],
            {"size": size, "hf": base_hf, "base": True, "data_files": eval_reads},
        )
        st.append(base_eval)
        for run, method, beta, seed, lr in cfg.runs():
            sft = Stage(
                f"sft:{z}:{run}",
                "sft",
                out / z / run / "ckpt",
                ["prep", base.name],
                {
                    "size": size,
                    "run": run,
                    "method": method,
                    "beta": beta,
                    "seed": seed,
                    "lr": lr,
                    "base": base.out,
                },
                atomic=False,
            )
            st.append(sft)
            for step in cfg.sft_steps():
                exp = Stage(
                    f"export:{z}:{run}:{step}",
                    "export",
                    out / z / run / "hf" / step_dir(step),
                    [sft.name],
                    {"size": size, "ckpt": sft.out, "step": step},
                )
                ev = Stage(
                    f"eval:{z}:{run}:{step}",
                    "eval",
                    out / z / run / "eval" / step_dir(step),
                    ["data", "prep", exp.name, base_eval.name],
                    {
                        "size": size,
                        "hf": exp.out,
                        "run": run,
                        "method": method,
                        "beta": beta,
                        "seed": seed,
                        "lr": lr,
                        "step": step,
                        "base_eval": base_eval.out,
                        "data_files": eval_reads,
                    },
                )
                st += [exp, ev]
    evals = [s.name for s in st if s.kind == "eval"]
    st.append(Stage("report", "report", out / "report", evals))
    return st


# ---- markers ---------------------------------------------------------------------------------


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Study:
    """A study folder: its config, stages and their state."""

    def __init__(
        self, cfg: StudyConfig, out: str | os.PathLike, log: Callable[[str], None] | None = None
    ):
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
        self._hashes: dict = {}  # (path, size, mtime_ns) -> sha256

    # -- fingerprints of the user's input files and of the data stage's output
    def fingerprint(self, path) -> str | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(Path(path))
        return self._hashes[key]

    def input_fingerprints(self) -> dict:
        """{--flag: {"path", "sha256"}} of the user's JSONL inputs (none for the embedded
        world, whose files follow from study.json)."""
        return {
            f"--{k.replace('_', '-')}": {"path": p, "sha256": self.fingerprint(p)}
            for k in DATA_KEYS
            if (p := getattr(self.cfg, k))
        }

    def changed_inputs(self) -> list[str]:
        """The user's input files that differ from those the data stage last copied."""
        m = self.marker(self.by_name["data"])
        have = (m or {}).get("inputs", {})
        return [
            f"{k} {v['path']}"
            for k, v in self.input_fingerprints().items()
            if m is not None and have.get(k) != v
        ]

    # -- study.json: a folder holds one study; a different config is refused, never mixed in
    def init_folder(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CONFIG_FILE
        want = json.loads(json.dumps(self.cfg.to_json()))  # tuples -> lists, as stored
        have = read_json(path)
        if have is not None:  # a study of an older version: its missing options at default
            for k in set(want) - set(have):
                if want[k] == _json_default(k):
                    have[k] = want[k]
        if have is None:
            if any(p.name != "logs" for p in self.out.iterdir()):
                raise ValueError(
                    f"--out {self.out}: not empty and holds no {CONFIG_FILE}; "
                    "choose a new folder (nothing was changed)"
                )
            write_json_atomic(path, want)
        elif have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(
                f"--out {self.out} holds a study with a different configuration "
                f"(differs in: {', '.join(diff)}); use another --out folder to "
                "keep both"
            )

    def marker(self, stage: Stage) -> dict | None:
        return read_json(stage.out / MARKER)

    def done(self, stage: Stage, _memo: dict | None = None) -> bool:
        """Done: its marker exists and records the current token of every input stage."""
        memo = {} if _memo is None else _memo
        if stage.name in memo:
            return memo[stage.name]
        m = self.marker(stage)
        ok = m is not None
        if ok and stage.kind == "data":
            ok = m.get("inputs", {}) == self.input_fingerprints()
        if ok:
            for d in stage.deps:
                dep = self.by_name[d]
                dm = self.marker(dep)
                if (
                    not self.done(dep, memo)
                    or dm is None
                    or m.get("deps", {}).get(d) != self._dep_token(stage, d, dm)
                ):
                    ok = False
                    break
        memo[stage.name] = ok
        return ok

    def _dep_token(self, stage: Stage, d: str, dm: dict):
        """What a stage records of its input stage ``d`` (marker ``dm``): the hashes of the
        data files it reads, else d's token."""
        if d == "data" and "data_files" in stage.info:
            files = dm.get("files", {})
            return {name: files.get(name) for name in stage.info["data_files"]}
        return dm["token"]

    def pending(self) -> list[Stage]:
        memo: dict = {}
        return [s for s in self.stages if not self.done(s, memo)]

    def dep_tokens(self, stage: Stage) -> dict:
        return {d: self._dep_token(stage, d, self.marker(self.by_name[d])) for d in stage.deps}

    def mark(self, stage: Stage, seconds: float | None = None, exclusive: bool = False) -> None:
        """Write the stage's marker (temp name, then rename). ``exclusive``: keep a marker that
        another process (a concurrent slurm job adopting the same stage) wrote first."""
        rec = {
            "stage": stage.name,
            "token": uuid.uuid4().hex,
            "deps": self.dep_tokens(stage),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": seconds,
        }
        if stage.kind == "data":  # the fingerprints (see the module's docstring)
            rec["inputs"] = self.input_fingerprints()
            rec["files"] = {
                p.name: sha256_file(p)
                for p in sorted(stage.out.iterdir())
                if p.is_file() and p.name != MARKER and not p.name.startswith(".")
            }
        if not exclusive:
            write_json_atomic(stage.out / MARKER, rec)
            return
        tmp = stage.out / f".{MARKER}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
        try:
            os.link(tmp, stage.out / MARKER)  # fails if it exists: first writer wins
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
        rec = read_json(stage.out / INPUTS)
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
                rec = read_json(s.out / INPUTS)
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
                res = read_json(s.out / "result.json")
                if res is None:
                    continue
                recs.append(
                    make_record(
                        s.info["method"],
                        s.info["beta"],
                        s.info["size"].name,
                        s.info["step"],
                        res["result"],
                        params=res.get("params"),
                        seed=s.info["seed"],
                        lr=s.info["lr"],
                    )
                )
        return recs


def _json_default(name: str):
    """A StudyConfig field's default, as study.json stores it."""
    f = next(f for f in dataclasses.fields(StudyConfig) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return json.loads(json.dumps(f.default))
    if f.default_factory is not dataclasses.MISSING:
        return json.loads(json.dumps(f.default_factory()))
    return dataclasses.MISSING


def _print(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_study(out: str | os.PathLike) -> Study:
    cfg = read_json(Path(out) / CONFIG_FILE)
    if cfg is None:
        raise ValueError(f"--out {out}: no {CONFIG_FILE} (not a study folder)")
    return Study(StudyConfig.from_json(cfg), out)
