"""Rewards for best-of-k: a Python callable named ``module:function``, or an HF reward model.

A reward is any ``f(prompt_messages, response) -> float``. ``load_reward("pkg.mod:fn")`` imports
it (a module path, or a ``path/to/file.py``); ``RewardModel(dir)`` scores with an HF
sequence-classification model (the logit of its single label, or of its 'positive' label) and
also scores whole lists at once (``score_many``), which ``compute_rewards`` uses when present.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["RewardModel", "compute_rewards", "load_reward"]

RewardFn = Callable[[list[dict], str], float]


def load_reward(spec: str) -> RewardFn:
    """The callable named by ``spec`` = ``module:function`` (``pkg.mod:fn`` or ``file.py:fn``);
    ValueError naming the spec when it cannot be imported or is not callable."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"reward {spec!r}: expected module:function (e.g. my_rewards:score)")
    try:
        if mod_name.endswith(".py"):
            if not Path(mod_name).is_file():
                raise ValueError(f"reward {spec!r}: no file {mod_name}")
            loader = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ValueError:
        raise
    except Exception as e:  # the user's module: any import-time error is theirs, named
        raise ValueError(f"reward {spec!r}: cannot import {mod_name}: {type(e).__name__}: {e}")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {mod_name} has no callable {fn_name!r}")
    return _Named(fn, spec)


class _Named:
    """A user's reward callable with the spec it was loaded by (for error messages)."""

    def __init__(self, fn: RewardFn, spec: str):
        self.fn, self.spec = fn, spec

    def __call__(self, messages: list[dict], response: str) -> float:
        return self.fn(messages, response)


def _render(tokenizer, messages: list[dict], response: str) -> str:
    """The conversation as the reward model reads it: its chat template when it has one, else
    the plain SFT template (``User: ... Assistant: response``)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
    from megatron_gem.data.chat import plain_render

    return f"{plain_render(messages)} {response}"


class RewardModel:
    """An HF sequence-classification reward model directory, offline: reward = the logit of
    its single label, or of the label named 'positive' (case-insensitive) when it has several."""

    def __init__(
        self, model_dir: str | os.PathLike, device: str = "cpu", batch_size: int = 8
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (Path(model_dir) / "config.json").is_file():
            raise ValueError(
                f"reward model {str(model_dir)!r} is not an HF model directory (no config.json)"
            )
        self.spec = str(model_dir)
        self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, dtype=torch.float32
        )
        self.model.to(device).eval()
        labels = {int(i): str(n) for i, n in self.model.config.id2label.items()}
        if self.model.config.num_labels == 1:
            self.label = 0
        else:
            pos = [i for i, n in labels.items() if n.lower() == "positive"]
            if not pos:
                raise ValueError(
                    f"reward model {self.spec}: {self.model.config.num_labels} labels "
                    f"{sorted(labels.values())} and none named 'positive': which is the reward?"
                )
            self.label = pos[0]
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.device, self.batch_size = device, batch_size

    def score_many(self, pairs: Sequence[tuple[list[dict], str]]) -> list[float]:
        import torch

        texts = [_render(self.tok, m, r) for m, r in pairs]
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(
                    texts[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=not getattr(self.tok, "chat_template", None),
                ).to(self.device)
                logits = self.model(**enc).logits.float()
                out += logits[:, self.label].tolist()
        return out

    def __call__(self, messages: list[dict], response: str) -> float:
        return self.score_many([(messages, response)])[0]


def compute_rewards(reward, prompts, generations) -> list[list[float]]:
    """Reward of every sample: ``reward.score_many`` in one call when it has one, else one call
    per sample; a reward that is not a finite number fails naming the reward and the prompt."""
    name = getattr(reward, "spec", getattr(reward, "__name__", repr(reward)))
    pairs = [(p.messages, s) for p, g in zip(prompts, generations) for s in g]
    if hasattr(reward, "score_many"):
        flat = list(reward.score_many(pairs))
    else:
        flat = [reward(m, s) for m, s in pairs]
    out, i = [], 0
    for p, g in zip(prompts, generations):
        row = flat[i : i + len(g)]
        i += len(g)
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(
                    f"reward {name}: prompt {p.id!r} sample {j}: expected a finite number, "
                    f"got {v!r}"
                )
        out.append([float(v) for v in row])
    return out
