#!/usr/bin/env python
"""Dry-run launch scripts (``megatron-gem-dry-run``; ``megatron_gem.train.dry_run``), from a clone
without installing; the default scripts are this checkout's ``launch_scripts/``.

    python tools/dry_run_launch.py [SCRIPT ...] [--set VAR=VALUE] [--gpu-memory-gib G]
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a clone without installing
os.environ.setdefault("GEM_LAUNCH_SCRIPTS", str(REPO / "launch_scripts"))

from megatron_gem.train.dry_run import build_parser, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
