"""Sampling with vLLM, for models beyond CPU scale: N samples per prompt, the SFT prompt ids.

The prompts are token ids built by the same ``ChatFormat`` as the HF path (the template the SFT
data was made with), passed to vLLM as ``{"prompt_token_ids": ids}``; vLLM neither tokenizes nor
detokenizes (``skip_tokenizer_init``): responses are cut at the format's stop ids and decoded by
the format, as ``sampling.sample`` does. ``SamplingConfig`` maps to ``vllm.SamplingParams``
(``sampling_params``); greedy decodes once per prompt and repeats it N times, as the HF path.

vLLM pins its own torch and needs a GPU: it lives in its own environment (docs/evaluation.md)
and is imported only when an engine is built. Everything up to the engine call is tested with
a fake engine; the vLLM call itself is unrun in this project's tests.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from megatron_gem.eval.formats import ChatFormat
from megatron_gem.eval.sampling import SamplingConfig

__all__ = ["load_vllm", "sample_vllm", "sampling_params"]


def sampling_params(cfg: SamplingConfig, fmt: ChatFormat, prompt_index: int = 0) -> dict:
    """The ``vllm.SamplingParams`` arguments for one prompt: the HF path's settings, the bare
    distribution (no penalties, no min-p), stop at the format's stop ids. Seeds differ per
    prompt (``seed + index``) so prompts do not share one random stream."""
    greedy = cfg.temperature == 0
    return {
        "n": 1 if greedy else cfg.n,
        "temperature": cfg.temperature,
        "top_p": 1.0 if greedy else cfg.top_p,
        "top_k": -1 if greedy or cfg.top_k == 0 else cfg.top_k,  # vLLM: -1 = off
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": cfg.max_new_tokens,
        "seed": cfg.seed + prompt_index,
        "stop_token_ids": list(fmt.stop_ids),
        "detokenize": False,  # the format decodes, as in the HF path
    }


def load_vllm(
    model_dir: str | os.PathLike,
    dtype: str = "auto",
    seed: int = 0,
    tensor_parallel_size: int = 1,
    **engine_kwargs,
):
    """A ``vllm.LLM`` engine on an HF model directory. ``generation_config="vllm"``: vLLM's own
    defaults, not the directory's generation_config.json (the HF path ignores it too)."""
    try:
        import vllm
    except ImportError as e:
        raise ValueError(
            f"--engine vllm needs the vllm package ({e}); install it in its own environment "
            f"(docs/evaluation.md, 'Sampling with vLLM')"
        ) from None
    kw = dict(
        model=str(model_dir),
        dtype=dtype,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
        skip_tokenizer_init=True,
        generation_config="vllm",
    )
    kw.update(engine_kwargs)
    return vllm.LLM(**kw)


def _params_class():
    from vllm import SamplingParams

    return SamplingParams


def sample_vllm(
    llm,
    fmt: ChatFormat,
    prompts: Sequence[list[dict]],
    cfg: SamplingConfig = SamplingConfig(),
    params_class: Callable | None = None,
) -> list[list[str]]:
    """``cfg.n`` responses per prompt from a vLLM engine (``llm.generate``), in prompt order.

    ``params_class`` builds the per-prompt settings (default ``vllm.SamplingParams``).
    """
    make = params_class or _params_class()
    inputs = [{"prompt_token_ids": fmt.prompt_ids(m)} for m in prompts]
    params = [make(**sampling_params(cfg, fmt, i)) for i in range(len(prompts))]
    outputs = llm.generate(inputs, sampling_params=params, use_tqdm=False)
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
    greedy = cfg.temperature == 0
    out: list[list[str]] = []
    for i, o in enumerate(outputs):
        # results come back in prompt order; each holds its n completions (by their index)
        comps = sorted(o.outputs, key=lambda c: c.index)
        want = 1 if greedy else cfg.n
        if len(comps) != want:
            raise ValueError(f"vLLM returned {len(comps)} completions for prompt {i}, not {want}")
        texts = [fmt.decode_response(list(c.token_ids)) for c in comps]
        out.append(texts * cfg.n if greedy else texts)
    return out
