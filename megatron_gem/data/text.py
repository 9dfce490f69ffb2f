"""Pre-training data: JSONL text -> Megatron indexed datasets (``.bin/.idx``) for ``--data-path``.

Follows upstream Megatron-LM's ``tools/preprocess_data.py``: one document per JSONL line and
per ``--json-keys`` key, tokenized with Megatron's own tokenizer (``megatron_gem.data.tokenizer``),
ended with ``eod``, written with Megatron's ``IndexedDatasetBuilder`` in the smallest dtype
that holds the vocabulary, to ``{output_prefix}_{key}_document.{bin,idx}`` (upstream's names:
pass ``{output_prefix}_{key}_document`` to ``--data-path``). Workers tokenize in parallel but
documents are written in input order, so the output does not depend on ``--workers``.
Unlike upstream, nothing is dropped silently: malformed lines fail with their line number
(or are skipped and counted with ``on_error="skip"``), empty texts are counted.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_gem.data import jsonl as J
from megatron_gem.paths import check_output_apart
from megatron_gem.data.tokenizer import build_tokenizer

__all__ = ["PreprocessReport", "output_prefix_for", "preprocess_jsonl"]

ON_ERROR_CHOICES = ("fail", "skip")


def output_prefix_for(output_prefix: str, key: str) -> str:
    """The ``--data-path`` prefix of the documents of ``key`` (upstream's naming)."""
    return f"{output_prefix}_{key}_document"


@dataclasses.dataclass
class PreprocessReport:
    lines: int = 0
    blank: int = 0
    documents: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tokens: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_lines: dict = dataclasses.field(default_factory=dict)
    outputs: dict = dataclasses.field(default_factory=dict)  # key -> data-path prefix

    def skip(self, reason: str, lineno: int) -> None:
        self.skipped[reason] += 1
        listed = self.skipped_lines.setdefault(reason, [])
        if len(listed) < 10:
            listed.append(lineno)

    def format(self) -> str:
        out = [f"read {self.lines} lines ({self.blank} blank, ignored)"]
        for key, prefix in self.outputs.items():
            out.append(
                f"{key!r}: {self.documents[key]} documents, {self.tokens[key]} tokens "
                f"-> --data-path {prefix}"
            )
        out.append(f"skipped {sum(self.skipped.values())}")
        for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            lines = ", ".join(map(str, self.skipped_lines[reason]))
            more = " ..." if n > len(self.skipped_lines[reason]) else ""
            out.append(f"  {n} x {reason} (lines {lines}{more})")
        return "\n".join(out)


# Per-process state of the tokenizing workers (a Megatron tokenizer is not picklable cheaply).
_WORKER: dict = {}


def _init_worker(tokenizer_spec: dict, json_keys: Sequence[str], append_eod: bool) -> None:
    tok = build_tokenizer(**tokenizer_spec)
    _WORKER.update(tok=tok, keys=tuple(json_keys), append_eod=append_eod, eod=int(tok.eod))


def _encode_line(item: tuple[int, bytes]):
    """``(lineno, {key: ids})`` or ``(lineno, error reason)``; ``None`` for a blank line."""
    lineno, line = item
    if J.is_blank(line):
        return lineno, None
    obj = J.parse_line(line)  # decoded and parsed here, in the worker
    if isinstance(obj, J.BadLine):
        return lineno, obj.reason
    if not isinstance(obj, dict):
        return lineno, f"not a JSON object (got {type(obj).__name__})"
    out = {}
    for key in _WORKER["keys"]:
        text = obj.get(key)
        if not isinstance(text, str):
            return lineno, f"no string {key!r}"
        ids = list(_WORKER["tok"].tokenize(text)) if text else []
        if ids and _WORKER["append_eod"]:
            ids.append(_WORKER["eod"])
        out[key] = np.asarray(ids, dtype=np.int64)
    return lineno, out


def preprocess_jsonl(
    input_path: str,
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    *,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    on_error: str = "fail",
    overwrite: bool = False,
    log_interval: int = 0,
) -> PreprocessReport:
    """Tokenize JSONL ``input_path`` into ``{output_prefix}_{key}_document.{bin,idx}``.

    Documents with empty text are skipped and counted. Outputs go to temporary names and are
    renamed when complete; existing outputs are only replaced with ``overwrite=True``.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"--on-error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be a positive integer, got {workers!r}")
    if not os.path.isfile(input_path):
        raise ValueError(f"--input {input_path!r}: no such file")
    json_keys = tuple(json_keys)
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys must be distinct and non-empty, got {list(json_keys)}")
    spec = dict(
        tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer_model,
        vocab_file=vocab_file,
        merge_file=merge_file,
    )
    _init_worker(spec, json_keys, append_eod)  # also validates the tokenizer flags here
    vocab_size = int(_WORKER["tok"].vocab_size)
    dtype = DType.optimal_dtype(vocab_size)

    final = {k: output_prefix_for(output_prefix, k) for k in json_keys}
    # Before anything is written: no output file may be, contain or lie inside an input.
    inputs = [
        ("--input", input_path),
        ("--tokenizer-model", tokenizer_model),
        ("--vocab-file", vocab_file),
        ("--merge-file", merge_file),
    ]
    for prefix in final.values():
        for path in (prefix + ".bin", prefix + ".idx"):
            check_output_apart(path, inputs, "--output-prefix file")
    report = PreprocessReport()
    for prefix in final.values():
        for path in (prefix + ".bin", prefix + ".idx"):
            if os.path.exists(path) and not overwrite:
                raise ValueError(f"--output-prefix {output_prefix!r}: {path} exists (--overwrite)")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)) or ".", exist_ok=True)
    tmp = {k: f"{p}.tmp-{os.getpid()}" for k, p in final.items()}
    builders = {k: IndexedDatasetBuilder(tmp[k] + ".bin", dtype=dtype) for k in json_keys}
    pool = None
    try:
        lines: Iterable = J.iter_lines(input_path)  # raw bytes: decoded in _encode_line
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=(spec, json_keys, append_eod)
            )
            results: Iterator = pool.imap(_encode_line, lines, chunksize=64)
        else:
            results = map(_encode_line, lines)
        for lineno, result in results:
            report.lines += 1
            if result is None:
                report.blank += 1
                continue
            if isinstance(result, str):
                if on_error == "fail":
                    raise ValueError(
                        f"{input_path}:{lineno}: {result} (pass --on-error skip to skip such lines)"
                    )
                report.skip(result, lineno)
                continue
            for key, ids in result.items():
                if ids.size == 0:
                    report.skip(f"empty {key!r}", lineno)
                    continue
                builders[key].add_item(torch.from_numpy(ids))
                builders[key].end_document()
                report.documents[key] += 1
                report.tokens[key] += int(ids.size)
            if log_interval and report.lines % log_interval == 0:
                print(f"processed {report.lines} lines", flush=True)
        for key in json_keys:
            if report.documents[key] == 0:
                raise ValueError(f"--input {input_path!r}: no document for key {key!r}")
            builders[key].finalize(tmp[key] + ".idx")
        for key in json_keys:
            os.replace(tmp[key] + ".bin", final[key] + ".bin")
            os.replace(tmp[key] + ".idx", final[key] + ".idx")
        report.outputs = dict(final)
    finally:
        if pool is not None:
            pool.terminate()
        for key, b in builders.items():
            if not b.data_file.closed:
                b.data_file.close()
            for ext in (".bin", ".idx"):
                if os.path.exists(tmp[key] + ext):
                    os.remove(tmp[key] + ext)
    return report
