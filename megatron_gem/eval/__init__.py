"""Evaluation: quality, diversity and forgetting of sampled responses; the public API.

prompts.py   EvalPrompt and the readers of prompts, generations and held-out texts
formats.py   ChatFormat: prompts/responses/documents -> ids (templates: megatron_gem.data.chat)
sampling.py  load_hf, SamplingConfig, sample (HF transformers, KV cache)
scoring.py   sequence_logprobs, score_valid, heldout_loss (exact, teacher forcing)
metrics.py   the metrics themselves (quality, valid mass, diversity, forgetting)
testtime.py  test-time scaling over N samples: pass@k, maj@k, best-of-k (exact expectations)
api.py       prompt_metrics, summarise, evaluate, flat_metrics
cli.py       the CLI (tools/evaluate.py, python -m megatron_gem.eval)
"""

from megatron_gem.eval.api import (
    METRIC_NAMES,
    evaluate,
    flat_metrics,
    prompt_metrics,
    summarise,
)
from megatron_gem.eval.formats import (
    ChatFormat,
    ChatTemplateFormat,
    PlainTemplateFormat,
    hf_chat_format,
    megatron_chat_format,
    plain_render,
)
from megatron_gem.eval.prompts import EvalPrompt, read_generations, read_prompts, read_texts
from megatron_gem.eval.sampling import SamplingConfig, load_hf, sample
from megatron_gem.eval.scoring import heldout_loss, score_valid, sequence_logprobs
from megatron_gem.eval.testtime import best_of_k, maj_at_k, majority_answer, pass_at_k

__all__ = [
    "EvalPrompt",
    "best_of_k",
    "maj_at_k",
    "majority_answer",
    "pass_at_k",
    "SamplingConfig",
    "evaluate",
    "flat_metrics",
    "heldout_loss",
    "hf_chat_format",
    "load_hf",
    "megatron_chat_format",
    "prompt_metrics",
    "read_generations",
    "read_prompts",
    "read_texts",
    "sample",
    "score_valid",
    "summarise",
    # also public: the formats, the exact scorer and the metric names of a result's sets
    "ChatFormat",
    "ChatTemplateFormat",
    "METRIC_NAMES",
    "PlainTemplateFormat",
    "plain_render",
    "sequence_logprobs",
]
