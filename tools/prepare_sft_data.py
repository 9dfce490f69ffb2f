#!/usr/bin/env python
"""Chat JSONL -> prompt-masked SFT data for ``--sft --data-path PREFIX``; see docs/data.md.

    python tools/prepare_sft_data.py --input chat.jsonl --output-prefix data/chat \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --seq-length 2048

Each line: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}.
Only assistant tokens carry loss. Prints how many samples were kept, truncated and skipped (and
why, with line numbers). Writes PREFIX.bin, PREFIX.idx and PREFIX.sft.json.

The CLI is ``megatron_gem.data.cli.prepare_sft_main``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

# build_parser too: the tool interface (launch_check --tool checks arguments with it).
from megatron_gem.data.cli import build_prepare_sft_parser as build_parser  # noqa: E402,F401
from megatron_gem.data.cli import prepare_sft_main as main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
