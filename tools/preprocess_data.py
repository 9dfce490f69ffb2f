#!/usr/bin/env python
"""JSONL text -> Megatron indexed dataset for pre-training (``--data-path``); see docs/data.md.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --workers 4
    # writes data/corpus_text_document.{bin,idx}; train with --data-path data/corpus_text_document

Flags follow upstream Megatron-LM's tools/preprocess_data.py (not supported: --split-sentences,
--keep-newlines, --partitions, --lang). Documents end with eod unless --no-append-eod.

The CLI is ``megatron_gem.data.cli.preprocess_main``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

# build_parser too: the tool interface (launch_check --tool checks arguments with it).
from megatron_gem.data.cli import build_preprocess_parser as build_parser  # noqa: E402,F401
from megatron_gem.data.cli import preprocess_main as main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
