"""Sampling responses from an HuggingFace-format causal LM: loading, settings, ``sample``.

Megatron checkpoints are exported to HF first (``megatron_gem`` conversion); transformers then
gives batched sampling with a KV cache (``model.generate``). Prompts become ids through a
``ChatFormat`` (``megatron_gem.eval.formats``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from megatron_gem.eval.formats import ChatFormat

__all__ = ["SamplingConfig", "load_hf", "load_tokenizer", "model_device", "sample"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_hf(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """(model, tokenizer) from an HF model directory, offline (no hub access); tokenizer is None
    when the directory has no tokenizer files (then build the format from the training
    tokenizer)."""
    from transformers import AutoModelForCausalLM

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(
            f"model_dir {str(model_dir)!r} is not an HF model directory (no config.json)"
        )
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    return model.to(device).eval(), tok


def load_tokenizer(model_dir: str | os.PathLike):
    """The HF tokenizer of a model directory, offline; None when it has no tokenizer files."""
    from transformers import AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(
            f"model_dir {str(model_dir)!r} is not an HF model directory (no config.json)"
        )
    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@dataclass(frozen=True)
class SamplingConfig:
    """How ``sample`` draws responses (the CLI's sampling flags)."""

    n: int = 16  # responses per prompt
    temperature: float = 1.0  # 0 = greedy (then all n responses are equal)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 32
    seed: int = 0
    batch_size: int = 16  # prompts per generate() call (rows = batch_size * n)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingConfig.n must be >= 1, got {self.n}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"SamplingConfig.max_new_tokens and batch_size must be >= 1, "
                f"got {self.max_new_tokens}, {self.batch_size}"
            )


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters: where its inputs go."""
    return next(model.parameters()).device


@torch.no_grad()
def sample(
    model,
    fmt: ChatFormat,
    prompts: Sequence[list[dict]],
    cfg: SamplingConfig = SamplingConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> list[list[str]]:
    """``cfg.n`` sampled responses (decoded text, cut at the end token) per prompt.

    Prompts are left-padded into batches and sampled with ``model.generate`` (KV cache).
    Reproducible for a fixed seed and batch size.
    """
    from transformers import GenerationConfig

    # A model directory's generation_config.json (repetition penalty, top-p, ...) would fill in
    # every setting not passed here: sample from the bare distribution, with exactly cfg.
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        return _sample(model, fmt, prompts, cfg, progress)
    finally:
        model.generation_config = saved


def _sample(model, fmt, prompts, cfg, progress):
    dev = model_device(model)
    torch.manual_seed(cfg.seed)
    out: list[list[str]] = []
    greedy = cfg.temperature == 0
    for start in range(0, len(prompts), cfg.batch_size):
        ids = [fmt.prompt_ids(m) for m in prompts[start : start + cfg.batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), fmt.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, width - len(x) :] = torch.tensor(x)
            mask[r, width - len(x) :] = 1
        kw = (
            dict(do_sample=False, num_beams=1)
            if greedy
            else dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        )
        reps = 1 if greedy else cfg.n  # greedy: one decode per prompt, repeated n times
        gen = model.generate(
            input_ids=input_ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=reps,
            eos_token_id=list(fmt.stop_ids),
            pad_token_id=fmt.pad_id,
            **kw,
        )
        new = gen[:, width:].tolist()
        for r in range(len(ids)):
            texts = [fmt.decode_response(new[r * reps + j]) for j in range(reps)]
            out.append(texts * cfg.n if greedy else texts)
        if progress:
            progress(len(out), len(prompts))
    return out
