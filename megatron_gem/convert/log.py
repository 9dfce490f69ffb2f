"""The conversion's progress and warning lines, on stderr with a ``[convert]`` prefix."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(f"[convert] {msg}", file=sys.stderr, flush=True)
