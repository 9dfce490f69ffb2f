"""Checks of the training entry's inputs, run before ``pretrain()`` starts anything.

Megatron meets many bad inputs with a warning and a random start, a torch stack trace, or an
endless loop. ``check_inputs(args)`` refuses them first with one :class:`InputError` line that
names the flag, the path and what to do (``megatron_gem.train.entry.main`` prints it and exits 2):

* ``--finetune`` / ``--pretrained-checkpoint`` whose directory holds no checkpoint (Megatron
  would only warn and train from random weights);
* the checkpoint to load: a tracker file that names nothing readable, a missing ``iter_*``
  directory, a torch_dist save without its ``.metadata`` (cut off mid-save) or with a ``.distcp``
  shorter than the offsets its ``.metadata`` records, a ``.pt`` that is not a whole zip archive;
  the newest earlier complete iteration is offered as ``--ckpt-step N``;
* a ``--tokenizer-model`` that does not load as the ``--tokenizer-type``;
* pre-training ``--data-path`` prefixes: SFT data (a ``PREFIX.sft.json`` of
  ``tools/prepare_sft_data.py``) without ``--sft``, missing ``.bin``/``.idx``, token ids outside
  ``[0, padded vocabulary)``, and a ``--split`` part that gets no document (Megatron's GPT
  dataset then loops forever: zero tokens per epoch never reach the requested count).

Token ids are checked without a full scan: when the ``.idx`` dtype cannot hold an id as large
as the padded vocabulary (e.g. uint16 under a 65536+ vocabulary) nothing is read; otherwise a
sample is read from the memory-mapped ``.bin`` (its first 1M tokens and 16 evenly spaced
windows of 64K, at most ~2M tokens: all of a small file).
"""

from __future__ import annotations

import os
import re
import struct
import zipfile

import numpy as np

__all__ = [
    "InputError",
    "check_inputs",
    "check_load",
    "check_checkpoint_dir",
    "check_pretraining_data",
]

TRACKER = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
_INDEX_HEADER = b"MMIDIDX\x00\x00"  # Megatron's IndexedDataset .idx header (indexed_dataset.py)
SAMPLE_HEAD = 1 << 20
SAMPLE_WINDOWS = 16
SAMPLE_WINDOW = 1 << 16


class InputError(ValueError):
    """A bad input of the training entry: one line, printed by ``main`` (exit status 2)."""


# --------------------------------------------------------------------------- checkpoints
def _iter_dir(load_dir: str, iteration: int, release: bool = False) -> str:
    # Megatron's get_checkpoint_name(..., return_base_dir=True)
    return os.path.join(load_dir, "release" if release else f"iter_{iteration:07d}")


def _iterations(load_dir: str) -> list[int]:
    try:
        names = os.listdir(load_dir)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_DIR.match, names) if m)


def checkpoint_damage(ckpt_dir: str) -> str | None:
    """Why the checkpoint directory ``ckpt_dir`` cannot load (one phrase), or None if it is whole.

    torch_dist / torch_dcp: ``.metadata`` (written last, by rename) must load and every
    ``.distcp`` must reach the end of the last item it records. torch: every ``.pt`` must be a
    whole zip archive (a cut-short file has no end-of-archive record). Sizes only: no tensor
    is read.
    """
    if not os.path.isdir(ckpt_dir):
        return f"{ckpt_dir} does not exist"
    names = os.listdir(ckpt_dir)
    if (
        any(n.endswith(".distcp") for n in names)
        or "metadata.json" in names
        or ".metadata" in names
    ):
        meta = os.path.join(ckpt_dir, ".metadata")
        if not os.path.isfile(meta):
            return f"{meta} is missing (the save did not finish)"
        try:
            from torch.distributed.checkpoint import FileSystemReader

            metadata = FileSystemReader(ckpt_dir).read_metadata()
        except Exception as err:  # a damaged pickle raises anything
            return f"{meta} does not load ({type(err).__name__})"
        need: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            end = int(info.offset) + int(info.length)
            need[info.relative_path] = max(need.get(info.relative_path, 0), end)
        for rel, end in sorted(need.items()):
            path = os.path.join(ckpt_dir, rel)
            if not os.path.isfile(path):
                return f"{path} is missing"
            size = os.path.getsize(path)
            if size < end:
                return f"{path} is cut short ({size} bytes, its .metadata needs {end})"
        return None
    pts = [
        os.path.join(root, n)
        for root, _, files in os.walk(ckpt_dir)
        for n in files
        if n.endswith(".pt")
    ]
    if not pts:
        return f"{ckpt_dir} holds no checkpoint files"
    for path in sorted(pts):
        if not zipfile.is_zipfile(path):
            return f"{path} is not a whole torch file (cut short?)"
    return None


def _earlier_hint(load_dir: str, iteration: int) -> str:
    for it in reversed([i for i in _iterations(load_dir) if i < iteration]):
        if checkpoint_damage(_iter_dir(load_dir, it)) is None:
            return f"; iteration {it} is complete: pass --ckpt-step {it} to load it"
    return f"; {load_dir} has no earlier complete checkpoint"


def check_checkpoint_dir(flag: str, load_dir: str, ckpt_step: int | None = None) -> bool:
    """Check the checkpoint Megatron would load from ``load_dir``; False when there is none.

    The iteration is ``ckpt_step`` if given, else the tracker file's (as Megatron reads it).
    """
    tracker = os.path.join(load_dir, TRACKER)
    release = False
    if ckpt_step:
        iteration = int(ckpt_step)
    elif os.path.isfile(tracker):
        with open(tracker, "r", encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        if text == "release":
            iteration, release = 0, True
        elif text.isdigit():
            iteration = int(text)
        else:  # e.g. empty: a save killed between opening and writing it
            last = _iterations(load_dir)
            raise InputError(
                f"argument {flag}: {tracker} names no iteration "
                f"(holds {text[:20]!r}; a save was cut off?)"
                + (
                    _earlier_hint(load_dir, last[-1] + 1)
                    if last
                    else f"; {load_dir} has no iter_* checkpoint"
                )
            )
    else:
        return False
    ckpt_dir = _iter_dir(load_dir, iteration, release)
    damage = checkpoint_damage(ckpt_dir)
    if damage is not None:
        what = "is missing" if not os.path.isdir(ckpt_dir) else f"is damaged: {damage}"
        source = (
            f"--ckpt-step {iteration}" if ckpt_step else f"{TRACKER} names iteration {iteration}"
        )
        raise InputError(
            f"argument {flag}: checkpoint {ckpt_dir} ({source}) {what}"
            + _earlier_hint(load_dir, iteration)
        )
    return True


def check_load(args) -> None:
    """``--load`` / ``--pretrained-checkpoint`` / ``--finetune`` as Megatron's load_checkpoint
    uses them."""
    load, pretrained = getattr(args, "load", None), getattr(args, "pretrained_checkpoint", None)
    step = getattr(args, "ckpt_step", None)
    if pretrained is not None:
        # Megatron: resume from --load when it has a tracker file, else fine-tune from this one
        if load is not None and os.path.isfile(os.path.join(load, TRACKER)):
            check_checkpoint_dir("--load", load, step)
            return
        if not check_checkpoint_dir("--pretrained-checkpoint", pretrained, step):
            raise InputError(
                f"argument --pretrained-checkpoint: {pretrained!r} holds no checkpoint "
                f"(no {TRACKER}); give the directory a training run saved to (--save)"
            )
        return
    if getattr(args, "finetune", False):
        if load is None:
            raise InputError(
                "argument --finetune: needs --load DIR (the checkpoint to fine-tune from)"
            )
        # Megatron may also load a non-persistent checkpoint (not checked here)
        non_persistent = getattr(args, "non_persistent_global_ckpt_dir", None) or os.path.join(
            load, "non_persistent"
        )
        if not check_checkpoint_dir("--load", load, step) and not os.path.isdir(non_persistent):
            raise InputError(
                f"argument --load: {load!r} holds no checkpoint (no {TRACKER}), "
                "so --finetune would train from random weights; give the directory a training "
                "run saved to (--save)"
            )
        return
    if load is not None:
        check_checkpoint_dir("--load", load, step)  # none there: a fresh start, as in Megatron


# --------------------------------------------------------------------------- tokenizer
def padded_vocab_size(args) -> int:
    """The model's vocabulary as Megatron pads it (also checks ``--tokenizer-model``)."""
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    from megatron_gem.data.tokenizer import tokenizer_from_megatron_args

    try:
        tokenizer = tokenizer_from_megatron_args(args)
    except ValueError as err:
        if not str(err).startswith("--tokenizer-model"):
            raise
        raise InputError(f"argument {err}") from err
    if getattr(args, "padded_vocab_size", None):
        return int(args.padded_vocab_size)
    return int(vocab_size_with_padding(tokenizer.vocab_size, args, logging_enabled=False))


# --------------------------------------------------------------------------- pre-training data
def _data_prefixes(args) -> list[tuple[str, str, bool]]:
    """``(flag, prefix, split by --split)`` of every pre-training dataset."""
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    out = []
    if blend is not None:
        out += [("--data-path", p, True) for p in blend[0]]
    for flag, b in zip(
        ("--train-data-path", "--valid-data-path", "--test-data-path"), blend_per_split or ()
    ):
        if b is not None:
            out += [(flag, p, False) for p in b[0]]
    return out


def _read_index_header(flag: str, prefix: str):
    from megatron.core.datasets.indexed_dataset import DType

    idx = prefix + ".idx"
    with open(idx, "rb") as f:
        head = f.read(len(_INDEX_HEADER) + 8 + 1 + 8)
    if len(head) < len(_INDEX_HEADER) + 17 or not head.startswith(_INDEX_HEADER):
        raise InputError(
            f"argument {flag}: {idx} is not a Megatron index file "
            "(make it with tools/preprocess_data.py)"
        )
    code = head[len(_INDEX_HEADER) + 8]
    (sequences,) = struct.unpack("<Q", head[len(_INDEX_HEADER) + 9 :])
    return np.dtype(DType.dtype_from_code(code)), int(sequences)


def _sample_ids(path: str, dtype: np.dtype) -> np.ndarray:
    tokens = np.memmap(path, dtype=dtype, mode="r")
    n = tokens.shape[0]
    if n <= SAMPLE_HEAD + SAMPLE_WINDOWS * SAMPLE_WINDOW:
        return np.asarray(tokens)
    starts = np.linspace(SAMPLE_HEAD, n - SAMPLE_WINDOW, SAMPLE_WINDOWS).astype(np.int64)
    return np.concatenate(
        [np.asarray(tokens[:SAMPLE_HEAD])]
        + [np.asarray(tokens[s : s + SAMPLE_WINDOW]) for s in starts]
    )


def _split_parts(split: str) -> list:
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def check_pretraining_data(args, padded_vocab: int) -> None:
    """SFT data, missing files, out-of-vocabulary ids and empty ``--split`` parts (module doc)."""
    from megatron_gem.data.sft import META_SUFFIX

    if getattr(args, "mock_data", False):
        return
    sft = bool(getattr(args, "sft", False))
    for flag, prefix, split_here in _data_prefixes(args):
        if not sft and os.path.isfile(prefix + META_SUFFIX):
            raise InputError(
                f"argument {flag}: {prefix!r} is SFT data ({prefix}{META_SUFFIX}, "
                "from tools/prepare_sft_data.py): pass --sft to fine-tune on it, "
                "or make pre-training data with tools/preprocess_data.py"
            )
        if sft:
            continue  # megatron_gem.data.sft checks its own format
        for ext in (".idx", ".bin"):
            if not os.path.isfile(prefix + ext):
                raise InputError(
                    f"argument {flag}: {prefix!r}: no {prefix}{ext} "
                    "(give the prefix tools/preprocess_data.py printed, without .bin/.idx)"
                )
        dtype, sequences = _read_index_header(flag, prefix)
        bound_ok = dtype.kind == "u" and np.iinfo(dtype).max < padded_vocab
        if not bound_ok:
            ids = _sample_ids(prefix + ".bin", dtype)
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= padded_vocab):
                bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                raise InputError(
                    f"argument {flag}: {prefix}.bin holds token id {bad}, outside the padded "
                    f"vocabulary of {padded_vocab} (--tokenizer-type {args.tokenizer_type}): "
                    "the data was made with another tokenizer; preprocess it with this one"
                )
        if split_here:
            for part, bounds in zip(("train", "validation", "test"), _split_parts(args.split)):
                if bounds is None:
                    continue
                # the document range Megatron's builder gives this part
                # (_build_megatron_dataset_splits)
                count = int(round(bounds[1] * sequences)) - int(round(bounds[0] * sequences))
                if count <= 0:
                    raise InputError(
                        f"argument --split: the {part} part of {prefix!r} gets no document "
                        f"({sequences} documents, --split {args.split!r}); give it a larger "
                        "share, 0 to drop it, or use more documents"
                    )


# --------------------------------------------------------------------------- all
def check_inputs(args) -> None:
    """Every check above, in the order a run would meet them. Raises :class:`InputError`."""
    check_load(args)
    padded = padded_vocab_size(args)
    check_pretraining_data(args, padded)
