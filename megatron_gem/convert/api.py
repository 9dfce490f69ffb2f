"""The two conversions, HF -> Megatron (`hf_to_megatron`) and Megatron -> HF (`megatron_to_hf`).

Each validates its arguments and its input in this process (the architecture, the
tensor/pipeline sizes, the vocabulary the export writes), runs the worker processes into a
temporary sibling of the output, checks what they wrote and only then publishes it
(``megatron_gem.paths``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from megatron_gem.convert.arch import (
    DTYPES,
    ArchSpec,
    arch_from_hf_config,
    arch_from_megatron_args,
    hf_config_from_arch,
    megatron_model_args,
    padded_vocab_size,
)
from megatron_gem.convert.checkpoints import (
    IMPORT_RECORD,
    check_hf_output,
    check_megatron_output,
    check_output_dir,
    megatron_checkpoint_dir,
    read_import_record,
    read_megatron_args,
)
from megatron_gem.convert.hf_files import (
    TOKEN_ID_KEYS,
    TOKENIZER_FILES,
    SafetensorsReader,
    check_hf_tensors,
    hf_dir_vocab,
    hf_dtype_name,
    hf_token_ids,
    read_hf_config,
    untie_if_head_differs,
)
from megatron_gem.convert.log import log
from megatron_gem.convert.workers import export_worker, import_worker, run_workers
from megatron_gem.paths import publish, temp_sibling


def tokenizer_argv_for(hf_dir: Path, arch: ArchSpec) -> list[str]:
    """Tokenizer args stored in the checkpoint (``--use-checkpoint-args`` reads them): the HF
    tokenizer in ``hf_dir`` when it has one, else Megatron's NullTokenizer of the vocab size."""
    if any(
        (hf_dir / f).is_file()
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return [
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(hf_dir.resolve()),
        ]
    return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(arch.vocab_size)]


def hf_to_megatron(
    hf_dir,
    out_dir,
    tp: int = 1,
    pp: int = 1,
    *,
    dtype: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
    after_save=None,
) -> list[str]:
    """Convert an HF Llama/Qwen2 directory into a Megatron release checkpoint at ``out_dir``
    with ``tp * pp`` worker processes (each reads and holds only its own shard). Returns the
    Megatron model flags to train it with (also written to ``out_dir/megatron_args.txt``)."""
    hf_dir = Path(hf_dir)
    for name, v in (
        ("tp", tp),
        ("pp", pp),
        ("make_vocab_size_divisible_by", make_vocab_size_divisible_by),
    ):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: must be a positive integer")
    cfg = read_hf_config(hf_dir)
    arch = arch_from_hf_config(cfg)
    dtype = dtype or hf_dtype_name(cfg)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    if arch.num_query_groups % tp or arch.num_attention_heads % tp or arch.ffn_hidden_size % tp:
        raise ValueError(
            f"tp={tp}: must divide num_key_value_heads={arch.num_query_groups}, "
            f"num_attention_heads={arch.num_attention_heads} and "
            f"intermediate_size={arch.ffn_hidden_size}"
        )
    if arch.num_layers % pp:
        raise ValueError(f"pp={pp}: must divide num_hidden_layers={arch.num_layers}")
    reader = SafetensorsReader(hf_dir)
    arch = untie_if_head_differs(reader, arch)
    check_hf_tensors(reader, arch)
    reader.close()
    out = check_output_dir(out_dir, overwrite, [("--hf", hf_dir)])
    padded = padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, tp)
    flags = megatron_model_args(arch, make_vocab_size_divisible_by)
    flags += {"bf16": ["--bf16"], "fp16": ["--fp16"], "fp32": []}[dtype]
    tmp = temp_sibling(out)
    try:
        log(
            f"hf-to-megatron: {arch.model_type} {arch.num_layers} layers, vocab "
            f"{arch.vocab_size} -> padded {padded}, TP={tp} PP={pp}, {dtype}"
        )
        run_workers(
            import_worker,
            tp * pp,
            hf_dir=str(hf_dir),
            tmp_out=str(tmp),
            arch=arch,
            dtype=dtype,
            tp=tp,
            pp=pp,
            padded_vocab=padded,
            tokenizer_argv=tokenizer_argv_for(hf_dir, arch),
            after_save=after_save,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        )
        (tmp / "megatron_args.txt").write_text(
            "# Megatron model flags for this checkpoint (pass them to megatron_gem.train with\n"
            f"# --tensor-model-parallel-size {tp} or --use-checkpoint-args)\n"
            + " ".join(flags)
            + "\n"
        )
        check_megatron_output(tmp, arch)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return flags


def _ckpt_hf_tokenizer(ckpt_args) -> Path | None:
    if (
        getattr(ckpt_args, "tokenizer_type", None) == "HuggingFaceTokenizer"
        and getattr(ckpt_args, "tokenizer_model", None)
        and Path(ckpt_args.tokenizer_model).is_dir()
    ):
        return Path(ckpt_args.tokenizer_model)
    return None


def recorded_vocab(ckpt_args, record: dict | None = None) -> tuple[int, bool, str] | None:
    """``(vocabulary, exact, where)`` the checkpoint records: its NullTokenizer's
    ``--vocab-size``, its HF tokenizer directory (`hf_dir_vocab`), else the import record."""
    if getattr(ckpt_args, "tokenizer_type", None) == "NullTokenizer" and getattr(
        ckpt_args, "vocab_size", None
    ):
        return int(ckpt_args.vocab_size), True, "its NullTokenizer --vocab-size"
    d = _ckpt_hf_tokenizer(ckpt_args)
    r = hf_dir_vocab(d) if d else None
    if r:
        return (*r, f"its tokenizer {d}" + ("" if r[1] else " (length)"))
    if record and record.get("vocab_size"):
        return int(record["vocab_size"]), True, f"its import record ({IMPORT_RECORD})"
    return None


def _export_vocab_size(
    ckpt_args, tokenizer_dir: Path | None, vocab_size: int | None, record: dict | None = None
) -> int:
    if vocab_size is not None:
        return int(vocab_size)
    r = hf_dir_vocab(tokenizer_dir) if tokenizer_dir else None
    r = r or recorded_vocab(ckpt_args, record)
    if r:
        return r[0]
    raise ValueError(
        "cannot tell the real vocabulary size (the checkpoint holds the padded one, "
        f"{ckpt_args.padded_vocab_size}): pass --vocab-size or --tokenizer"
    )


def check_export_vocab(v: int, source: str, ckpt_args, record: dict | None = None) -> None:
    """``v`` (from ``source``) is a vocabulary this checkpoint can hold: Megatron's padding of
    it is the checkpoint's padded size (for the saved divisor x TP, or the import record's:
    ``--use-checkpoint-args`` keeps the padded size at another TP), and it equals the real
    vocabulary the checkpoint records (is at least its tokenizer's length)."""
    padded = int(ckpt_args.padded_vocab_size)
    layouts = [
        (
            int(getattr(ckpt_args, "make_vocab_size_divisible_by", 128)),
            int(getattr(ckpt_args, "tensor_model_parallel_size", 1)),
        )
    ]
    if record and record.get("padded_vocab_size") == padded:
        layouts.append(
            (int(record["make_vocab_size_divisible_by"]), int(record["tensor_model_parallel_size"]))
        )
    if v > padded or all(padded_vocab_size(v, d, t) != padded for d, t in layouts):
        d, t = layouts[0]
        raise ValueError(
            f"{source}: vocabulary size {v} cannot be this checkpoint's: its vocabulary is padded "
            f"to {padded} (make_vocab_size_divisible_by={d} x TP {t}), and {v} pads to "
            f"{padded_vocab_size(v, d, t)}; pass the vocabulary size (or --tokenizer) the "
            "model was trained with"
        )
    rec = recorded_vocab(ckpt_args, record)
    if rec and (v != rec[0] if rec[1] else v < rec[0]):
        raise ValueError(
            f"{source}: vocabulary size {v}, but the checkpoint records {rec[0]} ({rec[2]}); "
            f"the export would {'drop rows of' if v < rec[0] else 'add rows to'} the trained "
            f"vocabulary: pass --vocab-size {rec[0]} or leave it out"
        )


def _export_token_ids(tokenizer_dir: Path | None, ckpt_args, record: dict) -> dict:
    """Special token ids for the export: ``--tokenizer``'s, else those of the HF tokenizer the
    checkpoint records, else the import record's."""
    d = tokenizer_dir or _ckpt_hf_tokenizer(ckpt_args)
    if d is not None:
        return hf_token_ids(d)
    return {k: record.get(k) for k in TOKEN_ID_KEYS if record.get(k) is not None}


def megatron_to_hf(
    load_dir,
    out_dir,
    *,
    iteration: int | None = None,
    pp: int = 1,
    dtype: str | None = None,
    tokenizer_dir=None,
    vocab_size: int | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    after_load=None,
) -> Path:
    """Convert a Megatron checkpoint written by megatron_gem.train (any TP/PP, torch_dist) into
    an HF directory with ``pp`` worker processes (each loads one pipeline stage)."""
    ckpt_dir, it = megatron_checkpoint_dir(load_dir, iteration)
    ckpt_args = read_megatron_args(ckpt_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise ValueError(f"--tokenizer {tokenizer_dir}: not a directory")
    record = read_import_record(Path(load_dir), ckpt_args)
    v = _export_vocab_size(ckpt_args, tokenizer_dir, vocab_size, record)
    check_export_vocab(
        v,
        f"--vocab-size {vocab_size}"
        if vocab_size is not None
        else f"--tokenizer {tokenizer_dir}"
        if tokenizer_dir
        else f"{ckpt_dir}'s recorded tokenizer",
        ckpt_args,
        record,
    )
    arch = arch_from_megatron_args(ckpt_args, v)
    padded = int(ckpt_args.padded_vocab_size)
    ckpt_dtype = (
        "bf16"
        if getattr(ckpt_args, "bf16", False)
        else ("fp16" if getattr(ckpt_args, "fp16", False) else "fp32")
    )
    dtype = dtype or ckpt_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    if not isinstance(pp, int) or pp < 1 or arch.num_layers % pp:
        raise ValueError(f"pp={pp!r}: must be a positive divisor of num_layers={arch.num_layers}")
    shard = _parse_size(max_shard_size)
    hf_cfg = hf_config_from_arch(
        arch, DTYPES[dtype], _export_token_ids(tokenizer_dir, ckpt_args, record)
    )
    # the HF tokenizer the checkpoint names is read too (vocabulary size): replacing it with
    # the export would destroy the original model and the checkpoint's tokenizer
    named_tok = (
        getattr(ckpt_args, "tokenizer_model", None)
        if getattr(ckpt_args, "tokenizer_type", None) == "HuggingFaceTokenizer"
        else None
    )
    out = check_output_dir(
        out_dir,
        overwrite,
        [
            ("--load", load_dir),
            ("--tokenizer", tokenizer_dir),
            ("the checkpoint's --tokenizer-model", named_tok),
        ],
    )
    tmp = temp_sibling(out)
    try:
        log(
            f"megatron-to-hf: {ckpt_dir} -> {arch.model_type}, {arch.num_layers} layers, vocab "
            f"{v} (padded {padded} trimmed), {dtype}, {pp} process(es)"
        )
        run_workers(
            export_worker,
            pp,
            ckpt_root=str(Path(load_dir)),
            iteration=it,
            tmp_out=str(tmp),
            arch=arch,
            ckpt_dtype=ckpt_dtype,
            out_dtype=dtype,
            pp=pp,
            padded_vocab=padded,
            max_shard_bytes=shard,
            after_load=after_load,
            add_position_embedding=getattr(ckpt_args, "add_position_embedding", True),
        )
        hf_cfg.save_pretrained(str(tmp))
        from transformers import GenerationConfig

        if tokenizer_dir is not None and (tokenizer_dir / "generation_config.json").is_file():
            shutil.copy2(tokenizer_dir / "generation_config.json", tmp)
        else:
            GenerationConfig(
                **{k: getattr(hf_cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            ).save_pretrained(str(tmp))
        if tokenizer_dir is not None:
            for f in TOKENIZER_FILES:
                if (tokenizer_dir / f).is_file():
                    shutil.copy2(tokenizer_dir / f, tmp)
        check_hf_output(tmp, arch)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", str(size).upper())
        if not m:
            raise ValueError(f"max_shard_size={size!r}: use e.g. 5GB, 500MB or a byte count")
        n = int(
            float(m.group(1)) * {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)]
        )
    if n <= 0:
        raise ValueError(f"max_shard_size={size!r}: must be positive")
    return n
