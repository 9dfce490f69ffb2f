"""Convert checkpoints between HuggingFace (Llama, Qwen2) and megatron-gem (Megatron-LM format).

    python tools/convert_checkpoint.py hf-to-megatron --hf DIR --out CKPT --tp 2 --pp 2
    python tools/convert_checkpoint.py megatron-to-hf --load CKPT --out DIR [--tokenizer HF_DIR]

A shim: the parser and ``main`` are ``megatron_gem.convert.cli`` (also ``python -m
megatron_gem.convert``); ``build_parser`` is here too for the launch check, which reads a tool's
arguments from its file.
"""

from megatron_gem.convert.cli import build_parser, main  # noqa: F401 (build_parser: launch check)

if __name__ == "__main__":
    raise SystemExit(main())
