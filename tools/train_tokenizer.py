#!/usr/bin/env python
"""Train a SentencePiece model for ``--tokenizer-type SentencePieceTokenizer``; see docs/data.md.

    python tools/train_tokenizer.py --input corpus.jsonl chat.jsonl --model-prefix tok \
        --vocab-size 8000
    # writes tok.model (use --tokenizer-model tok.model) and tok.vocab

Inputs: .jsonl/.json lines give their --json-key text, or for chat lines each message as it
reads in the plain SFT template ("User: ..."); other files give their lines. Special ids:
unk 0, bos 1, eos 2 (Megatron's eod), pad 3.

The CLI is ``megatron_gem.data.cli.train_tokenizer_main``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

# build_parser too: the tool interface (launch_check --tool checks arguments with it).
from megatron_gem.data.cli import build_train_tokenizer_parser as build_parser  # noqa: E402,F401
from megatron_gem.data.cli import train_tokenizer_main as main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
