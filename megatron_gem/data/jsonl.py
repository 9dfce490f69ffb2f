"""The one JSONL (and text-lines) reader of every tool: bytes decoded per line, errors named.

The data tools, the tokenizer trainer, evaluation and the study all read their inputs through
``iter_lines`` + ``parse_line`` (``read_jsonl`` composes them; the data tools parse in their
worker processes), so the same bad input gets the same named error everywhere:

* The file is read as bytes and each line is decoded on its own, so a non-UTF-8 byte is an
  error of that line only, ``not UTF-8 (byte 0xff at column 7, byte 9 of the line)``, which
  ``--on-error skip`` skips like any other bad line (a text-mode read raised a
  UnicodeDecodeError for the whole file, without a line number).
* A UTF-8 byte-order mark (BOM) at the start of the file is ACCEPTED and dropped (utf-8-sig
  semantics for line 1): Windows editors and spreadsheet exports write one, it carries no
  content, and refusing it would only make the user re-save a correct file. A BOM at the
  start of any later line is refused: it is not JSON whitespace, and it usually means files
  were concatenated (``cat a.jsonl b.jsonl``), so the user should look.
* Invalid JSON names the real column (``JSONDecodeError.colno``, in characters).

Lines are split on ``\\n`` (a ``\\r`` before it is dropped), as editors number them. No Megatron
import here.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

__all__ = ["BOM", "BadLine", "decode_line", "is_blank", "iter_lines", "parse_line", "read_jsonl"]

BOM = b"\xef\xbb\xbf"


class BadLine(ValueError):
    """Why one line is not a JSON value (not UTF-8, a misplaced BOM, invalid JSON).

    Returned (not raised) by ``decode_line``/``parse_line`` and yielded by ``read_jsonl``, so
    a tool decides: fail with ``path:line: reason`` or skip and count it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """``(line number from 1, raw bytes without the line end)`` of every line, blank ones
    included; the BOM of line 1 is dropped."""
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(path)}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            yield lineno, raw.rstrip(b"\n").rstrip(b"\r")


def is_blank(raw: bytes | str) -> bool:
    return not raw.strip()


def decode_line(raw: bytes | str) -> str | BadLine:
    """The text of one line, or why it is not UTF-8."""
    if isinstance(raw, str):
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        col = len(raw[: err.start].decode("utf-8")) + 1  # the prefix before the bad byte is valid
        return BadLine(
            f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {col}, "
            f"byte {err.start + 1} of the line)"
        )
    if text.startswith("\ufeff"):  # line 1's BOM is gone already (iter_lines)
        return BadLine(
            "a UTF-8 byte-order mark (BOM) at column 1: allowed only at the start of "
            "the file (were files concatenated?)"
        )
    return text


def parse_line(raw: bytes | str):
    """The JSON value of one (non-blank) line, or a ``BadLine`` saying why not."""
    text = decode_line(raw)
    if isinstance(text, BadLine):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return BadLine(f"invalid JSON ({err.msg} at column {err.colno})")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """``(line number, JSON value or BadLine)`` of every non-blank line of ``path``."""
    for lineno, raw in iter_lines(path):
        if not is_blank(raw):
            yield lineno, parse_line(raw)
