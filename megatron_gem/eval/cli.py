"""The evaluation CLI (``tools/evaluate.py``, ``python -m megatron_gem.eval``).

Reads the user's JSONL (prompts, generations, held-out text), runs ``megatron_gem.eval.evaluate``
and writes the result JSON (and CSV, generations), each file atomically; no output may be, contain
or lie inside an input. ``main(argv)`` returns the exit status (2: refused input).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import torch

import megatron_gem.eval as E
from megatron_gem.data.chat import TEMPLATES
from megatron_gem.eval.api import is_curve, metric_order
from megatron_gem.eval.metrics import sentence_embedder
from megatron_gem.eval.testtime import MAJ_EXACT_SUBSETS
from megatron_gem.paths import check_output_apart

# The --help text (the tool's docstring).
USAGE = """Evaluate quality, diversity, forgetting and test-time scaling (pass@k, maj@k,
best-of-k) on your own JSONL (see docs/evaluation.md).

    python tools/evaluate.py --prompts eval.jsonl --generations gens.jsonl --out results.json
    python tools/evaluate.py --prompts gsm8k_test.jsonl --generations gens.jsonl --out r.json
    python tools/evaluate.py --prompts humaneval.jsonl --generations gens.jsonl --out r.json
    python tools/evaluate.py --prompts eval.jsonl --model hf_dir --n 16 --heldout heldout.jsonl
        --base-model hf_base_dir --out results.json --csv results.csv   (one command line)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--prompts",
        required=True,
        help="JSONL, one prompt per line, by its fields: {messages, valid? | answer?, id?, "
        "split?}, GSM8K {question, answer: '... #### 42'}, or HumanEval {task_id, prompt, test, "
        "entry_point}",
    )
    src = p.add_argument_group("what to evaluate (at least one)")
    src.add_argument(
        "--generations", help="JSONL: {prompt_id | index, generations: [...]} per line"
    )
    src.add_argument(
        "--model",
        help="HF model directory to sample from (and to score valid sets / held-out text)",
    )
    s = p.add_argument_group("sampling (with --model and no --generations)")
    d = E.SamplingConfig()
    s.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="sample with transformers (hf, default) or vLLM (vllm: GPU, its own environment; "
        "sampling only: no valid-set scoring, no held-out loss)",
    )
    s.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per model (default 1)"
    )
    s.add_argument("--n", type=int, default=d.n, help="responses per prompt (default %(default)s)")
    s.add_argument(
        "--temperature", type=float, default=d.temperature, help="0 = greedy (default %(default)s)"
    )
    s.add_argument("--top-p", type=float, default=d.top_p)
    s.add_argument("--top-k", type=int, default=d.top_k, help="0 = off (default)")
    s.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="prompts per generate() call"
    )
    s.add_argument(
        "--template",
        choices=TEMPLATES,
        default="auto",
        help="prompt template, as in SFT data preparation: the tokenizer's chat "
        "template when it has one (auto), or the plain 'User: ... Assistant:' "
        "template",
    )
    s.add_argument(
        "--tokenizer-type",
        help="Megatron tokenizer type (e.g. SentencePieceTokenizer) "
        "when the model directory has no tokenizer, or to use the training tokenizer "
        "exactly",
    )
    s.add_argument("--tokenizer-model", help="SentencePiece model file or HF tokenizer directory")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default %(default)s)")
    s.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="model weights dtype (log-probabilities are always computed in fp32)",
    )
    s.add_argument(
        "--save-generations", help="also write the sampled responses as a generations JSONL"
    )
    f = p.add_argument_group("forgetting (with --model)")
    f.add_argument("--heldout", help="JSONL of {text} held-out pre-training documents")
    f.add_argument(
        "--heldout-loss-before", type=float, help="held-out loss of the model before SFT"
    )
    f.add_argument(
        "--base-model", help="HF directory of the model before SFT (computes the loss before)"
    )
    t = p.add_argument_group("test-time scaling: best-of-k rewards and code execution")
    r = t.add_mutually_exclusive_group()
    r.add_argument(
        "--reward",
        metavar="MODULE:FUNCTION",
        help="reward f(prompt_messages, response) -> float, imported from a module (or "
        "file.py) for the best-of-k curves",
    )
    r.add_argument(
        "--reward-model",
        metavar="PATH",
        help="HF sequence-classification reward model directory (logit of the single or the "
        "'positive' label)",
    )
    c = E.SandboxConfig()
    t.add_argument(
        "--code-timeout",
        type=float,
        default=c.timeout,
        help="seconds per code sample (%(default)s)",
    )
    t.add_argument(
        "--code-memory-mb",
        type=int,
        default=c.memory_mb,
        help="address-space limit per code sample in MiB (%(default)s)",
    )
    t.add_argument(
        "--code-workers", type=int, default=c.workers, help="code samples run at once (%(default)s)"
    )
    t.add_argument(
        "--maj-draws",
        type=int,
        default=MAJ_EXACT_SUBSETS,
        help="maj@k: all k-subsets when there are at most this many, else this many seeded "
        "draws (default %(default)s)",
    )
    p.add_argument("--no-score", action="store_true", help="skip exact scoring of valid sets")
    p.add_argument(
        "--embedding-model", help="sentence-transformers model (local path) for embedding diversity"
    )
    p.add_argument(
        "--out", required=True, help="output JSON (metrics per prompt set, per prompt, generations)"
    )
    p.add_argument("--csv", help="also write one CSV row per prompt set")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden per-process name opened exclusively ("x"): the old fixed "NAME.tmp" silently
    # overwrote a user's file of that name (even an input).
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    f = open(tmp, "x", encoding="utf-8")  # from here on, tmp is ours to remove
    try:
        with f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_outputs(a) -> None:
    """No output is, contains or lies inside an input, or another output (before anything)."""
    inputs = [
        ("--prompts", a.prompts),
        ("--generations", a.generations),
        ("--model", a.model),
        ("--base-model", a.base_model),
        ("--heldout", a.heldout),
        ("--tokenizer-model", a.tokenizer_model),
        ("--embedding-model", a.embedding_model),
        ("--reward-model", a.reward_model),
    ]
    outputs = [
        (name, x)
        for name, x in (
            ("--out", a.out),
            ("--csv", a.csv),
            ("--save-generations", a.save_generations),
        )
        if x
    ]
    for k, (name, path) in enumerate(outputs):
        check_output_apart(path, inputs + outputs[:k], name)


def _chat_format(a, tok):
    """The prompt format: the training tokenizer when given, else the model directory's."""
    if a.tokenizer_type:
        from megatron_gem.data.tokenizer import build_tokenizer

        return E.megatron_chat_format(
            build_tokenizer(a.tokenizer_type, a.tokenizer_model), a.template
        )
    if tok is None:
        raise ValueError(
            f"{a.model} has no tokenizer files: pass --tokenizer-type and --tokenizer-model"
        )
    return E.hf_chat_format(tok, a.template)


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.generations and not a.model:
        parser.error("give --generations, --model, or both")
    if (a.heldout or a.base_model) and not a.model:
        parser.error("--heldout/--base-model need --model (the loss is the model's)")
    if a.base_model and a.heldout_loss_before is not None:
        parser.error("give --base-model or --heldout-loss-before, not both")
    if (a.base_model or a.heldout_loss_before is not None) and not a.heldout:
        parser.error("forgetting needs --heldout")
    if a.engine == "vllm":
        if not a.model or a.generations:
            parser.error("--engine vllm samples from --model: give --model and no --generations")
        if a.heldout or a.base_model:
            parser.error("--engine vllm only samples: held-out loss needs --engine hf")
    try:
        check_outputs(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    outs = [Path(x) for x in (a.out, a.csv, a.save_generations) if x]
    clash = [str(x) for x in outs if x.exists()]
    if clash and not a.overwrite:
        parser.error(f"output exists: {', '.join(clash)} (pass --overwrite to replace)")
    try:
        sampling = E.SamplingConfig(
            n=a.n,
            temperature=a.temperature,
            top_p=a.top_p,
            top_k=a.top_k,
            max_new_tokens=a.max_new_tokens,
            seed=a.seed,
            batch_size=a.batch_size,
        )
        if a.maj_draws < 1:
            raise ValueError(f"--maj-draws must be >= 1, got {a.maj_draws}")
        sandbox = E.SandboxConfig(
            timeout=a.code_timeout, memory_mb=a.code_memory_mb, workers=a.code_workers
        )
    except ValueError as e:
        parser.error(str(e))

    say = lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        prompts = E.read_prompts(a.prompts)
        gens = E.read_generations(a.generations, prompts) if a.generations else None
        heldout = E.read_texts(a.heldout) if a.heldout else None
        model = fmt = None
        before = a.heldout_loss_before
        sampled_here = gens is None
        if a.engine == "vllm":
            from megatron_gem.eval import vllm_sampling as V

            fmt = _chat_format(a, E.load_tokenizer(a.model))
            say(f"loading {a.model} in vLLM")
            llm = V.load_vllm(
                a.model, dtype=a.dtype, seed=a.seed, tensor_parallel_size=a.tensor_parallel_size
            )
            say(f"sampling {sampling.n} responses for {len(prompts)} prompts with vLLM")
            gens = V.sample_vllm(llm, fmt, [p.messages for p in prompts], sampling)
            del llm
        elif a.model:
            say(f"loading {a.model}")
            dtype = getattr(torch, a.dtype)
            model, tok = E.load_hf(a.model, device=a.device, dtype=dtype)
            fmt = _chat_format(a, tok)
            if a.base_model:
                say(f"held-out loss of the base model {a.base_model}")
                # same tokenizer as the SFT model
                base, _ = E.load_hf(a.base_model, device=a.device, dtype=dtype)
                before = E.heldout_loss(base, fmt, heldout)
                del base
        embedder = sentence_embedder(a.embedding_model)
        if a.embedding_model and embedder is None:
            say("sentence-transformers is not installed: embedding diversity skipped")
        reward = None
        if a.reward:
            from megatron_gem.eval.reward import load_reward

            reward = load_reward(a.reward)
        elif a.reward_model:
            from megatron_gem.eval.reward import RewardModel

            say(f"loading the reward model {a.reward_model}")
            reward = RewardModel(a.reward_model, device=a.device)
        result = E.evaluate(
            model,
            fmt,
            prompts,
            sampling,
            generations=gens,
            heldout_texts=heldout,
            heldout_loss_before=before,
            score=not a.no_score,
            embedder=embedder,
            progress=say,
            reward=reward,
            sandbox=sandbox,
            maj_draws=a.maj_draws,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.engine == "vllm":
        result["sampling"] = {**vars(sampling), "engine": "vllm"}
    if before is not None:
        result["heldout_loss_before"] = before
    result["note"] = "all metrics are computed on the response text only (the prompt is excluded)"

    _write_atomic(Path(a.out), json.dumps(result, indent=1) + "\n")
    if a.csv:
        present = {k for d in result["sets"].values() for k in d}
        metrics = metric_order(k for k in present if f"n_{k}" in present)
        order = ["n_prompts", "n_samples", *metrics, *(f"n_{m}" for m in metrics)]
        keys = [k for k in order if k in present] + sorted(present - set(order))
        rows = [
            {
                "set": s,
                **d,
                "heldout_loss": result["heldout_loss"],
                "forgetting": result["forgetting"],
            }
            for s, d in result["sets"].items()
        ]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["set", *keys, "heldout_loss", "forgetting"])
        w.writeheader()
        w.writerows(rows)
        _write_atomic(Path(a.csv), buf.getvalue())
    if a.save_generations and sampled_here:
        _write_atomic(
            Path(a.save_generations),
            "".join(
                json.dumps({"prompt_id": r["id"], "generations": r["generations"]}) + "\n"
                for r in result["prompts"]
            ),
        )

    shown = (
        "quality",
        "valid_mass",
        "effective_valid",
        "coverage",
        "ngram_diversity",
        "self_bleu_diversity",
        "embedding_diversity",
    )
    shown = [m for m in shown if any(m in d for d in result["sets"].values())]
    width = max(len(s) for s in result["sets"]) + 2
    print("set".ljust(width) + "".join(m.rjust(len(m) + 2) for m in shown))
    for s, d in result["sets"].items():
        print(
            s.ljust(width)
            + "".join((f"{d[m]:.4f}" if m in d else "-").rjust(len(m) + 2) for m in shown)
        )
    for k in ("heldout_loss", "forgetting"):
        if result[k] is not None:
            print(f"{k}: {result[k]:.4f}")
    curves = [c for c in metric_order(result["sets"]["all"]) if is_curve(c)]
    for fam in dict.fromkeys(c.split("@")[0] for c in curves):
        points = [c for c in curves if c.split("@")[0] == fam]
        print(f"{fam}@k (all): " + "  ".join(f"{c}={result['sets']['all'][c]:.4f}" for c in points))
    print(f"wrote {a.out}" + (f" and {a.csv}" if a.csv else ""))
    return 0
