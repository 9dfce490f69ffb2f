"""Writing outputs without losing what the user wrote; shared by every tool that writes.

* ``check_output_apart``: with ``--overwrite`` a tool replaces its output; if that output is
  one of its inputs, contains one, or lies inside one, the replacement destroys what the user
  wrote. Every tool checks this before it touches anything.
* ``check_output_dir`` / ``temp_sibling`` / ``publish``: a directory output is built under a
  hidden temporary name next to it (``.NAME.incomplete-PID-*``) and renamed into place only
  when complete; an earlier output is removed only after the swap. Leftovers of runs that died
  are named and removed on the next run (an earlier output caught mid-swap is put back).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "check_output_apart",
    "check_output_dir",
    "overlap",
    "publish",
    "remove_path",
    "temp_sibling",
]


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


def check_output_apart(
    output: str | os.PathLike, inputs: Iterable[tuple[str, object]], output_name: str = "--out"
) -> None:
    """Raise ``ValueError`` naming both paths when ``output`` is, contains or lies inside any
    of ``inputs`` (``(argument name, path or None)`` pairs; None entries are skipped)."""
    for name, path in inputs:
        if path is None or path == "":
            continue
        how = overlap(output, path)  # type: ignore[arg-type]
        if how is not None:
            raise ValueError(
                f"{output_name} {os.fspath(output)} {how} {name} "
                f"{os.fspath(path)}: choose an output apart from the inputs "
                "(nothing was written)"
            )


def _say(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).name or 'megatron-gem'}] {msg}", file=sys.stderr, flush=True)


def check_output_dir(
    out: str | os.PathLike,
    overwrite: bool,
    inputs: Iterable[tuple[str, object]] = (),
    *,
    log=None,
    writer: str = "run",
) -> Path:
    """The output directory, checked before anything is written: it must not be, contain or
    lie inside an input (``(argument name, path)`` pairs: with ``--overwrite`` publishing it
    would delete that input), and may exist only with ``overwrite``. Leftovers of earlier
    runs to the same output whose process has died are named and removed (an earlier
    output a dead conversion was replacing is put back first)."""
    log = log or _say
    check_output_apart(out, inputs)
    out = Path(out)
    stale = _leftovers(out)
    if not os.path.lexists(out):
        _restore_replaced(out, stale, log, writer)
    if out.exists() and not overwrite:
        raise ValueError(f"output directory {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    for path, pid in stale:
        if not os.path.lexists(path):
            continue  # restored above
        if pid is None or _alive(pid):
            who = f"process {pid}, still running" if pid else "an unknown process"
            log(f"found {path} (left by {who}): leaving it")
        else:
            log(f"found {path}, left by a {writer} that died (process {pid}): removing it")
            remove_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


# `.NAME.incomplete-PID-XXXX` (temp_sibling), `.NAME.replaced-PID` (publish), `.NAME.tmp-PID`
_LEFTOVER = re.compile(r"(?:incomplete-(\d+)-[^/]*|replaced-(\d+)|tmp-(\d+))")


def _leftovers(out: Path) -> list[tuple[Path, int | None]]:
    """``(path, creating PID or None when the name does not tell)`` of the temporary names an
    earlier conversion to ``out`` leaves when it dies."""
    prefix = f".{out.name}."
    if not out.parent.is_dir():
        return []
    found = []
    for p in sorted(out.parent.iterdir()):
        rest = p.name[len(prefix) :] if p.name.startswith(prefix) else ""
        m = _LEFTOVER.fullmatch(rest)
        if m:
            found.append((p, int(next(g for g in m.groups() if g))))
        elif rest.startswith("incomplete-"):  # written before the PID was in the name
            found.append((p, None))
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _restore_replaced(out: Path, stale: list[tuple[Path, int | None]], log, writer: str) -> None:
    """A run killed between its two renames in `publish` left the earlier output only
    as ``.NAME.replaced-PID``: put it back rather than treat it as a leftover."""
    for path, pid in stale:
        if path.name.startswith(f".{out.name}.replaced-") and pid and not _alive(pid):
            log(
                f"found {path}, the earlier {out} a {writer} that died (process {pid}) was "
                "replacing: restoring it"
            )
            os.rename(path, out)
            return


def remove_path(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def umask() -> int:
    """The process's umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_sibling(out: Path) -> Path:
    """A fresh temporary directory next to ``out`` (same filesystem, so the final rename is
    atomic); its name says it is incomplete and which process writes it (a later run removes
    it once that process is gone)."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.incomplete-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would outlive the rename
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place; an existing ``out`` (allowed by --overwrite) is
    removed only now that the replacement is complete, and put back if the swap fails."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    remove_path(old)  # a symlinked --out: the link goes, the directory it named stays
