"""SFT data: chat JSONL -> prompt-masked, packed training samples for Megatron.

Two halves:

* **Preparation** (``prepare_sft_data``, CLI ``tools/prepare_sft_data.py``). Each line
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` becomes one
  sample: token ids plus an *assistant mask* (True on the tokens the model must learn to emit).
  With a HuggingFace tokenizer that has a chat template, the conversation is rendered with the
  template and assistant character spans are found by prefix-diffing renders (see
  ``ChatTemplateEncoder``); otherwise the plain template of ``PlainTemplateEncoder`` is used.
  Samples are stored in ONE Megatron ``IndexedDataset`` (``PREFIX.bin/.idx``, int32) with the
  mask sign-encoded: a prompt token ``t`` is stored as ``t``, an assistant token as ``~t =
  -t-1``. Why: tokens and mask are aligned by construction (no second index that can drift or
  be half-written), one memory-mapped read gives both, and a file mistakenly used as
  pre-training data fails loudly (negative ids) instead of training on prompts. The cost, 4
  bytes a token instead of 2 for vocabularies under 65k, is small for SFT-sized data.
  ``PREFIX.sft.json`` records the format, tokenizer, template and the preparation counts.

* **Training** (``build_sft_datasets(args, train_val_test_num_samples)``): Megatron's
  ``BlendedMegatronDatasetBuilder`` (so ``--data-path`` blends, ``--split`` and
  ``--train/valid/test-data-path`` behave as for GPT data) over ``PackedSFTDataset``, which
  packs whole samples up to ``--seq-length`` (shuffled per epoch from ``--seed``, as many
  epochs as the requested number of samples needs). A sample of ``L`` tokens fills ``L - 1``
  positions (inputs ``ids[:-1]``, labels ``ids[1:]``), so no label ever crosses into the next
  sample; ``loss_mask`` is 1 exactly where the label is an assistant token; ``position_ids``
  restart at 0 per sample; ``attention_mask`` (``[1, S, S]`` bool, True = masked, Megatron's
  convention) is block-diagonal causal, so packed samples never see each other and no
  Transformer Engine is needed. The padding tail is its own block (it must attend to
  something, or softmax rows would be NaN) with loss 0. On Transformer Engine's THD path
  (``create_attention_mask=False``) no S x S mask is built: samples carry ``cu_seqlens`` (real
  lengths) and ``cu_seqlens_padded`` (block boundaries) instead, and with context parallelism
  each sample is padded to a multiple of ``2 * cp`` (``megatron_gem.train.context_parallel``).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split
from megatron.core.utils import log_single_rank

from megatron_gem.data import jsonl as J
from megatron_gem.data.chat import PLAIN_HEADERS, ROLES, TEMPLATES, ChatTemplate, PlainTemplate
from megatron_gem.data.tokenizer import (
    hf_tokenizer,
    pad_or_eod,
    text_to_ids,
    tokenizer_from_megatron_args,
)
from megatron_gem.paths import check_output_apart

logger = logging.getLogger(__name__)

__all__ = [
    "PLAIN_HEADERS",
    "ChatTemplateEncoder",
    "PlainTemplateEncoder",
    "PackedSFTDataset",
    "SFTDatasetConfig",
    "SFTIndexedData",
    "SFTPrepReport",
    "build_sft_datasets",
    "decode_sample",
    "make_encoder",
    "pack_next_fit",
    "parse_chat_line",
    "prepare_sft_data",
]

FORMAT = "megatron-gem-sft"
FORMAT_VERSION = 1
# ROLES, PLAIN_HEADERS and the templates themselves: megatron_gem.data.chat (the evaluation
# encodes prompts with the same code).
META_SUFFIX = ".sft.json"
ON_ERROR_CHOICES = ("fail", "skip")


class SampleError(ValueError):
    """A line that cannot become a sample; ``malformed`` ones obey --on-error."""

    def __init__(self, reason: str, malformed: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.malformed = malformed

    def __reduce__(self):  # keep ``malformed`` when sent back from a worker process
        return (SampleError, (self.reason, self.malformed))


# --------------------------------------------------------------------------- parsing


def parse_chat_line(line: str | bytes, messages_key: str = "messages") -> list[dict]:
    """The messages of one JSONL line; ``SampleError`` says what is wrong with it."""
    obj = J.parse_line(line)
    if isinstance(obj, J.BadLine):
        raise SampleError(obj.reason)
    if not isinstance(obj, dict):
        raise SampleError(f"not a JSON object (got {type(obj).__name__})")
    if messages_key not in obj:
        raise SampleError(f"no {messages_key!r} key")
    messages = obj[messages_key]
    if not isinstance(messages, list) or not messages:
        raise SampleError(f"{messages_key!r} is not a non-empty list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise SampleError(f"message {k} is not an object with a string 'role'")
        if m["role"] not in ROLES:
            raise SampleError(f"message {k} has role {m['role']!r} (expected one of {ROLES})")
        if not isinstance(m.get("content"), str):
            raise SampleError(f"message {k} has no string 'content'")
    return messages


# --------------------------------------------------------------------------- encoders


class PlainTemplateEncoder:
    """``ids(HEADER[role]) + ids(content) (+ [eod] for assistant)`` per message.

    The generation prompt for inference is the encoding of the history followed by
    ``ids("Assistant:")``; the model ends its answer with ``eod``. The template on ids is
    ``megatron_gem.data.chat.PlainTemplate``, shared with the evaluation.
    """

    name = "plain"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eod = int(tokenizer.eod)
        self.plain = PlainTemplate(functools.partial(text_to_ids, tokenizer), self.eod)

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.plain.encode_messages(messages)
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)

    def metadata(self) -> dict:
        return {"template": self.name, "headers": PLAIN_HEADERS}


class ChatTemplateEncoder(ChatTemplate):
    """A HuggingFace chat template; assistant spans found by prefix-diffing renders.

    For assistant message ``i``: ``P = render(messages[:i], add_generation_prompt=True)`` ends
    where the answer starts, ``F = render(messages[:i+1])`` ends after its end-of-turn
    marker (``ChatTemplate.answer_renders``). Both must be prefixes of the full render ``T``
    (else the template rewrites history, e.g. drops earlier reasoning, and the sample is refused
    with that reason); the answer is ``T[len(P):len(F)]``, its end-of-turn tokens included so the
    model learns to stop. ``T`` is tokenized once (``add_special_tokens=False``, as
    ``apply_chat_template`` does; the template writes its own BOS), and a token carries loss when
    its character span overlaps an answer span. Multi-turn conversations get every assistant turn.
    """

    name = "chat"

    def __init__(self, tokenizer, chat_template: Optional[str] = None):
        hf = hf_tokenizer(tokenizer)
        if hf is None:
            raise ValueError("the chat template needs --tokenizer-type HuggingFaceTokenizer")
        if not getattr(hf, "is_fast", False):
            raise ValueError(
                "the chat template path needs a fast HuggingFace tokenizer (character offsets)"
            )
        template = chat_template or getattr(tokenizer, "chat_template", None) or hf.chat_template
        if not template:
            raise ValueError(
                "the tokenizer has no chat template: pass --chat-template or use --template plain"
            )
        super().__init__(hf, template)

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        try:
            return super().render(messages, generation_prompt)
        except Exception as err:  # jinja raises many types; the reason goes to the report
            raise SampleError(f"chat template failed: {type(err).__name__}: {err}")

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        text = self.render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, end = self.answer_renders(messages[:i], m)
            if not (text.startswith(start) and text.startswith(end) and len(end) >= len(start)):
                raise SampleError(
                    f"chat template is not prefix-stable at message {i}: "
                    "cannot locate the assistant tokens"
                )
            spans.append((len(start), len(end)))
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        s, e = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            mask |= (s < b) & (e > a)  # any overlap with the answer
            mask |= (s == e) & (s >= a) & (s < b)  # zero-width tokens inside it
        return ids, mask

    def metadata(self) -> dict:
        return {"template": self.name, "chat_template": self.template}


def make_encoder(tokenizer, template: str = "auto", chat_template: Optional[str] = None):
    """``auto``: the chat template when the tokenizer is HuggingFace and has one, else plain."""
    if template not in TEMPLATES:
        raise ValueError(f"--template must be auto, chat or plain, got {template!r}")
    if template == "auto":
        hf = hf_tokenizer(tokenizer)
        has = chat_template or getattr(tokenizer, "chat_template", None)
        has = has or (hf.chat_template if hf is not None else None)
        template = "chat" if hf is not None and has else "plain"
    if template == "chat":
        return ChatTemplateEncoder(tokenizer, chat_template)
    return PlainTemplateEncoder(tokenizer)


# --------------------------------------------------------------------------- preparation


@dataclasses.dataclass
class SFTPrepReport:
    """What ``prepare_sft_data`` did with every line of the input."""

    lines: int = 0
    blank: int = 0
    kept: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_lines: dict = dataclasses.field(default_factory=dict)  # reason -> first line numbers

    MAX_LINES_LISTED = 10

    def skip(self, reason: str, lineno: int) -> None:
        self.skipped[reason] += 1
        listed = self.skipped_lines.setdefault(reason, [])
        if len(listed) < self.MAX_LINES_LISTED:
            listed.append(lineno)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {
            "lines": self.lines,
            "blank_lines": self.blank,
            "kept": self.kept,
            "truncated": self.truncated,
            "skipped": self.num_skipped,
            "skipped_by_reason": dict(self.skipped),
            "skipped_lines": self.skipped_lines,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
        }

    def format(self) -> str:
        out = [
            f"read {self.lines} lines ({self.blank} blank, ignored)",
            f"kept {self.kept} samples ({self.truncated} truncated to --seq-length), "
            f"{self.tokens} tokens, {self.loss_tokens} with loss",
            f"skipped {self.num_skipped} samples",
        ]
        for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            lines = ", ".join(map(str, self.skipped_lines[reason]))
            more = " ..." if n > len(self.skipped_lines[reason]) else ""
            out.append(f"  {n} x {reason} (lines {lines}{more})")
        return "\n".join(out)


def _output_paths(prefix: str) -> dict:
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "meta": prefix + META_SUFFIX}


# State of the encoding (in forked workers: inherited from the parent).
_WORKER: dict = {}


def _encode_line(line: bytes):
    """``(ids, mask, truncated)`` of one JSONL line, a ``SampleError``, or None if blank."""
    if J.is_blank(line):
        return None
    max_tokens = _WORKER["max_tokens"]
    try:
        messages = parse_chat_line(line, _WORKER["messages_key"])
        if not any(m["role"] == "assistant" for m in messages):
            raise SampleError("no assistant message", malformed=False)
        ids, mask = _WORKER["encoder"].encode(messages)
    except SampleError as err:
        return err
    truncated = len(ids) > max_tokens
    ids, mask = ids[:max_tokens], mask[:max_tokens]
    if not mask[1:].any():  # position 0 is never a label
        reason = (
            "no assistant token within --seq-length (prompt fills it)"
            if truncated
            else "no assistant token after the first token"
        )
        return SampleError(reason, malformed=False)
    return ids, mask, truncated


def prepare_sft_data(
    input_path: str,
    output_prefix: str,
    tokenizer,
    seq_length: int,
    *,
    template: str = "auto",
    chat_template: Optional[str] = None,
    messages_key: str = "messages",
    on_error: str = "fail",
    overwrite: bool = False,
    tokenizer_info: Optional[dict] = None,
    workers: int = 1,
    other_inputs: Sequence[tuple[str, Optional[str]]] = (),
) -> SFTPrepReport:
    """Turn chat JSONL into ``output_prefix.{bin,idx,sft.json}``; return the report.

    A sample keeps at most ``seq_length + 1`` tokens (it fills ``seq_length`` positions);
    longer ones are truncated on the right and counted. Skipped, always with the reason and
    line numbers in the report: samples without an assistant message, and samples whose
    prompt fills ``--seq-length`` (no assistant token left to learn). Malformed lines and
    chat-template failures raise ``ValueError`` naming the line (``on_error="fail"``) or are
    skipped the same way (``"skip"``). Outputs are written under a temporary name and renamed
    when complete; existing outputs are only replaced with ``overwrite=True``, and never when
    an output is, contains or lies inside ``input_path``, ``tokenizer_info["tokenizer_model"]``
    or one of ``other_inputs`` (``(argument name, path)``). ``workers`` > 1 encodes in forked
    processes; the output is the same.
    """
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"--seq-length must be a positive integer, got {seq_length!r}")
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"--on-error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    if not os.path.isfile(input_path):
        raise ValueError(f"--input {input_path!r}: no such file")
    if tokenizer.vocab_size >= 2**31 - 1:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit the int32 encoding")
    final = _output_paths(output_prefix)
    # Before anything is written (and before "exists", which would suggest --overwrite): no
    # output file may be, contain or lie inside an input.
    tok_model = (tokenizer_info or {}).get("tokenizer_model")
    inputs = [("--input", input_path), ("--tokenizer-model", tok_model), *other_inputs]
    for path in final.values():
        check_output_apart(path, inputs, "--output-prefix file")
    existing = [p for p in final.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise ValueError(f"--output-prefix {output_prefix!r}: {existing[0]} exists (--overwrite)")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be a positive integer, got {workers!r}")
    encoder = make_encoder(tokenizer, template, chat_template)
    _WORKER.update(encoder=encoder, max_tokens=seq_length + 1, messages_key=messages_key)
    report = SFTPrepReport()
    pool = None

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = {k: f"{p}.tmp-{os.getpid()}" for k, p in final.items()}
    builder = IndexedDatasetBuilder(tmp["bin"], dtype=np.int32)
    try:
        # Raw lines, decoded and parsed where they are encoded (megatron_gem.data.jsonl).
        lines = (raw for _, raw in J.iter_lines(input_path))
        if workers > 1:  # forked workers inherit the encoder; results come back in order
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF: no fork warning
            pool = multiprocessing.get_context("fork").Pool(workers)
            results = pool.imap(_encode_line, lines, chunksize=64)
        else:
            results = map(_encode_line, lines)
        for lineno, result in enumerate(results, start=1):
            report.lines += 1
            if result is None:
                report.blank += 1
                continue
            if isinstance(result, SampleError):
                if result.malformed and on_error == "fail":
                    raise ValueError(
                        f"{input_path}:{lineno}: {result.reason} "
                        "(pass --on-error skip to skip such lines)"
                    )
                report.skip(result.reason, lineno)
                continue
            ids, mask, truncated = result
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise ValueError(f"{input_path}:{lineno}: token id out of the vocabulary")
            stored = np.where(mask, ~ids, ids).astype(np.int32)
            builder.add_item(torch.from_numpy(stored))
            builder.end_document()
            report.kept += 1
            report.truncated += int(truncated)
            report.tokens += int(len(ids))
            report.loss_tokens += int(mask[1:].sum())
        builder.finalize(tmp["idx"])
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "encoding": "int32: prompt token t stored as t, assistant token t as ~t = -t-1",
            "source": os.path.abspath(input_path),
            "seq_length": seq_length,
            "vocab_size": int(tokenizer.vocab_size),
            "eod": int(tokenizer.eod),
            "pad": pad_or_eod(tokenizer),
            "tokenizer": tokenizer_info or {},
            **encoder.metadata(),
            "report": report.as_dict(),
        }
        with open(tmp["meta"], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        if report.kept == 0:
            raise ValueError(f"--input {input_path!r}: no sample kept\n{report.format()}")
        for k in ("bin", "idx", "meta"):  # the metadata last: its presence marks completion
            os.replace(tmp[k], final[k])
    finally:
        if pool is not None:
            pool.terminate()
        if not builder.data_file.closed:
            builder.data_file.close()
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
    return report


def decode_sample(ids: np.ndarray, mask: np.ndarray, tokenizer) -> str:
    """Text of a sample with the loss-carrying parts wrapped in [[ ]] (for eyeballing)."""
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or mask[k] != mask[start]:
            piece = tokenizer.detokenize([int(t) for t in ids[start:k]])
            out.append(f"[[{piece}]]" if mask[start] else piece)
            start = k
    return "".join(out)


# --------------------------------------------------------------------------- reading


class SFTIndexedData:
    """The samples of ``PREFIX.{bin,idx,sft.json}`` (the low-level dataset)."""

    def __init__(self, prefix: str, mmap: bool = True):
        meta_path = prefix + META_SUFFIX
        if not os.path.exists(meta_path):
            raise ValueError(
                f"SFT data path {prefix!r}: no {meta_path}; make SFT data with "
                "tools/prepare_sft_data.py (pre-training data cannot be used with --sft)"
            )
        with open(meta_path, "r", encoding="utf-8") as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT or self.meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: not {FORMAT} version {FORMAT_VERSION} data")
        self.prefix = prefix
        self.indexed = IndexedDataset(prefix, mmap=mmap)
        if self.indexed.index.dtype != np.int32:
            raise ValueError(f"{prefix}.idx: expected int32 tokens, got {self.indexed.index.dtype}")
        self.lengths = np.asarray(self.indexed.sequence_lengths, dtype=np.int64)
        self.pad = int(self.meta["pad"])

    def __len__(self) -> int:
        return len(self.lengths)

    def sample(self, i: int, max_tokens: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64, assistant_mask bool)`` of sample ``i``, at most ``max_tokens`` long."""
        n = int(self.lengths[i]) if max_tokens is None else min(int(self.lengths[i]), max_tokens)
        stored = np.asarray(self.indexed.get(int(i), 0, n), dtype=np.int64)
        mask = stored < 0
        return np.where(mask, ~stored, stored), mask

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse data made with another tokenizer (vocabulary size or eod differ)."""
        if tokenizer is None:
            return
        got = {"vocab_size": int(tokenizer.vocab_size), "eod": int(tokenizer.eod)}
        want = {k: self.meta[k] for k in got}
        if got != want:
            raise ValueError(
                f"SFT data {self.prefix!r} was made with a tokenizer with {want}, but the "
                f"training tokenizer has {got}: use the same --tokenizer-type/--tokenizer-model"
            )


def pack_next_fit(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Cut ``sizes`` (in order) into consecutive packs of total <= ``capacity``.

    Returns the pack boundaries ``b`` (pack ``k`` holds items ``b[k]:b[k+1]``). Next-fit keeps
    the shuffled order, so packing is a pure function of the seed, and is linear time. Every
    size must be in ``1..capacity``.
    """
    bounds = [0]
    used = 0
    for k, n in enumerate(sizes.tolist()):  # plain ints: ~10x faster than numpy scalars
        if used + n > capacity:
            bounds.append(k)
            used = 0
        used += n
    bounds.append(len(sizes))
    return np.asarray(bounds, dtype=np.int64)


@dataclasses.dataclass
class SFTDatasetConfig(BlendedMegatronDatasetConfig):
    """Megatron's dataset config; ``tokenizer`` (optional) is checked against the data.

    ``create_attention_mask``: emit the dense ``[1, S, S]`` block-diagonal mask (the local spec
    needs it); False (Transformer Engine's THD path) emits ``cu_seqlens`` / ``cu_seqlens_padded``
    instead and builds no S x S tensor. ``pad_to_multiple_of``: each packed sample is padded to a
    multiple of it (``2 * cp`` for context parallelism, whose THD split needs it; 1 otherwise).
    """

    create_attention_mask: bool = True
    pad_to_multiple_of: int = 1


class PackedSFTDataset(MegatronDataset):
    """Packed, prompt-masked SFT samples in Megatron's GPT batch format (see module doc)."""

    def __init__(
        self,
        dataset: SFTIndexedData,
        dataset_path: Optional[str],
        indices: np.ndarray,
        num_samples: Optional[int],
        index_split: Split,
        config: SFTDatasetConfig,
    ) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        S = int(config.sequence_length)
        self.seq_length = S
        m = int(config.pad_to_multiple_of)
        if m < 1 or S % m:
            raise ValueError(
                f"--seq-length {S} is not a multiple of {m} (2 x --context-parallel-size), "
                "which each packed sample is padded to"
            )
        self.pad_multiple = m
        self.create_attention_mask = bool(config.create_attention_mask)
        docs = np.asarray(indices, dtype=np.int64)
        if docs.size == 0:
            raise ValueError(
                f"SFT data {dataset_path!r}: the {index_split.name} split is empty "
                f"({len(dataset)} samples, --split {config.split!r}); use more samples "
                "or change --split"
            )
        lengths = dataset.lengths[docs]
        self.num_truncated = int((lengths > S + 1).sum())
        positions = np.minimum(lengths, S + 1) - 1
        keep = positions > 0
        docs, positions = docs[keep], positions[keep]
        if docs.size == 0:
            raise ValueError(f"SFT data {dataset_path!r}: no sample has 2 or more tokens")
        # Per epoch: shuffle (from the seed), then next-fit; packs are ranges of the order.
        orders, bounds, num_packs, epoch = [], [], 0, 0
        while epoch == 0 or (num_samples is not None and num_packs < num_samples):
            rng = np.random.default_rng([int(config.random_seed), index_split.value, epoch])
            order = rng.permutation(docs.size)
            b = pack_next_fit(-(-positions[order] // m) * m, S)  # padded sizes
            bounds.append(b[1:] + epoch * docs.size)
            orders.append(order)
            num_packs += len(b) - 1
            epoch += 1
        self.num_epochs = epoch
        order = np.concatenate(orders)
        self._docs = docs[order]
        self._bounds = np.concatenate([[0]] + bounds)
        self.fill = float(positions[order].sum()) / (num_packs * S)
        self._causal = None  # [S, S] "masked" template, built on first use (in each worker)
        log_single_rank(
            logger,
            logging.INFO,
            f"> SFT {index_split.name}: {docs.size} samples of {dataset_path} packed into "
            f"{num_packs} sequences of {S} over {epoch} epoch(s), {100 * self.fill:.1f}% "
            f"of positions used, {self.num_truncated} samples truncated to {S + 1} tokens",
        )

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: SFTIndexedData) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: SFTDatasetConfig) -> SFTIndexedData:
        data = SFTIndexedData(dataset_path, mmap=config.mmap_bin_files)
        data.check_tokenizer(config.tokenizer)
        return data

    def __len__(self) -> int:
        return len(self._bounds) - 1

    @staticmethod
    def _key_config_attributes() -> list[str]:
        # the padding changes the packs: part of the dataset's identity (and cache key)
        return MegatronDataset._key_config_attributes() + [
            "pad_to_multiple_of",
            "create_attention_mask",
        ]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        S = self.seq_length
        pad = self.dataset.pad
        tokens = np.full(S, pad, dtype=np.int64)
        labels = np.full(S, pad, dtype=np.int64)
        loss_mask = np.zeros(S, dtype=np.float32)
        position_ids = np.zeros(S, dtype=np.int64)
        m = self.pad_multiple
        starts = [0]  # block boundaries: 0, end of sample 1, ..., end of the last sample
        real = [0]  # cumulative real (unpadded) lengths, TE's cu_seqlens
        p = 0
        docs = self._docs[self._bounds[idx] : self._bounds[idx + 1]]
        for d in docs:
            ids, mask = self.dataset.sample(int(d), max_tokens=S + 1)
            n = len(ids) - 1
            n_pad = -(-n // m) * m
            tokens[p : p + n] = ids[:-1]
            labels[p : p + n] = ids[1:]
            loss_mask[p : p + n] = mask[1:]
            # padding up to n_pad (CP): pad tokens, loss 0, positions go on (as Megatron's SFT);
            # attention is causal, so the sample's real tokens never see it
            position_ids[p : p + n_pad] = np.arange(n_pad)
            p += n_pad
            starts.append(p)
            real.append(real[-1] + n)
        # The padding tail [p, S): its own causal block, loss 0.
        position_ids[p:] = np.arange(S - p)
        if p < S:
            starts.append(S)
            real.append(real[-1] + S - p)
        item = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
        }
        if not self.create_attention_mask:  # THD (Transformer Engine): no S x S tensor
            item["cu_seqlens"] = torch.tensor(real, dtype=torch.int32)
            item["cu_seqlens_padded"] = torch.tensor(starts, dtype=torch.int32)
            return item
        starts = starts[:-1] if starts[-1] == S else starts
        # Block-diagonal causal, True = masked: the causal mask, plus for the rows of each
        # block every column before the block (<= S^2/2 writes, no S x S arithmetic).
        if self._causal is None:
            self._causal = ~torch.ones(S, S, dtype=torch.bool).tril()
        attention_mask = self._causal.clone()
        for a, b in zip(starts[1:], starts[2:] + [S]):
            attention_mask[a:b, :a] = True
        item["attention_mask"] = attention_mask.unsqueeze(0)
        return item


# --------------------------------------------------------------------------- from args


def _default_is_built_on_rank() -> bool:
    """Megatron's GPT convention: first/last pipeline stage, tensor-parallel rank 0."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return True
    stage_needs_data = ps.is_pipeline_first_stage(ignore_virtual=True) or ps.is_pipeline_last_stage(
        ignore_virtual=True
    )
    return stage_needs_data and ps.get_tensor_model_parallel_rank() == 0


def _tokenizer_for(args):
    """The training tokenizer: Megatron's global one if built, else built from ``args``."""
    try:
        from megatron.training import get_tokenizer

        tok = get_tokenizer()
        if tok is not None:
            return tok
    except Exception:  # not initialised (tests, tools)
        pass
    if getattr(args, "tokenizer_type", None) is None:
        return None
    return tokenizer_from_megatron_args(args)


def build_sft_datasets(
    args,
    train_val_test_num_samples,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    tokenizer: Any = None,
):
    """``(train, valid, test)`` packed SFT datasets from Megatron's arguments.

    Reads ``args.data_path`` (with ``args.split``) or ``args.train/valid/test_data_path``
    (also ``data_args_path``/``per_split_data_args_path``), ``args.seq_length``,
    ``args.seed``, and, when present, ``data_cache_path``, ``mmap_bin_files``,
    ``num_dataset_builder_threads``, ``mid_level_dataset_surplus``, ``multiple_validation_sets``,
    ``full_validation``. Each dataset's ``len`` is at least the requested number of samples.
    Returns None for a split on ranks that do not build data (``is_built_on_rank``; default:
    Megatron's GPT rule) or when that split is not requested.

    With ``--transformer-impl transformer_engine`` the samples carry THD ``cu_seqlens`` and no
    dense mask, and with ``--context-parallel-size`` cp > 1 each packed sample is padded to a
    multiple of ``2 * cp`` (``SFTDatasetConfig``); other implementations get the dense mask.
    """
    from megatron.training.utils import get_blend_and_blend_per_split

    def arg(name, default=None):
        return getattr(args, name, default)

    seq_length = arg("seq_length")
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"--seq-length must be a positive integer, got {seq_length!r}")
    ns = copy.copy(args)
    for name in (
        "data_path",
        "data_args_path",
        "per_split_data_args_path",
        "train_data_path",
        "valid_data_path",
        "test_data_path",
    ):
        setattr(ns, name, arg(name))
    blend, blend_per_split = get_blend_and_blend_per_split(ns)
    if blend is None and blend_per_split is None:
        raise ValueError(
            "SFT needs --data-path (or --train-data-path/--valid-data-path/--test-data-path) "
            "pointing at data made by tools/prepare_sft_data.py"
        )
    split = arg("split")
    if blend is not None and split is None:
        split = "969, 30, 1"  # Megatron's legacy default for --data-path without --split
    if tokenizer is None:
        tokenizer = _tokenizer_for(args)
    thd = arg("transformer_impl") == "transformer_engine"
    cp = int(arg("context_parallel_size", 1) or 1)
    config = SFTDatasetConfig(
        create_attention_mask=not thd,
        pad_to_multiple_of=2 * cp if thd and cp > 1 else 1,
        random_seed=int(arg("seed", 1234)),
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split if blend is not None else None,
        multiple_validation_sets=arg("multiple_validation_sets"),
        full_validation=arg("full_validation"),
        num_dataset_builder_threads=arg("num_dataset_builder_threads", 1) or 1,
        path_to_cache=arg("data_cache_path"),
        mmap_bin_files=arg("mmap_bin_files", True),
        tokenizer=tokenizer,
        mid_level_dataset_surplus=arg("mid_level_dataset_surplus", 0.005),
    )
    builder = BlendedMegatronDatasetBuilder(
        PackedSFTDataset,
        list(train_val_test_num_samples),
        is_built_on_rank or _default_is_built_on_rank,
        config,
    )
    train, valid, test = builder.build()
    return train, valid, test
