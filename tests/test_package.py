"""The package installs like a library: a wheel, installed outside the checkout, whose console
scripts work from any directory (nothing in the package reads files by its place in the checkout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

from conftest import REPO

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(bin folder, environment)`` of the wheel installed into a fresh target folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp / "dist").glob("megatron_gem-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("megatron_gem/", "megatron_gem-")) for n in names), "only the package"
    assert "megatron_gem/ops/gem_loss.py" in names and "megatron_gem/train/__main__.py" in names
    target = tmp / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    # the wheel's copy first on the path (the test venv also has an editable install)
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONWARNINGS="ignore")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return target / "bin", env, elsewhere


def test_the_installed_package_is_the_wheels(installed):
    bin_dir, env, elsewhere = installed
    out = subprocess.run(
        [sys.executable, "-c", "import megatron_gem; print(megatron_gem.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith(str(bin_dir.parent)) and not out.startswith(str(REPO))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help_from_another_directory(installed, name):
    bin_dir, env, elsewhere = installed
    proc = subprocess.run(
        [str(bin_dir / name), "--help"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_a_real_command_from_another_directory(installed):
    """``megatron-gem-evaluate`` scores generations it is given (no model needed)."""
    bin_dir, env, elsewhere = installed
    (elsewhere / "eval.jsonl").write_text(
        json.dumps(
            {
                "id": "fly",
                "messages": [{"role": "user", "content": "Name an animal that can fly."}],
                "valid": ["eagle", "owl", "bat"],
            }
        )
        + "\n"
    )
    (elsewhere / "gens.jsonl").write_text(
        json.dumps({"prompt_id": "fly", "generations": ["Owl.", "owl", "bat", "a cow"]}) + "\n"
    )
    proc = subprocess.run(
        [
            str(bin_dir / "megatron-gem-evaluate"),
            "--prompts",
            "eval.jsonl",
            "--generations",
            "gens.jsonl",
            "--out",
            "results.json",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((elsewhere / "results.json").read_text())["sets"]["all"]
    # 3 of 4 samples name a valid answer, covering 2 of the 3 valid answers (owl, bat)
    assert result["quality"] == 0.75 and abs(result["coverage"] - 2 / 3) < 1e-12
