"""Where the stages run, and the slurm jobs' scripts, variables and chaining.

Executors: ``local`` runs the pending stages in sequence in this process (training as
``torch.distributed.run`` subprocesses: CPU mode with gloo without CUDA, or one GPU node);
``slurm`` submits them as ``sbatch`` jobs chained with ``--dependency=afterok`` through the
launch scripts (``launch_scripts/gpt_pretrain.sbatch``, ``llama3_8b_sft.sbatch``,
``convert_*.sbatch``; the Python stages as ``sbatch --wrap`` of ``python -m megatron_gem.study
run-stage``), and collects the results in its ``report`` job (or when run again). The launch
scripts stay in the megatron-gem checkout (they are not part of the installed package): the
slurm executor is given their folder (``SlurmOptions.launch_scripts``, ``--launch-scripts``,
default ``$GEM_LAUNCH_SCRIPTS``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from megatron_gem.study.stages import INPUTS, Stage, Study, read_json, write_json_atomic
from megatron_gem.study.steps import (
    RUNNERS,
    check_inputs,
    describe,
    tokenizer_flags,
    train_argv,
    vocab_size,
)


# ---- local execution -------------------------------------------------------------------------


# Stages that run as subprocesses (the training entry): the local executor runs these
# alongside the in-process stages, which share this process's interpreter and so one at a time.
SUBPROCESS_KINDS = ("pretrain", "sft")


def default_jobs(cfg) -> int:
    """Stages at a time by default: one per core, a training run counting its processes (at
    most 8: beyond, memory rather than cores limits CPU training)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // cfg.nproc))


def run_local(study: Study, only: Sequence[str] | None = None, jobs: int = 1) -> list[str]:
    """Run every pending stage (``only``: just these, for ``run-stage``); returns the names of
    the stages run, in the order they finished. The user's inputs are checked first (every
    line); what is pending is decided again after each stage, so an input edited since the
    last run reruns only the stages that read what changed.

    ``jobs`` > 1: up to that many independent stages at a time, training runs (subprocesses)
    in worker threads beside the in-process stages (export, evaluation, ...), which run in
    this thread one at a time. A stage is marked done only when it succeeded; the first
    failure starts nothing new, waits for the stages running, then is raised (a training
    failure names its log)."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
    check_before_start(study)
    study.init_folder()

    def pending():
        return [s for s in study.pending() if only is None or s.name in only]

    todo, ran = pending(), []
    if not todo:
        study.log(f"nothing to do: every stage of {study.out} is done")
        return ran
    total = len(todo)
    study.log(
        f"{total} of {len(study.stages)} stages to run in {study.out}"
        + (f" ({jobs} at a time)" if jobs > 1 else "")
    )
    started: list[str] = []

    def run_one(s: Stage) -> None:
        n = f"({len(started)}/{total})"
        study.log(f"{n} {s.name}: {describe(study.cfg, s)}")
        t0 = time.time()
        study.prepare_output(s)
        RUNNERS[s.kind](study, s)
        study.mark(s, round(time.time() - t0, 1))
        study.log(f"{n} {s.name} done in {time.time() - t0:.0f} s")

    def start(s: Stage) -> None:
        if s.name in started:
            raise RuntimeError(f"stage {s.name}: ran but is not done (its marker)")
        missing = [d for d in s.deps if not study.done(study.by_name[d])]
        if missing:
            raise RuntimeError(f"stage {s.name}: input stage(s) {missing} are not done")
        started.append(s.name)

    def finished(s: Stage, before: int) -> list[Stage]:
        ran.append(s.name)
        now = pending()
        if s.kind == "data" and len(now) < before - 1:
            study.log(f"   unchanged data files: {before - 1 - len(now)} stage(s) stay done")
        return now

    if jobs == 1:
        while todo:
            start(todo[0])
            run_one(todo[0])
            todo = finished(todo[0], len(todo))
        return ran

    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    running: dict = {}  # future -> stage (training runs in worker threads)
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while True:
            if error is None:
                busy = {s.name for s in running.values()}
                memo: dict = {}  # one reading of the markers per round (a study has hundreds)
                ready = [
                    s
                    for s in todo
                    if s.name not in busy
                    and all(study.done(study.by_name[d], memo) for d in s.deps)
                ]
                inproc = [s for s in ready if s.kind not in SUBPROCESS_KINDS]
                for s in [s for s in ready if s.kind in SUBPROCESS_KINDS]:
                    if len(running) >= jobs - (1 if inproc else 0):
                        break  # a slot stays for this thread's next stage
                    start(s)
                    running[pool.submit(run_one, s)] = s
                if inproc and len(running) < jobs:
                    s = inproc[0]
                    try:
                        start(s)
                        run_one(s)
                        todo = finished(s, len(todo))
                    except BaseException as err:  # noqa: BLE001 -- re-raised below
                        error = err
                    continue
                if not running and todo:
                    raise RuntimeError(
                        f"stage(s) {[s.name for s in todo[:3]]}: pending, but their input "
                        "stages are neither done nor running"
                    )
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in done:
                s = running.pop(f)
                if f.exception() is not None:
                    error = error or f.exception()
                elif error is None:
                    todo = finished(s, len(todo))
                else:
                    ran.append(s.name)
    if error is not None:
        study.log(f"stopped: {str(error).splitlines()[0]}")
        raise error
    return ran


def check_before_start(study: Study) -> None:
    """Before any stage: the user's input files, every line (``check_inputs``), when the data
    stage will copy them; and say which were edited since the last run."""
    data = study.by_name["data"]
    if study.cfg.embedded or study.done(data):
        return
    changed = study.changed_inputs()
    if changed:
        study.log(f"input(s) changed since the last run: {', '.join(changed)}")
    check_inputs(study.cfg)


# ---- slurm -----------------------------------------------------------------------------------

SCRIPTS = {
    "pretrain": "gpt_pretrain.sbatch",
    "sft": "llama3_8b_sft.sbatch",
    "export": "convert_megatron_to_hf.sbatch",
    "import": "convert_hf_to_megatron.sbatch",
}
JOBS_FILE = "slurm_jobs.json"
LAUNCH_SCRIPTS_ENV = "GEM_LAUNCH_SCRIPTS"  # the default of SlurmOptions.launch_scripts


@dataclass
class SlurmOptions:
    sbatch: str = "sbatch"
    python: str | None = None  # interpreter of the Python stages (default: this one)
    partition: str | None = None
    account: str | None = None
    cpu_args: tuple[str, ...] = ("--nodes=1", "--ntasks=1", "--cpus-per-task=8", "--time=02:00:00")
    # training jobs: GPUs (= processes) per node (default: nproc)
    gpus_per_node: int | None = None
    extra_sbatch: tuple[str, ...] = ()  # for every job (e.g. --qos=...)
    launch_scripts: str | os.PathLike | None = None  # a checkout's launch_scripts/ folder


def launch_scripts_dir(given: str | os.PathLike | None = None) -> Path:
    """The launch_scripts/ folder of a megatron-gem checkout that the jobs run: ``given``, else
    $GEM_LAUNCH_SCRIPTS. Its parent is the jobs' GEM_REPO (the scripts source
    ``$GEM_REPO/launch_scripts/common.sh``)."""
    folder = given or os.environ.get(LAUNCH_SCRIPTS_ENV)
    if not folder:
        raise ValueError(
            "--executor slurm needs the launch_scripts/ folder of a megatron-gem "
            f"checkout: pass --launch-scripts DIR or set {LAUNCH_SCRIPTS_ENV}"
        )
    folder = Path(os.path.abspath(folder))
    needed = [folder / name for name in SCRIPTS.values()]
    needed.append(folder.parent / "launch_scripts" / "common.sh")
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise ValueError(
            f"--launch-scripts {folder}: not the launch_scripts/ folder of a "
            f"megatron-gem checkout (no {', '.join(missing)})"
        )
    return folder


def _sbatch(opts: SlurmOptions, args: list[str], env: dict | None = None) -> str:
    cmd = [opts.sbatch, "--parsable", *args]
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"sbatch failed (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr}"
        )
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
    scripts = launch_scripts_dir(opts.launch_scripts)
    env = {"GEM_REPO": str(scripts.parent)}
    if s.kind in ("pretrain", "sft"):
        gpus = opts.gpus_per_node or cfg.nproc
        common += ["--nodes=1", f"--ntasks-per-node={gpus}", f"--gpus-per-node={gpus}"]
        argv = train_argv(study, s)
        pre = s.kind == "pretrain"
        it = cfg.pretrain_iters if pre else cfg.sft_iters
        lr = cfg.pretrain_lr if pre else s.info["lr"]
        # The script's own defaults are replaced by the study's flags (extra flags come last).
        env.update(
            NODES="1",
            GPUS_PER_NODE=str(gpus),
            MODEL="tiny",
            TP=str(cfg.tp),
            PP="1",
            SP="0",
            DIST_OPT="0",
            PRECISION="fp32" if cfg.precision == "fp32" else "bf16",
            CKPT_DIR=str(s.out),
            TRAIN_ITERS=str(it),
            SEQ_LENGTH=str(cfg.seq_length),
            MICRO_BATCH=str(cfg.micro_batch),
            GLOBAL_BATCH=str(cfg.pretrain_batch if s.kind == "pretrain" else cfg.sft_batch),
            SAVE_INTERVAL=str(it if s.kind == "pretrain" else cfg.save_interval),
            EVAL_INTERVAL=str(it),
            EVAL_ITERS="0",
            LOG_INTERVAL=str(max(1, it // 10)),
            LR=str(lr),
            MIN_LR=str(lr / 10) if pre else f"{cfg.sft_min_lr_of(lr):.8g}",
            WARMUP_ITERS=str(max(1, it // 20) if pre else cfg.sft_warmup()),
            WEIGHT_DECAY=str(0.1 if pre else cfg.sft_weight_decay),
            GEM_WORK=str(study.out),
        )
        prep = study.by_name["prep"].out
        tf = tokenizer_flags(study)
        if s.kind == "pretrain":
            env.update(
                TOKENIZER_MODEL=tf[3],
                PRETRAIN_DATA=str(prep / "pretrain_text_document"),
                LOSS="ce",
                SPLIT="100,0,0",
                TOKENIZER_VOCAB_SIZE=str(cfg.vocab_size),
            )
        else:
            # Packed SFT under Transformer Engine passes each pack as one THD sequence: Megatron
            # needs micro-batch 1 there (the global batch, hence the schedule, is unchanged).
            env.update(MICRO_BATCH="1")
            env.update(
                TOKENIZER_TYPE=tf[1],
                HF_MODEL=tf[3],
                SFT_DATA=str(prep / "sft"),
                BASE_CKPT=str(s.info["base"]),
                LOSS=s.info["method"],
                SPLIT="100,0,0",
            )
            if s.info["method"] == "gem":
                env.update(GEM_BETA=f"{s.info['beta']:g}", GEM_H="linear")
        # Flags not set by the script's variables (architecture, seed, ...) go as script
        # arguments, last, so they win over the preset.
        return common + [str(scripts / SCRIPTS[s.kind]), *_script_extra(argv)], env
    if s.kind == "export":
        env.update(
            CKPT_DIR=str(s.info["ckpt"]),
            HF_OUT=str(s.out),
            ITERATION=str(s.info["step"]),
            TOKENIZER=str(s.info["size"].hf_model or ""),
            CONVERT_PP="1",
            DTYPE="fp32",
        )
        extra = [] if cfg.imports else ["--vocab-size", "VOCAB"]
        return common + [str(scripts / SCRIPTS["export"]), *extra], env
    if s.kind == "import":
        env.update(
            HF_MODEL=str(s.info["size"].hf_model),
            BASE_CKPT=str(s.out),
            MODEL=s.info["size"].name,
            CONVERT_TP=str(cfg.tp),
            CONVERT_PP="1",
            DTYPE="",
        )
        return common + [str(scripts / SCRIPTS["import"])], env
    wrap = (
        f"{shlex.quote(py)} -m megatron_gem.study run-stage "
        f"--out {shlex.quote(str(study.out))} --stage {shlex.quote(s.name)}"
    )
    return common + list(opts.cpu_args) + [f"--wrap={wrap}"], env


# Flags the launch scripts set from their variables (given to them through the environment).
# --lr-decay-style is not among them (the scripts fix cosine): it goes as a script argument.
_SCRIPT_FLAGS = {
    "--tensor-model-parallel-size",
    "--eval-interval",
    "--seq-length",
    "--micro-batch-size",
    "--global-batch-size",
    "--train-iters",
    "--lr",
    "--min-lr",
    "--lr-warmup-iters",
    "--save",
    "--load",
    "--save-interval",
    "--log-interval",
    "--eval-iters",
    "--data-path",
    "--split",
    "--tokenizer-type",
    "--tokenizer-model",
    "--pretrained-checkpoint",
    "--loss",
    "--gem-beta",
    "--gem-h",
    "--ckpt-format",
}
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
    is still missing (and, when nothing is, writes nothing). Refused (ValueError) without the
    launch scripts (``opts.launch_scripts`` or $GEM_LAUNCH_SCRIPTS)."""
    opts = replace(opts, launch_scripts=launch_scripts_dir(opts.launch_scripts))
    check_before_start(study)
    study.init_folder()
    (study.out / "logs").mkdir(exist_ok=True)
    if not study.cfg.embedded and not study.done(study.by_name["data"]):
        # Copying the user's files takes seconds: here, so the jobs submitted next are exactly
        # the stages that read a changed file (their hashes are known only once copied).
        run_local(study, only=["data"])
    adopted = study.adopt_finished()
    if adopted:
        study.log(f"finished by earlier jobs: {', '.join(adopted)}")
    todo = study.pending()
    if not todo:
        study.log(
            f"nothing to submit: every stage of {study.out} is done; report in "
            f"{study.by_name['report'].out}"
        )
        return {}
    jobs: dict[str, str] = {}
    for s in todo:
        if s.out.exists():
            # Its inputs are pending (or it failed): the old output cannot be reused, except a
            # partial training run of the same inputs (the job resumes it).
            if not (
                not s.atomic
                and all(d not in jobs for d in s.deps)
                and study.marker(s) is None
                and read_json(s.out / INPUTS) in (None, _deps_or_none(study, s))
            ):
                study.log(f"removing the stale output of {s.name}: {s.out}")
                shutil.rmtree(s.out)
        if not s.atomic and all(d not in jobs for d in s.deps):
            s.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(s.out / INPUTS, study.dep_tokens(s))
        args, env = slurm_job(study, s, opts)
        if "VOCAB" in args:  # the tokenizer's size is known once prep has run
            args[args.index("VOCAB")] = (
                str(vocab_size(study))
                if study.done(study.by_name["prep"])
                else str(study.cfg.vocab_size)
            )
        after = sorted({jobs[d] for d in s.deps if d in jobs}, key=int)
        dep = (
            [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
            if after
            else []
        )
        jobs[s.name] = _sbatch(opts, dep + args, env)
        study.log(
            f"submitted {s.name}: job {jobs[s.name]}"
            + (f" (after {', '.join(after)})" if after else "")
        )
    write_json_atomic(
        study.out / JOBS_FILE, {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "jobs": jobs}
    )
    study.log(
        f"{len(jobs)} jobs submitted; the report job ({jobs.get('report')}) writes "
        f"{study.by_name['report'].out}/report.md"
    )
    return jobs


def _deps_or_none(study: Study, s: Stage):
    try:
        return study.dep_tokens(s)
    except TypeError:
        return None


def wait_slurm(
    study: Study, jobs: dict[str, str], squeue: str = "squeue", poll_s: float = 30
) -> None:
    """Wait until none of ``jobs`` is queued or running (squeue), then adopt finished stages."""
    ids = set(jobs.values())
    while ids:
        proc = subprocess.run(
            [squeue, "-h", "-o", "%i", "-j", ",".join(sorted(ids, key=int))],
            capture_output=True,
            text=True,
        )
        live = {line.strip().split("_")[0] for line in proc.stdout.splitlines() if line.strip()}
        ids &= live
        if ids:
            study.log(f"waiting for {len(ids)} job(s)")
            time.sleep(poll_s)
    study.adopt_finished()
    left = [s.name for s in study.pending()]
    if left:
        raise RuntimeError(f"jobs ended but stage(s) {left} are not done: see {study.out / 'logs'}")
