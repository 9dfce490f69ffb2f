#!/usr/bin/env python
"""Chat JSONL -> prompt-masked SFT data for ``--sft --data-path PREFIX``; see docs/data.md.

    python tools/prepare_sft_data.py --input chat.jsonl --output-prefix data/chat \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --seq-length 2048

Each line: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}.
Only assistant tokens carry loss. Prints how many samples were kept, truncated and skipped (and
why, with line numbers). Writes PREFIX.bin, PREFIX.idx and PREFIX.sft.json.
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--input", required=True, help="chat JSONL file")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.{bin,idx,sft.json}")
    p.add_argument("--seq-length", type=int, required=True,
                   help="training --seq-length; longer samples are truncated (and counted)")
    p.add_argument("--template", choices=("auto", "chat", "plain"), default="auto",
                   help="chat: the HF tokenizer's chat template; plain: the documented plain "
                   "template; auto (default): chat when the tokenizer has a chat template")
    p.add_argument("--chat-template", default=None,
                   help="a jinja chat template, or a file holding one (overrides the tokenizer's)")
    p.add_argument("--messages-key", default="messages", help="JSON key of the message list")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="malformed line: stop with its line number (default) or skip and count it")
    p.add_argument("--workers", type=int, default=1, help="encoding processes (same output)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="print the first N samples with the loss-carrying text in [[ ]]")
    add_tokenizer_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
                raise ValueError(f"--chat-template {template_file}: not UTF-8 ({err.reason} "
                                 f"at byte {err.start})") from None
        elif chat_template is not None and "{" not in chat_template:
            # Neither a file nor jinja (a template without {{ }} / {% %} cannot show messages):
            # most likely a mistyped path, which would otherwise render as literal text.
            raise ValueError(f"--chat-template {chat_template!r}: no such file, and not a jinja "
                             "template (no '{{' or '{%')")
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
            tokenizer_info={"tokenizer_type": args.tokenizer_type,
                            "tokenizer_model": args.tokenizer_model},
            other_inputs=[("--chat-template", template_file), ("--vocab-file", args.vocab_file),
                          ("--merge-file", args.merge_file)],
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.format())
    if args.show:
        data = SFTIndexedData(args.output_prefix)
        for i in range(min(args.show, len(data))):
            print(f"--- sample {i}\n{decode_sample(*data.sample(i), tokenizer)}")
    print(f"train with: --sft --data-path {args.output_prefix} --seq-length {args.seq_length} "
          f"--tokenizer-type {args.tokenizer_type} --tokenizer-model {args.tokenizer_model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
