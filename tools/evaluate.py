#!/usr/bin/env python
"""Evaluate quality, diversity and forgetting on your own JSONL (see docs/evaluation.md).

    python tools/evaluate.py --prompts eval.jsonl --generations gens.jsonl --out results.json
    python tools/evaluate.py --prompts eval.jsonl --model hf_dir --n 16 --heldout heldout.jsonl
        --base-model hf_base_dir --out results.json --csv results.csv   (one command line)

The CLI is ``megatron_gem.eval.cli`` (also ``python -m megatron_gem.eval``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

# build_parser too: the tool interface (launch_check --tool checks arguments with it).
from megatron_gem.eval.cli import build_parser, main  # noqa: E402,F401

if __name__ == "__main__":
    raise SystemExit(main())
