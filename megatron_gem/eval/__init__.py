"""Evaluation: quality, diversity and forgetting of sampled responses; the public API."""

from megatron_gem.eval.api import (
    EvalPrompt,
    SamplingConfig,
    evaluate,
    flat_metrics,
    heldout_loss,
    hf_chat_format,
    load_hf,
    megatron_chat_format,
    prompt_metrics,
    read_generations,
    read_prompts,
    read_texts,
    sample,
    score_valid,
    summarise,
)

__all__ = [
    "EvalPrompt", "SamplingConfig", "evaluate", "flat_metrics", "heldout_loss", "hf_chat_format",
    "load_hf", "megatron_chat_format", "prompt_metrics", "read_generations", "read_prompts",
    "read_texts", "sample", "score_valid", "summarise",
]
