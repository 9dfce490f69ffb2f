"""``GemGPTModel(linear_fusion=True)``: the main head through ``vocab_parallel_linear_gem_loss``
equals the materialised output layer + GEM, on a real tiny Megatron GPT.

One torchrun spawn of 2 gloo CPU processes runs every case (TP 1 and 2, sequence parallel on and
off, tied and untied embeddings, an MTP depth, both h) and writes one JSON record per case and rank;
the tests assert on the records. The reference is the same model unfused (the op itself is checked
against float64 in tests/ops/test_linear_gem.py): per-token loss, statistics and EVERY
parameter's gradient agree within 1e-6 relative in fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

RTOL = 1e-6

_SCRIPT = r"""
import json, os
import torch
import torch.nn.functional as F
from megatron_gem.megatron.cpu import enable_cpu_mode

enable_cpu_mode()
import torch.distributed as dist

dist.init_process_group("gloo")
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec, get_gpt_mtp_block_spec,
)
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron_gem import GemConfig
from megatron_gem.megatron.model import as_gem_model

RANK = dist.get_rank()
S, B, VOCAB = 8, 3, 38  # V/tp = 19 at TP 2: an odd shard


def build(tp, sp, tied, mtp=0, seed=7):
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        tensor_model_parallel_size=tp, sequence_parallel=sp, mtp_num_layers=mtp or None,
    )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    extra = {}
    if mtp:
        extra["mtp_block_spec"] = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False)
    model = GPTModel(
        cfg, spec, vocab_size=VOCAB, max_sequence_length=S, position_embedding_type="rope",
        share_embeddings_and_output_weights=tied, **extra,
    )
    return as_gem_model(model, "gem", GemConfig(0.7, "linear"))


gen = torch.Generator().manual_seed(2024)  # the same batch on every rank
tokens = torch.randint(0, VOCAB, (B, S), generator=gen)
labels = torch.randint(0, VOCAB, (B, S), generator=gen)
positions = torch.arange(S).expand(B, S)
upstream = torch.rand(B, S, generator=gen) + 0.5
calls = {"n": 0}


def run(model, fused, gem, with_labels=True):
    model.set_loss("gem", gem, linear_fusion=fused)
    model.zero_grad(set_to_none=True)
    calls["n"] = 0
    out = model(tokens, positions, None, labels=labels if with_labels else None,
                loss_mask=torch.ones(B, S))
    if not with_labels:
        return out.detach(), None, None, calls["n"]
    stats = model.pop_token_stats()
    (out * upstream).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), stats, grads, calls["n"]


def rel(a, b):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def compare(name, model, gem, ref_gem=None):
    model.output_layer.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    seen_rows = []
    fused_head = model._fused_main_head

    def recording_head(**kwargs):  # the rows of hidden the fused head is given
        seen_rows.append(kwargs["hidden_states"].shape[0])
        return fused_head(**kwargs)

    model._fused_main_head = recording_head
    ref_loss, ref_stats, ref_grads, ref_calls = run(model, False, ref_gem or gem)
    loss, stats, grads, fused_calls = run(model, True, gem)
    names = sorted(set(ref_grads) | set(grads))
    grad_err = {n: rel(grads[n], ref_grads[n]) if n in grads and n in ref_grads else float("inf")
                for n in names}
    worst = max(grad_err, key=grad_err.get)
    logits_ref, _, _, _ = run(model, False, gem, with_labels=False)
    logits, _, _, logit_calls = run(model, True, gem, with_labels=False)
    record = {
        "case": name, "rank": RANK, "loss": rel(loss, ref_loss),
        "ce": rel(stats[0], ref_stats[0]), "entropy": rel(stats[1], ref_stats[1]),
        "grad": grad_err[worst], "worst": worst, "params": len(names),
        "all_params_have_grads": len(grads) == len(list(model.parameters())),
        "loss_shape": list(loss.shape), "output_layer_calls": [ref_calls, fused_calls],
        "logits": rel(logits, logits_ref), "logits_shape": list(logits.shape),
        "logits_calls": logit_calls, "loss_scale": ref_loss.abs().max().item(),
        "hidden_rows": seen_rows,
    }
    return record, ref_grads


records = []
for tp in (1, 2):
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, 1)
    for sp in ((False,) if tp == 1 else (False, True)):
        for tied in (False, True):
            model = build(tp, sp, tied)
            record, _ = compare(f"tp{tp}-sp{int(sp)}-tied{int(tied)}", model, GemConfig(0.7))
            records.append(record)
    if tp == 1:
        mtp = build(1, False, False, mtp=1)
        records.append(compare("tp1-mtp1", mtp, GemConfig(0.7))[0])
        # control: a reference with another beta must differ (the comparison can fail)
        control = build(1, False, False)
        records.append(compare("control", control, GemConfig(0.7), GemConfig(0.69))[0])
    else:
        sp_model = build(2, True, False)
        record, sp_grads = compare("tp2-sp1-logsigmoid", sp_model, GemConfig(1.0, "logsigmoid"))
        records.append(record)
        # The CPU-mode stand-in for sequence parallelism (torch norms, params marked
        # sequence_parallel): with the marked gradients summed over TP, as Megatron's
        # finalize_model_grads does, the SP model's gradients are the non-SP model's.
        dense = build(2, False, False)
        dense.load_state_dict(sp_model.state_dict())
        _, _, dense_grads, _ = run(dense, False, GemConfig(1.0, "logsigmoid"))
        params = sp_model.named_parameters()
        marked = [n for n, p in params if getattr(p, "sequence_parallel", False)]
        partial_err = max(rel(sp_grads[n], dense_grads[n]) for n in marked)
        for n in marked:
            dist.all_reduce(sp_grads[n], group=parallel_state.get_tensor_model_parallel_group())
        records.append({
            "case": "sp-standin", "rank": RANK, "marked": marked,
            "partial": partial_err,
            "summed": max(rel(sp_grads[n], dense_grads[n]) for n in sp_grads),
        })
with open(os.path.join(os.environ["RECORDS_DIR"], f"rank{RANK}.json"), "w") as f:
    json.dump(records, f)
"""


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fusion")
    script = folder / "fusion.py"
    script.write_text(_SCRIPT)
    env = dict(
        os.environ,
        RECORDS_DIR=str(folder),
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*cmd, str(script)],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=300,
    )
    files = sorted(folder.glob("rank*.json"))
    assert proc.returncode == 0 and len(files) == 2, proc.stdout[-6000:]
    out: dict[str, list[dict]] = {}
    for file in files:
        for record in json.loads(file.read_text()):
            out.setdefault(record["case"], []).append(record)
    return out


CASES = [
    "tp1-sp0-tied0",
    "tp1-sp0-tied1",
    "tp1-mtp1",
    "tp2-sp0-tied0",
    "tp2-sp0-tied1",
    "tp2-sp1-tied0",
    "tp2-sp1-tied1",
    "tp2-sp1-logsigmoid",
]


@pytest.mark.parametrize("case", CASES)
def test_fused_main_head_equals_materialised_head(records, case):
    """Per-token loss, cross-entropy, entropy and every parameter's gradient, on both ranks."""
    assert len(records[case]) == 2, records.get(case)
    for r in records[case]:
        assert r["loss_shape"] == [3, 8] and r["loss_scale"] > 1e-2
        assert r["loss"] <= RTOL and r["ce"] <= RTOL and r["entropy"] <= RTOL, r
        assert r["all_params_have_grads"], r
        assert r["grad"] <= RTOL, r  # the worst parameter, named in r["worst"]


@pytest.mark.parametrize("case", CASES)
def test_fused_head_skips_the_output_layer_and_keeps_it_without_labels(records, case):
    """With labels the output layer module never runs (no logits); without labels (generation)
    the model returns the normal logits [b, s, V/tp] through it."""
    tp = int(case[2])
    vocab_local = 38 // tp
    mtp = 1 if "mtp" in case else 0  # an MTP depth runs the (unfused) output layer itself
    for r in records[case]:
        # once, with labels; under sequence parallelism on this rank's sequence shard
        assert r["hidden_rows"] == [8 // tp if "sp1" in case else 8], r
        assert r["output_layer_calls"] == [1 + mtp, mtp], r
        assert r["logits_calls"] == 1 + mtp and r["logits_shape"] == [3, 8, vocab_local]
        assert r["logits"] == 0.0, r


def test_comparison_detects_a_different_loss(records):
    """Control: the same model against an unfused reference at beta 0.69 instead of 0.7 fails
    every tolerance above."""
    for r in records["control"]:
        assert r["loss"] > 1e-3 and r["grad"] > 1e-3, r


def test_cpu_sequence_parallel_norm_standin_gives_the_dense_gradients(records):
    """Sequence parallel in CPU mode: the torch norms' parameters are marked, each rank's
    gradient of them is partial (the check can fail), and summed over TP (Megatron's
    finalize_model_grads) every gradient equals the model without sequence parallelism."""
    for r in records["sp-standin"]:
        assert r["marked"] and all("layernorm" in n for n in r["marked"]), r
        assert r["partial"] > 1e-3, r
        assert r["summed"] <= RTOL, r


def _bare_model(**attrs):
    """A GemGPTModel with only the attributes set_loss reads (no Megatron init)."""
    import torch

    from megatron_gem.megatron.model import GemGPTModel

    model = object.__new__(GemGPTModel)
    torch.nn.Module.__init__(model)
    for name, value in attrs.items():
        object.__setattr__(model, name, value)
    return model


def test_set_loss_refuses_what_the_fused_head_cannot_do():
    from types import SimpleNamespace

    import torch

    from megatron_gem import GemConfig

    with pytest.raises(ValueError, match="it needs loss='gem', got loss='ce'"):
        _bare_model().set_loss("ce", linear_fusion=True)
    with pytest.raises(ValueError, match="linear_fusion must be a bool, got linear_fusion=1"):
        _bare_model().set_loss("gem", linear_fusion=1)
    mup = SimpleNamespace(use_mup=True, mup_output_mult=0.5)
    with pytest.raises(ValueError, match=r"mup_output_mult=0\.5"):
        _bare_model(config=mup).set_loss("gem", linear_fusion=True)
    defer = SimpleNamespace(defer_embedding_wgrad_compute=True)
    with pytest.raises(ValueError, match="defer_embedding_wgrad_compute=True"):
        _bare_model(config=defer).set_loss("gem", linear_fusion=True)
    biased = SimpleNamespace(bias=object())
    with pytest.raises(ValueError, match="the output layer has a bias"):
        _bare_model(output_layer=biased).set_loss("gem", linear_fusion=True)
    with pytest.raises(ValueError, match="ColumnParallelLinear output layer, got Linear"):
        _bare_model(output_layer=torch.nn.Linear(2, 2, bias=False)).set_loss(
            "gem", linear_fusion=True
        )
    model = _bare_model(config=SimpleNamespace(use_mup=True, mup_output_mult=1.0))
    model.set_loss("gem", GemConfig(0.5), linear_fusion=True)  # MuP without an output mult: fine
    assert model.gem_linear_fusion is True and model.gem.beta == 0.5
    model.set_loss("gem")
    assert model.gem_linear_fusion is False  # set_loss sets every setting


def test_postprocess_routes_only_labelled_calls_through_the_fused_head(monkeypatch):
    """Positional or keyword, with labels the main head gets the fused output_processor; a
    caller's own output_processor and labels=None (logits wanted) are left alone."""
    from megatron.core.models.gpt import GPTModel

    from megatron_gem import GemConfig

    seen = []
    monkeypatch.setattr(GPTModel, "_postprocess", lambda self, **kw: seen.append(kw))
    model = _bare_model()
    model.set_loss("gem", GemConfig(), linear_fusion=True)
    labels, mine = object(), object()
    model._postprocess("hidden", "ids", "pos", labels, None, None, None)  # positional
    model._postprocess(hidden_states="h", labels=labels, output_processor=mine)
    model._postprocess(hidden_states="h", labels=None)
    assert seen[0]["labels"] is labels and seen[0]["hidden_states"] == "hidden"
    assert seen[0]["output_processor"] == model._fused_main_head
    assert seen[1]["output_processor"] is mine
    assert seen[2].get("output_processor") is None
    model.set_loss("gem", GemConfig())  # fusion off
    model._postprocess(hidden_states="h", labels=labels)
    assert seen[3].get("output_processor") is None
