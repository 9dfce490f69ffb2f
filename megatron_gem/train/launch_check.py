"""Dry-run checks of launch scripts: the job's exact arguments, checked without a GPU or slurm.

A launch script (``launch_scripts/*.sbatch``, ``*.sh``) builds its full argument list and ends
with ``gem_launch`` (``launch_scripts/common.sh``). With ``DRY_RUN=1`` that call does not start
anything; it runs ``python -m megatron_gem.train.launch_check`` on the same arguments, which

* parses them with the training entry's own parser (``megatron_gem.train.arguments.parse_args``:
  Megatron's parser and ``validate_args`` plus ``--loss/--gem-*``) for the job's world size
  ``nodes x gpus_per_node``, as on the cluster (``--transformer-impl`` etc. as written, not
  adapted to this machine; FP8 flags parse without Transformer Engine installed);
* adds the layout checks Megatron leaves to model-build time on the cluster (heads, query
  groups and FFN width divisible by TP, sequence divisible for SP/CP, FP8 needing Transformer
  Engine, checkpoint/exit flags that make preemption lose work, ...);
* prints the layout and Megatron's theoretical per-GPU memory estimate
  (``megatron.training.theoretical_memory_usage``) and fails when it exceeds the GPU memory.

Tool jobs (checkpoint conversion, data preparation) are checked by parsing their arguments with
the tool's own ``build_parser()``. Recipe jobs (``GEM_RECIPE``: a Megatron-Bridge recipe script
such as ``examples/bridge_llama3_8b_sft.py``, started like the entry) are checked the same way
with the recipe file's ``build_parser()``, plus the GEM flags' values; their Megatron settings
are Bridge's config, checked by Bridge at start-up, so they get no layout or memory check here.

Megatron's ``validate_args`` asks ``torch.cuda`` for the device architecture when TP/CP > 1;
without a GPU the check runs under ``megatron_gem.megatron.cpu`` (switched on only for the parse and
off again), whose stand-in device reports architecture 0: Megatron then validates as for a
pre-Blackwell GPU, which is what an H100 is.

Many scripts are checked in one process by ``tools/dry_run_launch.py`` (and the tests): the
scripts then write their records to ``GEM_DRY_RUN_DUMP`` (``read_dump``) instead of starting a
Python process each (importing Megatron costs seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = [
    "LaunchSpec",
    "LaunchReport",
    "LaunchCheckError",
    "parse_train_args",
    "layout_problems",
    "checkpoint_model_problems",
    "estimate_memory",
    "check_spec",
    "read_dump",
    "dry_run_script",
    "main",
    "DEFAULT_GPU_MEMORY_GIB",
]

DEFAULT_GPU_MEMORY_GIB = 80.0  # H100 SXM; --gpu-memory-gib for other GPUs
MIB = 1024 * 1024


class LaunchCheckError(ValueError):
    """A launch whose arguments would fail (or run out of memory) on the cluster."""


@dataclasses.dataclass
class LaunchSpec:
    """One launch of a script: what ``gem_launch`` would start, and where."""

    # "train" (megatron_gem.train), "tool" (a module of megatron_gem, run with -m) or "recipe"
    # (a Python file run in every task, e.g. a Megatron-Bridge recipe script)
    kind: str
    # "megatron_gem.train", the tool's module (e.g. "megatron_gem.convert") or the recipe file
    program: str
    target: str  # "cluster" (flags as written, GPU job) or "host" (this machine, CPU mode)
    nodes: int
    gpus_per_node: int
    argv: list[str]
    vocab_size: int | None = None  # tokenizer vocabulary, for the memory estimate
    script: str = ""
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("train", "tool", "recipe"):
            raise ValueError(f"kind={self.kind!r}: must be 'train', 'tool' or 'recipe'")
        if self.target not in ("cluster", "host"):
            raise ValueError(f"target={self.target!r}: must be 'cluster' or 'host'")
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.vocab_size is not None and (
            not isinstance(self.vocab_size, int) or self.vocab_size < 1
        ):
            raise ValueError(f"vocab_size={self.vocab_size!r}: must be a positive integer or None")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def name(self) -> str:
        return Path(self.script).name if self.script else self.program


@dataclasses.dataclass
class LaunchReport:
    spec: LaunchSpec
    layout: dict  # name -> value, in print order
    memory: dict | None  # MiB: weights_and_optimizer, activations, total (Megatron's estimate)
    warnings: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)  # what was not checked, and why

    def format(self) -> str:
        s = self.spec
        if s.kind == "tool":
            where = "a tool job, arguments parsed by its own parser"
        else:
            where = (
                f"on {s.nodes} node(s) x {s.gpus_per_node} = {s.world_size} rank(s) ({s.target})"
            )
        if s.kind == "recipe":
            where += ", a recipe: arguments parsed by its own parser"
        lines = [f"== {s.name}: {s.program} {where} -- OK"]
        if self.layout:
            lines.append("   layout: " + ", ".join(f"{k}={v}" for k, v in self.layout.items()))
        if self.memory is not None:
            m = self.memory
            lines.append(
                f"   memory per GPU (Megatron's theoretical estimate, {m['method']}): "
                f"weights+optimizer {_size(m['weights_and_optimizer'])}, "
                f"activations {_size(m['activations'])}, total {_size(m['total'])}"
                + (f" of {m['gpu_memory_gib']:.0f} GiB" if m.get("gpu_memory_gib") else "")
            )
        lines += [f"   WARNING: {w}" for w in self.warnings]
        lines += [f"   note: {n}" for n in self.notes]
        return "\n".join(lines)


def _size(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"


# ----------------------------------------------------------------------------- parsing
def _argparse_error(stderr_text: str) -> str:
    errors = [line for line in stderr_text.splitlines() if ": error: " in line]
    return errors[-1].split(": error: ", 1)[1] if errors else stderr_text.strip()[-500:]


def parse_train_args(
    argv: list[str], world_size: int, target: str = "cluster"
) -> argparse.Namespace:
    """The training entry's validated args for ``argv`` at ``world_size`` ranks, quietly.

    Raises ``LaunchCheckError`` with the parser's or Megatron's own message on bad arguments.
    ``target="cluster"`` keeps the flags as written; ``"host"`` applies the defaults the entry
    applies on this machine (the CPU smoke run).
    """
    from megatron_gem.megatron import cpu as cpu_mode
    from megatron_gem.train.arguments import parse_args

    switched_on = False
    out, err = io.StringIO(), io.StringIO()
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            if not cpu_mode.is_cpu_mode_enabled():
                switched_on = cpu_mode.enable_cpu_mode()  # no-op where CUDA is available
            return parse_args(
                list(argv), world_size=world_size, rank=0, adapt_to_host=(target == "host")
            )
    except SystemExit:  # argparse (unknown flag, bad value) or the GEM argument checks
        raise LaunchCheckError(f"argument error: {_argparse_error(err.getvalue())}") from None
    except AssertionError as e:  # Megatron's validate_args
        raise LaunchCheckError(f"Megatron rejected the arguments: {e}") from None
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise LaunchCheckError(
            f"Megatron rejected the arguments: {type(e).__name__}: {e}"
        ) from None
    finally:
        if switched_on:
            cpu_mode.disable_cpu_mode()


# ----------------------------------------------------------------------------- layout
def layout_problems(args: argparse.Namespace, spec: LaunchSpec) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` Megatron's ``validate_args`` does not report.

    Most would surface only on the cluster, after the allocation started: when the model is
    built (head/group/FFN splits), in the first forward (sequence splits) or at preemption
    (nothing saved to resume from).
    """
    errors: list[str] = []
    warns: list[str] = []
    tp = args.tensor_model_parallel_size
    pp = args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    vp = args.virtual_pipeline_model_parallel_size or 1
    dp = args.data_parallel_size

    if args.world_size != spec.world_size:
        errors.append(f"world size {args.world_size} != nodes x GPUs per node = {spec.world_size}")
    if tp * pp * cp * dp != args.world_size:
        errors.append(f"TP*PP*CP*DP = {tp}*{pp}*{cp}*{dp} != world size {args.world_size}")

    heads = args.num_attention_heads
    groups = args.num_query_groups if args.group_query_attention else heads
    if heads % tp:
        errors.append(
            f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if groups % tp:
        errors.append(
            f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size {tp} "
            "(each TP rank needs whole key/value groups)"
        )
    ffn = args.ffn_hidden_size
    if ffn % tp:
        errors.append(
            f"--ffn-hidden-size {ffn} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if args.num_layers % (pp * vp):
        errors.append(f"--num-layers {args.num_layers} is not divisible by PP x VP = {pp} x {vp}")

    seq = args.seq_length
    if args.sequence_parallel and tp > 1 and seq % (tp * (2 * cp if cp > 1 else 1)):
        need = tp * (2 * cp if cp > 1 else 1)
        errors.append(
            f"--seq-length {seq} is not divisible by {need} (TP{' x 2CP' if cp > 1 else ''}), "
            "needed by --sequence-parallel"
        )
    if args.max_position_embeddings is not None and seq > args.max_position_embeddings:
        errors.append(
            f"--seq-length {seq} exceeds --max-position-embeddings {args.max_position_embeddings}"
        )

    if spec.target == "cluster":
        if spec.gpus_per_node % tp and tp > 1:
            warns.append(
                f"TP={tp} does not divide GPUs per node={spec.gpus_per_node}: tensor-parallel "
                "groups span nodes (every layer all-reduces over the network)"
            )
        elif tp > spec.gpus_per_node:
            warns.append(
                f"TP={tp} > GPUs per node={spec.gpus_per_node}: tensor-parallel groups span nodes"
            )
        if tp > 1 and not args.sequence_parallel:
            warns.append("TP > 1 without --sequence-parallel: activations are replicated over TP")
        conn = spec.env.get("CUDA_DEVICE_MAX_CONNECTIONS")
        if (
            (tp > 1 or cp > 1)
            and conn != "1"
            and not (args.use_torch_fsdp2 or args.use_megatron_fsdp)
        ):
            warns.append(
                f"CUDA_DEVICE_MAX_CONNECTIONS={conn!r}: Megatron needs 1 to overlap TP/CP "
                "communication on Hopper (export it in the job)"
            )

    if args.fp8:
        if args.transformer_impl != "transformer_engine":
            errors.append(
                f"--fp8-format {args.fp8} needs --transformer-impl transformer_engine "
                f"(got {args.transformer_impl})"
            )
        if not args.bf16:
            warns.append("FP8 without --bf16: the non-FP8 parts run in FP32")
        if args.fp8_recipe == "mxfp8":
            warns.append(
                "--fp8-recipe mxfp8 needs Blackwell GPUs (use tensorwise or delayed on H100)"
            )

    saving = args.save is not None
    if (args.exit_signal_handler or args.exit_duration_in_mins) and not saving:
        errors.append(
            "--exit-signal-handler / --exit-duration-in-mins without --save: the job would "
            "stop without a checkpoint to resume from"
        )
    if saving and args.load is None:
        warns.append(
            "--save without --load: a rerun or requeued job starts over instead of resuming"
        )
    elif (
        saving
        and args.load is not None
        and os.path.abspath(args.load) != os.path.abspath(args.save)
    ):
        warns.append(
            f"--load {args.load} != --save {args.save}: a requeued job does not resume "
            "from its own checkpoints"
        )
    if saving and args.save_interval is None:
        warns.append("--save without --save-interval: checkpoints only at exit")

    if getattr(args, "sft", False) and not (
        args.data_path or args.train_data_path or args.mock_data
    ):
        errors.append("--sft needs --data-path (the prefix written by tools/prepare_sft_data.py)")
    if (
        args.tokenizer_type
        in (
            "HuggingFaceTokenizer",
            "SentencePieceTokenizer",
            "GPTSentencePieceTokenizer",
            "Llama2Tokenizer",
            "TikTokenizer",
        )
        and not args.tokenizer_model
    ):
        errors.append(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
    return errors, warns


# ----------------------------------------------------------------------------- base checkpoint
CHECKPOINT_FLAGS_FILE = "megatron_args.txt"  # written by megatron-gem-convert hf-to-megatron
_IGNORED_CHECKPOINT_FLAGS = {"--bf16", "--fp16"}  # the run's precision is the run's choice
_ARCH_SWITCHES = (
    "--group-query-attention",
    "--untie-embeddings-and-output-weights",
    "--add-qkv-bias",
    "--use-rope-scaling",
    "--swiglu",
    "--disable-bias-linear",
)


def _flag_map(tokens: list[str]) -> dict[str, str | bool]:
    """``--flag value`` / ``--flag=value`` / ``--switch`` -> dict (the last occurrence wins)."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            if "=" in tok:
                key, value = tok.split("=", 1)
                out[key] = value
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                out[tok] = tokens[i + 1]
                i += 1
            else:
                out[tok] = True
        i += 1
    return out


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def checkpoint_model_problems(
    argv: list[str], args: argparse.Namespace, vocab_size: int | None
) -> list[str]:
    """Differences between the run's model flags and those of the converted base checkpoint.

    ``megatron-gem-convert hf-to-megatron`` writes the exact model flags of the HF model
    to ``CKPT/megatron_args.txt``; when the run's ``--pretrained-checkpoint`` (or ``--load``)
    has that file here, every flag in it must have the same value in the run, and the run may
    not switch on an architecture option the checkpoint lacks. The embedding's padded
    vocabulary (a multiple of ``--make-vocab-size-divisible-by`` x TP) must match too.
    """
    problems: list[str] = []
    for ckpt in (getattr(args, "pretrained_checkpoint", None), args.load):
        path = Path(ckpt) / CHECKPOINT_FLAGS_FILE if ckpt else None
        if path is None or not path.is_file():
            continue
        lines = path.read_text().splitlines()
        theirs = _flag_map(" ".join(x for x in lines if not x.lstrip().startswith("#")).split())
        mine = _flag_map(list(argv))
        for flag, value in theirs.items():
            if flag in _IGNORED_CHECKPOINT_FLAGS:
                continue
            if flag not in mine:
                problems.append(
                    f"{flag} {'' if value is True else value}".rstrip()
                    + f" is in {path} but not in the run's arguments"
                )
            elif not _same(mine[flag], value):
                problems.append(
                    f"{flag} {mine[flag]} differs from the checkpoint's {value} ({path})"
                )
        for flag in _ARCH_SWITCHES:
            if flag in mine and flag not in theirs:
                problems.append(
                    f"{flag} is set but the checkpoint's model has no such option ({path})"
                )
        comment = " ".join(x for x in lines if x.lstrip().startswith("#"))
        found = re.search(r"--tensor-model-parallel-size (\d+)", comment)
        if found and vocab_size:
            div = args.make_vocab_size_divisible_by
            ckpt_tp, tp = int(found.group(1)), args.tensor_model_parallel_size
            if padded_vocab_size(vocab_size, div, ckpt_tp) != padded_vocab_size(
                vocab_size, div, tp
            ):
                problems.append(
                    f"the checkpoint was converted at TP={ckpt_tp}: its embedding has "
                    f"{padded_vocab_size(vocab_size, div, ckpt_tp)} rows, TP={tp} needs "
                    f"{padded_vocab_size(vocab_size, div, tp)} (convert again with --tp {tp})"
                )
        break
    return problems


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """Megatron's own padding (``vocab_size_with_padding``) for a vocabulary at TP ``tp``."""
    from types import SimpleNamespace

    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    layout = SimpleNamespace(
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tp,
        rank=0,
    )
    return vocab_size_with_padding(vocab_size, layout, logging_enabled=False)


def _layout(args: argparse.Namespace, num_microbatches: int) -> dict:
    loss = args.loss
    if args.loss == "gem":
        fused = ", linear-fusion" if getattr(args, "gem_linear_fusion", False) else ""
        loss += f"(beta={args.gem_beta}, h={args.gem_h}{fused})"
    layout = {
        "TP": args.tensor_model_parallel_size,
        "PP": args.pipeline_model_parallel_size,
        "VP": args.virtual_pipeline_model_parallel_size or 1,
        "CP": args.context_parallel_size,
        "DP": args.data_parallel_size,
        "SP": "on" if args.sequence_parallel else "off",
        "dist-opt": "on" if args.use_distributed_optimizer else "off",
        "layers/stage": args.num_layers
        // (args.pipeline_model_parallel_size * (args.virtual_pipeline_model_parallel_size or 1)),
        "seq": args.seq_length,
        "micro-batch": args.micro_batch_size,
        "global-batch": args.global_batch_size,
        "micro-batches/step": num_microbatches,
        "precision": ("fp8-" + str(args.fp8) + "/" + str(args.fp8_recipe))
        if args.fp8
        else ("bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"),
        "loss": loss,
        "impl": args.transformer_impl,
    }
    if args.recompute_granularity:
        layout["recompute"] = args.recompute_granularity
    return layout


# ----------------------------------------------------------------------------- memory
def estimate_memory(args: argparse.Namespace, vocab_size: int, num_microbatches: int) -> dict:
    """Megatron's theoretical per-GPU memory (MiB) for ``args`` with this tokenizer vocabulary.

    Megatron's functions (``report_theoretical_memory`` logs them at start-up); see the comment
    below for which activation formula is used. Megatron assumes BF16 weights with FP32
    main weights/gradients/Adam states and counts neither the CUDA context, NCCL buffers,
    allocator fragmentation nor FP8 copies: budget ~10-15% headroom.
    """
    from megatron.training import theoretical_memory_usage as tmu
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    a = copy.copy(args)  # compute_weight_and_optimizer_memory writes num_query_groups
    a.padded_vocab_size = calculate_padded_vocab_size(
        vocab_size,
        a.make_vocab_size_divisible_by,
        a.tensor_model_parallel_size,
        logging_enabled=False,
    )
    # Megatron's SP formula (Korthikanti et al. 2022, Table 2) assumes the s x s attention
    # scores are not kept: true with selective recompute, and also with Transformer Engine's
    # flash/fused attention, which never materialises them. Megatron's own report uses it only
    # for selective recompute and otherwise the no-SP formula, an upper bound under SP.
    flash = a.transformer_impl == "transformer_engine"
    # Megatron's formulas ignore context parallelism: each CP rank holds seq / cp tokens of
    # activations (every term is linear in the sequence with fused attention), and the
    # distributed optimizer shards its state over DP x CP (Megatron's intra_dp_cp group).
    cp = a.context_parallel_size or 1
    dp = a.data_parallel_size
    sp_formula = a.sequence_parallel and (a.recompute_granularity == "selective" or flash)
    activation_memory = (
        tmu.compute_activation_memory if sp_formula else tmu.compute_activation_memory_without_sp
    )
    with contextlib.redirect_stdout(io.StringIO()):
        a.data_parallel_size = dp * cp
        weights = tmu.compute_weight_and_optimizer_memory(a) / MIB
        a.data_parallel_size, a.seq_length = dp, a.seq_length // cp
        activations = activation_memory(a, num_microbatches=num_microbatches) / MIB
    if sp_formula:
        method = "SP, " + (
            "selective recompute" if a.recompute_granularity == "selective" else "fused attention"
        )
    else:
        method = "no SP" if not a.sequence_parallel else "SP with unfused attention: upper bound"
    if cp > 1:
        method += f", CP{cp}: {a.seq_length} tokens per rank"
    if getattr(a, "gem_linear_fusion", False) and a.pipeline_model_parallel_size == 1:
        # Megatron's formulas count the [tokens, V/tp] logits of the output layer and the loss
        # (4 bytes a logit with SP: room for the bf16 logits and the loss's work; 2 x 1.05,
        # the bf16 logits, without)
        # only with PP=1, where the first stage (the one estimated) is also the last. The fused
        # op never materialises them: take out exactly Megatron's term (the same formula with
        # no vocabulary) and put in the op's workspace (``workspace_bytes``). With
        # PP > 1 the estimated first stage holds no logits, so the flag changes nothing there.
        from megatron_gem.ops.linear_gem import workspace_bytes

        no_vocab = copy.copy(a)
        no_vocab.padded_vocab_size = 0
        with contextlib.redirect_stdout(io.StringIO()):
            logits = activations - activation_memory(no_vocab, num_microbatches) / MIB
        v_local = a.padded_vocab_size // a.tensor_model_parallel_size
        tokens = a.seq_length * a.micro_batch_size  # the output layer sees the gathered sequence
        dtype_bytes = 2 if (a.bf16 or a.fp16) else 4
        workspace = (
            workspace_bytes(
                tokens, a.hidden_size, v_local, dtype_bytes, "cuda", a.gem_impl or "auto"
            )
            / MIB
        )
        activations += workspace - logits
        method += (
            f", fused output layer + GEM: logits {_size(logits)} -> workspace {_size(workspace)}"
        )
    return {
        "weights_and_optimizer": weights,
        "activations": activations,
        "total": weights + activations,
        "padded_vocab_size": a.padded_vocab_size,
        "method": method,
    }


def _vocab_size(args: argparse.Namespace, spec: LaunchSpec) -> int | None:
    if args.vocab_size:
        return int(args.vocab_size)
    return spec.vocab_size


# ----------------------------------------------------------------------------- checks
def _check_train(spec: LaunchSpec, gpu_memory_gib: float | None) -> LaunchReport:
    args = parse_train_args(spec.argv, spec.world_size, spec.target)
    errors, warns = layout_problems(args, spec)
    errors += checkpoint_model_problems(spec.argv, args, _vocab_size(args, spec))
    if errors:
        raise LaunchCheckError("invalid layout/arguments:\n  - " + "\n  - ".join(errors))
    num_microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    memory = None
    vocab = _vocab_size(args, spec)
    if vocab is None:
        warns.append(
            "no vocabulary size (set GEM_VOCAB_SIZE or pass --vocab-size): memory not estimated"
        )
    else:
        memory = estimate_memory(args, vocab, num_microbatches)
        if spec.target == "cluster" and gpu_memory_gib:
            memory["gpu_memory_gib"] = gpu_memory_gib
            total_gib = memory["total"] / 1024
            if total_gib > gpu_memory_gib:
                raise LaunchCheckError(
                    f"estimated {total_gib:.1f} GiB per GPU (weights+optimizer "
                    f"{memory['weights_and_optimizer'] / 1024:.1f}, activations "
                    f"{memory['activations'] / 1024:.1f}) exceeds the GPU's "
                    f"{gpu_memory_gib:.0f} GiB: "
                    "raise TP/PP, use the distributed optimizer, recompute activations or add nodes"
                )
            if total_gib > 0.85 * gpu_memory_gib:
                warns.append(
                    f"estimated {total_gib:.1f} GiB is within 15% of the GPU's "
                    f"{gpu_memory_gib:.0f} GiB"
                )
    return LaunchReport(spec, _layout(args, num_microbatches), memory, warns)


def _load_tool(module: str):
    """The tool's module (``python -m MODULE``) or its ``.cli``: whichever has ``build_parser``."""
    for name in (module, f"{module}.cli"):
        try:
            loaded = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(loaded, "build_parser"):
            return loaded
    raise LaunchCheckError(
        f"tool {module}: no module with build_parser() (not an installed megatron_gem tool?)"
    )


def _parse_own(parser: argparse.ArgumentParser, spec: LaunchSpec) -> argparse.Namespace:
    """``spec.argv`` parsed by a tool's or recipe's own parser; its error as a LaunchCheckError."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(spec.argv)
    except SystemExit:
        raise LaunchCheckError(
            f"argument error ({spec.program}): {_argparse_error(err.getvalue())}"
        ) from None


def _shown(ns: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(ns).items() if v is not None and not callable(v)}


def _check_tool(spec: LaunchSpec) -> LaunchReport:
    ns = _parse_own(_load_tool(spec.program).build_parser(), spec)
    return LaunchReport(spec, _shown(ns), None, [])


RECIPE_NOTE = (
    "the recipe's Megatron settings (parallel layout, precision, batch, data) are its "
    "Megatron-Bridge config, not flags: Bridge checks them at start-up; no memory estimate"
)


def _check_recipe(spec: LaunchSpec) -> LaunchReport:
    """A recipe file (run as ``python FILE ARGS`` in every task): it exists, its own
    ``build_parser()`` accepts the arguments, and the GEM flags it takes have valid values
    (checked here too, as a recipe's parser may take ``--gem-beta`` as any float)."""
    import importlib.util

    from megatron_gem.ops.config import GEM_H_CHOICES, check_beta

    path = Path(spec.program)
    if not path.is_file():
        raise LaunchCheckError(f"recipe {path} not found (GEM_RECIPE)")
    module_spec = importlib.util.spec_from_file_location(f"_gem_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)  # a recipe imports Bridge in main(), not here
    except Exception as e:
        raise LaunchCheckError(f"recipe {path} does not import: {type(e).__name__}: {e}") from None
    if not hasattr(module, "build_parser"):
        raise LaunchCheckError(f"recipe {path} has no build_parser() to check its arguments with")
    ns = _parse_own(module.build_parser(), spec)
    beta, h = getattr(ns, "gem_beta", None), getattr(ns, "gem_h", None)
    if beta is not None:
        try:
            check_beta(float(beta))
        except ValueError:
            raise LaunchCheckError(
                f"argument error ({spec.program}): argument --gem-beta: must be in (0, 1], "
                f"got {beta!r}"
            ) from None
    if h is not None and h not in GEM_H_CHOICES:
        raise LaunchCheckError(
            f"argument error ({spec.program}): argument --gem-h: must be one of "
            f"{', '.join(GEM_H_CHOICES)}, got {h!r}"
        )
    return LaunchReport(spec, _shown(ns), None, [], [RECIPE_NOTE])


def check_spec(
    spec: LaunchSpec, gpu_memory_gib: float | None = DEFAULT_GPU_MEMORY_GIB
) -> LaunchReport:
    """Check one launch; ``LaunchCheckError`` (a ``ValueError``) says what is wrong."""
    if spec.kind == "tool":
        return _check_tool(spec)
    if spec.kind == "recipe":
        return _check_recipe(spec)
    return _check_train(spec, gpu_memory_gib)


# ----------------------------------------------------------------------------- scripts
_DUMP_HEADER = (
    8  # kind, program, target, nodes, gpus_per_node, vocab, script, env CUDA_DEVICE_MAX_CONNECTIONS
)


def read_dump(data: bytes) -> list[LaunchSpec]:
    """Parse the NUL-separated records ``gem_launch`` writes to ``GEM_DRY_RUN_DUMP``."""
    fields = data.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    text = [f.decode() for f in fields]
    specs, i = [], 0
    while i < len(text):
        if i + _DUMP_HEADER + 1 > len(text):
            raise ValueError("truncated dry-run record")
        kind, program, target, nodes, gpus, vocab, script, conn = text[i : i + _DUMP_HEADER]
        argc = int(text[i + _DUMP_HEADER])
        argv = text[i + _DUMP_HEADER + 1 : i + _DUMP_HEADER + 1 + argc]
        if len(argv) != argc:
            raise ValueError("truncated dry-run record")
        env = {"CUDA_DEVICE_MAX_CONNECTIONS": conn} if conn else {}
        specs.append(
            LaunchSpec(
                kind,
                program,
                target,
                int(nodes),
                int(gpus),
                argv,
                int(vocab) if vocab else None,
                script,
                env,
            )
        )
        i += _DUMP_HEADER + 1 + argc
    return specs


# Variables of the caller's environment that would change what a script builds.
_SCRUB_PREFIXES = ("SLURM_",)


def dry_run_script(
    script: str | os.PathLike,
    env: dict[str, str] | None = None,
    script_args: list[str] | tuple = (),
    timeout: float = 60,
    base_env: dict[str, str] | None = None,
) -> list[LaunchSpec]:
    """Run a launch script with ``DRY_RUN=1`` (bash only, no Python started) and return the
    launches it would make. ``env`` overrides variables (e.g. ``{"TP": "4"}``) of ``base_env``
    (default: this process's environment, so ``TP=4 tools/dry_run_launch.py`` works like
    ``TP=4 sbatch``); slurm's variables are removed so the result is the same inside a job.
    Raises ``LaunchCheckError`` with the script's message when it stops early.
    """
    script = Path(script)
    if not script.is_file():
        raise LaunchCheckError(f"launch script {script} not found")
    base = os.environ if base_env is None else base_env
    run_env = {k: v for k, v in base.items() if not k.startswith(_SCRUB_PREFIXES)}
    for name in ("GEM_REPO", "GEM_SCRIPT"):  # found from the script's own location
        run_env.pop(name, None)
    run_env.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "launches"
        run_env.update(DRY_RUN="1", GEM_DRY_RUN_DUMP=str(dump))
        proc = subprocess.run(
            ["bash", str(script), *script_args],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise LaunchCheckError(
                f"{script.name} stopped (exit {proc.returncode}): "
                + (proc.stderr.strip().splitlines() or ["no message"])[-1]
            )
        if not dump.exists():
            raise LaunchCheckError(f"{script.name} launched nothing (does it end with gem_launch?)")
        return read_dump(dump.read_bytes())


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_gem.train.launch_check",
        description="Check a launch's arguments without a GPU: parse them with the training "
        "entry's parser for the job's world size, check the parallel layout, print it with "
        "Megatron's per-GPU memory estimate. Usually called by launch scripts run with DRY_RUN=1.",
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument(
        "--target",
        choices=("cluster", "host"),
        default="cluster",
        help="cluster: flags as written (a GPU job); host: as the entry adapts them here",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="tokenizer vocabulary for the memory estimate (when not in the arguments)",
    )
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=DEFAULT_GPU_MEMORY_GIB,
        help=f"fail when the estimate exceeds this (default {DEFAULT_GPU_MEMORY_GIB:.0f}, H100)",
    )
    p.add_argument(
        "--tool", default=None, help="check ARGV against this tool's build_parser() instead"
    )
    p.add_argument(
        "--recipe",
        default=None,
        help="check ARGV against this recipe file's build_parser() instead (GEM_RECIPE)",
    )
    p.add_argument("--script", default="", help="name shown in the report")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the launch's arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    rest = ns.argv[1:] if ns.argv[:1] == ["--"] else ns.argv
    try:
        spec = LaunchSpec(
            "tool" if ns.tool else "recipe" if ns.recipe else "train",
            ns.tool or ns.recipe or "megatron_gem.train",
            ns.target,
            ns.nodes,
            ns.gpus_per_node,
            list(rest),
            ns.vocab_size,
            ns.script,
            {k: os.environ[k] for k in ("CUDA_DEVICE_MAX_CONNECTIONS",) if k in os.environ},
        )
        report = check_spec(spec, ns.gpu_memory_gib)
    except (LaunchCheckError, ValueError) as e:
        name = Path(ns.script).name if ns.script else "launch"
        print(f"== {name}: DRY RUN FAILED\n{e}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
