#!/usr/bin/env python
"""JSONL text -> Megatron indexed dataset for pre-training (``--data-path``); see docs/data.md.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --workers 4
    # writes data/corpus_text_document.{bin,idx}; train with --data-path data/corpus_text_document

Flags follow upstream Megatron-LM's tools/preprocess_data.py (not supported: --split-sentences,
--keep-newlines, --partitions, --lang). Documents end with eod unless --no-append-eod.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing
# Megatron warns at import about missing GPU libraries (TE, Apex): irrelevant to data tools.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

from megatron_gem.data.tokenizer import add_tokenizer_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.{bin,idx}")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (default text)")
    p.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end every document with the eod token (default: on)",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="malformed line: stop with its line number (default) or skip and count it")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--log-interval", type=int, default=100000, help="lines between progress prints")
    add_tokenizer_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
