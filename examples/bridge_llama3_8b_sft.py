"""Llama-3 8B SFT with the GEM loss through Megatron-Bridge's own recipe and training loop.

NOT RUN by this project: megatron-bridge (0.6.x) imports Transformer Engine unconditionally and
this project's machines have neither TE nor a GPU with it. Written against megatron-bridge
0.6.2's API (``llama3_8b_sft_config``, ``finetune``, the model provider's pre-wrap hooks); see
docs/bridge.md. On a GPU node with ``pip install "megatron-gem[bridge]"``:

    # the base model as a Megatron checkpoint, once (Bridge's AutoBridge)
    python -c "from megatron.bridge import AutoBridge; \
        AutoBridge.import_ckpt('meta-llama/Meta-Llama-3-8B', '/ckpt/llama3-8b')"
    torchrun --nproc-per-node 2 examples/bridge_llama3_8b_sft.py \
        --pretrained-checkpoint /ckpt/llama3-8b --save /ckpt/llama3-8b-sft-gem

The recipe (TP2, SQuAD by default, packed sequences of 4096) is Bridge's; this script changes
the loss only (``megatron_gem.bridge.use_gem``: one call) and a few run settings. ``--loss ce``
runs the same recipe with Bridge's model and Megatron's cross-entropy through the same loss
reduction, for a CE baseline; ``--gem-beta 1.0 --gem-h linear`` has CE's gradient exactly.
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained-checkpoint", required=True, help="Bridge/Megatron checkpoint")
    p.add_argument("--save", required=True, help="where the SFT checkpoints go")
    p.add_argument("--hf-model", default="meta-llama/Meta-Llama-3-8B", help="tokenizer")
    p.add_argument("--loss", choices=("gem", "ce"), default="gem")
    p.add_argument("--gem-beta", type=float, default=None, help="default: megatron_gem's")
    p.add_argument("--gem-h", choices=("linear", "logsigmoid"), default=None)
    p.add_argument("--train-iters", type=int, default=1000)
    p.add_argument("--global-batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    # Bridge is imported here, not at module import (it needs Transformer Engine)
    from megatron.bridge.recipes.llama import llama3_8b_sft_config
    from megatron.bridge.training.finetune import finetune

    from megatron_gem import DEFAULT_BETA, DEFAULT_H, GemConfig
    from megatron_gem.bridge import use_gem

    cfg = llama3_8b_sft_config()
    cfg.tokenizer.tokenizer_model = args.hf_model
    cfg.checkpoint.pretrained_checkpoint = args.pretrained_checkpoint
    cfg.checkpoint.save = cfg.checkpoint.load = args.save  # restarts resume
    cfg.train.train_iters = args.train_iters
    if args.global_batch_size is not None:
        cfg.train.global_batch_size = args.global_batch_size
    if args.lr is not None:
        cfg.scheduler.max_lr = args.lr

    gem = GemConfig(
        DEFAULT_BETA if args.gem_beta is None else args.gem_beta,
        DEFAULT_H if args.gem_h is None else args.gem_h,
    )
    forward_step = use_gem(cfg.model, gem, loss=args.loss)  # the one call
    finetune(cfg, forward_step_func=forward_step)


if __name__ == "__main__":
    main()
