"""Evaluation: quality, diversity and forgetting of sampled responses; the public API.

prompts.py   EvalPrompt and the readers of prompts, generations and held-out texts
formats.py   ChatFormat: prompts/responses/documents -> ids (templates: megatron_gem.data.chat)
sampling.py  load_hf, SamplingConfig, sample (HF transformers, KV cache)
scoring.py   sequence_logprobs, score_valid, heldout_loss (exact, teacher forcing)
metrics.py   the metrics themselves (quality, valid mass, diversity, forgetting)
testtime.py  test-time scaling over N samples: pass@k, maj@k, best-of-k (exact expectations)
answers.py   final answers of math responses (GSM8K ####, \\boxed{}, last number), equivalence
execution.py HumanEval-style code tasks run in a limited subprocess per sample
reward.py    rewards for best-of-k: a Python callable or an HF sequence-classification model
vllm_sampling.py  sampling with vLLM (models beyond CPU scale), same ids as the HF path
api.py       prompt_metrics, summarise, evaluate, flat_metrics (judge, default_ks)
cli.py       the CLI (tools/evaluate.py, python -m megatron_gem.eval)
"""

from megatron_gem.eval.api import (
    METRIC_NAMES,
    TESTTIME_METRICS,
    default_ks,
    evaluate,
    flat_metrics,
    judge,
    prompt_metrics,
    summarise,
)
from megatron_gem.eval.execution import CodeTask, SandboxConfig, run_program, run_tests
from megatron_gem.eval.formats import (
    ChatFormat,
    ChatTemplateFormat,
    PlainTemplateFormat,
    hf_chat_format,
    megatron_chat_format,
    plain_render,
)
from megatron_gem.eval.prompts import EvalPrompt, read_generations, read_prompts, read_texts
from megatron_gem.eval.sampling import SamplingConfig, load_hf, load_tokenizer, sample
from megatron_gem.eval.scoring import heldout_loss, score_valid, sequence_logprobs
from megatron_gem.eval.testtime import best_of_k, maj_at_k, majority_answer, pass_at_k

__all__ = [
    "CodeTask",
    "EvalPrompt",
    "SandboxConfig",
    "default_ks",
    "judge",
    "run_program",
    "run_tests",
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
    "load_tokenizer",
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
    "TESTTIME_METRICS",
    "PlainTemplateFormat",
    "plain_render",
    "sequence_logprobs",
]
