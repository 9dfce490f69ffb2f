"""The data CLIs: SFT data preparation, pre-training data preprocessing, tokenizer training.

``tools/prepare_sft_data.py``, ``tools/preprocess_data.py`` and ``tools/train_tokenizer.py`` are
shims over ``prepare_sft_main``, ``preprocess_main`` and ``train_tokenizer_main``; each takes
``argv`` and returns the exit status (2: refused input, with one ``error:`` line on stderr). The
libraries they call (``megatron_gem.data.sft``, ``.text``, ``.tokenizer``) import Megatron, so
they are imported inside the mains: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from megatron_gem.data.chat import TEMPLATES
from megatron_gem.data.tokenizer import add_tokenizer_args

# Megatron warns at import about missing GPU libraries (TE, Apex): irrelevant to data tools.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

__all__ = [
    "build_prepare_sft_parser",
    "build_preprocess_parser",
    "build_train_tokenizer_parser",
    "prepare_sft_main",
    "preprocess_main",
    "train_tokenizer_main",
]


# ---- tools/prepare_sft_data.py ----------------------------------------------------------------

# The --help text (the tool's docstring).
PREPARE_SFT_USAGE = """\
Chat JSONL -> prompt-masked SFT data for ``--sft --data-path PREFIX``; see docs/data.md.

    python tools/prepare_sft_data.py --input chat.jsonl --output-prefix data/chat \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --seq-length 2048

Each line: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}.
Only assistant tokens carry loss. Prints how many samples were kept, truncated and skipped (and
why, with line numbers). Writes PREFIX.bin, PREFIX.idx and PREFIX.sft.json.
"""


def build_prepare_sft_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=PREPARE_SFT_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="chat JSONL file")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.{bin,idx,sft.json}")
    p.add_argument(
        "--seq-length",
        type=int,
        required=True,
        help="training --seq-length; longer samples are truncated (and counted)",
    )
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        default="auto",
        help="chat: the HF tokenizer's chat template; plain: the documented plain "
        "template; auto (default): chat when the tokenizer has a chat template",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="a jinja chat template, or a file holding one (overrides the tokenizer's)",
    )
    p.add_argument("--messages-key", default="messages", help="JSON key of the message list")
    p.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="malformed line: stop with its line number (default) or skip and count it",
    )
    p.add_argument("--workers", type=int, default=1, help="encoding processes (same output)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--show",
        type=int,
        default=0,
        metavar="N",
        help="print the first N samples with the loss-carrying text in [[ ]]",
    )
    add_tokenizer_args(p)
    return p


def prepare_sft_main(argv=None) -> int:
    args = build_prepare_sft_parser().parse_args(argv)
    from megatron_gem.data.sft import SFTIndexedData, decode_sample, prepare_sft_data
    from megatron_gem.data.tokenizer import tokenizer_from_args

    chat_template = args.chat_template
    template_file = None
    try:
        if chat_template is not None and os.path.isfile(chat_template):
            template_file = chat_template
            try:
                with open(chat_template, "r", encoding="utf-8") as f:
                    chat_template = f.read()
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"--chat-template {template_file}: not UTF-8 ({err.reason} at byte {err.start})"
                ) from None
        elif chat_template is not None and "{" not in chat_template:
            # Neither a file nor jinja (a template without {{ }} / {% %} cannot show messages):
            # most likely a mistyped path, which would otherwise render as literal text.
            raise ValueError(
                f"--chat-template {chat_template!r}: no such file, and not a jinja "
                "template (no '{{' or '{%')"
            )
        tokenizer = tokenizer_from_args(args)
        report = prepare_sft_data(
            args.input,
            args.output_prefix,
            tokenizer,
            args.seq_length,
            template=args.template,
            chat_template=chat_template,
            messages_key=args.messages_key,
            on_error=args.on_error,
            overwrite=args.overwrite,
            workers=args.workers,
            tokenizer_info={
                "tokenizer_type": args.tokenizer_type,
                "tokenizer_model": args.tokenizer_model,
            },
            other_inputs=[
                ("--chat-template", template_file),
                ("--vocab-file", args.vocab_file),
                ("--merge-file", args.merge_file),
            ],
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.format())
    if args.show:
        data = SFTIndexedData(args.output_prefix)
        for i in range(min(args.show, len(data))):
            print(f"--- sample {i}\n{decode_sample(*data.sample(i), tokenizer)}")
    print(
        f"train with: --sft --data-path {args.output_prefix} --seq-length {args.seq_length} "
        f"--tokenizer-type {args.tokenizer_type} --tokenizer-model {args.tokenizer_model}"
    )
    return 0


# ---- tools/preprocess_data.py -----------------------------------------------------------------

# The --help text (the tool's docstring).
PREPROCESS_USAGE = """\
JSONL text -> Megatron indexed dataset for pre-training (``--data-path``); see docs/data.md.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --workers 4
    # writes data/corpus_text_document.{bin,idx}; train with --data-path data/corpus_text_document

Flags follow upstream Megatron-LM's tools/preprocess_data.py (not supported: --split-sentences,
--keep-newlines, --partitions, --lang). Documents end with eod unless --no-append-eod.
"""


def build_preprocess_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=PREPROCESS_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.{bin,idx}")
    p.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys to extract (default text)"
    )
    p.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end every document with the eod token (default: on)",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="malformed line: stop with its line number (default) or skip and count it",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--log-interval", type=int, default=100000, help="lines between progress prints")
    add_tokenizer_args(p)
    return p


def preprocess_main(argv=None) -> int:
    args = build_preprocess_parser().parse_args(argv)
    from megatron_gem.data.text import preprocess_jsonl

    try:
        report = preprocess_jsonl(
            args.input,
            args.output_prefix,
            args.tokenizer_type,
            args.tokenizer_model,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            on_error=args.on_error,
            overwrite=args.overwrite,
            log_interval=args.log_interval,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.format())
    return 0


# ---- tools/train_tokenizer.py -----------------------------------------------------------------

# The --help text (the tool's docstring).
TRAIN_TOKENIZER_USAGE = """\
Train a SentencePiece model for ``--tokenizer-type SentencePieceTokenizer``; see docs/data.md.

    python tools/train_tokenizer.py --input corpus.jsonl chat.jsonl --model-prefix tok \
        --vocab-size 8000
    # writes tok.model (use --tokenizer-model tok.model) and tok.vocab

Inputs: .jsonl/.json lines give their --json-key text, or for chat lines each message as it
reads in the plain SFT template ("User: ..."); other files give their lines. Special ids:
unk 0, bos 1, eos 2 (Megatron's eod), pad 3.
"""


def build_train_tokenizer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=TRAIN_TOKENIZER_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("bpe", "unigram", "char", "word"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument(
        "--byte-fallback",
        action="store_true",
        help="unknown characters become byte tokens (needs vocab >= ~300)",
    )
    p.add_argument("--user-defined-symbols", nargs="*", default=[], help="pieces always kept whole")
    p.add_argument("--json-key", default="text", help="text key of JSONL inputs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model")
    return p


def train_tokenizer_main(argv=None) -> int:
    args = build_train_tokenizer_parser().parse_args(argv)
    from megatron_gem.data.tokenizer import iter_training_text, train_sentencepiece

    try:
        path = train_sentencepiece(
            iter_training_text(args.input, text_key=args.json_key),
            args.model_prefix,
            args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            user_defined_symbols=args.user_defined_symbols,
            byte_fallback=args.byte_fallback,
            overwrite=args.overwrite,
            inputs=args.input,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}; use --tokenizer-type SentencePieceTokenizer --tokenizer-model {path}")
    return 0
