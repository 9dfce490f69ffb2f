"""The architecture a conversion maps: what the HF and the Megatron side must agree on.

`ArchSpec` is read from an HF ``config.json`` (`arch_from_hf_config`) or from the Megatron args
saved in a checkpoint (`arch_from_megatron_args`), and turned into Megatron command-line flags
(`megatron_model_args`, with `padded_vocab_size` the vocabulary Megatron pads them to) or an HF
config (`hf_config_from_arch`). Anything that cannot be mapped exactly raises ``ValueError``
before a file is written. Pure Python and torch: no Megatron import.
"""

from __future__ import annotations

import dataclasses
import math

import torch

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
# The parameter dtypes a conversion writes, by the names its ``dtype`` arguments take.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        for f in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "head_dim",
            "vocab_size",
        ):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f}={v!r}: must be a positive integer")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_query_groups}"
            )

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
            "not supported"
        )
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
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (LlamaForCausalLM, Qwen2ForCausalLM)"
        )
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
            raise ValueError(
                "HF config: attention_bias=True (q/k/v/o biases) is not supported for llama"
            )
        qkv_bias = False
    else:  # qwen2: q/k/v biases always, no o_proj bias
        qkv_bias = True
        if cfg.get("use_sliding_window"):
            raise ValueError(
                "HF config: use_sliding_window=True is not supported (Megatron GPT "
                "with the local spec has no per-layer sliding window)"
            )
        lt = cfg.get("layer_types")
        if lt and any(t != "full_attention" for t in lt):
            raise ValueError(
                f"HF config: layer_types={sorted(set(lt))} is not supported (full attention only)"
            )
    theta, rope = _hf_rope(cfg)
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(
            f"HF config: partial_rotary_factor={rope['partial_rotary_factor']} is not supported"
        )
    if theta != int(theta):
        raise ValueError(
            f"HF config: rope_theta={theta} is not an integer (Megatron's --rotary-base is an int)"
        )
    rope_type = rope["rope_type"]
    factor = None
    if rope_type == "llama3":
        for k, v in MEGATRON_LLAMA3_ROPE_FIXED.items():
            if k not in rope or float(rope[k]) != float(v):
                raise ValueError(
                    f"HF config: llama3 rope scaling with {k}={rope.get(k)!r} cannot be mapped: "
                    f"Megatron fixes {MEGATRON_LLAMA3_ROPE_FIXED} and takes only the factor"
                )
        factor = float(rope["factor"])
    elif rope_type != "default":
        raise ValueError(
            f"HF config: rope_type={rope_type!r} cannot be mapped onto Megatron (supported: "
            "'default', 'llama3')"
        )

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
        "--num-layers",
        str(a.num_layers),
        "--hidden-size",
        str(a.hidden_size),
        "--ffn-hidden-size",
        str(a.ffn_hidden_size),
        "--num-attention-heads",
        str(a.num_attention_heads),
    ]
    if a.num_query_groups != a.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(a.num_query_groups)]
    flags += [
        "--kv-channels",
        str(a.head_dim),
        "--max-position-embeddings",
        str(a.max_position_embeddings),
        "--position-embedding-type",
        "rope",
        "--rotary-base",
        str(a.rope_theta),
        "--rotary-percent",
        "1.0",
    ]
    if a.rope_scaling_factor is not None:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", repr(a.rope_scaling_factor)]
    flags += [
        "--normalization",
        "RMSNorm",
        "--norm-epsilon",
        repr(a.norm_epsilon),
        "--swiglu",
        "--disable-bias-linear",
    ]
    if a.qkv_bias:
        flags.append("--add-qkv-bias")
    if not a.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    flags += [
        "--attention-dropout",
        repr(a.attention_dropout),
        "--hidden-dropout",
        "0.0",
        "--make-vocab-size-divisible-by",
        str(make_vocab_size_divisible_by),
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
    for flag in (
        "qk_layernorm",
        "layernorm_zero_centered_gamma",
        "apply_layernorm_1p",
        "rotary_interleaved",
        "squared_relu",
        "multi_latent_attention",
        "experimental_attention_variant",
        "mtp_num_layers",
        "heterogeneous_layers_config_path",
        "rotary_seq_len_interpolation_factor",
        "window_size",
    ):
        if g(flag):
            problems.append(f"{flag}={g(flag)!r}")
    if float(g("rotary_percent", 1.0)) != 1.0:
        problems.append(f"rotary_percent={g('rotary_percent')}")
    if problems:
        raise ValueError(
            "Megatron checkpoint cannot be exported to HF Llama/Qwen2: " + "; ".join(problems)
        )
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
        rope = {
            "rope_type": "llama3",
            "rope_theta": float(arch.rope_theta),
            "factor": arch.rope_scaling_factor,
            **MEGATRON_LLAMA3_ROPE_FIXED,
        }
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
