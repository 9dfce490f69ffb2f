"""Reading HF model directories (in the parent process: validation before any worker starts or
any file is written).

``config.json`` and its dtype, the safetensors files (`SafetensorsReader` reads slices without
loading whole files), the check that every tensor has the shape the config implies, the
untie-if-the-head-differs rule, and the vocabulary size and special token ids of an HF
directory. Every broken file is a one-line ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from megatron_gem.convert.arch import ArchSpec
from megatron_gem.convert.log import log

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_HF_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_json(path: str | os.PathLike, what: str = "file"):
    """``path`` parsed as JSON; a broken file is a one-line ValueError with its line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
            f"the {what} is truncated or corrupt: restore or re-download it"
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); the {what} is "
            "corrupt: restore or re-download it"
        ) from None


def _safe_open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{path}: cannot be read as safetensors ({e}); the file is truncated, "
            "corrupt or missing (an interrupted download or save?): download or "
            "save it again"
        ) from None


class SafetensorsReader:
    """Reads slices of tensors from an HF checkpoint directory (``model.safetensors`` or
    ``model.safetensors.index.json`` + shards) without loading whole files."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            wm = read_json(index, "safetensors index")
            wm = wm.get("weight_map") if isinstance(wm, dict) else None
            if not isinstance(wm, dict):
                raise ValueError(
                    f"{index}: no 'weight_map' object; the index is corrupt: "
                    "restore or re-download it"
                )
            self.weight_map = wm
        elif single.is_file():
            with _safe_open(single) as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            found = sorted(p.name for p in self.dir.iterdir()) if self.dir.is_dir() else []
            raise ValueError(
                f"{hf_dir}: no model.safetensors or model.safetensors.index.json (found {found}); "
                "only safetensors checkpoints are supported"
            )
        self._handles = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise ValueError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        fn = self.weight_map[name]
        if fn not in self._handles:
            self._handles[fn] = _safe_open(self.dir / fn)
        return self._handles[fn]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def get(
        self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        sl = self._handle(name).get_slice(name)
        if rows is None and cols is None:
            return sl[:]
        r = slice(*rows) if rows else slice(None)
        if cols is None:
            return sl[r]
        return sl[r, slice(*cols)]

    def close(self):
        self._handles.clear()


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir}: no config.json (is it a HuggingFace model directory?)")
    cfg = read_json(path, "HF config")
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{path}: holds a JSON {type(cfg).__name__}, not an object; the HF "
            "config is corrupt: restore or re-download it"
        )
    return cfg


def hf_dtype_name(cfg: dict) -> str:
    """'fp32' / 'bf16' / 'fp16' from an HF config's ``dtype`` (5.x) or ``torch_dtype`` (4.x)."""
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    if name not in _HF_DTYPE_NAMES:
        raise ValueError(f"HF config: dtype={name!r} is not supported ({sorted(_HF_DTYPE_NAMES)})")
    return _HF_DTYPE_NAMES[name]


def check_hf_tensors(reader: SafetensorsReader, arch: ArchSpec) -> None:
    """Every tensor the Megatron model needs exists with the shape ``arch`` implies."""
    a = arch
    qd, kvd = a.num_attention_heads * a.head_dim, a.num_query_groups * a.head_dim
    want = {
        "model.embed_tokens.weight": [a.vocab_size, a.hidden_size],
        "model.norm.weight": [a.hidden_size],
    }
    if not a.tie_word_embeddings:
        want["lm_head.weight"] = [a.vocab_size, a.hidden_size]
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        want.update(
            {
                p + "input_layernorm.weight": [a.hidden_size],
                p + "post_attention_layernorm.weight": [a.hidden_size],
                p + "self_attn.q_proj.weight": [qd, a.hidden_size],
                p + "self_attn.k_proj.weight": [kvd, a.hidden_size],
                p + "self_attn.v_proj.weight": [kvd, a.hidden_size],
                p + "self_attn.o_proj.weight": [a.hidden_size, qd],
                p + "mlp.gate_proj.weight": [a.ffn_hidden_size, a.hidden_size],
                p + "mlp.up_proj.weight": [a.ffn_hidden_size, a.hidden_size],
                p + "mlp.down_proj.weight": [a.hidden_size, a.ffn_hidden_size],
            }
        )
        if a.qkv_bias:
            want.update(
                {
                    p + "self_attn.q_proj.bias": [qd],
                    p + "self_attn.k_proj.bias": [kvd],
                    p + "self_attn.v_proj.bias": [kvd],
                }
            )
    for name, shape in want.items():
        got = reader.shape(name)
        if got != shape:
            raise ValueError(
                f"{reader.dir}: tensor {name!r} has shape {got}, config.json implies {shape}"
            )


def untie_if_head_differs(
    reader: SafetensorsReader, arch: ArchSpec, rows_per_read: int = 4096
) -> ArchSpec:
    """``arch``, untied when ``config.json`` says ``tie_word_embeddings`` but the files hold an
    ``lm_head.weight`` that differs from the embedding: transformers (5.x) then does NOT tie
    them and runs with both, so that is the model to convert. Compared a block of rows at a
    time (the parent never holds two whole vocabularies)."""
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    if not arch.tie_word_embeddings or head not in reader:
        return arch
    shape = reader.shape(emb)
    same = reader.shape(head) == shape and all(
        torch.equal(
            reader.get(emb, rows=(r, r + rows_per_read)),
            reader.get(head, rows=(r, r + rows_per_read)),
        )
        for r in range(0, shape[0], rows_per_read)
    )
    if same:
        return arch
    log(
        f"{reader.dir}: config.json ties the embeddings but {head} differs from {emb}; "
        "transformers then loads both untied, so the conversion is untied too"
    )
    return dataclasses.replace(arch, tie_word_embeddings=False)


def hf_dir_vocab(d: Path) -> tuple[int, bool] | None:
    """``(vocabulary, exact)`` of an HF directory: its config.json's ``vocab_size`` (exact),
    else its tokenizer's length (a lower bound: a model may have more rows than its tokenizer
    has tokens, e.g. Qwen2.5's 152064 for 151665)."""
    if (d / "config.json").is_file():
        v = read_json(d / "config.json", "HF config").get("vocab_size")
        if v:
            return int(v), True
    if d.is_dir():
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(str(d))), False
    return None


def hf_token_ids(tokenizer_dir: Path | None) -> dict:
    """The special token ids of an HF directory: its config.json's, else its tokenizer's."""
    if tokenizer_dir is None:
        return {}
    if (tokenizer_dir / "config.json").is_file():
        c = read_json(tokenizer_dir / "config.json", "HF config")
        ids = {k: c.get(k) for k in TOKEN_ID_KEYS}
        if any(v is not None for v in ids.values()):
            return ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
