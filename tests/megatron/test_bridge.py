"""``megatron_gem.bridge``: GEM in Megatron-Bridge recipes, checked without Bridge.

megatron-bridge 0.6.x imports Transformer Engine unconditionally, so it does not import here.
What is tested here: the pre-wrap hook on megatron-core's own ``GPTModel`` (a tiny local-spec
model on CPU, in its own process) and the loss function, against plain float64 formulas from
the logits: at beta = 1 with h linear, GEM's gradient is exactly cross-entropy's, so two
identical models, one CE and one GEM, stay identical step after step and report the same
``lm loss`` per iteration; GEM's own loss value is NOT CE's but CE - entropy (checked too).
``gem_forward_step``'s plumbing is checked with a stand-in for Bridge's ``gpt_step`` module;
the test with the real Bridge runs only where ``megatron.bridge`` imports.
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys
import types

import pytest
import torch

from megatron_gem import GemConfig

_SCRIPT = r"""
import sys
import torch
import torch.nn.functional as F
from megatron_gem.megatron.cpu import enable_cpu_mode

enable_cpu_mode()
import torch.distributed as dist
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{int(sys.argv[1])}", rank=0,
                        world_size=1)
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron_gem import GemConfig
from megatron_gem.bridge import gem_pre_wrap_hook, loss_function
from megatron_gem.megatron.model import GemGPTModel

parallel_state.initialize_model_parallel(1, 1)
cfg = TransformerConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
    gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
    hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, apply_rope_fusion=False,
    persist_layer_norm=False, gradient_accumulation_fusion=False, bias_activation_fusion=False,
    masked_softmax_fusion=False, bias_dropout_fusion=False,
)
V, S, B = 64, 16, 2

def build():
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(7)
    return GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=V,
                    max_sequence_length=S, position_embedding_type="rope")

ce_model, gem_model = build(), build()
assert all(torch.equal(a, b) for a, b in zip(ce_model.parameters(), gem_model.parameters()))
chunks = gem_pre_wrap_hook(GemConfig(1.0, "linear"))([gem_model])  # what Bridge calls
assert len(chunks) == 1 and chunks[0] is gem_model and type(gem_model) is GemGPTModel
assert type(ce_model) is GPTModel

g = torch.Generator().manual_seed(1)
pos = torch.arange(S).repeat(B, 1)
causal = ~torch.ones(S, S, dtype=torch.bool).tril().view(1, 1, S, S)
opt_ce = torch.optim.SGD(ce_model.parameters(), lr=0.05)
opt_gem = torch.optim.SGD(gem_model.parameters(), lr=0.05)
for it in range(3):
    tokens = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    with torch.no_grad():  # the independent reference, from the logits in float64
        z = ce_model(tokens, pos, causal).double()  # [b, s, V]
        logp = torch.log_softmax(z, -1)
        ref_ce = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        ref_ent = -(logp.exp() * logp).sum(-1)
    ce_tok = ce_model(tokens, pos, causal, labels=labels)  # Megatron's own CE per token
    gem_tok = gem_model(tokens, pos, causal, labels=labels)
    ce_sum = torch.sum(ce_tok.view(-1).float() * mask.view(-1))  # Bridge's masked_next_token_loss
    total, count, report = loss_function(mask, model=gem_model, check_for_nan=False)(gem_tok)
    print("ITER", it,
          (ce_tok.double() - ref_ce).abs().max().item(),
          (gem_tok.double() - (ref_ce - ref_ent)).abs().max().item(),
          (gem_tok - ce_tok).abs().max().item(),
          abs(report["lm loss"][0].item() - ce_sum.item()),
          ce_sum.item(), int(report["lm loss"][1]), int(mask.sum()), int(count))
    opt_ce.zero_grad()
    opt_gem.zero_grad()
    ce_sum.backward()
    total.backward()
    grad_diff = max((a.grad - b.grad).abs().max().item()
                    for a, b in zip(ce_model.parameters(), gem_model.parameters()))
    grad_size = max(a.grad.abs().max().item() for a in ce_model.parameters())
    print("GRAD", it, grad_diff, grad_size)
    opt_ce.step()
    opt_gem.step()
"""


def test_hook_on_megatron_gpt_model_beta1_linear_is_ce_per_iteration(tmp_path):
    """Must hold (without Bridge): the hook makes the built GPTModel GEM's; at beta 1 (linear)
    the reported lm loss is Megatron's CE iteration by iteration, the gradients are CE's, and
    the GEM loss value itself is CE - entropy (not CE)."""
    from conftest import run_script

    proc = run_script(tmp_path / "bridge_hook.py", _SCRIPT)
    iters = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("ITER")]
    grads = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("GRAD")]
    assert proc.returncode == 0 and len(iters) == len(grads) == 3, proc.stdout[-4000:]
    losses = []
    for it, ce_err, gem_err, gem_vs_ce, lm_vs_ce, ce_sum, n_report, n_mask, n in iters:
        assert float(ce_err) < 1e-4  # Megatron's CE is the formula (fp32 vs float64)
        assert float(gem_err) < 1e-4  # GEM at beta 1, linear: CE - entropy per token
        assert float(gem_vs_ce) > 0.1  # ... which is not CE: the loss values differ
        assert float(lm_vs_ce) <= 1e-4 * max(1.0, abs(float(ce_sum)))  # reported lm loss = CE
        assert int(n_report) == int(n_mask) == int(n) > 0
        losses.append(float(ce_sum))
    for it, diff, size in grads:
        assert float(diff) <= 1e-5 * max(1.0, float(size)), (it, diff, size)  # CE's gradient
    assert len(set(losses)) == 3  # the steps changed the model (not the same batch thrice)


# ------------------------------------------------------------------- in-process, no Megatron init
class _Provider:
    """Stands for a Bridge model provider: only ``register_pre_wrap_hook``."""

    def __init__(self):
        self.hooks = []

    def register_pre_wrap_hook(self, hook, prepend=False):
        self.hooks.insert(0, hook) if prepend else self.hooks.append(hook)


def test_use_gem_registers_the_hook_and_returns_a_state_forward_step():
    from megatron_gem.bridge import gem_forward_step, use_gem

    provider = _Provider()
    step = use_gem(provider, GemConfig(0.5, "logsigmoid"))
    (hook,) = provider.hooks
    assert hook.gem == GemConfig(0.5, "logsigmoid") and hook.loss == "gem"
    assert step.func is gem_forward_step
    # Bridge injects its GlobalState when the first parameter is named "state"
    assert list(inspect.signature(step).parameters)[:3] == ["state", "data_iterator", "model"]
    with pytest.raises(ValueError, match="register_pre_wrap_hook"):
        use_gem(object())
    with pytest.raises(ValueError, match="loss="):
        use_gem(provider, loss="mse")
    with pytest.raises(ValueError, match="gem="):
        use_gem(provider, gem=0.7)
    with pytest.raises(ValueError, match="GPTModel"):
        hook([torch.nn.Linear(2, 2)])


def test_hook_keeps_a_gpt_model_subclass_methods():
    """Bridge builds some families as GPTModel subclasses (e.g. VLM text models): the hook keeps
    their methods, and refuses one that computes its own token loss."""
    from megatron.core.models.gpt import GPTModel

    from megatron_gem.bridge import gem_pre_wrap_hook
    from megatron_gem.megatron.model import GemGPTModel

    class Family(GPTModel):
        def extra(self):
            return "kept"

    class OwnLoss(GPTModel):
        def compute_language_model_loss(self, labels, logits):
            return logits

    def bare(cls):  # only what the loss needs (no Megatron init), as tests/megatron/test_model.py
        model = object.__new__(cls)
        torch.nn.Module.__init__(model)
        model.tp_group = None
        return model

    hook = gem_pre_wrap_hook(GemConfig(1.0, "linear"))
    (model,) = hook([bare(Family)])
    assert isinstance(model, GemGPTModel) and isinstance(model, Family)
    assert model.extra() == "kept" and model.gem == GemConfig(1.0, "linear")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 2, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    loss = model.compute_language_model_loss(labels, logits)
    logp = torch.log_softmax(logits.double().transpose(0, 1), -1)
    ce = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(loss.double(), ce - entropy, atol=1e-5, rtol=1e-5)
    assert type(hook([bare(Family)])[0]) is type(model)  # one class per family
    with pytest.raises(ValueError, match="OwnLoss overrides compute_language_model_loss"):
        hook([bare(OwnLoss)])


def test_gem_forward_step_keeps_bridges_batch_and_swaps_the_loss(monkeypatch):
    """With a stand-in for ``megatron.bridge.training.gpt_step`` (Bridge does not import here):
    Bridge's output and loss mask go through, the loss function becomes GEM's reduction with
    Bridge's NaN / spiky settings."""
    import megatron_gem.bridge as bridge

    mask = torch.tensor([[1.0, 0.0, 1.0]])
    output = torch.tensor([[2.0, 5.0, 3.0]])
    seen = {}

    def forward_step(state, data_iterator, model, return_schedule_plan=False):
        seen.update(state=state, data_iterator=data_iterator, model=model)

        def masked_next_token_loss(loss_mask, output_tensor, **kw):
            raise AssertionError("Bridge's CE reduction must not be used")

        return output, functools.partial(masked_next_token_loss, mask, check_for_nan_in_loss=True)

    gpt_step = types.ModuleType("megatron.bridge.training.gpt_step")
    gpt_step.forward_step = forward_step
    for name in ("megatron.bridge", "megatron.bridge.training"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "megatron.bridge.training.gpt_step", gpt_step)
    rerun = types.SimpleNamespace(check_for_nan_in_loss=False, check_for_spiky_loss=False)
    state = types.SimpleNamespace(cfg=types.SimpleNamespace(rerun_state_machine=rerun))
    model = object()

    out, loss_func = bridge.gem_forward_step(state, "it", model, loss="ce")
    assert out is output and seen == dict(state=state, data_iterator="it", model=model)
    assert loss_func.args == (mask,) and loss_func.keywords["model"] is model
    assert loss_func.keywords["check_nan"] is False and loss_func.keywords["check_spiky"] is False
    total, count, report = loss_func(out)
    assert float(total) == 5.0 and int(count) == 2 and report["lm loss"].tolist() == [5.0, 2.0]
    with pytest.raises(ValueError, match="return_schedule_plan"):
        bridge.gem_forward_step(state, "it", model, True)
    gpt_step.forward_step = lambda *a, **k: (output, lambda t: t)
    with pytest.raises(RuntimeError, match="not supported"):
        bridge.gem_forward_step(state, "it", model)


def test_conversion_path_per_family_and_autobridge_absent_is_one_clear_error():
    from megatron_gem.bridge import (
        conversion_path,
        export_hf_checkpoint,
        import_hf_checkpoint,
    )

    want = {
        "llama": "project",
        "qwen2": "project",
        "qwen3": "autobridge",
        "mistral": "autobridge",
        "gemma": "autobridge",
        "gemma2": "autobridge",
        "gemma3_text": "autobridge",
    }
    assert {t: conversion_path({"model_type": t}) for t in want} == want
    for other in ("gemma3", "mixtral", None):
        with pytest.raises(ValueError, match="has no documented path"):
            conversion_path({"model_type": other})
    try:
        import megatron.bridge  # noqa: F401

        pytest.skip("megatron.bridge imports here: the error path is not reachable")
    except (ImportError, RuntimeError):
        pass
    for call in (
        lambda: import_hf_checkpoint("Qwen/Qwen3-8B", "/nonexistent/x"),
        lambda: export_hf_checkpoint("Qwen/Qwen3-8B", "/nonexistent/x", "/nonexistent/y"),
    ):
        with pytest.raises(RuntimeError, match="megatron.bridge does not import .*megatron-gem"):
            call()


def test_bridge_module_imports_without_megatron_bridge():
    code = (
        "import sys, megatron_gem.bridge; "
        "assert not any(m == 'megatron.bridge' or m.startswith('megatron.bridge.') "
        "for m in sys.modules), 'megatron.bridge imported'"
    )
    from conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------- with the real Bridge
def test_with_megatron_bridge_installed():
    """Runs only where megatron.bridge imports (a GPU environment with Transformer Engine)."""
    pytest.importorskip("megatron.bridge")
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.utils.train_utils import needs_global_state_injection

    from megatron_gem.bridge import use_gem

    provider = GPTModelProvider(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64
    )
    step = use_gem(provider, GemConfig(1.0, "linear"))
    assert needs_global_state_injection(step)
    hooks = provider._pre_wrap_hooks
    assert hooks[-1].gem == GemConfig(1.0, "linear") and provider.pre_wrap_hook is not None
