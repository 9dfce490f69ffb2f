#!/usr/bin/env python
"""Train a SentencePiece model for ``--tokenizer-type SentencePieceTokenizer``; see docs/data.md.

    python tools/train_tokenizer.py --input corpus.jsonl chat.jsonl --model-prefix tok \
        --vocab-size 8000
    # writes tok.model (use --tokenizer-model tok.model) and tok.vocab

Inputs: .jsonl/.json lines give their --json-key text, or for chat lines each message as it
reads in the plain SFT template ("User: ..."); other files give their lines. Special ids:
unk 0, bos 1, eos 2 (Megatron's eod), pad 3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("bpe", "unigram", "char", "word"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--byte-fallback", action="store_true",
                   help="unknown characters become byte tokens (needs vocab >= ~300)")
    p.add_argument("--user-defined-symbols", nargs="*", default=[],
                   help="pieces always kept whole")
    p.add_argument("--json-key", default="text", help="text key of JSONL inputs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
