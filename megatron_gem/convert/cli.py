"""Convert checkpoints between HuggingFace (Llama, Qwen2) and megatron-gem (Megatron-LM format).

    python tools/convert_checkpoint.py hf-to-megatron --hf DIR --out CKPT --tp 2 --pp 2
    python tools/convert_checkpoint.py megatron-to-hf --load CKPT --out DIR [--tokenizer HF_DIR]

Thin CLI over ``megatron_gem.convert`` (see docs/conversion.md). Runs on CPUs, one process per
model shard; nothing is written before the input has been validated, an existing output is
replaced only with ``--overwrite`` and never when it overlaps an input, and output appears only
once complete. SIGTERM (like Ctrl-C) stops the workers and removes the temporary directory; if
the process is killed outright, its workers stop with it and the next conversion to the same
``--out`` removes what it left.
"""

from __future__ import annotations

import argparse
import signal
import sys

from megatron_gem.convert.api import hf_to_megatron, megatron_to_hf
from megatron_gem.convert.checkpoints import IncompleteOutputError


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("hf-to-megatron", help="HF directory -> Megatron release checkpoint")
    i.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    i.add_argument(
        "--out",
        required=True,
        help="Megatron checkpoint directory to create "
        "(pass it to megatron_gem.train as --load or --finetune --load)",
    )
    i.add_argument(
        "--tp",
        type=_positive,
        default=1,
        help="tensor-parallel size: the vocabulary is padded for it (train with the "
        "same --tensor-model-parallel-size or --use-checkpoint-args); one process per "
        "TP x PP shard",
    )
    i.add_argument(
        "--pp",
        type=_positive,
        default=1,
        help="pipeline stages of the conversion (memory per process ~ model/(TP*PP)); "
        "the checkpoint itself loads at any pipeline size",
    )
    i.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="parameter dtype of the checkpoint (default: the HF config's dtype)",
    )
    i.add_argument(
        "--make-vocab-size-divisible-by",
        type=_positive,
        default=128,
        help="as Megatron's flag (default 128)",
    )
    i.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    e = sub.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF directory")
    e.add_argument(
        "--load",
        required=True,
        help="Megatron checkpoint directory (the entry's "
        "--save; holds latest_checkpointed_iteration.txt)",
    )
    e.add_argument("--out", required=True, help="HF directory to create")
    e.add_argument(
        "--iteration", type=int, default=None, help="iteration to export (default: the latest)"
    )
    e.add_argument(
        "--tokenizer",
        default=None,
        help="HF directory whose tokenizer files (and generation_config.json) are "
        "copied and whose vocabulary size/special token ids are used, e.g. the "
        "original HF model",
    )
    e.add_argument(
        "--vocab-size",
        type=_positive,
        default=None,
        help="real vocabulary size (default: from --tokenizer or the checkpoint)",
    )
    e.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="dtype of the safetensors (default: the checkpoint's)",
    )
    e.add_argument(
        "--pp",
        type=_positive,
        default=1,
        help="processes, one pipeline stage each (memory per process ~ model/PP)",
    )
    e.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


class _Stopped(BaseException):
    """SIGTERM, raised where the conversion is so that its clean-up runs."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
    raise _Stopped


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if a.command == "hf-to-megatron":
            flags = hf_to_megatron(
                a.hf,
                a.out,
                a.tp,
                a.pp,
                dtype=a.dtype,
                make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
                overwrite=a.overwrite,
            )
            print(
                f"wrote {a.out}; train it with megatron_gem.train and these model flags "
                f"(also in {a.out}/megatron_args.txt):"
            )
            print(" ".join(flags + ["--tensor-model-parallel-size", str(a.tp), "--load", a.out]))
        else:
            out = megatron_to_hf(
                a.load,
                a.out,
                iteration=a.iteration,
                pp=a.pp,
                dtype=a.dtype,
                tokenizer_dir=a.tokenizer,
                vocab_size=a.vocab_size,
                max_shard_size=a.max_shard_size,
                overwrite=a.overwrite,
            )
            print(f"wrote {out}")
    except ValueError as err:
        parser.error(str(err))
    except IncompleteOutputError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    except (_Stopped, KeyboardInterrupt) as err:
        what = "SIGTERM" if isinstance(err, _Stopped) else "Ctrl-C"
        print(
            f"{parser.prog}: stopped by {what}: nothing was published, the temporary directory "
            f"was removed and {a.out} is as it was",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if isinstance(err, _Stopped) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
