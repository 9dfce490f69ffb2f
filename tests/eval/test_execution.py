"""The code scorer: passing and failing samples, an endless loop, a memory hog, nothing left."""

import os
import time
from dataclasses import replace

import pytest

from megatron_gem.eval.execution import (
    CodeTask,
    SandboxConfig,
    humaneval_program,
    run_program,
    run_tests,
)

TASK = CodeTask(
    prompt='def add(a, b):\n    """Return a + b."""\n',
    test="def check(candidate):\n"
    "    assert candidate(2, 3) == 5\n"
    "    assert candidate(-1, 1) == 0\n",
    entry_point="add",
)


@pytest.fixture
def cfg(tmp_path):
    root = tmp_path / "exec"
    root.mkdir()
    # a generous wall limit: the machine's cores are shared, startup alone can take a while
    return SandboxConfig(timeout=30.0, memory_mb=256, workers=2, temp_root=str(root))


def test_pass_fail_loop_and_memory_hog_leave_nothing_behind(cfg):
    before = sorted(os.listdir(cfg.temp_root))
    samples = [
        "    return a + b\n",  # passes
        "    return a - b\n",  # fails its assertion
        "    x = bytearray(1 << 30)\n    return a + b\n",  # 1 GiB > 256 MiB: MemoryError
        "    open('left_behind.txt', 'w').write('x')\n    return a + b\n",  # a stray file
    ]
    res = run_tests(TASK, samples, cfg)
    assert [r.status for r in res] == ["passed", "failed", "memory", "passed"]
    assert "AssertionError" in res[1].stderr
    assert "MemoryError" in res[2].stderr
    # the limit is what stopped it: with room for 1 GiB the same sample passes
    assert run_tests(TASK, [samples[2]], replace(cfg, memory_mb=4096))[0].passed
    # an endless loop, killed at the wall-time limit
    loop = run_tests(TASK, ["    while True:\n        pass\n"], replace(cfg, timeout=1.0))[0]
    assert loop.status == "timeout" and loop.returncode is None
    assert 1.0 <= loop.seconds < 10.0
    assert sorted(os.listdir(cfg.temp_root)) == before == []


def test_growing_memory_hog_output_truncation_stdin_and_children(cfg):
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n"
    assert run_program(hog, cfg).status == "memory"
    r = run_program("print('x' * 100_000)\n", replace(cfg, output_bytes=50))
    assert r.status == "passed" and r.stdout.startswith("x" * 50) and "truncated" in r.stdout
    assert run_program("import sys\nassert sys.stdin.read() == ''\n", cfg).passed
    # a child left running in the background dies with the process group
    spawn = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(p.pid)\n"
    )
    r = run_program(spawn, cfg)
    assert r.passed
    pid = int(r.stdout.split()[0])
    assert _dead(pid)
    assert os.listdir(cfg.temp_root) == []


def _dead(pid, wait=2.0):
    """Gone, or a zombie waiting for init to reap it (killed, not running)."""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_humaneval_program_shapes():
    plain = humaneval_program(TASK, "    return a + b\n")
    assert plain == TASK.prompt + "    return a + b\n\n\n" + TASK.test + "\n\ncheck(add)\n"
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return b + a\n```\nDone."
    prog = humaneval_program(TASK, fenced)
    assert "def add(a, b):\n    return b + a" in prog and "Here you go" not in prog
    assert run_program(prog, SandboxConfig(timeout=30)).passed
    with pytest.raises(ValueError, match="timeout"):
        SandboxConfig(timeout=0)
