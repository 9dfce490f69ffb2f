"""Checkpoint conversion between HuggingFace (Llama, Qwen2) and megatron-gem (Megatron-LM format).

Layers of this module:

* **architecture** (`ArchSpec`): what both sides must agree on, read from an HF ``config.json``
  (`arch_from_hf_config`) or from the Megatron args saved in a checkpoint
  (`arch_from_megatron_args`), turned into Megatron command-line flags (`megatron_model_args`)
  or an HF config (`hf_config_from_arch`). Anything that cannot be mapped exactly raises
  ``ValueError`` before a file is written.
* **tensors** (pure torch): the name map between Megatron parameters (local and Transformer
  Engine spec names) and HF tensors, the QKV interleave, the SwiGLU ``fc1 = [gate; up]``
  concatenation, vocabulary padding/trimming, and the tensor-parallel slice of every Megatron
  parameter read straight from HF safetensors (`SafetensorsReader`, ``get_slice``), so a rank
  reads only its own part of the model.
* **drivers** (`import_hf_on_this_rank`, `export_hf_on_this_rank`): run inside each of the
  ``tp*pp`` (import) or ``pp`` (export) worker processes of ``tools/convert_checkpoint.py``
  after Megatron is initialised; the model is built by the training entry's own model
  provider, and checkpoints are written/read by Megatron's own ``save_checkpoint`` /
  ``load_checkpoint`` (torch_dist, resharded on load), so ``megatron_gem.train --load`` accepts
  what is written here and any layout the entry saved can be read.

Megatron is imported only inside the drivers: the mapping layer is cheap to import and test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from megatron_gem.paths import check_output_dir as _check_output_dir
from megatron_gem.paths import publish, temp_sibling, umask

__all__ = [
    "IncompleteOutputError",
    "ArchSpec",
    "arch_from_hf_config",
    "arch_from_megatron_args",
    "megatron_model_args",
    "hf_config_from_arch",
    "padded_vocab_size",
    "parse_megatron_name",
    "qkv_hf_to_megatron",
    "qkv_megatron_to_hf",
    "SafetensorsReader",
    "local_megatron_tensor",
    "megatron_to_hf_tensors",
    "hf_to_megatron_full_state",
    "megatron_full_state_to_hf",
    "read_megatron_tensors",
    "hf_to_megatron",
    "megatron_to_hf",
]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# Megatron's Llama-3 rope scaling (RotaryEmbedding._apply_scaling in megatron-core 0.19) takes
# only `factor` from the command line; these three are fixed in its code.
MEGATRON_LLAMA3_ROPE_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# HF config keys whose presence means a mixture-of-experts model.
_MOE_KEYS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_intermediate_size",
    "num_experts_per_tok",
)


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """The architecture facts both formats must agree on (a decoder-only Llama-style model)."""

    model_type: str  # "llama" or "qwen2"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # = HF num_key_value_heads
    head_dim: int  # = Megatron kv_channels
    vocab_size: int  # the real (HF) vocabulary, never the Megatron-padded one
    max_position_embeddings: int
    norm_epsilon: float
    rope_theta: int
    rope_scaling_factor: float | None  # Llama-3 rope scaling, None when plain RoPE
    tie_word_embeddings: bool
    qkv_bias: bool
    attention_dropout: float = 0.0

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: supported {SUPPORTED_MODEL_TYPES}")
        for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "head_dim", "vocab_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f}={v!r}: must be a positive integer")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_query_groups}")

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


def _get(cfg: dict, key: str, default=None, required: bool = False):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required:
        raise ValueError(f"HF config: required key {key!r} is missing")
    return default


def _hf_rope(cfg: dict) -> tuple[float, dict]:
    """(rope_theta, rope parameters) from an HF config of transformers 4.x or 5.x."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            "HF config: per-layer-type rope_parameters (e.g. sliding/full attention mixes) are "
            "not supported")
    params = dict(params or {})
    scaling = cfg.get("rope_scaling")  # transformers 4.x
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        theta = 10000.0  # both Llama and Qwen2 configs default to 10000 when absent
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    params["rope_type"] = rope_type
    return float(theta), params


def arch_from_hf_config(cfg: dict) -> ArchSpec:
    """Read and validate an HF ``config.json`` (as a dict). Raises ValueError if it cannot be
    mapped exactly onto a Megatron GPT model."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = cfg.get("architectures")
        raise ValueError(
            f"HF config: model_type={model_type!r} (architectures={archs}) is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (LlamaForCausalLM, Qwen2ForCausalLM)")
    moe = [k for k in _MOE_KEYS if cfg.get(k)]
    if moe:
        raise ValueError(f"HF config: mixture-of-experts models are not supported (found {moe})")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"HF config: hidden_act={act!r} is not supported (SwiGLU needs 'silu')")
    if cfg.get("mlp_bias"):
        raise ValueError("HF config: mlp_bias=True is not supported (Megatron: no MLP bias here)")
    if model_type == "llama":
        if cfg.get("attention_bias"):
            # Llama's attention_bias also adds an o_proj bias, which --add-qkv-bias does not.
            raise ValueError("HF config: attention_bias=True (q/k/v/o biases) is not supported "
                             "for llama")
        qkv_bias = False
    else:  # qwen2: q/k/v biases always, no o_proj bias
        qkv_bias = True
        if cfg.get("use_sliding_window"):
            raise ValueError("HF config: use_sliding_window=True is not supported (Megatron GPT "
                             "with the local spec has no per-layer sliding window)")
        lt = cfg.get("layer_types")
        if lt and any(t != "full_attention" for t in lt):
            raise ValueError(f"HF config: layer_types={sorted(set(lt))} is not supported "
                             "(full attention only)")
    theta, rope = _hf_rope(cfg)
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"HF config: partial_rotary_factor={rope['partial_rotary_factor']} is "
                         "not supported")
    if theta != int(theta):
        raise ValueError(f"HF config: rope_theta={theta} is not an integer (Megatron's "
                         "--rotary-base is an int)")
    rope_type = rope["rope_type"]
    factor = None
    if rope_type == "llama3":
        for k, v in MEGATRON_LLAMA3_ROPE_FIXED.items():
            if k not in rope or float(rope[k]) != float(v):
                raise ValueError(
                    f"HF config: llama3 rope scaling with {k}={rope.get(k)!r} cannot be mapped: "
                    f"Megatron fixes {MEGATRON_LLAMA3_ROPE_FIXED} and takes only the factor")
        factor = float(rope["factor"])
    elif rope_type != "default":
        raise ValueError(
            f"HF config: rope_type={rope_type!r} cannot be mapped onto Megatron (supported: "
            "'default', 'llama3')")

    hidden = int(_get(cfg, "hidden_size", required=True))
    heads = int(_get(cfg, "num_attention_heads", required=True))
    kv_heads = int(_get(cfg, "num_key_value_heads", heads))
    head_dim = _get(cfg, "head_dim")
    head_dim = int(head_dim) if head_dim else hidden // heads
    return ArchSpec(
        model_type=model_type,
        num_layers=int(_get(cfg, "num_hidden_layers", required=True)),
        hidden_size=hidden,
        ffn_hidden_size=int(_get(cfg, "intermediate_size", required=True)),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=head_dim,
        vocab_size=int(_get(cfg, "vocab_size", required=True)),
        max_position_embeddings=int(_get(cfg, "max_position_embeddings", required=True)),
        norm_epsilon=float(_get(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=int(theta),
        rope_scaling_factor=factor,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
    )


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary (``vocab_size_with_padding`` in megatron.core.tokenizers):
    rounded up to a multiple of ``make_vocab_size_divisible_by * tp``."""
    multiple = make_vocab_size_divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def megatron_model_args(arch: ArchSpec, make_vocab_size_divisible_by: int = 128) -> list[str]:
    """The Megatron-LM command-line flags that build exactly this architecture."""
    a = arch
    flags = [
        "--num-layers", str(a.num_layers),
        "--hidden-size", str(a.hidden_size),
        "--ffn-hidden-size", str(a.ffn_hidden_size),
        "--num-attention-heads", str(a.num_attention_heads),
    ]
    if a.num_query_groups != a.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(a.num_query_groups)]
    flags += [
        "--kv-channels", str(a.head_dim),
        "--max-position-embeddings", str(a.max_position_embeddings),
        "--position-embedding-type", "rope",
        "--rotary-base", str(a.rope_theta),
        "--rotary-percent", "1.0",
    ]
    if a.rope_scaling_factor is not None:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", repr(a.rope_scaling_factor)]
    flags += [
        "--normalization", "RMSNorm",
        "--norm-epsilon", repr(a.norm_epsilon),
        "--swiglu",
        "--disable-bias-linear",
    ]
    if a.qkv_bias:
        flags.append("--add-qkv-bias")
    if not a.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    flags += [
        "--attention-dropout", repr(a.attention_dropout),
        "--hidden-dropout", "0.0",
        "--make-vocab-size-divisible-by", str(make_vocab_size_divisible_by),
    ]
    return flags


def arch_from_megatron_args(args, vocab_size: int) -> ArchSpec:
    """Read and validate the Megatron args saved in a checkpoint (``common.pt``). ``vocab_size``
    is the real vocabulary (the saved model holds the padded one)."""

    def g(name, default=None):
        return getattr(args, name, default)

    problems = []
    if g("num_experts"):
        problems.append(f"num_experts={g('num_experts')} (mixture of experts)")
    if not g("swiglu"):
        problems.append("swiglu=False (HF Llama/Qwen2 need SwiGLU)")
    if g("normalization") != "RMSNorm":
        problems.append(f"normalization={g('normalization')!r} (need RMSNorm)")
    if g("position_embedding_type") != "rope":
        problems.append(f"position_embedding_type={g('position_embedding_type')!r} (need rope)")
    if g("add_bias_linear"):
        problems.append("add_bias_linear=True (HF Llama/Qwen2 have no linear biases)")
    for flag in ("qk_layernorm", "layernorm_zero_centered_gamma", "apply_layernorm_1p",
                 "rotary_interleaved", "squared_relu", "multi_latent_attention",
                 "experimental_attention_variant", "mtp_num_layers", "heterogeneous_layers_config_path",
                 "rotary_seq_len_interpolation_factor", "window_size"):
        if g(flag):
            problems.append(f"{flag}={g(flag)!r}")
    if float(g("rotary_percent", 1.0)) != 1.0:
        problems.append(f"rotary_percent={g('rotary_percent')}")
    if problems:
        raise ValueError("Megatron checkpoint cannot be exported to HF Llama/Qwen2: "
                         + "; ".join(problems))
    heads = int(g("num_attention_heads"))
    groups = int(g("num_query_groups") or heads) if g("group_query_attention") else heads
    kv = g("kv_channels") or g("hidden_size") // heads
    qkv_bias = bool(g("add_qkv_bias"))
    return ArchSpec(
        model_type="qwen2" if qkv_bias else "llama",
        num_layers=int(g("num_layers")),
        hidden_size=int(g("hidden_size")),
        ffn_hidden_size=int(g("ffn_hidden_size")),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=int(kv),
        vocab_size=int(vocab_size),
        max_position_embeddings=int(g("max_position_embeddings") or g("seq_length")),
        norm_epsilon=float(g("layernorm_epsilon", 1e-5)),  # dest of --norm-epsilon
        rope_theta=int(g("rotary_base", 10000)),
        rope_scaling_factor=float(g("rope_scaling_factor")) if g("use_rope_scaling") else None,
        tie_word_embeddings=not g("untie_embeddings_and_output_weights"),
        qkv_bias=qkv_bias,
        attention_dropout=float(g("attention_dropout", 0.0) or 0.0),
    )


def hf_config_from_arch(arch: ArchSpec, dtype: torch.dtype, token_ids: dict | None = None):
    """A transformers ``LlamaConfig``/``Qwen2Config`` for ``arch`` (transformers 5.x writes the
    rope settings as ``rope_parameters``)."""
    from transformers import LlamaConfig, Qwen2Config

    rope = {"rope_type": "default", "rope_theta": float(arch.rope_theta)}
    if arch.rope_scaling_factor is not None:
        rope = {"rope_type": "llama3", "rope_theta": float(arch.rope_theta),
                "factor": arch.rope_scaling_factor, **MEGATRON_LLAMA3_ROPE_FIXED}
    common = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_epsilon,
        tie_word_embeddings=arch.tie_word_embeddings,
        rope_parameters=rope,
        attention_dropout=arch.attention_dropout,
        hidden_act="silu",
        # unknown ids stay None rather than LlamaConfig's Llama-2 defaults (1, 2)
        **{"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(token_ids or {})},
    )
    if arch.model_type == "llama":
        cfg = LlamaConfig(head_dim=arch.head_dim, attention_bias=False, mlp_bias=False, **common)
    else:
        # transformers 5.x's Qwen2 attention reads config.head_dim (default hidden/heads); write
        # it only where it differs, as Qwen2 configs do
        if arch.head_dim * arch.num_attention_heads != arch.hidden_size:
            common["head_dim"] = arch.head_dim
        cfg = Qwen2Config(use_sliding_window=False, **common)
    cfg.architectures = ["LlamaForCausalLM" if arch.model_type == "llama" else "Qwen2ForCausalLM"]
    cfg.dtype = dtype
    return cfg


# --------------------------------------------------------------------------------------------
# Names and tensors
# --------------------------------------------------------------------------------------------

# Megatron parameter name (local or TE spec, global layer index) -> kind. `_extra_state`
# (TE/FP8 metadata) carries no weights and is skipped by the callers.
_LAYER_KINDS = {
    "input_layernorm.weight": "input_norm",
    "self_attention.linear_qkv.layer_norm_weight": "input_norm",  # TE spec
    "self_attention.linear_qkv.weight": "qkv",
    "self_attention.linear_qkv.bias": "qkv_bias",
    "self_attention.linear_proj.weight": "o",
    "pre_mlp_layernorm.weight": "post_norm",
    "mlp.linear_fc1.layer_norm_weight": "post_norm",  # TE spec
    "mlp.linear_fc1.weight": "fc1",
    "mlp.linear_fc2.weight": "fc2",
}
_TOP_KINDS = {
    "embedding.word_embeddings.weight": "embed",
    "output_layer.weight": "lm_head",
    "decoder.final_layernorm.weight": "final_norm",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def parse_megatron_name(name: str) -> tuple[str, int | None]:
    """``(kind, layer)`` of a Megatron GPT parameter; ``layer`` is the index within the names
    given (callers pass global indices). Wrapper prefixes (``module.``) are ignored."""
    while name.startswith("module."):
        name = name[len("module."):]
    if name in _TOP_KINDS:
        return _TOP_KINDS[name], None
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_KINDS:
        return _LAYER_KINDS[m.group(2)], int(m.group(1))
    raise ValueError(f"Megatron parameter {name!r} has no HF Llama/Qwen2 counterpart "
                     "(unsupported architecture option?)")


def hf_names(kind: str, layer: int | None, tied: bool = False) -> list[str]:
    """The HF tensor names a Megatron parameter kind is made of (in concatenation order)."""
    p = f"model.layers.{layer}."
    return {
        "embed": ["model.embed_tokens.weight"],
        "lm_head": ["model.embed_tokens.weight" if tied else "lm_head.weight"],
        "final_norm": ["model.norm.weight"],
        "input_norm": [p + "input_layernorm.weight"],
        "post_norm": [p + "post_attention_layernorm.weight"],
        "qkv": [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                p + "self_attn.v_proj.weight"],
        "qkv_bias": [p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias",
                     p + "self_attn.v_proj.bias"],
        "o": [p + "self_attn.o_proj.weight"],
        "fc1": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "fc2": [p + "mlp.down_proj.weight"],
    }[kind]


def qkv_hf_to_megatron(q, k, v, num_heads: int, num_groups: int, head_dim: int):
    """Megatron's fused QKV: for each KV group, its ``num_heads/num_groups`` query heads, then
    its key head, then its value head. Works on weights ``[rows, H]`` and biases ``[rows]``, and
    on any contiguous run of whole groups (a tensor-parallel shard)."""
    n = q.shape[0] // (num_heads // num_groups * head_dim)  # groups present
    rest = q.shape[1:]
    qg = q.reshape(n, -1, *rest)
    kg = k.reshape(n, head_dim, *rest)
    vg = v.reshape(n, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def qkv_megatron_to_hf(qkv, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of `qkv_hf_to_megatron` for the whole tensor: ``(q, k, v)``."""
    per = num_heads // num_groups * head_dim
    rest = qkv.shape[1:]
    g = qkv.reshape(num_groups, per + 2 * head_dim, *rest)
    q, k, v = torch.split(g, [per, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def read_json(path: str | os.PathLike, what: str = "file"):
    """``path`` parsed as JSON; a broken file is a one-line ValueError with its line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                         f"the {what} is truncated or corrupt: restore or re-download it") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); the {what} is "
                         "corrupt: restore or re-download it") from None


def _safe_open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot be read as safetensors ({e}); the file is truncated, "
                         "corrupt or missing (an interrupted download or save?): download or "
                         "save it again") from None


def _shard(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    if total % size:
        raise ValueError(f"{what}={total} is not divisible by tensor-parallel size {size}")
    n = total // size
    return rank * n, (rank + 1) * n


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
                raise ValueError(f"{index}: no 'weight_map' object; the index is corrupt: "
                                 "restore or re-download it")
            self.weight_map = wm
        elif single.is_file():
            with _safe_open(single) as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            found = sorted(p.name for p in self.dir.iterdir()) if self.dir.is_dir() else []
            raise ValueError(
                f"{hf_dir}: no model.safetensors or model.safetensors.index.json (found {found}); "
                "only safetensors checkpoints are supported")
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

    def get(self, name: str, rows: tuple[int, int] | None = None,
            cols: tuple[int, int] | None = None) -> torch.Tensor:
        sl = self._handle(name).get_slice(name)
        if rows is None and cols is None:
            return sl[:]
        r = slice(*rows) if rows else slice(None)
        if cols is None:
            return sl[r]
        return sl[r, slice(*cols)]

    def close(self):
        self._handles.clear()


def local_megatron_tensor(kind: str, layer: int | None, arch: ArchSpec, read: Callable,
                          tp_rank: int, tp_size: int, padded_vocab: int) -> torch.Tensor:
    """The tensor-parallel shard ``tp_rank`` of a Megatron parameter, read from HF tensors with
    ``read(name, rows=None, cols=None)`` (`SafetensorsReader.get`). Column-parallel layers
    (QKV, fc1, embedding, output layer) are split by rows, row-parallel ones (proj, fc2) by
    columns, norms are replicated. Padded vocabulary rows are zero."""
    a = arch
    names = hf_names(kind, layer, tied=a.tie_word_embeddings)
    if kind in ("input_norm", "post_norm", "final_norm"):
        return read(names[0])
    if kind in ("qkv", "qkv_bias"):
        g0, g1 = _shard(a.num_query_groups, tp_rank, tp_size, "num_query_groups")
        qper = a.heads_per_group * a.head_dim
        q = read(names[0], rows=(g0 * qper, g1 * qper))
        k = read(names[1], rows=(g0 * a.head_dim, g1 * a.head_dim))
        v = read(names[2], rows=(g0 * a.head_dim, g1 * a.head_dim))
        return qkv_hf_to_megatron(q, k, v, a.num_attention_heads, a.num_query_groups, a.head_dim)
    if kind == "o":
        c = _shard(a.num_attention_heads * a.head_dim, tp_rank, tp_size, "attention width")
        _shard(a.num_attention_heads, tp_rank, tp_size, "num_attention_heads")
        return read(names[0], cols=c)
    if kind == "fc1":
        r = _shard(a.ffn_hidden_size, tp_rank, tp_size, "ffn_hidden_size")
        return torch.cat([read(names[0], rows=r), read(names[1], rows=r)], dim=0)
    if kind == "fc2":
        return read(names[0], cols=_shard(a.ffn_hidden_size, tp_rank, tp_size, "ffn_hidden_size"))
    if kind in ("embed", "lm_head"):
        r0, r1 = _shard(padded_vocab, tp_rank, tp_size, "padded vocabulary")
        if padded_vocab < a.vocab_size:
            raise ValueError(f"padded vocabulary {padded_vocab} < vocab_size {a.vocab_size}")
        real = read(names[0], rows=(min(r0, a.vocab_size), min(r1, a.vocab_size)))
        if real.shape[0] == r1 - r0:
            return real
        out = real.new_zeros((r1 - r0, a.hidden_size))
        out[: real.shape[0]] = real
        return out
    raise ValueError(f"unknown kind {kind!r}")


def megatron_to_hf_tensors(kind: str, layer: int | None, tensor: torch.Tensor,
                           arch: ArchSpec) -> dict[str, torch.Tensor]:
    """HF tensors from one whole (tensor-parallel size 1) Megatron parameter. The tied output
    layer maps to nothing (HF ties it to the embedding); padded vocabulary rows are dropped."""
    a = arch
    if kind == "lm_head" and a.tie_word_embeddings:
        return {}
    names = hf_names(kind, layer, tied=a.tie_word_embeddings)
    if kind in ("qkv", "qkv_bias"):
        return dict(zip(names, qkv_megatron_to_hf(tensor, a.num_attention_heads,
                                                  a.num_query_groups, a.head_dim)))
    if kind == "fc1":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return {names[0]: gate.contiguous(), names[1]: up.contiguous()}
    if kind in ("embed", "lm_head"):
        if tensor.shape[0] < a.vocab_size:
            raise ValueError(f"{kind}: {tensor.shape[0]} rows < vocab_size {a.vocab_size}")
        return {names[0]: tensor[: a.vocab_size].contiguous()}
    return {names[0]: tensor}


def expected_megatron_kinds(arch: ArchSpec) -> Iterator[tuple[str, int | None]]:
    """Every (kind, layer) a whole Megatron model of this architecture has."""
    yield "embed", None
    for i in range(arch.num_layers):
        yield "input_norm", i
        yield "qkv", i
        if arch.qkv_bias:
            yield "qkv_bias", i
        yield "o", i
        yield "post_norm", i
        yield "fc1", i
        yield "fc2", i
    yield "final_norm", None
    if not arch.tie_word_embeddings:
        yield "lm_head", None


_KIND_TO_LOCAL_NAME = {
    "input_norm": "input_layernorm.weight",
    "qkv": "self_attention.linear_qkv.weight",
    "qkv_bias": "self_attention.linear_qkv.bias",
    "o": "self_attention.linear_proj.weight",
    "post_norm": "pre_mlp_layernorm.weight",
    "fc1": "mlp.linear_fc1.weight",
    "fc2": "mlp.linear_fc2.weight",
}


def megatron_name(kind: str, layer: int | None) -> str:
    """The local-spec Megatron name of (kind, layer)."""
    for n, k in _TOP_KINDS.items():
        if k == kind:
            return n
    return f"decoder.layers.{layer}.{_KIND_TO_LOCAL_NAME[kind]}"


def hf_to_megatron_full_state(hf: dict[str, torch.Tensor], arch: ArchSpec,
                              padded_vocab: int) -> dict[str, torch.Tensor]:
    """Whole-model HF state dict -> whole Megatron state dict (local-spec names, TP size 1).
    For tests and small models; the CLI streams shards instead."""

    def read(name, rows=None, cols=None):
        t = hf[name]
        if rows:
            t = t[rows[0]:rows[1]]
        if cols:
            t = t[:, cols[0]:cols[1]]
        return t

    return {megatron_name(k, l): local_megatron_tensor(k, l, arch, read, 0, 1, padded_vocab)
            for k, l in expected_megatron_kinds(arch)}


def megatron_full_state_to_hf(state: dict[str, torch.Tensor], arch: ArchSpec
                              ) -> dict[str, torch.Tensor]:
    """Whole Megatron state dict (TP size 1, local or TE names) -> HF state dict."""
    out = {}
    for name, t in state.items():
        if name.endswith("_extra_state"):
            continue
        kind, layer = parse_megatron_name(name)
        out.update(megatron_to_hf_tensors(kind, layer, t, arch))
    return out


# --------------------------------------------------------------------------------------------
# HF directories (parent process: validation before any worker starts or any file is written)
# --------------------------------------------------------------------------------------------

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir}: no config.json (is it a HuggingFace model directory?)")
    cfg = read_json(path, "HF config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: holds a JSON {type(cfg).__name__}, not an object; the HF "
                         "config is corrupt: restore or re-download it")
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
    want = {"model.embed_tokens.weight": [a.vocab_size, a.hidden_size],
            "model.norm.weight": [a.hidden_size]}
    if not a.tie_word_embeddings:
        want["lm_head.weight"] = [a.vocab_size, a.hidden_size]
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        want.update({
            p + "input_layernorm.weight": [a.hidden_size],
            p + "post_attention_layernorm.weight": [a.hidden_size],
            p + "self_attn.q_proj.weight": [qd, a.hidden_size],
            p + "self_attn.k_proj.weight": [kvd, a.hidden_size],
            p + "self_attn.v_proj.weight": [kvd, a.hidden_size],
            p + "self_attn.o_proj.weight": [a.hidden_size, qd],
            p + "mlp.gate_proj.weight": [a.ffn_hidden_size, a.hidden_size],
            p + "mlp.up_proj.weight": [a.ffn_hidden_size, a.hidden_size],
            p + "mlp.down_proj.weight": [a.hidden_size, a.ffn_hidden_size],
        })
        if a.qkv_bias:
            want.update({p + "self_attn.q_proj.bias": [qd], p + "self_attn.k_proj.bias": [kvd],
                         p + "self_attn.v_proj.bias": [kvd]})
    for name, shape in want.items():
        got = reader.shape(name)
        if got != shape:
            raise ValueError(f"{reader.dir}: tensor {name!r} has shape {got}, config.json "
                             f"implies {shape}")


def untie_if_head_differs(reader: SafetensorsReader, arch: ArchSpec,
                          rows_per_read: int = 4096) -> ArchSpec:
    """``arch``, untied when ``config.json`` says ``tie_word_embeddings`` but the files hold an
    ``lm_head.weight`` that differs from the embedding: transformers (5.x) then does NOT tie
    them and runs with both, so that is the model to convert. Compared a block of rows at a
    time (the parent never holds two whole vocabularies)."""
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    if not arch.tie_word_embeddings or head not in reader:
        return arch
    shape = reader.shape(emb)
    same = reader.shape(head) == shape and all(
        torch.equal(reader.get(emb, rows=(r, r + rows_per_read)),
                    reader.get(head, rows=(r, r + rows_per_read)))
        for r in range(0, shape[0], rows_per_read))
    if same:
        return arch
    _log(f"{reader.dir}: config.json ties the embeddings but {head} differs from {emb}; "
         "transformers then loads both untied, so the conversion is untied too")
    return dataclasses.replace(arch, tie_word_embeddings=False)


class IncompleteOutputError(RuntimeError):
    """A conversion's workers ended (returned, exited or died) without writing a complete
    output: nothing was published and an earlier output at ``--out`` is unchanged."""


def check_output_dir(out, overwrite: bool, inputs=()) -> Path:
    """``megatron_gem.paths.check_output_dir``, with leftovers named as a conversion's."""
    return _check_output_dir(out, overwrite, inputs, log=_log, writer="conversion")


def check_megatron_output(ckpt: Path, arch: ArchSpec) -> None:
    """``ckpt`` holds the complete release checkpoint of ``arch`` that `import_worker` writes:
    the tracker, ``release/metadata.json`` and torch_dist files holding every byte their
    ``.metadata`` lists, for every tensor the model has. Raises `IncompleteOutputError`."""
    rel = ckpt / "release"
    missing = [f for f in ("latest_checkpointed_iteration.txt", "release/metadata.json",
                           "release/.metadata") if not (ckpt / f).is_file()]
    if not missing and (ckpt / "latest_checkpointed_iteration.txt").read_text() != "release":
        missing.append("'release' in latest_checkpointed_iteration.txt")
    if not missing:
        import torch.distributed.checkpoint as dcp

        meta = dcp.FileSystemReader(str(rel)).read_metadata()
        for info in meta.storage_data.values():
            f = rel / info.relative_path
            if not f.is_file() or f.stat().st_size < info.offset + info.length:
                missing.append(f"release/{info.relative_path} (bytes up to "
                               f"{info.offset + info.length})")
                break
        want = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
        if not arch.tie_word_embeddings:
            want.add("output_layer.weight")
        layers = {k for k, m in meta.state_dict_metadata.items()
                  if k.startswith("decoder.layers.") and getattr(m, "size", [0])[:1]
                  == torch.Size([arch.num_layers])}
        # one stacked tensor per layer parameter (the input norm under its TE name)
        want_layers = 6 + arch.qkv_bias
        missing += sorted(want - set(meta.state_dict_metadata))
        if len(layers) < want_layers:
            missing.append(f"{want_layers} layer tensors of {arch.num_layers} layers (found "
                           f"{sorted(layers)})")
    if missing:
        raise IncompleteOutputError(
            f"the conversion workers ended but the checkpoint they wrote in {ckpt} is "
            f"incomplete (missing {', '.join(missing)}): nothing was published")


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
        have |= keys if weight_map is None else {k for k, v in weight_map.items()
                                                 if v == fn and k in keys}
    want = {n for k, lay in expected_megatron_kinds(arch)
            for n in hf_names(k, lay, arch.tie_word_embeddings)}
    if files and not missing:
        absent = sorted(want - have)
        missing += [f"tensor {n}" for n in absent[:5]]
        if len(absent) > 5:
            missing.append(f"{len(absent) - 5} more tensors")
    if missing:
        raise IncompleteOutputError(
            f"the conversion workers ended but the HF directory they wrote in {hf_dir} is "
            f"incomplete (missing {', '.join(missing)}): nothing was published")


# --------------------------------------------------------------------------------------------
# Megatron checkpoints
# --------------------------------------------------------------------------------------------


def megatron_checkpoint_dir(load_dir: str | os.PathLike, iteration: int | None = None
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
        raise ValueError(f"{load_dir}: no latest_checkpointed_iteration.txt (not a Megatron-LM "
                         "checkpoint directory?)")
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
        hint = (" (a legacy --ckpt-format torch checkpoint: re-save it with --ckpt-format "
                "torch_dist)") if legacy else ""
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
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype)
          for k, m in meta.state_dict_metadata.items()
          if isinstance(m, TensorStorageMetadata) and "_extra_state" not in k}
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, target, kwargs: dict, parent: int | None = None):
    if parent is not None:
        _die_with_parent(parent)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
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
        ctx = mp.start_processes(_child, args=(nprocs, _free_port(), target, kwargs, os.getpid()),
                                 nprocs=nprocs, start_method="spawn", join=False)
        while not ctx.join():
            pass
    except mp.ProcessRaisedException as err:
        last = str(err).strip().splitlines()[-1]
        if last.startswith("ValueError: "):  # a refusal in a worker: report it plainly
            raise ValueError(last[len("ValueError: "):]) from err
        raise
    except mp.ProcessExitedException as err:
        how = (f"was killed by {err.signal_name}" if err.signal_name
               else f"exited with code {err.exit_code}")
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

    from megatron_gem.train.arguments import parse_args
    from megatron_gem.megatron import patches

    patches.prebuilt_dataset_helpers()
    args = parse_args(argv, world_size=int(os.environ["WORLD_SIZE"]),
                      rank=int(os.environ["RANK"]))
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

    want = RotaryEmbedding(arch.head_dim, 1.0, rotary_base=arch.rope_theta,
                           rope_scaling=arch.rope_scaling_factor is not None,
                           rope_scaling_factor=arch.rope_scaling_factor or 8.0,
                           use_cpu_initialization=True).inv_freq
    for chunk in model_chunks:
        rope = getattr(unwrap(chunk), "rotary_pos_emb", None)
        if rope is not None and not torch.equal(rope.inv_freq.cpu(), want):
            raise ValueError(
                "the training entry's model provider builds RoPE frequencies that differ from "
                f"the HF model's (rope_theta={arch.rope_theta}, llama3 factor="
                f"{arch.rope_scaling_factor}); it must pass --rope-scaling-factor to the model "
                "config")


def _log(msg: str) -> None:
    import sys

    print(f"[convert] {msg}", file=sys.stderr, flush=True)


def _worker_argv(arch: ArchSpec, dtype: str, tp: int, pp: int, extra: list[str],
                 make_vocab_size_divisible_by: int = 128) -> list[str]:
    argv = megatron_model_args(arch, make_vocab_size_divisible_by) + [
        "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp),
        "--micro-batch-size", "1",
        "--seq-length", str(min(arch.max_position_embeddings, 4096)),
        "--ckpt-format", "torch_dist",
        "--save-interval", "1",  # validate_args wants one whenever --save is given
        "--train-iters", "1",
        "--eval-iters", "0",
        "--no-initialization",  # every weight is overwritten: skip the random init
        "--use-cpu-initialization",
        "--distributed-timeout-minutes", "600",  # a 70B shard can take a while to read
    ]
    if dtype == "bf16":
        argv.append("--bf16")
    elif dtype == "fp16":
        argv.append("--fp16")
    return argv + extra


def import_worker(hf_dir: str, tmp_out: str, arch: ArchSpec, dtype: str, tp: int, pp: int,
                  padded_vocab: int, tokenizer_argv: list[str], after_save=None,
                  make_vocab_size_divisible_by: int = 128) -> None:
    """One rank of ``hf -> megatron``: build this rank's shard, fill it from HF slices, save
    with Megatron's ``save_checkpoint`` as a release checkpoint, and (rank 0) the import
    record. ``after_save(model, arch)`` (tests) runs in every rank at the end."""
    from megatron.core import parallel_state as ps

    # the divisor goes into the saved args too: the export checks the vocabulary against it
    args = init_megatron_worker(
        _worker_argv(arch, dtype, tp, pp, ["--save", tmp_out, "--no-save-optim", "--no-save-rng",
                                           *tokenizer_argv], make_vocab_size_divisible_by),
        padded_vocab)
    if args.rank == 0:
        write_import_record(Path(hf_dir), Path(tmp_out), arch, padded_vocab,
                            make_vocab_size_divisible_by, tp)
    model = build_model()
    check_model_rope(model, arch)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    reader = SafetensorsReader(hf_dir)
    chunk_params = [list(named_global_parameters(c)) for c in model]
    layers = sorted({lay for ps_ in chunk_params for _, lay, _, _ in ps_ if lay is not None})
    done = set()
    with torch.no_grad():
        for params in chunk_params:
            for kind, layer, name, p in params:
                t = local_megatron_tensor(kind, layer, arch, reader.get, tp_rank, tp_size,
                                          padded_vocab)
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: HF gives shape {tuple(t.shape)}, the Megatron "
                                     f"shard has {tuple(p.shape)}")
                p.copy_(t)
                if layer is not None and layer not in done and args.rank == 0:
                    done.add(layer)
                    _log(f"hf-to-megatron: rank 0 filling layer {layer} "
                         f"({len(done)}/{len(layers)} of its stage)")
    reader.close()
    from megatron.training.checkpointing import save_checkpoint

    if args.rank == 0:
        _log(f"hf-to-megatron: saving the torch_dist checkpoint ({tp * pp} ranks)")
    save_checkpoint(0, model, None, None, 0, release=True)
    torch.distributed.barrier()
    if after_save is not None:
        after_save(model, arch)


def export_worker(ckpt_root: str, iteration: int | None, tmp_out: str, arch: ArchSpec,
                  ckpt_dtype: str, out_dtype: str, pp: int, padded_vocab: int,
                  max_shard_bytes: int, add_position_embedding: bool = True,
                  after_load=None) -> None:
    """One pipeline stage of ``megatron -> hf`` (tensor-parallel size 1): load this stage from
    the checkpoint with Megatron's ``load_checkpoint`` (resharded from any saved layout),
    convert its parameters and write them as safetensors parts; rank 0 renames the parts,
    writes the index. ``after_load(model, arch)`` (tests) runs in every rank after loading."""
    from safetensors.torch import save_file

    extra = ["--load", ckpt_root, "--no-load-optim", "--no-load-rng", "--exit-on-missing-checkpoint"]
    if iteration is not None:
        extra += ["--ckpt-step", str(iteration)]
    # load_checkpoint asserts this flag equals the saved one; it means nothing with RoPE
    args = init_megatron_worker(_worker_argv(arch, ckpt_dtype, 1, pp, extra), padded_vocab,
                                {"add_position_embedding": add_position_embedding})
    from megatron.training.checkpointing import load_checkpoint

    model = build_model()
    if args.rank == 0:
        _log(f"megatron-to-hf: loading {ckpt_root} into {pp} pipeline stage(s)")
    load_checkpoint(model, None, None)
    if after_load is not None:
        after_load(model, arch)

    stage = torch.distributed.get_rank()
    dtype = _DTYPES[out_dtype]
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
                    _log(f"megatron-to-hf: stage 0 converting layer {layer}")
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
            index = {"metadata": {"total_size": sum(g[1] for g in gathered)},
                     "weight_map": dict(sorted(weight_map.items()))}
            Path(tmp_out, "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    torch.distributed.barrier()


# --------------------------------------------------------------------------------------------
# The two conversions (parent process)
# --------------------------------------------------------------------------------------------


def tokenizer_argv_for(hf_dir: Path, arch: ArchSpec) -> list[str]:
    """Tokenizer args stored in the checkpoint (``--use-checkpoint-args`` reads them): the HF
    tokenizer in ``hf_dir`` when it has one, else Megatron's NullTokenizer of the vocab size."""
    if any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                            "tokenizer.model")):
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                str(hf_dir.resolve())]
    return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(arch.vocab_size)]


def hf_to_megatron(hf_dir, out_dir, tp: int = 1, pp: int = 1, *, dtype: str | None = None,
                   make_vocab_size_divisible_by: int = 128, overwrite: bool = False,
                   after_save=None) -> list[str]:
    """Convert an HF Llama/Qwen2 directory into a Megatron release checkpoint at ``out_dir``
    with ``tp * pp`` worker processes (each reads and holds only its own shard). Returns the
    Megatron model flags to train it with (also written to ``out_dir/megatron_args.txt``)."""
    hf_dir = Path(hf_dir)
    for name, v in (("tp", tp), ("pp", pp), ("make_vocab_size_divisible_by",
                                              make_vocab_size_divisible_by)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: must be a positive integer")
    cfg = read_hf_config(hf_dir)
    arch = arch_from_hf_config(cfg)
    dtype = dtype or hf_dtype_name(cfg)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(_DTYPES)}")
    if arch.num_query_groups % tp or arch.num_attention_heads % tp or arch.ffn_hidden_size % tp:
        raise ValueError(f"tp={tp}: must divide num_key_value_heads={arch.num_query_groups}, "
                         f"num_attention_heads={arch.num_attention_heads} and "
                         f"intermediate_size={arch.ffn_hidden_size}")
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
        _log(f"hf-to-megatron: {arch.model_type} {arch.num_layers} layers, vocab "
             f"{arch.vocab_size} -> padded {padded}, TP={tp} PP={pp}, {dtype}")
        run_workers(import_worker, tp * pp, hf_dir=str(hf_dir), tmp_out=str(tmp), arch=arch,
                    dtype=dtype, tp=tp, pp=pp, padded_vocab=padded,
                    tokenizer_argv=tokenizer_argv_for(hf_dir, arch), after_save=after_save,
                    make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        (tmp / "megatron_args.txt").write_text(
            "# Megatron model flags for this checkpoint (pass them to megatron_gem.train with\n"
            f"# --tensor-model-parallel-size {tp} or --use-checkpoint-args)\n"
            + " ".join(flags) + "\n")
        check_megatron_output(tmp, arch)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return flags


IMPORT_RECORD = "hf_source.json"
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def write_import_record(hf_dir: Path, out: Path, arch: ArchSpec, padded: int, divisor: int,
                        tp: int) -> None:
    """``out/hf_source.json``: the source's real vocabulary, its padding and its special token
    ids (Megatron's NullTokenizer args cannot hold them), read back by `megatron_to_hf`."""
    cfg = read_hf_config(hf_dir)
    gen = hf_dir / "generation_config.json"
    gen = read_json(gen, "generation config") if gen.is_file() else {}
    record = {"hf_dir": str(hf_dir.resolve()), "vocab_size": arch.vocab_size,
              "padded_vocab_size": padded, "make_vocab_size_divisible_by": divisor,
              "tensor_model_parallel_size": tp,
              **{k: cfg[k] if cfg.get(k) is not None else gen.get(k) for k in _TOKEN_ID_KEYS}}
    (out / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_import_record(load_dir: Path, ckpt_args) -> dict:
    """The import record of this checkpoint, else of the one it was fine-tuned from (the
    saved ``--load`` / ``--pretrained-checkpoint``); {} when there is none."""
    for d in (load_dir, getattr(ckpt_args, "load", None),
              getattr(ckpt_args, "pretrained_checkpoint", None)):
        if d and (Path(d) / IMPORT_RECORD).is_file():
            return read_json(Path(d) / IMPORT_RECORD, "import record")
    return {}


def _hf_dir_vocab(d: Path) -> tuple[int, bool] | None:
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


def _ckpt_hf_tokenizer(ckpt_args) -> Path | None:
    if (getattr(ckpt_args, "tokenizer_type", None) == "HuggingFaceTokenizer"
            and getattr(ckpt_args, "tokenizer_model", None)
            and Path(ckpt_args.tokenizer_model).is_dir()):
        return Path(ckpt_args.tokenizer_model)
    return None


def recorded_vocab(ckpt_args, record: dict | None = None) -> tuple[int, bool, str] | None:
    """``(vocabulary, exact, where)`` the checkpoint records: its NullTokenizer's
    ``--vocab-size``, its HF tokenizer directory (`_hf_dir_vocab`), else the import record."""
    if getattr(ckpt_args, "tokenizer_type", None) == "NullTokenizer" and getattr(
            ckpt_args, "vocab_size", None):
        return int(ckpt_args.vocab_size), True, "its NullTokenizer --vocab-size"
    d = _ckpt_hf_tokenizer(ckpt_args)
    r = _hf_dir_vocab(d) if d else None
    if r:
        return (*r, f"its tokenizer {d}" + ("" if r[1] else " (length)"))
    if record and record.get("vocab_size"):
        return int(record["vocab_size"]), True, f"its import record ({IMPORT_RECORD})"
    return None


def _export_vocab_size(ckpt_args, tokenizer_dir: Path | None, vocab_size: int | None,
                       record: dict | None = None) -> int:
    if vocab_size is not None:
        return int(vocab_size)
    r = _hf_dir_vocab(tokenizer_dir) if tokenizer_dir else None
    r = r or recorded_vocab(ckpt_args, record)
    if r:
        return r[0]
    raise ValueError("cannot tell the real vocabulary size (the checkpoint holds the padded one, "
                     f"{ckpt_args.padded_vocab_size}): pass --vocab-size or --tokenizer")


def check_export_vocab(v: int, source: str, ckpt_args, record: dict | None = None) -> None:
    """``v`` (from ``source``) is a vocabulary this checkpoint can hold: Megatron's padding of
    it is the checkpoint's padded size (for the saved divisor x TP, or the import record's:
    ``--use-checkpoint-args`` keeps the padded size at another TP), and it equals the real
    vocabulary the checkpoint records (is at least its tokenizer's length)."""
    padded = int(ckpt_args.padded_vocab_size)
    layouts = [(int(getattr(ckpt_args, "make_vocab_size_divisible_by", 128)),
                int(getattr(ckpt_args, "tensor_model_parallel_size", 1)))]
    if record and record.get("padded_vocab_size") == padded:
        layouts.append((int(record["make_vocab_size_divisible_by"]),
                        int(record["tensor_model_parallel_size"])))
    if v > padded or all(padded_vocab_size(v, d, t) != padded for d, t in layouts):
        d, t = layouts[0]
        raise ValueError(
            f"{source}: vocabulary size {v} cannot be this checkpoint's: its vocabulary is padded "
            f"to {padded} (make_vocab_size_divisible_by={d} x TP {t}), and {v} pads to "
            f"{padded_vocab_size(v, d, t)}; pass the vocabulary size (or --tokenizer) the "
            "model was trained with")
    rec = recorded_vocab(ckpt_args, record)
    if rec and (v != rec[0] if rec[1] else v < rec[0]):
        raise ValueError(
            f"{source}: vocabulary size {v}, but the checkpoint records {rec[0]} ({rec[2]}); "
            f"the export would {'drop rows of' if v < rec[0] else 'add rows to'} the trained "
            f"vocabulary: pass --vocab-size {rec[0]} or leave it out")


def _export_token_ids(tokenizer_dir: Path | None, ckpt_args, record: dict) -> dict:
    """Special token ids for the export: ``--tokenizer``'s, else those of the HF tokenizer the
    checkpoint records, else the import record's."""
    d = tokenizer_dir or _ckpt_hf_tokenizer(ckpt_args)
    if d is not None:
        return _token_ids(d)
    return {k: record.get(k) for k in _TOKEN_ID_KEYS if record.get(k) is not None}


def _token_ids(tokenizer_dir: Path | None) -> dict:
    if tokenizer_dir is None:
        return {}
    if (tokenizer_dir / "config.json").is_file():
        c = read_json(tokenizer_dir / "config.json", "HF config")
        ids = {k: c.get(k) for k in _TOKEN_ID_KEYS}
        if any(v is not None for v in ids.values()):
            return ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


def megatron_to_hf(load_dir, out_dir, *, iteration: int | None = None, pp: int = 1,
                   dtype: str | None = None, tokenizer_dir=None, vocab_size: int | None = None,
                   max_shard_size: str | int = "5GB", overwrite: bool = False,
                   after_load=None) -> Path:
    """Convert a Megatron checkpoint written by megatron_gem.train (any TP/PP, torch_dist) into
    an HF directory with ``pp`` worker processes (each loads one pipeline stage)."""
    ckpt_dir, it = megatron_checkpoint_dir(load_dir, iteration)
    ckpt_args = read_megatron_args(ckpt_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise ValueError(f"--tokenizer {tokenizer_dir}: not a directory")
    record = read_import_record(Path(load_dir), ckpt_args)
    v = _export_vocab_size(ckpt_args, tokenizer_dir, vocab_size, record)
    check_export_vocab(v, f"--vocab-size {vocab_size}" if vocab_size is not None else
                       f"--tokenizer {tokenizer_dir}" if tokenizer_dir else
                       f"{ckpt_dir}'s recorded tokenizer", ckpt_args, record)
    arch = arch_from_megatron_args(ckpt_args, v)
    padded = int(ckpt_args.padded_vocab_size)
    ckpt_dtype = "bf16" if getattr(ckpt_args, "bf16", False) else (
        "fp16" if getattr(ckpt_args, "fp16", False) else "fp32")
    dtype = dtype or ckpt_dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(_DTYPES)}")
    if not isinstance(pp, int) or pp < 1 or arch.num_layers % pp:
        raise ValueError(f"pp={pp!r}: must be a positive divisor of num_layers={arch.num_layers}")
    shard = _parse_size(max_shard_size)
    hf_cfg = hf_config_from_arch(arch, _DTYPES[dtype],
                                 _export_token_ids(tokenizer_dir, ckpt_args, record))
    # the HF tokenizer the checkpoint names is read too (vocabulary size): replacing it with
    # the export would destroy the original model and the checkpoint's tokenizer
    named_tok = getattr(ckpt_args, "tokenizer_model", None) if getattr(
        ckpt_args, "tokenizer_type", None) == "HuggingFaceTokenizer" else None
    out = check_output_dir(out_dir, overwrite, [
        ("--load", load_dir), ("--tokenizer", tokenizer_dir),
        ("the checkpoint's --tokenizer-model", named_tok)])
    tmp = temp_sibling(out)
    try:
        _log(f"megatron-to-hf: {ckpt_dir} -> {arch.model_type}, {arch.num_layers} layers, vocab "
             f"{v} (padded {padded} trimmed), {dtype}, {pp} process(es)")
        run_workers(export_worker, pp, ckpt_root=str(Path(load_dir)), iteration=it,
                    tmp_out=str(tmp), arch=arch, ckpt_dtype=ckpt_dtype, out_dtype=dtype, pp=pp,
                    padded_vocab=padded, max_shard_bytes=shard, after_load=after_load,
                    add_position_embedding=getattr(ckpt_args, "add_position_embedding", True))
        hf_cfg.save_pretrained(str(tmp))
        from transformers import GenerationConfig

        if tokenizer_dir is not None and (tokenizer_dir / "generation_config.json").is_file():
            shutil.copy2(tokenizer_dir / "generation_config.json", tmp)
        else:
            GenerationConfig(**{k: getattr(hf_cfg, k) for k in
                                ("bos_token_id", "eos_token_id", "pad_token_id")}
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
        n = int(float(m.group(1)) * {None: 1, "B": 1, "KB": 10**3, "MB": 10**6,
                                     "GB": 10**9}[m.group(2)])
    if n <= 0:
        raise ValueError(f"max_shard_size={size!r}: must be positive")
    return n
