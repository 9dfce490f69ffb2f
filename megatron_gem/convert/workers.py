"""The conversion's worker processes: one per model shard, each running Megatron on CPUs.

`run_workers` starts ``tp*pp`` (import) or ``pp`` (export) processes forming one gloo job, and
makes sure none outlives the conversion (process groups, parent-death handling). In each one,
Megatron is initialised as the training entry does (`init_megatron_worker`), the model is built
by the entry's own model provider, and checkpoints are written/read by Megatron's own
``save_checkpoint`` / ``load_checkpoint`` (torch_dist, resharded on load), so
``megatron_gem.train --load`` accepts what `import_worker` writes and `export_worker` reads any
layout the entry saved. Megatron is imported only inside the workers.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from megatron_gem.convert.arch import DTYPES, ArchSpec, megatron_model_args
from megatron_gem.convert.checkpoints import IncompleteOutputError, write_import_record
from megatron_gem.convert.hf_files import SafetensorsReader
from megatron_gem.convert.log import log
from megatron_gem.convert.mapping import (
    local_megatron_tensor,
    megatron_to_hf_tensors,
    parse_megatron_name,
)
from megatron_gem.paths import umask


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, target, kwargs: dict, parent: int | None = None):
    if parent is not None:
        _die_with_parent(parent)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # share the cores
    target(**kwargs)


def _die_with_parent(parent: int) -> None:
    """Stop this worker and everything it started (Megatron's checkpoint writer starts a
    multiprocessing Manager) when the conversion that started it dies: kill -9 leaves the
    parent no chance to stop them, and orphans would go on using the cores and the memory.
    The worker leads its own process group, which SIGTERM (the parent's clean-up, or the
    kernel's parent-death signal on Linux) and a thread watching the parent's PID kill."""
    import signal
    import threading
    import time

    os.setpgid(0, 0)

    def stop(*_):
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the signal was armed
        stop()

    def watch():  # the signal handler waits for the main thread; this does not
        while os.getppid() == parent:
            time.sleep(0.2)
        stop()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_workers(target: Callable, nprocs: int, **kwargs) -> None:
    """Run ``target(**kwargs)`` in ``nprocs`` fresh processes forming one gloo job (env
    ``RANK``/``WORLD_SIZE``/``MASTER_*`` set). Raises if any process fails; the workers never
    outlive this call (an exception here, e.g. SIGTERM turned into one, kills them) nor the
    calling process (`_die_with_parent`). A worker that exits 0 without writing its part is
    not detected here: the callers check the output (`check_megatron_output`,
    `check_hf_output`)."""
    import signal

    import torch.multiprocessing as mp

    # Conversion is CPU work (gloo, megatron_gem.megatron.cpu, local layer spec) even on a GPU
    # node: the workers inherit an environment without visible GPUs.
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    ctx = None
    try:
        ctx = mp.start_processes(
            _child,
            args=(nprocs, _free_port(), target, kwargs, os.getpid()),
            nprocs=nprocs,
            start_method="spawn",
            join=False,
        )
        while not ctx.join():
            pass
    except mp.ProcessRaisedException as err:
        last = str(err).strip().splitlines()[-1]
        if last.startswith("ValueError: "):  # a refusal in a worker: report it plainly
            raise ValueError(last[len("ValueError: ") :]) from err
        raise
    except mp.ProcessExitedException as err:
        how = (
            f"was killed by {err.signal_name}"
            if err.signal_name
            else f"exited with code {err.exit_code}"
        )
        if err.signal_name == "SIGKILL":
            how += " (out of memory?)"
        raise IncompleteOutputError(
            f"conversion worker {err.error_index} of {nprocs} {how}: nothing was published"
        ) from err
    finally:
        if ctx is not None:
            for p in ctx.processes:
                if p.is_alive():  # its process group: the worker and what it started
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:  # not yet its own group: nothing started yet
                        p.kill()
            for p in ctx.processes:
                p.join()
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def init_megatron_worker(argv: list[str], padded_vocab: int, overrides: dict | None = None):
    """Initialise Megatron in this worker as the training entry does (CPU mode, its argument
    parser), with a fixed padded vocabulary and no tokenizer; returns the args."""
    from megatron_gem.megatron import cpu as cpu_mode

    cpu_mode.enable_cpu_mode()  # no-op with CUDA (never the case here, see _child)
    from megatron.training.global_vars import set_global_variables
    from megatron.training.initialize import initialize_megatron

    from megatron_gem.megatron import patches
    from megatron_gem.train.arguments import parse_args

    patches.prebuilt_dataset_helpers()
    args = parse_args(argv, world_size=int(os.environ["WORLD_SIZE"]), rank=int(os.environ["RANK"]))
    args.padded_vocab_size = padded_vocab  # the checkpoint's, not recomputed from a tokenizer
    for k, v in (overrides or {}).items():
        setattr(args, k, v)
    set_global_variables(args, build_tokenizer=False)
    initialize_megatron(allow_no_cuda=True)
    return args


def build_model():
    """This rank's model chunks, built by the training entry's model provider."""
    from megatron.training.training import get_model

    from megatron_gem.megatron.model import model_provider

    return get_model(model_provider, wrap_with_ddp=False)


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def named_global_parameters(chunk) -> Iterator[tuple[str, int | None, str, torch.nn.Parameter]]:
    """``(kind, global layer, name, parameter)`` of one model chunk."""
    gpt = unwrap(chunk)
    for name, p in gpt.named_parameters():
        kind, local = parse_megatron_name(name)
        layer = None if local is None else gpt.decoder.layers[local].layer_number - 1
        yield kind, layer, name, p


def check_model_rope(model_chunks, arch: ArchSpec) -> None:
    """The rotary frequencies of the model the entry built are those of ``arch`` (megatron-core
    0.19.2's ``gpt_config_from_args`` drops ``--rope-scaling-factor``: a model provider that
    does not restore it trains Llama 3.2 (factor 32) with factor 8)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    want = RotaryEmbedding(
        arch.head_dim,
        1.0,
        rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        use_cpu_initialization=True,
    ).inv_freq
    for chunk in model_chunks:
        rope = getattr(unwrap(chunk), "rotary_pos_emb", None)
        if rope is not None and not torch.equal(rope.inv_freq.cpu(), want):
            raise ValueError(
                "the training entry's model provider builds RoPE frequencies that differ from "
                f"the HF model's (rope_theta={arch.rope_theta}, llama3 factor="
                f"{arch.rope_scaling_factor}); it must pass --rope-scaling-factor to the model "
                "config"
            )


def _worker_argv(
    arch: ArchSpec,
    dtype: str,
    tp: int,
    pp: int,
    extra: list[str],
    make_vocab_size_divisible_by: int = 128,
) -> list[str]:
    argv = megatron_model_args(arch, make_vocab_size_divisible_by) + [
        "--tensor-model-parallel-size",
        str(tp),
        "--pipeline-model-parallel-size",
        str(pp),
        "--micro-batch-size",
        "1",
        "--seq-length",
        str(min(arch.max_position_embeddings, 4096)),
        "--ckpt-format",
        "torch_dist",
        "--save-interval",
        "1",  # validate_args wants one whenever --save is given
        "--train-iters",
        "1",
        "--eval-iters",
        "0",
        "--no-initialization",  # every weight is overwritten: skip the random init
        "--use-cpu-initialization",
        "--distributed-timeout-minutes",
        "600",  # a 70B shard can take a while to read
    ]
    if dtype == "bf16":
        argv.append("--bf16")
    elif dtype == "fp16":
        argv.append("--fp16")
    return argv + extra


def import_worker(
    hf_dir: str,
    tmp_out: str,
    arch: ArchSpec,
    dtype: str,
    tp: int,
    pp: int,
    padded_vocab: int,
    tokenizer_argv: list[str],
    after_save=None,
    make_vocab_size_divisible_by: int = 128,
) -> None:
    """One rank of ``hf -> megatron``: build this rank's shard, fill it from HF slices, save
    with Megatron's ``save_checkpoint`` as a release checkpoint, and (rank 0) the import
    record. ``after_save(model, arch)`` (tests) runs in every rank at the end."""
    from megatron.core import parallel_state as ps

    # the divisor goes into the saved args too: the export checks the vocabulary against it
    args = init_megatron_worker(
        _worker_argv(
            arch,
            dtype,
            tp,
            pp,
            ["--save", tmp_out, "--no-save-optim", "--no-save-rng", *tokenizer_argv],
            make_vocab_size_divisible_by,
        ),
        padded_vocab,
    )
    if args.rank == 0:
        write_import_record(
            Path(hf_dir), Path(tmp_out), arch, padded_vocab, make_vocab_size_divisible_by, tp
        )
    model = build_model()
    check_model_rope(model, arch)
    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    reader = SafetensorsReader(hf_dir)
    chunk_params = [list(named_global_parameters(c)) for c in model]
    layers = sorted({lay for ps_ in chunk_params for _, lay, _, _ in ps_ if lay is not None})
    done = set()
    with torch.no_grad():
        for params in chunk_params:
            for kind, layer, name, p in params:
                t = local_megatron_tensor(
                    kind, layer, arch, reader.get, tp_rank, tp_size, padded_vocab
                )
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{name}: HF gives shape {tuple(t.shape)}, the Megatron "
                        f"shard has {tuple(p.shape)}"
                    )
                p.copy_(t)
                if layer is not None and layer not in done and args.rank == 0:
                    done.add(layer)
                    log(
                        f"hf-to-megatron: rank 0 filling layer {layer} "
                        f"({len(done)}/{len(layers)} of its stage)"
                    )
    reader.close()
    from megatron.training.checkpointing import save_checkpoint

    if args.rank == 0:
        log(f"hf-to-megatron: saving the torch_dist checkpoint ({tp * pp} ranks)")
    save_checkpoint(0, model, None, None, 0, release=True)
    torch.distributed.barrier()
    if after_save is not None:
        after_save(model, arch)


def export_worker(
    ckpt_root: str,
    iteration: int | None,
    tmp_out: str,
    arch: ArchSpec,
    ckpt_dtype: str,
    out_dtype: str,
    pp: int,
    padded_vocab: int,
    max_shard_bytes: int,
    add_position_embedding: bool = True,
    after_load=None,
) -> None:
    """One pipeline stage of ``megatron -> hf`` (tensor-parallel size 1): load this stage from
    the checkpoint with Megatron's ``load_checkpoint`` (resharded from any saved layout),
    convert its parameters and write them as safetensors parts; rank 0 renames the parts,
    writes the index. ``after_load(model, arch)`` (tests) runs in every rank after loading."""
    from safetensors.torch import save_file

    extra = [
        "--load",
        ckpt_root,
        "--no-load-optim",
        "--no-load-rng",
        "--exit-on-missing-checkpoint",
    ]
    if iteration is not None:
        extra += ["--ckpt-step", str(iteration)]
    # load_checkpoint asserts this flag equals the saved one; it means nothing with RoPE
    args = init_megatron_worker(
        _worker_argv(arch, ckpt_dtype, 1, pp, extra),
        padded_vocab,
        {"add_position_embedding": add_position_embedding},
    )
    from megatron.training.checkpointing import load_checkpoint

    model = build_model()
    if args.rank == 0:
        log(f"megatron-to-hf: loading {ckpt_root} into {pp} pipeline stage(s)")
    load_checkpoint(model, None, None)
    if after_load is not None:
        after_load(model, arch)

    stage = torch.distributed.get_rank()
    dtype = DTYPES[out_dtype]
    parts, buf, nbytes, total = [], {}, 0, 0

    def flush():
        nonlocal buf, nbytes
        if buf:
            fn = f"part-{stage:05d}-{len(parts):05d}.safetensors"
            save_file(buf, os.path.join(tmp_out, fn), metadata={"format": "pt"})
            parts.append((fn, list(buf), nbytes))
            buf, nbytes = {}, 0

    last_layer = None
    with torch.no_grad():
        for chunk in model:
            for kind, layer, name, p in named_global_parameters(chunk):
                for hf_name, t in megatron_to_hf_tensors(kind, layer, p.detach(), arch).items():
                    t = t.to(dtype).contiguous().clone()
                    size = t.numel() * t.element_size()
                    if buf and nbytes + size > max_shard_bytes:
                        flush()
                    buf[hf_name] = t
                    nbytes += size
                    total += size
                if layer is not None and layer != last_layer and stage == 0:
                    last_layer = layer
                    log(f"megatron-to-hf: stage 0 converting layer {layer}")
    flush()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (parts, total))
    if stage == 0:
        all_parts = [p for g in gathered for p in g[0]]
        n = len(all_parts)
        weight_map = {}
        for i, (fn, names, _) in enumerate(all_parts):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(tmp_out, fn), os.path.join(tmp_out, final))
            os.chmod(os.path.join(tmp_out, final), 0o666 & ~umask())
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {
                "metadata": {"total_size": sum(g[1] for g in gathered)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            Path(tmp_out, "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    torch.distributed.barrier()
