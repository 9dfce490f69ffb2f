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
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

__all__ = [
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
        "--no-position-embedding",
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
        if arch.head_dim * arch.num_attention_heads != arch.hidden_size:
            raise ValueError(f"qwen2: head_dim={arch.head_dim} must equal hidden_size/heads "
                             f"({arch.hidden_size}/{arch.num_attention_heads}) in transformers")
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
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
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
            from safetensors import safe_open

            self._handles[fn] = safe_open(self.dir / fn, framework="pt")
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
