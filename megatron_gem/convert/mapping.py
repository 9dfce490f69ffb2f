"""The weight mapping between Megatron GPT parameters and HF Llama/Qwen2 tensors (pure torch).

The name map between Megatron parameters (local and Transformer Engine spec names) and HF
tensors, the QKV interleave, the SwiGLU ``fc1 = [gate; up]`` concatenation, vocabulary
padding/trimming, and the tensor-parallel slice of every Megatron parameter read straight from
HF tensors (`local_megatron_tensor`), so a rank reads only its own part of the model; whole-model
conversions for tests and small models. No Megatron import: cheap to import and test.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from megatron_gem.convert.arch import ArchSpec

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
        name = name[len("module.") :]
    if name in _TOP_KINDS:
        return _TOP_KINDS[name], None
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_KINDS:
        return _LAYER_KINDS[m.group(2)], int(m.group(1))
    raise ValueError(
        f"Megatron parameter {name!r} has no HF Llama/Qwen2 counterpart "
        "(unsupported architecture option?)"
    )


def hf_names(kind: str, layer: int | None, tied: bool = False) -> list[str]:
    """The HF tensor names a Megatron parameter kind is made of (in concatenation order)."""
    p = f"model.layers.{layer}."
    return {
        "embed": ["model.embed_tokens.weight"],
        "lm_head": ["model.embed_tokens.weight" if tied else "lm_head.weight"],
        "final_norm": ["model.norm.weight"],
        "input_norm": [p + "input_layernorm.weight"],
        "post_norm": [p + "post_attention_layernorm.weight"],
        "qkv": [
            p + "self_attn.q_proj.weight",
            p + "self_attn.k_proj.weight",
            p + "self_attn.v_proj.weight",
        ],
        "qkv_bias": [
            p + "self_attn.q_proj.bias",
            p + "self_attn.k_proj.bias",
            p + "self_attn.v_proj.bias",
        ],
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
    return (
        q.reshape(-1, *rest).contiguous(),
        k.reshape(-1, *rest).contiguous(),
        v.reshape(-1, *rest).contiguous(),
    )


def _shard(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    if total % size:
        raise ValueError(f"{what}={total} is not divisible by tensor-parallel size {size}")
    n = total // size
    return rank * n, (rank + 1) * n


def local_megatron_tensor(
    kind: str,
    layer: int | None,
    arch: ArchSpec,
    read: Callable,
    tp_rank: int,
    tp_size: int,
    padded_vocab: int,
) -> torch.Tensor:
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


def megatron_to_hf_tensors(
    kind: str, layer: int | None, tensor: torch.Tensor, arch: ArchSpec
) -> dict[str, torch.Tensor]:
    """HF tensors from one whole (tensor-parallel size 1) Megatron parameter. The tied output
    layer maps to nothing (HF ties it to the embedding); padded vocabulary rows are dropped."""
    a = arch
    if kind == "lm_head" and a.tie_word_embeddings:
        return {}
    names = hf_names(kind, layer, tied=a.tie_word_embeddings)
    if kind in ("qkv", "qkv_bias"):
        return dict(
            zip(
                names,
                qkv_megatron_to_hf(tensor, a.num_attention_heads, a.num_query_groups, a.head_dim),
            )
        )
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


def hf_to_megatron_full_state(
    hf: dict[str, torch.Tensor], arch: ArchSpec, padded_vocab: int
) -> dict[str, torch.Tensor]:
    """Whole-model HF state dict -> whole Megatron state dict (local-spec names, TP size 1).
    For tests and small models; the CLI streams shards instead."""

    def read(name, rows=None, cols=None):
        t = hf[name]
        if rows:
            t = t[rows[0] : rows[1]]
        if cols:
            t = t[:, cols[0] : cols[1]]
        return t

    return {
        megatron_name(k, layer): local_megatron_tensor(k, layer, arch, read, 0, 1, padded_vocab)
        for k, layer in expected_megatron_kinds(arch)
    }


def megatron_full_state_to_hf(
    state: dict[str, torch.Tensor], arch: ArchSpec
) -> dict[str, torch.Tensor]:
    """Whole Megatron state dict (TP size 1, local or TE names) -> HF state dict."""
    out = {}
    for name, t in state.items():
        if name.endswith("_extra_state"):
            continue
        kind, layer = parse_megatron_name(name)
        out.update(megatron_to_hf_tensors(kind, layer, t, arch))
    return out
