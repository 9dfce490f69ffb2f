"""The op layer is pure torch: importing megatron_gem or megatron_gem.ops imports no Megatron."""

import subprocess
import sys

from conftest import REPO


def test_import_megatron_gem_and_ops_import_no_megatron_module():
    code = (
        "import sys, megatron_gem, megatron_gem.ops, megatron_gem.ops.config\n"
        "from megatron_gem import GemConfig, gem_loss, vocab_parallel_gem_loss\n"
        "loaded = sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.'))\n"
        "print(loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
    # and the check can fail: the Megatron layer does import Megatron
    code = code.replace(
        "megatron_gem.ops.config\n", "megatron_gem.ops.config, megatron_gem.megatron.model\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "megatron.core" in out
