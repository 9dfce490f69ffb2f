"""Tokenizers exactly as Megatron's training entry builds them, and a SentencePiece trainer.

The data tools must produce the token ids, ``eod`` and ``pad`` that training sees, so they do
not wrap SentencePiece or transformers themselves: they fill a namespace with the defaults of
Megatron's own ``TokenizerConfig`` (the ``--tokenizer-*`` flags) and call Megatron's
``build_tokenizer(args)``, the function ``megatron.training`` uses for ``--tokenizer-type
SentencePieceTokenizer --tokenizer-model FILE`` and ``--tokenizer-type HuggingFaceTokenizer
--tokenizer-model DIR``. Megatron is imported lazily (it costs seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from typing import Iterable, Iterator, Sequence

# The role headers of the plain SFT chat template (re-exported: tokenizer training includes them).
from megatron_gem.data.chat import PLAIN_HEADERS, plain_message_text

__all__ = [
    "PLAIN_HEADERS",
    "TEXT_TOKENIZER_TYPES",
    "add_tokenizer_args",
    "build_tokenizer",
    "hf_tokenizer",
    "iter_training_text",
    "pad_or_eod",
    "text_to_ids",
    "tokenizer_args",
    "tokenizer_from_args",
    "tokenizer_from_megatron_args",
    "train_sentencepiece",
]

# Megatron tokenizer types that turn text into ids from a model file/directory.
SP_TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
TEXT_TOKENIZER_TYPES = SP_TOKENIZER_TYPES + (
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "TikTokenizer",
)


def _config_defaults() -> dict:
    from megatron.training.config import TokenizerConfig

    values = {}
    for f in dataclasses.fields(TokenizerConfig):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # pragma: no cover - none today
            values[f.name] = f.default_factory()
    return values


def tokenizer_args(tokenizer_type: str, tokenizer_model: str | None = None, **overrides):
    """A namespace with every Megatron tokenizer argument at its command-line default.

    ``overrides`` set other ``TokenizerConfig`` fields (``vocab_file``, ``merge_file``,
    ``chat_template``...). ``pad_vocab_size`` is off: the tools need the tokenizer, not the
    model's padded vocabulary.
    """
    if tokenizer_type not in TEXT_TOKENIZER_TYPES:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type!r} is not supported here; "
            f"choose one of {', '.join(TEXT_TOKENIZER_TYPES)}"
        )
    if tokenizer_type in SP_TOKENIZER_TYPES or tokenizer_type == "TikTokenizer":
        if not tokenizer_model or not os.path.isfile(tokenizer_model):
            raise ValueError(f"--tokenizer-model {tokenizer_model!r}: no such file")
    if tokenizer_type == "HuggingFaceTokenizer" and not tokenizer_model:
        raise ValueError("--tokenizer-model is required with HuggingFaceTokenizer (a directory)")
    values = _config_defaults()
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"unknown tokenizer argument(s): {sorted(unknown)}")
    values.update(overrides)
    values.update(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model)
    values["pad_vocab_size"] = False
    return argparse.Namespace(**values)


def _build_named(ns):
    """Megatron's ``build_tokenizer(ns)``; a model that does not load is a one-line ValueError
    naming ``--tokenizer-model`` (SentencePiece raises RuntimeError, transformers ValueError/OSError
    with many lines)."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer as _build

    model = getattr(ns, "tokenizer_model", None)
    if (
        model
        and ns.tokenizer_type in SP_TOKENIZER_TYPES + ("TikTokenizer",)
        and not os.path.isfile(model)
    ):
        raise ValueError(
            f"--tokenizer-model {model!r}: no such file (a {ns.tokenizer_type} model file)"
        )
    if (
        model
        and ns.tokenizer_type == "HuggingFaceTokenizer"
        and model.startswith(("/", ".", "~"))
        and not os.path.exists(model)
    ):
        raise ValueError(f"--tokenizer-model {model!r}: no such file or directory")
    try:
        return _build(ns)
    except Exception as err:
        if not model:
            raise
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise ValueError(
            f"--tokenizer-model {model!r}: not a {ns.tokenizer_type} model "
            f"(it did not load: {reason})"
        ) from err


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, **overrides):
    """Megatron's tokenizer for these flags (a ``MegatronTokenizerText``)."""
    return _build_named(tokenizer_args(tokenizer_type, tokenizer_model, **overrides))


def tokenizer_from_megatron_args(args):
    """The tokenizer training builds from a (possibly partial) Megatron args namespace.

    Missing tokenizer fields take Megatron's defaults; the caller's ``args`` is not modified
    (Megatron's builder would set ``padded_vocab_size`` on it). A ``--tokenizer-model`` that does
    not load raises a one-line ``ValueError`` naming it.
    """
    values = _config_defaults()
    for name in values:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    values["pad_vocab_size"] = False
    return _build_named(argparse.Namespace(**values))


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The tokenizer flags of the data tools (same names as Megatron's)."""
    g = parser.add_argument_group("tokenizer (same flags as training)")
    g.add_argument("--tokenizer-type", required=True, choices=TEXT_TOKENIZER_TYPES)
    g.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece model file, or HuggingFace tokenizer directory/name",
    )
    g.add_argument("--vocab-file", default=None, help="vocab file (GPT2BPETokenizer)")
    g.add_argument("--merge-file", default=None, help="BPE merge file (GPT2BPETokenizer)")
    return parser


def tokenizer_from_args(args: argparse.Namespace):
    """Build the tokenizer from the flags of ``add_tokenizer_args``."""
    return build_tokenizer(
        args.tokenizer_type,
        args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
    )


def hf_tokenizer(tokenizer):
    """The transformers tokenizer inside a Megatron HuggingFace tokenizer, else None."""
    if getattr(tokenizer, "library", None) != "huggingface":
        return None
    return tokenizer._tokenizer.tokenizer


def text_to_ids(tokenizer, text: str) -> list[int]:
    """Ids of a piece of text, with no special tokens added around it.

    SentencePiece: Megatron's ``tokenize`` (it adds none). HuggingFace: ``add_special_tokens=
    False``, as ``apply_chat_template`` does; Megatron's ``tokenize`` would add e.g. a BOS to
    every piece.
    """
    hf = hf_tokenizer(tokenizer)
    if hf is not None:
        return list(hf(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer.tokenize(text))


def pad_or_eod(tokenizer) -> int:
    """A valid id for padding positions: the pad token if the tokenizer has one, else eod."""
    try:
        pad = tokenizer.pad
    except Exception:  # some libraries raise instead of returning None
        pad = None
    if pad is None or pad < 0:
        return int(tokenizer.eod)
    return int(pad)


def _keep_error(it: Iterator[str], seen: dict) -> Iterator[str]:
    """``it``, counting its texts and keeping the ValueError it raises: SentencePiece turns an
    exception of its sentence iterator into a RuntimeError holding a Python traceback."""
    try:
        for t in it:
            seen["texts"] += 1
            yield t
    except ValueError as err:
        seen["error"] = err
        raise


def train_sentencepiece(
    text: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    user_defined_symbols: Sequence[str] = (),
    byte_fallback: bool = False,
    max_sentence_length: int = 1 << 16,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    **trainer_options,
) -> str:
    """Train a SentencePiece model; return the path of ``<model_prefix>.model``.

    ``text``: one file path (``str`` or ``PathLike``), a list of ``pathlib.Path`` files, or an
    iterable of strings (one sentence or document each; a list of ``str`` is text, not paths).
    Special ids follow Llama's layout plus a real pad: unk 0, bos 1, eos 2 (Megatron's ``eod``),
    pad 3. Training is single-threaded, so the model is a deterministic function of the text.
    Outputs are written under a temporary name and renamed when complete; existing files are
    only replaced with ``overwrite=True``, and never when an output is, contains or lies inside
    an input: the files of ``text``, or ``inputs`` (the files an iterable ``text`` is read from,
    e.g. ``iter_training_text``'s).
    """
    import sentencepiece as spm

    from megatron_gem.paths import check_output_apart

    if not isinstance(vocab_size, int) or vocab_size < 8:
        raise ValueError(f"vocab_size must be an integer >= 8, got {vocab_size!r}")
    if model_type not in ("bpe", "unigram", "char", "word"):
        raise ValueError(f"model_type must be bpe, unigram, char or word, got {model_type!r}")
    model_prefix = os.fspath(model_prefix)
    final = {ext: f"{model_prefix}.{ext}" for ext in ("model", "vocab")}
    if isinstance(text, (str, os.PathLike)):
        files = [os.fspath(text)]
    elif isinstance(text, (list, tuple)) and text and all(isinstance(t, os.PathLike) for t in text):
        files = [os.fspath(t) for t in text]
    else:  # strings in a list are text, not paths: no guessing
        files = None
    # Before anything is written (and before "exists", which would suggest overwrite).
    for path in final.values():
        check_output_apart(
            path,
            [("--input", f) for f in [*(files or []), *map(os.fspath, inputs)]],
            "--model-prefix file",
        )
    existing = [p for p in final.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise ValueError(f"model_prefix {model_prefix!r}: {existing[0]} exists (pass overwrite)")

    options = dict(
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        user_defined_symbols=list(user_defined_symbols),
        byte_fallback=byte_fallback,
        max_sentence_length=max_sentence_length,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    options.update(trainer_options)
    seen = {"texts": 0, "error": None}
    if files is not None:
        for f in files:
            if not os.path.isfile(f):
                raise ValueError(f"text file {f!r} does not exist")
        options["input"] = ",".join(files)
    else:
        options["sentence_iterator"] = _keep_error(iter(text), seen)

    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".sp-train-") as tmp:
        tmp_prefix = os.path.join(tmp, "sp")
        try:
            spm.SentencePieceTrainer.train(model_prefix=tmp_prefix, **options)
        except RuntimeError as err:
            if seen["error"] is not None:  # the text's own error (e.g. path:line: reason)
                raise seen["error"] from None
            if files is None and seen["texts"] == 0:
                where = f" (--input {', '.join(map(os.fspath, inputs))})" if inputs else ""
                raise ValueError(
                    f"no text to train the tokenizer on{where}: empty, or blank lines only"
                )
            # e.g. "Vocabulary size too high (5000). Please set it to a value <= 812."
            raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}): {err}")
        for ext, path in final.items():
            os.replace(f"{tmp_prefix}.{ext}", path)
    return final["model"]


def iter_training_text(
    paths: Sequence[str], text_key: str = "text", messages_key: str = "messages"
) -> Iterator[str]:
    """Text to train a tokenizer on, from plain-text files and/or JSONL files.

    ``.jsonl``/``.json`` lines give their ``text_key`` string, or, for chat lines, each message
    as it reads in the plain SFT template (``"User: ..."``), so the template's headers are in
    the vocabulary. Other files give their lines.
    """
    from megatron_gem.data.jsonl import BadLine, decode_line, is_blank, iter_lines, parse_line

    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"--input {path!r}: no such file")
        is_jsonl = path.endswith((".jsonl", ".json"))
        for lineno, raw in iter_lines(path):  # bytes, decoded per line (megatron_gem.data.jsonl)
            if is_blank(raw):
                continue
            obj = parse_line(raw) if is_jsonl else decode_line(raw)
            if isinstance(obj, BadLine):
                raise ValueError(f"{path}:{lineno}: {obj.reason}")
            if not is_jsonl:
                yield obj
            elif isinstance(obj, dict) and isinstance(obj.get(text_key), str):
                yield obj[text_key]
            elif isinstance(obj, dict) and isinstance(obj.get(messages_key), list):
                for m in obj[messages_key]:
                    if isinstance(m, dict) and m.get("role") in PLAIN_HEADERS:
                        yield plain_message_text(m["role"], m.get("content", ""))
            else:
                raise ValueError(f"{path}:{lineno}: no {text_key!r} or {messages_key!r}")
