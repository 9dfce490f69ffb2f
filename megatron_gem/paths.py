"""Path checks shared by every tool that writes: an output never overlaps an input.

With ``--overwrite`` a tool replaces its output; if that output is one of its inputs, contains
one, or lies inside one, the replacement destroys what the user wrote. Every tool checks this
before it touches anything (``check_output_apart``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["check_output_apart", "overlap"]


def _real(path: str | os.PathLike) -> Path:
    # realpath, not resolve(strict=True): the output usually does not exist yet, and a symlink
    # to an input is the same input.
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def overlap(output: str | os.PathLike, input_path: str | os.PathLike) -> str | None:
    """How ``output`` overlaps ``input_path`` ("is", "contains", "lies inside"), or None."""
    out, inp = _real(output), _real(input_path)
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "lies inside"
    return None


def check_output_apart(output: str | os.PathLike, inputs: Iterable[tuple[str, object]],
                       output_name: str = "--out") -> None:
    """Raise ``ValueError`` naming both paths when ``output`` is, contains or lies inside any
    of ``inputs`` (``(argument name, path or None)`` pairs; None entries are skipped)."""
    for name, path in inputs:
        if path is None or path == "":
            continue
        how = overlap(output, path)  # type: ignore[arg-type]
        if how is not None:
            raise ValueError(f"{output_name} {os.fspath(output)} {how} {name} "
                             f"{os.fspath(path)}: choose an output apart from the inputs "
                             "(nothing was written)")
