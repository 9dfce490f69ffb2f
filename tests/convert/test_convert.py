"""HF <-> Megatron conversion (megatron_gem/convert/, tools/convert_checkpoint.py).

Fast unit tests of the mapping (no Megatron import) first; the multi-process end-to-end checks
(logits against transformers at TP=2 and TP=2 x PP=2, bit-exact round trip, export after GEM
training) are grouped at the end, one spawn per group.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from megatron_gem.convert import (
    arch_from_hf_config,
    arch_from_megatron_args,
    hf_config_from_arch,
    hf_to_megatron,
    megatron_full_state_to_hf,
    megatron_model_args,
    megatron_to_hf,
    padded_vocab_size,
    read_megatron_tensors,
)
from megatron_gem.convert.api import _export_vocab_size, _parse_size
from megatron_gem.convert.hf_files import SafetensorsReader, hf_token_ids, read_hf_config
from megatron_gem.convert.mapping import (
    hf_to_megatron_full_state,
    local_megatron_tensor,
    parse_megatron_name,
    qkv_hf_to_megatron,
    qkv_megatron_to_hf,
)
from megatron_gem.convert.workers import build_model, unwrap

# --------------------------------------------------------------------------------------------
# tiny configs (odd sizes: 3 query heads per KV group, ffn not a power of two)
# --------------------------------------------------------------------------------------------


def llama_cfg(factor=32.0, **kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=203,
        hidden_size=48,
        intermediate_size=88,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    base.update(kw)
    return LlamaConfig(**base)


def qwen2_cfg(**kw):
    from transformers import Qwen2Config

    base = dict(
        vocab_size=157,
        hidden_size=40,
        intermediate_size=72,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    base.update(kw)
    return Qwen2Config(**base)


def random_hf_state(cfg, seed):
    """Random weights for every tensor of the model (biases and norms included)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model


# --------------------------------------------------------------------------------------------
# architecture mapping
# --------------------------------------------------------------------------------------------


def test_arch_from_hf_llama_and_qwen2():
    a = arch_from_hf_config(llama_cfg().to_dict())
    assert (a.model_type, a.num_layers, a.hidden_size, a.ffn_hidden_size) == ("llama", 4, 48, 88)
    assert (a.num_attention_heads, a.num_query_groups, a.head_dim) == (6, 2, 12)
    assert (a.rope_theta, a.rope_scaling_factor, a.tie_word_embeddings, a.qkv_bias) == (
        500000,
        32.0,
        False,
        False,
    )
    q = arch_from_hf_config(qwen2_cfg().to_dict())
    assert (q.model_type, q.qkv_bias, q.tie_word_embeddings, q.head_dim, q.rope_theta) == (
        "qwen2",
        True,
        True,
        10,
        1000000,
    )
    assert q.rope_scaling_factor is None


def test_arch_from_hf_transformers4_style_rope_keys():
    d = llama_cfg().to_dict()
    d.pop("rope_parameters")
    d["rope_theta"] = 500000.0
    d["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    a = arch_from_hf_config(d)
    assert (a.rope_theta, a.rope_scaling_factor) == (500000, 8.0)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"num_local_experts": 8}, "mixture-of-experts"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "linear"),
        (
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 2.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            },
            "low_freq_factor=2.0",
        ),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.5}}, "not an integer"),
        ({"num_key_value_heads": 4}, "not a multiple"),
    ],
)
def test_arch_from_hf_refuses_what_it_cannot_map(change, match):
    d = llama_cfg().to_dict()
    d.update(change)
    with pytest.raises(ValueError, match=match):
        arch_from_hf_config(d)


def test_arch_from_hf_refuses_qwen2_sliding_window():
    d = qwen2_cfg().to_dict()
    d["use_sliding_window"] = True
    with pytest.raises(ValueError, match="use_sliding_window"):
        arch_from_hf_config(d)


@pytest.mark.parametrize("make", [llama_cfg, qwen2_cfg])
def test_hf_config_round_trip(make):
    a = arch_from_hf_config(make().to_dict())
    cfg = hf_config_from_arch(a, torch.bfloat16, {"eos_token_id": 7})
    d = json.loads(cfg.to_json_string())
    assert d["dtype"] == "bfloat16" and d["eos_token_id"] == 7 and d["bos_token_id"] is None
    assert "rope_parameters" in d and "rope_theta" not in d
    assert arch_from_hf_config(d) == a


def test_megatron_args_round_trip_through_megatron_parser():
    """The printed flags parse with Megatron's own parser and read back to the same arch."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    for make in (llama_cfg, qwen2_cfg):
        a = arch_from_hf_config(make().to_dict())
        ns = parser.parse_args(megatron_model_args(a, 64))
        assert ns.make_vocab_size_divisible_by == 64
        assert arch_from_megatron_args(ns, a.vocab_size) == a
    ns.num_experts = 8
    with pytest.raises(ValueError, match="num_experts=8"):
        arch_from_megatron_args(ns, 10)


def test_padded_vocab_size_matches_megatron():
    from types import SimpleNamespace

    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    for v, d, tp in [(203, 128, 2), (128256, 128, 8), (256, 128, 1), (151665, 64, 4), (1, 1, 3)]:
        ns = SimpleNamespace(make_vocab_size_divisible_by=d, tensor_model_parallel_size=tp, rank=1)
        assert padded_vocab_size(v, d, tp) == vocab_size_with_padding(v, ns, False)


# --------------------------------------------------------------------------------------------
# tensor mapping
# --------------------------------------------------------------------------------------------


def test_qkv_layout_against_explicit_loop():
    """Row order written from the layout rule: group i = [its query heads, k_i, v_i]."""
    nh, g, d, h = 6, 2, 3, 5
    q = torch.randn(nh * d, h)
    k = torch.randn(g * d, h)
    v = torch.randn(g * d, h)
    rows = []
    for i in range(g):
        for j in range(nh // g):
            head = i * (nh // g) + j
            rows += [q[head * d + r] for r in range(d)]
        rows += [k[i * d + r] for r in range(d)]
        rows += [v[i * d + r] for r in range(d)]
    ref = torch.stack(rows)
    got = qkv_hf_to_megatron(q, k, v, nh, g, d)
    assert torch.equal(got, ref)
    q2, k2, v2 = qkv_megatron_to_hf(got, nh, g, d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    # biases (1-D)
    qb, kb, vb = torch.randn(nh * d), torch.randn(g * d), torch.randn(g * d)
    fused = qkv_hf_to_megatron(qb, kb, vb, nh, g, d)
    assert torch.equal(
        fused, qkv_hf_to_megatron(qb[:, None], kb[:, None], vb[:, None], nh, g, d)[:, 0]
    )


def test_megatron_attention_split_recovers_hf_heads():
    """Megatron's own QKV split (view [ng, (np/ng + 2) hn] per token) gives HF's heads."""
    nh, g, d, h = 6, 2, 4, 7
    # small integers in float64: every product is exact, whatever the matmul blocking
    q, k, v, x = (
        torch.randint(-4, 5, s).double() for s in [(nh * d, h), (g * d, h), (g * d, h), (3, h)]
    )
    fused = x @ qkv_hf_to_megatron(q, k, v, nh, g, d).T  # [s, (nh + 2g) d]
    mixed = fused.view(3, g, (nh // g + 2) * d)
    mq, mk, mv = torch.split(mixed, [nh // g * d, d, d], dim=2)
    assert torch.equal(mq.reshape(3, nh, d), (x @ q.T).view(3, nh, d))
    assert torch.equal(mk.reshape(3, g, d), (x @ k.T).view(3, g, d))
    assert torch.equal(mv.reshape(3, g, d), (x @ v.T).view(3, g, d))


def _full_megatron_from_shards(kind, layer, arch, read, tp, padded):
    parts = [local_megatron_tensor(kind, layer, arch, read, r, tp, padded) for r in range(tp)]
    if kind in ("o", "fc2"):
        return torch.cat(parts, 1)
    if kind in ("input_norm", "post_norm", "final_norm"):
        assert all(torch.equal(p, parts[0]) for p in parts)
        return parts[0]
    if kind == "fc1":  # each rank holds [gate shard; up shard]
        gates, ups = zip(*(torch.chunk(p, 2) for p in parts))
        return torch.cat(gates + ups)
    return torch.cat(parts, 0)


@pytest.mark.parametrize("make, tp", [(llama_cfg, 2), (qwen2_cfg, 2), (llama_cfg, 1)])
def test_tp_shards_assemble_to_whole_and_round_trip_is_exact(make, tp):
    cfg = make()
    model = random_hf_state(cfg, seed=3 + tp)
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    a = arch_from_hf_config(cfg.to_dict())
    padded = padded_vocab_size(a.vocab_size, 16, tp)
    full = hf_to_megatron_full_state(hf, a, padded)

    def read(name, rows=None, cols=None):
        t = hf[name]
        t = t[rows[0] : rows[1]] if rows else t
        return t[:, cols[0] : cols[1]] if cols else t

    for name, t in full.items():
        kind, layer = parse_megatron_name(name)
        assert torch.equal(_full_megatron_from_shards(kind, layer, a, read, tp, padded), t), name
    emb = full["embedding.word_embeddings.weight"]
    assert emb.shape == (padded, a.hidden_size) and padded > a.vocab_size
    assert torch.equal(emb[: a.vocab_size], hf["model.embed_tokens.weight"])
    assert not emb[a.vocab_size :].any()
    assert ("output_layer.weight" in full) == (not a.tie_word_embeddings)
    back = megatron_full_state_to_hf(full, a)
    expected = {
        k: v for k, v in hf.items() if not (a.tie_word_embeddings and k == "lm_head.weight")
    }
    assert back.keys() == expected.keys()
    for k in expected:
        assert torch.equal(back[k], expected[k]), k


def test_parse_megatron_name_local_and_te_spec():
    assert parse_megatron_name("module.decoder.layers.3.input_layernorm.weight") == (
        "input_norm",
        3,
    )
    assert parse_megatron_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight") == (
        "input_norm",
        0,
    )
    assert parse_megatron_name("decoder.layers.7.mlp.linear_fc1.layer_norm_weight") == (
        "post_norm",
        7,
    )
    assert parse_megatron_name("decoder.layers.7.pre_mlp_layernorm.weight") == ("post_norm", 7)
    assert parse_megatron_name("output_layer.weight") == ("lm_head", None)
    with pytest.raises(ValueError, match="q_layernorm"):
        parse_megatron_name("decoder.layers.0.self_attention.q_layernorm.weight")


def test_safetensors_reader_sharded_slices(tmp_path):
    from safetensors.torch import save_file

    a = torch.randn(10, 6)
    b = torch.randn(4)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    r = SafetensorsReader(tmp_path)
    assert torch.equal(r.get("a", rows=(2, 5)), a[2:5])
    assert torch.equal(r.get("a", cols=(1, 4)), a[:, 1:4])
    assert torch.equal(r.get("a", rows=(3, 9), cols=(0, 2)), a[3:9, 0:2])
    assert torch.equal(r.get("b"), b) and r.shape("a") == [10, 6]
    with pytest.raises(ValueError, match="'c' is missing"):
        r.get("c")
    with pytest.raises(ValueError, match="only safetensors"):
        SafetensorsReader(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# end to end (worker processes; each test is one or two spawns)
# --------------------------------------------------------------------------------------------

TOKENS_SEED = 1234


def sample_tokens(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(TOKENS_SEED)
    return torch.randint(0, vocab_size, (2, 17), generator=g)


def megatron_logits(model_chunks, tokens):
    """Whole-vocabulary logits ``[b, s, padded V]`` of a Megatron model (any TP x PP, run in
    every rank of the job); None on ranks that are not the last pipeline stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    (model,) = model_chunks
    model.eval()
    gpt = unwrap(model)
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]  # True = masked
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            recv = torch.empty(s, b, gpt.config.hidden_size, dtype=next(gpt.parameters()).dtype)
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
            gpt.set_input_tensor(recv)
        out = model(tokens, pos, mask)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=-1)


def hf_logits(hf_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def check_reloaded_logits(model, arch, ref):
    """Import hook (every rank): reload the checkpoint just saved with Megatron's own
    ``load_checkpoint`` into a fresh model and compare its logits with transformers' ``ref``
    (computed by the test process on `sample_tokens`)."""
    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint

    args = get_args()
    args.load, args.no_load_optim, args.no_load_rng = args.save, True, True
    fresh = build_model()
    load_checkpoint(fresh, None, None)
    tokens = sample_tokens(arch.vocab_size)
    got = megatron_logits(fresh, tokens)
    if got is None:
        return
    assert got.shape[-1] > arch.vocab_size  # padded for Megatron
    diff = (got[..., : arch.vocab_size] - ref).abs().max().item()
    print(
        f"[test] Megatron vs transformers logits: max |diff| = {diff:.3g} "
        f"(|logits| <= {ref.abs().max().item():.3g})",
        flush=True,
    )
    assert diff <= 1e-5, diff
    assert not got[..., arch.vocab_size :].any()  # zero rows for the padded vocabulary


def save_megatron_logits(model, arch, path):
    """Export hook: the loaded Megatron model's logits on the sample tokens, to ``path``."""
    got = megatron_logits(model, sample_tokens(arch.vocab_size))
    if got is not None:
        torch.save(got[..., : arch.vocab_size].clone(), path)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """HF Llama (GQA 3:1, untied, llama3 rope) and Qwen2 (QKV bias, tied) directories."""
    root = tmp_path_factory.mktemp("convert")
    dirs = {}
    # llama3 rope factor 8 (Llama 3.1's): the entry's model provider takes the factor from
    # megatron-core's gpt_config_from_args, which drops --rope-scaling-factor (see
    # convert.check_model_rope, which refuses other factors until the provider passes it)
    for name, make, seed in (("llama", partial(llama_cfg, 8.0), 11), ("qwen2", qwen2_cfg, 12)):
        random_hf_state(make(), seed).save_pretrained(str(root / f"{name}_hf"))
        dirs[name] = root / f"{name}_hf"
    return root, dirs


def _stack_layers(full: dict, arch) -> dict:
    """Whole-model local-spec state -> the checkpoint's global tensors (TE-spec keys, layers
    stacked on a leading axis), as Megatron's sharded state dict names them."""
    te = {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
        "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    }
    out, per = {}, {}
    for name, t in full.items():
        kind, layer = parse_megatron_name(name)
        if layer is None:
            out[name] = t
        else:
            suffix = name.split(f"layers.{layer}.", 1)[1]
            per.setdefault("decoder.layers." + te.get(suffix, suffix), []).append(t)
    out.update({k: torch.stack(v) for k, v in per.items()})
    return out


def test_e2e_llama_tp2_pp2_logits_and_round_trip(e2e, tmp_path):
    """(1) HF Llama -> Megatron at TP=2 x PP=2: logits of the reloaded checkpoint equal
    transformers' to 1e-5; the checkpoint's global tensors equal the mapping of the HF ones.
    (2) Megatron -> HF (2 pipeline workers, several shards) -> Megatron is bit-exact for every
    tensor, and the exported HF tensors equal the originals bit for bit."""
    root, dirs = e2e
    hf = dirs["llama"]
    ckpt = root / "llama_tp2pp2"
    ref = hf_logits(hf, sample_tokens(203))
    flags = hf_to_megatron(hf, ckpt, tp=2, pp=2, after_save=partial(check_reloaded_logits, ref=ref))
    assert "--untie-embeddings-and-output-weights" in flags and "--use-rope-scaling" in flags
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert " ".join(flags) in (ckpt / "megatron_args.txt").read_text()
    assert not [p for p in root.iterdir() if "incomplete" in p.name]

    arch = arch_from_hf_config(read_hf_config(hf))
    reader = SafetensorsReader(hf)
    hf_state = {k: reader.get(k) for k in reader.weight_map}
    saved = read_megatron_tensors(ckpt / "release")
    want = _stack_layers(hf_to_megatron_full_state(hf_state, arch, 256), arch)
    assert saved.keys() == want.keys()
    for k in want:
        assert torch.equal(saved[k], want[k]), k

    out = tmp_path / "llama_back"
    megatron_to_hf(ckpt, out, pp=2, max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = SafetensorsReader(out)
    assert sorted(back.weight_map) == sorted(hf_state)
    for k, t in hf_state.items():
        assert torch.equal(back.get(k), t), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["vocab_size"] == 203

    # ... -> Megatron again: the writer above produced exactly the mapping of its input (checked
    # against `want`), so mapping the export back must give the checkpoint bit for bit
    # (a second import process would add nothing but start-up time).
    again = _stack_layers(
        hf_to_megatron_full_state({k: back.get(k) for k in back.weight_map}, arch, 256), arch
    )
    assert again.keys() == saved.keys()
    for k in saved:
        assert torch.equal(again[k], saved[k]), k


def test_e2e_qwen2_tp2_logits(e2e):
    """(1) HF Qwen2 (QKV bias, tied embeddings) -> Megatron at TP=2: logits equal transformers'."""
    root, dirs = e2e
    ref = hf_logits(dirs["qwen2"], sample_tokens(157))
    flags = hf_to_megatron(
        dirs["qwen2"],
        root / "qwen2_tp2",
        tp=2,
        pp=1,
        after_save=partial(check_reloaded_logits, ref=ref),
    )
    assert "--add-qkv-bias" in flags and "--untie-embeddings-and-output-weights" not in flags


def test_e2e_gem_training_then_export_loads_in_transformers(e2e, tmp_path):
    """(3) The entry fine-tunes the converted Llama with GEM for a few iterations (TP=2,
    --finetune --load, the printed flags); the export loads in transformers offline and its
    logits equal the trained Megatron model's (loaded by the exporter's 2 pipeline stages)."""
    from conftest import run_train

    root, dirs = e2e
    ckpt = root / "llama_tp2pp2"  # written by the TP=2 x PP=2 test, or here when run alone
    if not ckpt.exists():
        hf_to_megatron(dirs["llama"], ckpt, tp=2, pp=1)
    flags = (ckpt / "megatron_args.txt").read_text().splitlines()[-1].split()
    trained = tmp_path / "trained"
    out = run_train(
        2,
        flags
        + [
            "--tensor-model-parallel-size",
            "2",
            "--finetune",
            "--load",
            str(ckpt),
            "--save",
            str(trained),
            "--save-interval",
            "3",
            "--train-iters",
            "3",
            "--loss",
            "gem",
            "--gem-beta",
            "0.7",
            "--lr",
            "3e-3",
            "--seq-length",
            "16",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "4",
            "--mock-data",
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "203",
            "--log-interval",
            "1",
            "--eval-iters",
            "1",
            "--eval-interval",
            "1000",
            "--num-workers",
            "0",
            "--seed",
            "7",
        ],
    )
    assert "loading release" in out and "gem loss" in out
    assert (trained / "latest_checkpointed_iteration.txt").read_text().strip() == "3"

    hf_out, logits_file = tmp_path / "trained_hf", tmp_path / "megatron_logits.pt"
    megatron_to_hf(
        trained, hf_out, pp=2, after_load=partial(save_megatron_logits, path=str(logits_file))
    )
    megatron = torch.load(logits_file)
    ref = hf_logits(hf_out, sample_tokens(203))  # HF_HUB_OFFLINE: a local directory only
    diff = (megatron - ref).abs().max().item()
    print(f"[test] trained Megatron vs exported transformers logits: max |diff| = {diff:.3g}")
    assert diff <= 1e-5, diff
    # training moved the weights away from the imported ones
    before = SafetensorsReader(dirs["llama"]).get("model.layers.0.mlp.down_proj.weight")
    after = SafetensorsReader(hf_out).get("model.layers.0.mlp.down_proj.weight")
    assert not torch.equal(before, after)


# --------------------------------------------------------------------------------------------
# CLI refusals: nothing is written, a one-line error (no worker is started)
# --------------------------------------------------------------------------------------------


def _cli(argv, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return exc.value.code, capsys.readouterr().err


def test_cli_refuses_before_writing(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = llama_cfg().to_dict()
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral"}))
    out = tmp_path / "out"
    code, err = _cli(["hf-to-megatron", "--hf", str(hf), "--out", str(out)], capsys)
    assert code == 2 and "model_type='mixtral'" in err and not out.exists()

    (hf / "config.json").write_text(json.dumps(cfg))
    code, err = _cli(["hf-to-megatron", "--hf", str(hf), "--out", str(out)], capsys)
    assert code == 2 and "only safetensors" in err and not out.exists()

    model = random_hf_state(llama_cfg(), 0)
    model.save_pretrained(str(hf))
    code, err = _cli(["hf-to-megatron", "--hf", str(hf), "--out", str(out), "--tp", "4"], capsys)
    assert code == 2 and "tp=4: must divide num_key_value_heads=2" in err and not out.exists()
    code, err = _cli(["hf-to-megatron", "--hf", str(hf), "--out", str(out), "--pp", "3"], capsys)
    assert code == 2 and "pp=3" in err and not out.exists()
    code, err = _cli(["hf-to-megatron", "--hf", str(hf), "--out", str(out), "--tp", "0"], capsys)
    assert code == 2 and "--tp: must be a positive integer" in err

    # a tensor whose shape contradicts config.json
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(state, str(hf / "model.safetensors"))
    code, err = _cli(["hf-to-megatron", "--hf", str(hf), "--out", str(out)], capsys)
    assert code == 2 and "'model.layers.1.mlp.up_proj.weight' has shape [87, 48]" in err

    model.save_pretrained(str(hf))  # valid again: now only the existing output is in the way
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = _cli(["hf-to-megatron", "--hf", str(hf), "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "user data"

    code, err = _cli(["megatron-to-hf", "--load", str(hf), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "latest_checkpointed_iteration.txt" in err
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temp leftovers


def test_parse_size():
    assert _parse_size("5GB") == 5 * 10**9 and _parse_size("60KB") == 60_000
    assert _parse_size(123) == 123 and _parse_size("1.5MB") == 1_500_000
    for bad in ("lots", "0", "-1GB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            _parse_size(bad)


def test_export_vocab_size_and_token_ids(tmp_path):
    from types import SimpleNamespace as NS

    null = NS(tokenizer_type="NullTokenizer", vocab_size=203, padded_vocab_size=256)
    assert _export_vocab_size(null, None, None) == 203
    assert _export_vocab_size(null, None, 201) == 201
    tok = tmp_path / "orig"
    tok.mkdir()
    (tok / "config.json").write_text(
        json.dumps({"vocab_size": 250, "bos_token_id": 3, "eos_token_id": [4, 5]})
    )
    assert _export_vocab_size(null, tok, None) == 250
    hf_tok = NS(
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(tok),
        vocab_size=None,
        padded_vocab_size=256,
    )
    assert _export_vocab_size(hf_tok, None, None) == 250
    with pytest.raises(ValueError, match="pass --vocab-size or --tokenizer"):
        _export_vocab_size(
            NS(tokenizer_type="GPT2BPETokenizer", vocab_size=None, padded_vocab_size=256),
            None,
            None,
        )
    assert hf_token_ids(tok) == {"bos_token_id": 3, "eos_token_id": [4, 5], "pad_token_id": None}
    assert hf_token_ids(None) == {}
