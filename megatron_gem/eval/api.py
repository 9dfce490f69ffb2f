"""Evaluation of HuggingFace-format causal LMs: sampling, exact response scoring, held-out loss.

Megatron checkpoints are exported to HF first (``megatron_gem`` conversion); transformers then
gives batched sampling with a KV cache (``model.generate``). Tokenisation and the prompt
template are a parameter (``ChatFormat``), so the same code serves an HF tokenizer with a chat
template and the SentencePiece + plain template of the embedded world.

All metrics are computed on the response text (the tokens generated after the prompt), never on
the prompt.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from megatron_gem.data import jsonl as J
from megatron_gem.eval import metrics as M

# ---- inputs ---------------------------------------------------------------------------------


@dataclass
class EvalPrompt:
    """One evaluation prompt: chat messages up to the answer, optional valid set, prompt set."""

    id: str
    messages: list[dict]
    valid: list[str] | None = None
    split: str = "all"


ROLES = ("system", "user", "assistant")


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: messages[{k}] must be an object with string 'role' and 'content', got {m!r}")
        # The roles SFT data accepts (sft_data.ROLES): a model was never trained on others, and
        # the plain template would fail on them only later, after loading the model, unnamed.
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: messages[{k}] has role {m['role']!r}; use one of {ROLES}")
    if messages[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the last message is the assistant's; an evaluation prompt ends "
                         f"before the answer (drop the assistant message)")
    return messages


def _read_jsonl(path: str | os.PathLike):
    """(lineno, object) per non-blank line; the first bad line fails with path:line (evaluation
    has no --on-error: every prompt counts)."""
    for lineno, rec in J.read_jsonl(path):
        if isinstance(rec, J.BadLine):
            raise ValueError(f"{path}:{lineno}: {rec.reason}")
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: each line must be a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def read_prompts(path: str | os.PathLike) -> list[EvalPrompt]:
    """Read evaluation prompts from JSONL.

    Each line: ``{"messages": [...], "valid": [...]?, "id": ...?, "split": ...?}``. ``id``
    defaults to the 0-based index of the record, ``split`` (the prompt set, e.g. seen/unseen)
    to "all". ``valid`` lists every valid response (compared after lower-casing, collapsing
    spaces and stripping edge punctuation).
    """
    out: list[EvalPrompt] = []
    ids: dict[str, int] = {}
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" not in rec:
            raise ValueError(f"{where}: missing 'messages' (keys present: {sorted(rec)})")
        msgs = _check_messages(rec["messages"], where)
        valid = rec.get("valid")
        if valid is not None:
            if not isinstance(valid, list) or not valid or not all(isinstance(v, str) for v in valid):
                raise ValueError(f"{where}: 'valid' must be a non-empty list of strings, got {valid!r}")
        pid = str(rec.get("id", len(out)))
        if pid in ids:
            raise ValueError(f"{where}: duplicate id {pid!r} (first on line {ids[pid]})")
        ids[pid] = lineno
        split = rec.get("split", "all")
        if not isinstance(split, str) or not split:
            raise ValueError(f"{where}: 'split' must be a non-empty string, got {split!r}")
        out.append(EvalPrompt(pid, msgs, valid, split))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def read_generations(path: str | os.PathLike, prompts: Sequence[EvalPrompt]) -> list[list[str]]:
    """Read generations JSONL and align them with ``prompts``.

    Each line: ``{"prompt_id": ID, "generations": ["...", ...]}`` (ID as in the prompts file) or
    ``{"index": i, "generations": [...]}`` (0-based position in the prompts file). Several lines
    for the same prompt are concatenated. Every prompt needs at least one generation.
    """
    by_id = {p.id: i for i, p in enumerate(prompts)}
    out: list[list[str]] = [[] for _ in prompts]
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if "prompt_id" in rec:
            key = str(rec["prompt_id"])
            if key not in by_id:
                raise ValueError(f"{where}: prompt_id {key!r} is not in the prompts file")
            i = by_id[key]
        elif "index" in rec:
            i = rec["index"]
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(prompts):
                raise ValueError(f"{where}: index {i!r} out of range [0, {len(prompts)})")
        else:
            raise ValueError(f"{where}: needs 'prompt_id' or 'index' (keys present: {sorted(rec)})")
        gens = rec.get("generations")
        if not isinstance(gens, list) or not all(isinstance(g, str) for g in gens):
            raise ValueError(f"{where}: 'generations' must be a list of strings, got {gens!r}")
        out[i].extend(gens)
    missing = [prompts[i].id for i, g in enumerate(out) if not g]
    if missing:
        raise ValueError(f"{path}: no generations for prompt id(s) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(prompts)})")
    return out


def read_texts(path: str | os.PathLike, key: str = "text") -> list[str]:
    """Documents of a ``{"text": ...}`` JSONL (held-out pre-training text)."""
    texts = []
    for lineno, rec in _read_jsonl(path):
        if not isinstance(rec.get(key), str):
            raise ValueError(f"{path}:{lineno}: needs a string {key!r} (keys present: {sorted(rec)})")
        texts.append(rec[key])
    if not texts:
        raise ValueError(f"{path}: no documents")
    return texts


# ---- tokenisation and prompt template -------------------------------------------------------


def plain_render(messages: list[dict]) -> str:
    """Readable text of the plain SFT template (for display; ids come from PlainTemplateFormat)."""
    from megatron_gem.data.tokenizer import PLAIN_HEADERS

    return " ".join(f"{PLAIN_HEADERS[m['role']]} {m['content']}" for m in messages) + " " + PLAIN_HEADERS["assistant"]


@dataclass
class ChatFormat:
    """How prompts, responses and documents become token ids for one model.

    encode/decode: plain text <-> ids, no special tokens. render: messages -> the prompt text that
    ends where the answer starts. A response is ``encode(text) + [eos_id]`` (its end token is
    part of its probability); a held-out document is ``[bos_id]? + encode(text) + [eos_id]``
    (as Megatron's pre-training data: text + eod). Subclasses match the SFT data's templates.
    """

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    render: Callable[[list[dict]], str]
    eos_id: int
    pad_id: int | None = None
    bos_id: int | None = None
    stop_ids: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.stop_ids = tuple(dict.fromkeys((self.eos_id, *self.stop_ids)))

    def _bos(self) -> list[int]:
        return [] if self.bos_id is None else [self.bos_id]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self._bos() + list(self.encode(self.render(messages)))

    def response_ids(self, text: str, messages: list[dict] | None = None) -> list[int]:
        """Ids of a complete response (end token included) after the prompt of ``messages``."""
        return list(self.encode(text)) + [self.eos_id]

    def document_ids(self, text: str) -> list[int]:
        return self._bos() + list(self.encode(text)) + [self.eos_id]

    def decode_response(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        for k, t in enumerate(ids):
            if t in self.stop_ids:
                ids = ids[:k]
                break
        return self.decode(ids).strip()


class PlainTemplateFormat(ChatFormat):
    """The plain SFT template of ``megatron_gem.data.sft.PlainTemplateEncoder``, on ids: per
    message ``ids(header) + ids(content) (+ [eod] after an assistant turn)``, each piece encoded
    on its own; the prompt ends with ``ids("Assistant:")``; a response is ``ids(text) + [eod]``."""

    def __init__(self, encode, decode, eos_id: int, pad_id: int | None = None):
        super().__init__(encode=encode, decode=decode, render=plain_render, eos_id=eos_id, pad_id=pad_id)
        from megatron_gem.data.tokenizer import PLAIN_HEADERS

        self._headers = {r: list(encode(h)) for r, h in PLAIN_HEADERS.items()}

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids: list[int] = []
        for m in messages:
            if m["role"] not in self._headers:
                raise ValueError(f"plain template: role {m['role']!r} is not one of {sorted(self._headers)}")
            ids += self._headers[m["role"]] + list(self.encode(m["content"]))
            if m["role"] == "assistant":
                ids.append(self.eos_id)
        return ids + self._headers["assistant"]


class ChatTemplateFormat(ChatFormat):
    """An HF chat template, as ``sft_data.ChatTemplateEncoder`` trains on it: the prompt is the
    render with the generation prompt; a response is the ids of the full render after the
    prompt's ids, up to and including the first stop token (the template's end of turn)."""

    def __init__(self, hf_tok, chat_template: str | None = None):
        self.hf = hf_tok
        self.template = chat_template or hf_tok.chat_template
        render = lambda m: hf_tok.apply_chat_template(  # noqa: E731
            m, chat_template=self.template, add_generation_prompt=True, tokenize=False)
        enc = lambda t: list(hf_tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
        super().__init__(encode=enc, decode=lambda ids: hf_tok.decode(ids, skip_special_tokens=True),
                         render=render, eos_id=hf_tok.eos_token_id, pad_id=hf_tok.pad_token_id)
        # Special tokens the template puts after an answer (e.g. <|im_end|>) also end a response.
        probe = [{"role": "user", "content": "hi"}]
        tail = self.response_ids("ok", probe, stop=False)[len(enc("ok")):]
        special = set(hf_tok.all_special_ids)
        self.stop_ids = tuple(dict.fromkeys((*self.stop_ids, *[t for t in tail if t in special][:1])))

    def response_ids(self, text: str, messages: list[dict] | None = None, stop: bool = True) -> list[int]:
        if messages is None:
            raise ValueError("ChatTemplateFormat.response_ids needs the prompt messages")
        prompt = self.prompt_ids(messages)
        full = self.encode(self.hf.apply_chat_template(
            list(messages) + [{"role": "assistant", "content": text}], chat_template=self.template,
            tokenize=False))
        if full[:len(prompt)] != prompt:
            raise ValueError("chat template is not prefix-stable: the prompt's ids are not a prefix of "
                             "the full conversation's ids")
        resp = full[len(prompt):]
        if stop:
            for k, t in enumerate(resp):
                if t in self.stop_ids:
                    return resp[:k + 1]
        return resp


def hf_chat_format(tokenizer, template: str = "auto") -> ChatFormat:
    """Format for an HF tokenizer, mirroring ``sft_data.make_encoder``: its chat template when
    it has one (``auto``/``chat``), else the plain template (``plain``)."""
    if template not in ("auto", "chat", "plain"):
        raise ValueError(f"template must be auto, chat or plain, got {template!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("hf_chat_format: the tokenizer has no eos_token_id; responses need an end token")
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ValueError("hf_chat_format: the tokenizer has no chat template; use template='plain'")
    if template != "plain" and has:
        return ChatTemplateFormat(tokenizer)
    return PlainTemplateFormat(lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"]),
                               lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                               eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)


def megatron_chat_format(tokenizer, template: str = "auto") -> ChatFormat:
    """Format for a Megatron tokenizer (``megatron_gem.data.tokenizer.build_tokenizer``), the ids
    training saw: HF tokenizers go through ``hf_chat_format``; others (SentencePiece) use the
    plain template with Megatron's ``tokenize``/``detokenize``/``eod``."""
    from megatron_gem.data.tokenizer import hf_tokenizer, pad_or_eod, text_to_ids

    hf = hf_tokenizer(tokenizer)
    if hf is not None:
        return hf_chat_format(hf, template)
    if template == "chat":
        raise ValueError("the chat template needs an HF tokenizer; use template='plain'")
    return PlainTemplateFormat(lambda t: text_to_ids(tokenizer, t), lambda ids: tokenizer.detokenize(list(ids)),
                               eos_id=int(tokenizer.eod), pad_id=pad_or_eod(tokenizer))


def load_hf(model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from an HF model directory, offline (no hub access); tokenizer is None
    when the directory has no tokenizer files (then build the format from the training tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"model_dir {str(model_dir)!r} is not an HF model directory (no config.json)")
    has_tok = any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True) if has_tok else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    return model.to(device).eval(), tok


# ---- sampling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 16                 # responses per prompt
    temperature: float = 1.0    # 0 = greedy (then all n responses are equal)
    top_p: float = 1.0
    top_k: int = 0              # 0 = off
    max_new_tokens: int = 32
    seed: int = 0
    batch_size: int = 16        # prompts per generate() call (rows = batch_size * n)

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
            raise ValueError(f"SamplingConfig.max_new_tokens and batch_size must be >= 1, "
                             f"got {self.max_new_tokens}, {self.batch_size}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sample(model, fmt: ChatFormat, prompts: Sequence[list[dict]], cfg: SamplingConfig = SamplingConfig(),
           progress: Callable[[int, int], None] | None = None) -> list[list[str]]:
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
    dev = _device(model)
    torch.manual_seed(cfg.seed)
    out: list[list[str]] = []
    greedy = cfg.temperature == 0
    for start in range(0, len(prompts), cfg.batch_size):
        ids = [fmt.prompt_ids(m) for m in prompts[start:start + cfg.batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), fmt.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, width - len(x):] = torch.tensor(x)
            mask[r, width - len(x):] = 1
        kw = dict(do_sample=False, num_beams=1) if greedy else dict(
            do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        reps = 1 if greedy else cfg.n  # greedy: one decode per prompt, repeated n times
        gen = model.generate(
            input_ids=input_ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=reps, eos_token_id=list(fmt.stop_ids), pad_token_id=fmt.pad_id, **kw)
        new = gen[:, width:].tolist()
        for r in range(len(ids)):
            texts = [fmt.decode_response(new[r * reps + j]) for j in range(reps)]
            out.append(texts * cfg.n if greedy else texts)
        if progress:
            progress(len(out), len(prompts))
    return out


# ---- exact scoring --------------------------------------------------------------------------


@torch.no_grad()
def sequence_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 32) -> list[float]:
    """log p(target | context) summed over the target tokens, for each (context_ids, target_ids).

    Teacher forcing in right-padded batches (sorted by length); log-softmax in fp32, sums in fp64.
    """
    dev = _device(model)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in idx]
        for i in idx:
            if not pairs[i][0] or not pairs[i][1]:
                raise ValueError(f"sequence_logprobs: pair {i} has an empty context or target")
        width = max(len(s) for s in seqs)
        tokens = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        tmask = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions whose token is a target
        for r, (i, s) in enumerate(zip(idx, seqs)):
            tokens[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
            tmask[r, len(pairs[i][0]):len(s)] = True
        logits = model(input_ids=tokens.to(dev), attention_mask=mask.to(dev)).logits[:, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None].to(dev))[..., 0]
        lp = (lp.double() * tmask[:, 1:].to(dev)).sum(dim=1).tolist()
        for i, v in zip(idx, lp):
            out[i] = v
    return out


def score_valid(model, fmt: ChatFormat, prompts: Sequence[EvalPrompt], batch_size: int = 32) -> list[list[float] | None]:
    """Exact log-probability of each valid response (its canonical tokenisation + end token) per
    prompt; None for prompts without a valid set."""
    pairs, owner = [], []
    for k, p in enumerate(prompts):
        if p.valid:
            ctx = fmt.prompt_ids(p.messages)
            for v in p.valid:
                pairs.append((ctx, fmt.response_ids(v, p.messages)))
                owner.append(k)
    lps = sequence_logprobs(model, pairs, batch_size)
    out: list[list[float] | None] = [[] if p.valid else None for p in prompts]
    for k, v in zip(owner, lps):
        out[k].append(v)
    return out


@torch.no_grad()
def heldout_loss(model, fmt: ChatFormat, texts: Sequence[str], max_len: int | None = None,
                 batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token, weighted by tokens) of documents
    ``[bos]? + text + [eos]``; documents longer than ``max_len`` (default: the model's
    max_position_embeddings) are split into windows of max_len tokens."""
    if not texts:
        raise ValueError("heldout_loss: no texts")
    if max_len is None:
        max_len = getattr(model.config, "max_position_embeddings", None) or 2048
    if max_len < 2:
        raise ValueError(f"heldout_loss: max_len must be >= 2, got {max_len}")
    windows = []
    for t in texts:
        ids = fmt.document_ids(t)
        windows += [ids[i:i + max_len] for i in range(0, len(ids), max_len) if len(ids[i:i + max_len]) >= 2]
    # Each window's first token is context, the rest are targets.
    lps = sequence_logprobs(model, [(w[:1], w[1:]) for w in windows], batch_size)
    n_tok = sum(len(w) - 1 for w in windows)
    if n_tok == 0:
        raise ValueError("heldout_loss: the texts have no token to predict (all empty?)")
    return -math.fsum(lps) / n_tok


# ---- metrics per prompt set -----------------------------------------------------------------

METRIC_NAMES = ("quality", "valid_mass", "effective_valid", "coverage", "ngram_diversity",
                "distinct_1", "distinct_2", "distinct_3", "self_bleu_diversity", "embedding_diversity")


def prompt_metrics(samples: Sequence[str], valid: Sequence[str] | None = None,
                   valid_logprobs: Sequence[float] | None = None, embedder=None) -> dict:
    """Metrics of one prompt's samples (response text only); absent when undefined."""
    if not samples:
        raise ValueError("prompt_metrics: no samples")
    m: dict = {}
    if valid:
        m["quality"] = M.quality(samples, valid)
        m["coverage"] = M.coverage(samples, valid)
    if valid_logprobs is not None:
        if not valid or len(valid_logprobs) != len(valid):
            raise ValueError(f"prompt_metrics: {len(valid_logprobs)} log-probabilities for "
                             f"{len(valid or [])} valid responses")
        # One probability per distinct answer: a response listed twice counts once; responses
        # that normalise to the same answer ("Owl", "owl") are different sequences whose
        # probabilities add up.
        groups: dict[str, list[float]] = {}
        for v, lp in dict(zip(valid, valid_logprobs)).items():
            groups.setdefault(M.normalize_answer(v), []).append(lp)
        answers = [torch.logsumexp(torch.tensor(g, dtype=torch.float64), 0).item() for g in groups.values()]
        m["valid_mass"] = M.valid_mass(answers)
        ev = M.effective_valid(answers)
        if math.isfinite(ev):
            m["effective_valid"] = ev
    ng = M.ngram_diversity(samples)
    if ng["mean"] is not None:
        m["ngram_diversity"] = ng["mean"]
        for n in (1, 2, 3):
            if n in ng:
                m[f"distinct_{n}"] = ng[n]
    if len(samples) >= 2:
        m["self_bleu_diversity"] = M.self_bleu_diversity(samples)
        if embedder is not None:
            m["embedding_diversity"] = M.embedding_diversity(embedder(list(samples)))
    return m


def summarise(prompts: Sequence[EvalPrompt], generations: Sequence[Sequence[str]],
              valid_logprobs: Sequence[Sequence[float] | None] | None = None, embedder=None) -> tuple[dict, list[dict]]:
    """(per-set means, per-prompt records). Sets: each prompt's ``split`` plus "all".

    A set's metric is the mean over the prompts where it is defined; ``n_<metric>`` says over how
    many (e.g. quality only over prompts with a valid list).
    """
    if len(generations) != len(prompts):
        raise ValueError(f"summarise: {len(generations)} generation lists for {len(prompts)} prompts")
    per_prompt = []
    for k, (p, g) in enumerate(zip(prompts, generations)):
        lps = valid_logprobs[k] if valid_logprobs is not None else None
        per_prompt.append({"id": p.id, "split": p.split, "n_samples": len(g),
                           "metrics": prompt_metrics(g, p.valid, lps, embedder)})
    sets: dict[str, dict] = {}
    names = ["all"] + sorted({p.split for p in prompts} - {"all"})
    for name in names:
        recs = [r for r in per_prompt if name == "all" or r["split"] == name]
        s: dict = {"n_prompts": len(recs), "n_samples": sum(r["n_samples"] for r in recs)}
        for metric in METRIC_NAMES:
            vals = [r["metrics"][metric] for r in recs if metric in r["metrics"]]
            if vals:
                s[metric] = math.fsum(vals) / len(vals)
                s[f"n_{metric}"] = len(vals)
        sets[name] = s
    return sets, per_prompt


def evaluate(model, fmt: ChatFormat, prompts: Sequence[EvalPrompt], sampling: SamplingConfig = SamplingConfig(),
             *, generations: Sequence[Sequence[str]] | None = None, heldout_texts: Sequence[str] | None = None,
             heldout_loss_before: float | None = None, score: bool = True, embedder=None,
             batch_size: int = 32, progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate one model: sample (unless ``generations`` are given), score valid sets, held-out loss.

    Returns ``{"sets": {set: {metric: mean}}, "heldout_loss", "forgetting", "prompts": [...],
    "sampling": {...}}``; ``forgetting`` needs ``heldout_loss_before`` (the loss of the model
    before SFT on the same texts). With ``model=None`` only the text metrics of ``generations``.
    """
    say = progress or (lambda msg: None)
    sampled = generations is None
    if sampled:
        if model is None:
            raise ValueError("evaluate: give a model to sample from or generations")
        say(f"sampling {sampling.n} responses for {len(prompts)} prompts")
        generations = sample(model, fmt, [p.messages for p in prompts], sampling,
                             progress=lambda k, n: say(f"sampled {k}/{n} prompts"))
    lps = None
    if model is not None and score and any(p.valid for p in prompts):
        say("scoring valid responses")
        lps = score_valid(model, fmt, prompts, batch_size)
    sets, per_prompt = summarise(prompts, generations, lps, embedder)
    for rec, g in zip(per_prompt, generations):
        rec["generations"] = list(g)
    result = {"sets": sets, "heldout_loss": None, "forgetting": None, "prompts": per_prompt,
              "sampling": vars(sampling).copy() if sampled else None}
    if model is not None and heldout_texts:
        say(f"held-out loss on {len(heldout_texts)} documents")
        result["heldout_loss"] = heldout_loss(model, fmt, heldout_texts, batch_size=batch_size)
        if heldout_loss_before is not None:
            result["forgetting"] = M.forgetting(heldout_loss_before, result["heldout_loss"])
    return result


def flat_metrics(result: dict) -> dict[str, float]:
    """``{"<set>/<metric>": value, "heldout_loss": ..., "forgetting": ...}`` for a results table."""
    out = {f"{s}/{k}": v for s, d in result["sets"].items() for k, v in d.items()}
    for k in ("heldout_loss", "forgetting"):
        if result.get(k) is not None:
            out[k] = result[k]
    return out
