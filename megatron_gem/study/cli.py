"""The command line, ``python -m megatron_gem.study {run,run-stage,status}``: the parser, the
StudyConfig it builds (preset, then --config, then the flags) and ``main``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Sequence

from megatron_gem.study.config import (
    DATA_KEYS,
    PRESETS,
    StudyConfig,
    LR_DECAY_STYLES,
    parse_floats,
    parse_ints,
    parse_size,
    preset,
    read_config_file,
)
from megatron_gem.study.executors import (
    SlurmOptions,
    default_jobs,
    launch_scripts_dir,
    run_local,
    run_slurm,
    wait_slurm,
)
from megatron_gem.study.stages import Study, load_study


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m megatron_gem.study",
        description="CE-vs-GEM study: pre-train (or import) -> SFT with CE and GEM -> export -> "
        "evaluate -> report (results.csv, report.md, PNG plots). See docs/study.md.",
    )
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run (or resume) a study")
    r.add_argument("--out", required=True, help="study folder (created; rerun to resume)")
    r.add_argument("--preset", default="default", choices=sorted(PRESETS))
    r.add_argument("--config", help="a JSON file of StudyConfig fields (overrides the preset)")
    r.add_argument(
        "--sizes", help="comma-separated NAME:LAYERSxHIDDEN[xHEADS[xGROUPS]] or NAME=HF_DIR"
    )
    r.add_argument("--betas", help="GEM betas, comma-separated (CE always runs)")
    r.add_argument("--seeds", help="SFT seeds, comma-separated (integers >= 1)")
    r.add_argument(
        "--sft-lrs", help="SFT learning rates, comma-separated: every method at each (a sweep)"
    )
    for k in ("pretrain-data", "sft-data", "eval-data", "heldout-data"):
        r.add_argument(f"--{k}", help="JSONL (default: the embedded world)")
    for k in (
        "pretrain-iters",
        "sft-iters",
        "save-interval",
        "n-samples",
        "tp",
        "nproc",
        "seq-length",
        "vocab-size",
        "world-seed",
        "max-new-tokens",
        "sft-warmup-iters",
        "eval-threads",
    ):
        r.add_argument(f"--{k}", type=int)
    for k in (
        "pretrain-lr",
        "sft-lr",
        "temperature",
        "sft-min-lr",
        "sft-weight-decay",
        "match-tolerance",
    ):
        r.add_argument(f"--{k}", type=float)
    r.add_argument("--sft-lr-decay-style", choices=LR_DECAY_STYLES)
    r.add_argument("--executor", choices=("local", "slurm"), default="local")
    r.add_argument(
        "--jobs",
        type=int,
        help="local: stages at a time (independent training runs and evaluations; "
        "default: one per core, a training run counting its --nproc processes)",
    )
    r.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then check")
    r.add_argument("--partition")
    r.add_argument("--account")
    r.add_argument(
        "--launch-scripts",
        metavar="DIR",
        help="slurm: the launch_scripts/ folder of the megatron-gem checkout the jobs "
        "run (default: $GEM_LAUNCH_SCRIPTS)",
    )
    r.add_argument(
        "--stage-sbatch-args",
        default=None,
        help="slurm: sbatch options of the Python stages (data, prep, eval, report), "
        "default '--nodes=1 --ntasks=1 --cpus-per-task=8 --time=02:00:00'; "
        "add e.g. --gpus=1 to evaluate large models on a GPU",
    )
    s = sub.add_parser("run-stage", help="run one stage of an existing study (slurm jobs use it)")
    s.add_argument("--out", required=True)
    s.add_argument("--stage", required=True)
    st = sub.add_parser("status", help="which stages of a study are done")
    st.add_argument("--out", required=True)
    return p


def config_from_args(args) -> StudyConfig:
    over: dict = {}
    if args.config:
        over.update(read_config_file(args.config))
    if args.sizes:
        over["sizes"] = tuple(parse_size(t.strip()) for t in args.sizes.split(",") if t.strip())
    if args.betas is not None:
        over["betas"] = parse_floats(args.betas, "--betas:")
    if args.seeds is not None:
        over["seeds"] = parse_ints(args.seeds, "--seeds:")
    if args.sft_lrs is not None:
        over["sft_lrs"] = parse_floats(args.sft_lrs, "--sft-lrs:")
    for k in DATA_KEYS:
        if getattr(args, k):
            over[k] = str(Path(getattr(args, k)).resolve())
    for k in (
        "pretrain_iters",
        "sft_iters",
        "save_interval",
        "n_samples",
        "tp",
        "nproc",
        "seq_length",
        "vocab_size",
        "world_seed",
        "pretrain_lr",
        "sft_lr",
        "temperature",
        "max_new_tokens",
        "sft_warmup_iters",
        "eval_threads",
        "sft_min_lr",
        "sft_weight_decay",
        "match_tolerance",
        "sft_lr_decay_style",
    ):
        if getattr(args, k) is not None:
            over[k] = getattr(args, k)
    return preset(args.preset, **over)


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
            # The jobs run the checkout's launch scripts: refused before anything else without them.
            scripts = launch_scripts_dir(args.launch_scripts) if args.executor == "slurm" else None
            study = Study(config_from_args(args), args.out)
            if args.executor == "slurm":
                opts = SlurmOptions(
                    partition=args.partition, account=args.account, launch_scripts=scripts
                )
                if args.stage_sbatch_args:
                    opts.cpu_args = tuple(shlex.split(args.stage_sbatch_args))
                jobs = run_slurm(study, opts)
                if args.wait:
                    wait_slurm(study, jobs)
                    print_outputs(study)
            else:
                jobs = default_jobs(study.cfg) if args.jobs is None else args.jobs
                run_local(study, jobs=jobs)
                print_outputs(study)
        elif args.command == "run-stage":
            study = load_study(args.out)
            if args.stage not in study.by_name:
                raise ValueError(
                    f"--stage {args.stage!r}: not a stage of this study "
                    f"({', '.join(s.name for s in study.stages[:4])}, ...)"
                )
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
