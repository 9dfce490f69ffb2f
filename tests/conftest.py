"""Shared pytest helpers: run the training entry under torchrun and read Megatron's log lines."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The Triton kernels (megatron_gem/ops/gem_triton.py) take CPU tensors only under Triton's
# interpreter, which triton reads when a kernel is defined: decide it here, before any test
# module imports them, and only where CUDA is absent. run_train's children do not inherit it.
_TRITON_INTERPRET_SET_HERE = "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available()
if _TRITON_INTERPRET_SET_HERE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("torch", "triton")  # the op's implementations (Triton under the interpreter on CPU)


@pytest.fixture(params=IMPLS)
def each_impl(request, monkeypatch):
    """Run a test module's checks on both implementations: its ``gem_loss`` and
    ``vocab_parallel_gem_loss`` are rebound to the op with ``impl=`` set. Use it with
    ``pytestmark = pytest.mark.usefixtures("each_impl")``."""
    import functools

    import megatron_gem

    for name in ("gem_loss", "vocab_parallel_gem_loss"):
        if name in vars(request.module):
            op = functools.partial(getattr(megatron_gem, name), impl=request.param)
            monkeypatch.setattr(request.module, name, op)
    return request.param


# Megatron's stdout: " [time] iteration    3/   10 | ... | lm loss: 6.24E+00 | gem loss: ... |"
_ITER = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|(.*)$")
_VALID = re.compile(r"validation loss at iteration (\d+) on (validation|test) set \|(.*)$")
_PAIR = re.compile(r"\s*([A-Za-z][A-Za-z _-]*?)(?: value)?: ([-+0-9.eE]+|nan|inf)\s*$")


def _pairs(fields: str) -> dict[str, float]:
    out = {}
    for field in fields.split("|"):
        m = _PAIR.match(field)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def parse_megatron_log(stdout: str) -> dict:
    """``{"train": {iteration: {key: value}}, "valid"/"test": {iteration: {key: value}}}``."""
    log = {"train": {}, "validation": {}, "test": {}}
    for line in stdout.splitlines():
        m = _VALID.search(line)
        if m:
            log[m.group(2)][int(m.group(1))] = _pairs(m.group(3))
            continue
        m = _ITER.search(line)
        if m and "consumed samples" in line:
            log["train"][int(m.group(1))] = _pairs(m.group(2))
    return log


def cpu_flag() -> list[str]:
    """``["--cpu"]`` where CUDA is absent: the entry's CPU mode is opt-in."""
    return [] if torch.cuda.is_available() else ["--cpu"]


def run_train(nproc: int, argv: list[str], timeout: float = 300, env: dict | None = None) -> str:
    """Run ``torchrun --standalone --nproc-per-node N -m megatron_gem.train ARGV``; return stdout.

    Fails the test with the output tail when the run fails. ``--standalone`` picks a free port,
    so concurrent runs do not collide.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_gem.train",
        *cpu_flag(),
        *argv,
    ]
    full_env = dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    if _TRITON_INTERPRET_SET_HERE:
        full_env.pop("TRITON_INTERPRET")
    full_env.update(env or {})
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"training entry failed (rc={proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-6000:]}"
        )
    return proc.stdout


def run_script(path: Path, source: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Write ``source`` to ``path`` and run it as ``python PATH PORT`` (a free local port, for a
    script that spawns its own gloo ranks), with the checkout on PYTHONPATH and one thread; stdout
    and stderr together in ``.stdout``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path.write_text(source)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(path), str(port)],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
    )
