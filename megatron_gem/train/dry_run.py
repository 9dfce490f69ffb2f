"""Dry-run launch scripts: check every launch they would make, without a GPU or slurm.

    megatron-gem-dry-run                                   # every script in ./launch_scripts
    megatron-gem-dry-run launch_scripts/llama3_70b_sft.sbatch --set NODES=16
    megatron-gem-dry-run --set PRECISION=fp8 launch_scripts/llama3_8b_sft.sbatch

Each script runs with DRY_RUN=1 (bash only, the same code path as a real launch up to the last
line) and hands its full argument list over; all are then checked in this one process
(``megatron_gem.train.launch_check``: the entry's parser at the job's world size, the layout, the
per-GPU memory estimate). ``DRY_RUN=1 bash SCRIPT`` checks a single script the same way.
Exit status 1 when any launch fails, with what is wrong.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from megatron_gem.train.launch_check import (
    DEFAULT_GPU_MEMORY_GIB,
    LaunchCheckError,
    check_spec,
    dry_run_script,
)

PROG = "megatron-gem-dry-run"


def default_scripts() -> list[Path]:
    """Every launch script in ``$GEM_LAUNCH_SCRIPTS``, else in ``./launch_scripts`` (the scripts
    live in the checkout, not in the installed package)."""
    d = Path(os.environ.get("GEM_LAUNCH_SCRIPTS") or "launch_scripts")
    if not d.is_dir():
        raise SystemExit(
            f"{PROG}: error: no launch scripts given and no folder {d} (name the "
            "scripts, run from the checkout's root or set GEM_LAUNCH_SCRIPTS)"
        )
    return sorted(
        p for p in d.iterdir() if p.suffix in (".sbatch", ".sh") and p.name != "common.sh"
    )


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected VAR=VALUE, got {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "scripts",
        nargs="*",
        type=Path,
        help="launch scripts (default: all in $GEM_LAUNCH_SCRIPTS or ./launch_scripts)",
    )
    p.add_argument(
        "--set",
        dest="env",
        action="append",
        type=_assignment,
        default=[],
        metavar="VAR=VALUE",
        help="set a script variable (repeatable), as in VAR=VALUE sbatch SCRIPT",
    )
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=DEFAULT_GPU_MEMORY_GIB,
        help=f"GPU memory the estimate must fit in (default {DEFAULT_GPU_MEMORY_GIB:.0f})",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    scripts = ns.scripts or default_scripts()
    env = dict(ns.env)
    failed = 0
    for script in scripts:
        try:
            specs = dry_run_script(script, env)
        except LaunchCheckError as e:
            print(f"== {script.name}: DRY RUN FAILED\n{e}", flush=True)
            failed += 1
            continue
        for spec in specs:
            try:
                print(check_spec(spec, ns.gpu_memory_gib).format(), flush=True)
            except LaunchCheckError as e:
                print(f"== {spec.name}: DRY RUN FAILED\n{e}", flush=True)
                failed += 1
    print(f"{len(scripts)} script(s), {failed} failure(s)")
    return 1 if failed else 0
