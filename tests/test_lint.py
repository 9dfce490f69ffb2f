"""The code passes the project's linter and formatter (ruff, configured in pyproject.toml)."""

import subprocess
import sys

import pytest

from conftest import REPO

PATHS = ["megatron_gem", "tests", "tools", "examples"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PATHS], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
