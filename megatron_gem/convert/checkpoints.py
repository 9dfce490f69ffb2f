"""Megatron checkpoints on disk, and the completeness checks of what a conversion wrote.

Locating a checkpoint's iteration (`megatron_checkpoint_dir`), reading its saved args and its
tensors, the import record (``hf_source.json``: what an HF import knew that Megatron's args
cannot hold), and the checks run before publishing: the output directory may be written
(`check_output_dir`), and the workers' output is complete (`check_megatron_output`,
`check_hf_output`, else `IncompleteOutputError`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_gem.convert.arch import ArchSpec
from megatron_gem.convert.hf_files import TOKEN_ID_KEYS, read_hf_config, read_json
from megatron_gem.convert.log import log
from megatron_gem.convert.mapping import expected_megatron_kinds, hf_names
from megatron_gem.paths import check_output_dir as _check_output_dir

IMPORT_RECORD = "hf_source.json"


def megatron_checkpoint_dir(
    load_dir: str | os.PathLike, iteration: int | None = None
) -> tuple[Path, int | None]:
    """``(directory of one checkpoint, iteration or None for a release checkpoint)``."""
    load_dir = Path(load_dir)
    if iteration is not None:
        d = load_dir / f"iter_{iteration:07d}"
        if not d.is_dir():
            raise ValueError(f"--iteration {iteration}: {d} does not exist")
        return d, iteration
    tracker = load_dir / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        raise ValueError(
            f"{load_dir}: no latest_checkpointed_iteration.txt (not a Megatron-LM "
            "checkpoint directory?)"
        )
    text = tracker.read_text().strip()
    if text == "release":
        return load_dir / "release", None
    try:
        it = int(text)
    except ValueError:
        raise ValueError(f"{tracker}: unexpected content {text!r}") from None
    return load_dir / f"iter_{it:07d}", it


def read_megatron_args(ckpt_dir: Path):
    """The Megatron args saved with a torch_dist checkpoint (its common state)."""
    if not (ckpt_dir / "metadata.json").is_file():
        legacy = sorted(p.name for p in ckpt_dir.glob("mp_rank_*"))
        hint = (
            (" (a legacy --ckpt-format torch checkpoint: re-save it with --ckpt-format torch_dist)")
            if legacy
            else ""
        )
        raise ValueError(f"{ckpt_dir}: not a torch_dist checkpoint{hint}")
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    state = load_common_state_dict(str(ckpt_dir))
    if "args" not in state:
        raise ValueError(f"{ckpt_dir}: the checkpoint has no saved args")
    return state["args"]


def read_megatron_tensors(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every model tensor of a torch_dist checkpoint, whole (global shape), in one process.
    For tests and small models: keys are Megatron's sharded keys (TE-spec names, layers
    stacked on a leading axis)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt_dir))
    meta = reader.read_metadata()
    sd = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata) and "_extra_state" not in k
    }
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


def write_import_record(
    hf_dir: Path, out: Path, arch: ArchSpec, padded: int, divisor: int, tp: int
) -> None:
    """``out/hf_source.json``: the source's real vocabulary, its padding and its special token
    ids (Megatron's NullTokenizer args cannot hold them), read back by `megatron_to_hf`."""
    cfg = read_hf_config(hf_dir)
    gen = hf_dir / "generation_config.json"
    gen = read_json(gen, "generation config") if gen.is_file() else {}
    record = {
        "hf_dir": str(hf_dir.resolve()),
        "vocab_size": arch.vocab_size,
        "padded_vocab_size": padded,
        "make_vocab_size_divisible_by": divisor,
        "tensor_model_parallel_size": tp,
        **{k: cfg[k] if cfg.get(k) is not None else gen.get(k) for k in TOKEN_ID_KEYS},
    }
    (out / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_import_record(load_dir: Path, ckpt_args) -> dict:
    """The import record of this checkpoint, else of the one it was fine-tuned from (the
    saved ``--load`` / ``--pretrained-checkpoint``); {} when there is none."""
    for d in (
        load_dir,
        getattr(ckpt_args, "load", None),
        getattr(ckpt_args, "pretrained_checkpoint", None),
    ):
        if d and (Path(d) / IMPORT_RECORD).is_file():
            return read_json(Path(d) / IMPORT_RECORD, "import record")
    return {}


class IncompleteOutputError(RuntimeError):
    """A conversion's workers ended (returned, exited or died) without writing a complete
    output: nothing was published and an earlier output at ``--out`` is unchanged."""


def check_output_dir(out, overwrite: bool, inputs=()) -> Path:
    """``megatron_gem.paths.check_output_dir``, with leftovers named as a conversion's."""
    return _check_output_dir(out, overwrite, inputs, log=log, writer="conversion")


def check_megatron_output(ckpt: Path, arch: ArchSpec) -> None:
    """``ckpt`` holds the complete release checkpoint of ``arch`` that `import_worker` writes:
    the tracker, ``release/metadata.json`` and torch_dist files holding every byte their
    ``.metadata`` lists, for every tensor the model has. Raises `IncompleteOutputError`."""
    rel = ckpt / "release"
    missing = [
        f
        for f in ("latest_checkpointed_iteration.txt", "release/metadata.json", "release/.metadata")
        if not (ckpt / f).is_file()
    ]
    if not missing and (ckpt / "latest_checkpointed_iteration.txt").read_text() != "release":
        missing.append("'release' in latest_checkpointed_iteration.txt")
    if not missing:
        import torch.distributed.checkpoint as dcp

        meta = dcp.FileSystemReader(str(rel)).read_metadata()
        for info in meta.storage_data.values():
            f = rel / info.relative_path
            if not f.is_file() or f.stat().st_size < info.offset + info.length:
                missing.append(
                    f"release/{info.relative_path} (bytes up to {info.offset + info.length})"
                )
                break
        want = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
        if not arch.tie_word_embeddings:
            want.add("output_layer.weight")
        layers = {
            k
            for k, m in meta.state_dict_metadata.items()
            if k.startswith("decoder.layers.")
            and getattr(m, "size", [0])[:1] == torch.Size([arch.num_layers])
        }
        # one stacked tensor per layer parameter (the input norm under its TE name)
        want_layers = 6 + arch.qkv_bias
        missing += sorted(want - set(meta.state_dict_metadata))
        if len(layers) < want_layers:
            missing.append(
                f"{want_layers} layer tensors of {arch.num_layers} layers (found {sorted(layers)})"
            )
    if missing:
        raise IncompleteOutputError(
            f"the conversion workers ended but the checkpoint they wrote in {ckpt} is "
            f"incomplete (missing {', '.join(missing)}): nothing was published"
        )


def check_hf_output(hf_dir: Path, arch: ArchSpec) -> None:
    """``hf_dir`` holds a complete HF export of ``arch``: config.json and every safetensors
    file its index (or the single model.safetensors) names, holding every tensor the
    architecture needs. Raises `IncompleteOutputError`."""
    from safetensors import safe_open

    missing = [] if (hf_dir / "config.json").is_file() else ["config.json"]
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    elif (hf_dir / "model.safetensors").is_file():
        weight_map = None
    else:
        weight_map = {}
        missing.append("model.safetensors or model.safetensors.index.json")
    files = {"model.safetensors"} if weight_map is None else set(weight_map.values())
    have = set()
    for fn in sorted(files):
        try:
            with safe_open(str(hf_dir / fn), framework="pt") as f:
                keys = set(f.keys())
        except Exception:  # absent or truncated: safetensors checks the header and its size
            missing.append(fn)
            continue
        have |= (
            keys
            if weight_map is None
            else {k for k, v in weight_map.items() if v == fn and k in keys}
        )
    want = {
        n
        for k, lay in expected_megatron_kinds(arch)
        for n in hf_names(k, lay, arch.tie_word_embeddings)
    }
    if files and not missing:
        absent = sorted(want - have)
        missing += [f"tensor {n}" for n in absent[:5]]
        if len(absent) > 5:
            missing.append(f"{len(absent) - 5} more tensors")
    if missing:
        raise IncompleteOutputError(
            f"the conversion workers ended but the HF directory they wrote in {hf_dir} is "
            f"incomplete (missing {', '.join(missing)}): nothing was published"
        )
