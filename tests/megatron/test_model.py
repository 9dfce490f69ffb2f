"""GemGPTModel's loss hook and the entry's loss_func, against float64 references (no process
group)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_gem import GemConfig
from megatron_gem.megatron.model import GemGPTModel, as_gem_model, unwrap_gem_model


def _bare_model(loss="gem", beta=0.7, h="linear"):
    """A GemGPTModel with only what compute_language_model_loss needs (no Megatron init)."""
    model = object.__new__(GemGPTModel)
    torch.nn.Module.__init__(model)
    model.tp_group = None
    model.set_loss(loss, GemConfig(beta, h))
    return model


def _reference(logits_sbv, labels_bs, beta, h):
    """Per-token GEM, CE, entropy in float64 from the formulas, in [b, s]."""
    z = logits_sbv.double().transpose(0, 1)  # [b, s, V]
    zy = z.gather(-1, labels_bs.unsqueeze(-1))
    q = torch.softmax(z / beta, -1)
    w = torch.sigmoid(0.01 * (z - zy)) if h == "logsigmoid" else torch.ones_like(z)
    gem = (q * w * (z - zy)).sum(-1)
    logp = torch.log_softmax(z, -1)
    ce = -logp.gather(-1, labels_bs.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    grad = q * w - (q * w).sum(-1, keepdim=True) * torch.nn.functional.one_hot(
        labels_bs, z.shape[-1]
    )
    return gem, ce, entropy, grad.transpose(0, 1)  # grad back in [s, b, V]


@pytest.mark.parametrize("beta, h", [(0.7, "linear"), (0.35, "logsigmoid"), (1.0, "linear")])
def test_compute_language_model_loss_matches_reference(beta, h):
    g = torch.Generator().manual_seed(int(beta * 100))
    s, b, v = 7, 3, 37  # Megatron layouts: logits [s, b, V], labels [b, s]
    logits = (torch.randn(s, b, v, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g)
    model = _bare_model("gem", beta, h)
    loss = model.compute_language_model_loss(labels, logits)
    ce, entropy = model.pop_token_stats()
    ref_gem, ref_ce, ref_ent, ref_grad = _reference(logits.detach(), labels, beta, h)
    assert loss.shape == (b, s) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_gem, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ce.double(), ref_ce, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_ent, atol=2e-5, rtol=1e-5)
    upstream = torch.randn(b, s, generator=g)
    (loss * upstream).sum().backward()
    torch.testing.assert_close(
        logits.grad.double(), ref_grad * upstream.T.double().unsqueeze(-1), atol=1e-5, rtol=1e-5
    )
    assert model.pop_token_stats() is None  # popped once


def test_last_call_stats_are_kept_and_arguments_checked():
    model = _bare_model()
    logits = torch.randn(4, 2, 9)
    first = torch.randint(0, 9, (2, 4))
    second = (first + 1) % 9
    model.compute_language_model_loss(first, logits)  # e.g. an MTP depth
    model.compute_language_model_loss(second, logits)  # the main head comes last
    ce, _ = model.pop_token_stats()
    torch.testing.assert_close(
        ce.double(), _reference(logits, second, 0.7, "linear")[1], atol=2e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="loss="):
        model.set_loss("mse")
    with pytest.raises(ValueError, match="gem="):
        model.set_loss("gem", 0.7)
    for beta, h in [
        (0.0, "linear"),
        (1.2, "linear"),
        (float("nan"), "linear"),
        (True, "linear"),
        (0.7, "tanh"),
    ]:
        with pytest.raises(ValueError, match="beta=" if h == "linear" else "h="):
            GemConfig(beta, h)
    with pytest.raises(ValueError, match="GPTModel"):
        as_gem_model(torch.nn.Linear(2, 2))
    wrapped = SimpleNamespace(module=SimpleNamespace(module=model))
    assert unwrap_gem_model(wrapped) is model and unwrap_gem_model(torch.nn.Linear(1, 1)) is None


@pytest.fixture
def megatron_args():
    from megatron.training import global_vars

    saved = global_vars._GLOBAL_ARGS
    global_vars._GLOBAL_ARGS = SimpleNamespace(
        loss="gem", check_for_nan_in_loss_and_grad=False, check_for_spiky_loss=False
    )
    try:
        yield global_vars._GLOBAL_ARGS
    finally:
        global_vars._GLOBAL_ARGS = saved


def test_loss_func_reduces_like_upstream_and_ignores_masked_labels(megatron_args):
    """Sums over unmasked tokens; changing only masked (prompt) labels changes nothing."""
    from megatron_gem.train.entry import loss_func

    g = torch.Generator().manual_seed(5)
    s, b, v = 6, 2, 23
    logits = torch.randn(s, b, v, generator=g) * 2
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.4).float()
    mask[0, 0] = 0.0
    model = _bare_model("gem", 0.6)

    def run(lbl):
        out = model.compute_language_model_loss(lbl, logits)
        return loss_func(mask, out, model=SimpleNamespace(module=model))

    loss, n, report = run(labels)
    ref_gem, ref_ce, ref_ent, _ = _reference(logits, labels, 0.6, "linear")
    m = mask.double()
    assert int(n) == int(mask.sum())
    assert float(loss) == pytest.approx(float((ref_gem * m).sum()), abs=1e-4)
    for key, ref in (("lm loss", ref_ce), ("gem loss", ref_gem), ("entropy", ref_ent)):
        assert report[key].shape == (2,) and float(report[key][1]) == int(mask.sum())
        assert float(report[key][0]) == pytest.approx(float((ref * m).sum()), abs=1e-4), key
    changed = torch.where(mask.bool(), labels, (labels + 7) % v)  # only prompt (masked) labels
    assert not torch.equal(changed, labels)
    loss2, n2, report2 = run(changed)
    assert torch.equal(loss2, loss) and int(n2) == int(n)
    for key in report:
        assert torch.equal(report2[key], report[key])


# A real (tiny, local-spec) Megatron GPT in its own process (torch.distributed must not leak
# into the test session): packed samples under the block-diagonal mask the SFT data gives.
_PACKED_SCRIPT = r"""
import sys
import torch
import torch.nn.functional as F
from megatron_gem.megatron.cpu import enable_cpu_mode

enable_cpu_mode()
import torch.distributed as dist
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{int(sys.argv[1])}", rank=0, world_size=1
)
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron_gem import GemConfig
from megatron_gem.megatron.model import as_gem_model

parallel_state.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(7)
cfg = TransformerConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
    gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
    hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, apply_rope_fusion=False,
    persist_layer_norm=False, gradient_accumulation_fusion=False, bias_activation_fusion=False,
    masked_softmax_fusion=False, bias_dropout_fusion=False,
)
model = GPTModel(
    cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=64, max_sequence_length=16,
    position_embedding_type="rope",
)
model = as_gem_model(model, "gem", GemConfig(0.7, "linear")).eval()
g = torch.Generator().manual_seed(0)
S = 16

def block_mask(lengths):
    m = torch.ones(S, S, dtype=torch.bool)
    start = 0
    for n in lengths:
        m[start:start + n, start:start + n] = ~torch.tril(torch.ones(n, n, dtype=torch.bool))
        start += n
    return m.view(1, 1, S, S)

def positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths]).view(1, S)

a, b = torch.randint(0, 64, (5,), generator=g), torch.randint(0, 64, (7,), generator=g)
pad = torch.zeros(4, dtype=torch.long)
with torch.no_grad():
    packed = model(torch.cat([a, b, pad]).view(1, S), positions([5, 7, 4]), block_mask([5, 7, 4]))
    other = model(
        torch.cat([torch.randint(0, 64, (5,), generator=g), b, pad]).view(1, S),
        positions([5, 7, 4]), block_mask([5, 7, 4]),
    )
    alone = model(
        torch.cat([b, torch.zeros(9, dtype=torch.long)]).view(1, S), positions([7, 9]),
        block_mask([7, 9]),
    )
    causal = model(torch.cat([a, b, pad]).view(1, S), positions([16]), block_mask([16]))
print("RESULT", (packed[0, 5:12] - alone[0, :7]).abs().max().item(),
      (packed[0, 5:12] - other[0, 5:12]).abs().max().item(),
      (packed[0, 5:12] - causal[0, 5:12]).abs().max().item())
"""


def test_packed_samples_do_not_attend_to_each_other(tmp_path):
    """Sample B packed after A gives the logits B gives alone, whatever A is; a plain causal
    mask over the pack does not (so the check can fail)."""

    from conftest import run_script

    proc = run_script(tmp_path / "packed.py", _PACKED_SCRIPT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:]
    vs_alone, vs_other_a, vs_causal = map(float, lines[-1].split()[1:])
    assert vs_alone < 1e-5 and vs_other_a < 1e-6
    assert vs_causal > 1e-3


def test_bad_label_raises_its_error_before_megatrons_inf_check():
    """The layer's op is sync-free, so a label outside the vocabulary (loss inf) is deferred:
    with Megatron's NaN check (which waits for the device anyway) reduce_token_losses raises it by
    name instead of "found Inf"; without, raise_deferred_errors does (the log-line hook)."""
    from megatron_gem.megatron.loss import reduce_token_losses
    from megatron_gem.ops import raise_deferred_errors

    model = _bare_model()
    logits = torch.randn(5, 2, 11)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5)
    raise_deferred_errors()
    reduce_token_losses(
        mask,
        model.compute_language_model_loss(labels, logits),
        model=model,
        loss="gem",
        check_nan=False,
    )
    raise_deferred_errors()  # clean: nothing pending
    labels[1, 2] = 11
    out = model.compute_language_model_loss(labels, logits)  # no error here: no sync
    assert torch.isinf(out[1, 2])
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 11\).*e\.g\. \[11\]"):
        reduce_token_losses(mask, out, model=model, loss="gem", check_nan=True)
    out = model.compute_language_model_loss(labels, logits)
    total, _, _ = reduce_token_losses(mask, out, model=model, loss="gem", check_nan=False)
    assert torch.isinf(total)
    with pytest.raises(ValueError, match=r"e\.g\. \[11\]"):
        raise_deferred_errors()


# A real tiny GPT with one MTP depth: which loss calls compute statistics, and whose they are.
_MTP_SCRIPT = r"""
import sys
import torch
import torch.nn.functional as F
from megatron_gem.megatron.cpu import enable_cpu_mode

enable_cpu_mode()
import torch.distributed as dist
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{int(sys.argv[1])}", rank=0, world_size=1
)
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec, get_gpt_mtp_block_spec,
)
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig
import megatron_gem.megatron.model as gem_model
from megatron_gem import GemConfig

parallel_state.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(7)
cfg = TransformerConfig(
    num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, mtp_num_layers=1,
    normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
    use_cpu_initialization=True, apply_rope_fusion=False, persist_layer_norm=False,
    gradient_accumulation_fusion=False, bias_activation_fusion=False,
    masked_softmax_fusion=False, bias_dropout_fusion=False,
)
spec = get_gpt_layer_local_spec(normalization="RMSNorm")
model = GPTModel(
    cfg, spec, vocab_size=64, max_sequence_length=16, position_embedding_type="rope",
    mtp_block_spec=get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False),
)
model = gem_model.as_gem_model(model, "gem", GemConfig(0.7, "linear")).eval()
calls = []
original = gem_model.vocab_parallel_gem_loss

def recording(logits, target, **kw):
    calls.append((kw["return_stats"], kw["sync_checks"], logits.detach().clone(), target.clone()))
    return original(logits, target, **kw)

gem_model.vocab_parallel_gem_loss = recording
g = torch.Generator().manual_seed(0)
tokens = torch.randint(0, 64, (2, 16), generator=g)
labels = torch.randint(0, 64, (2, 16), generator=g)
positions = torch.arange(16).expand(2, 16)
with torch.no_grad():
    for _ in range(2):  # the count restarts with every forward
        model(tokens, positions, None, labels=labels, loss_mask=torch.ones(2, 16))
print("FLAGS", [(stats, sync) for stats, sync, _, _ in calls])
ce, _ = model.pop_token_stats()
main_logits, main_target = calls[-1][2].double(), calls[-1][3]
ref = torch.logsumexp(main_logits, -1) - main_logits.gather(-1, main_target[..., None])[..., 0]
mtp_logits = calls[-2][2].double()
print("RESULT", (ce.T.double() - ref).abs().max().item(),
      (mtp_logits - main_logits).abs().max().item())
"""


def test_statistics_only_for_the_main_head_with_mtp(tmp_path):
    """GPTModel 0.19.2 calls the loss for each MTP depth (process_mtp_loss) before the main head:
    only the main head's call computes the statistics, every call is sync-free, and the stats
    popped are the main head's cross-entropy (float64, from the logits it was given)."""

    from conftest import run_script

    proc = run_script(tmp_path / "mtp.py", _MTP_SCRIPT)
    flags = [line for line in proc.stdout.splitlines() if line.startswith("FLAGS")]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:]
    assert flags[-1] == "FLAGS " + str([(False, False), (True, False)] * 2)
    ce_error, mtp_vs_main = map(float, lines[-1].split()[1:])
    assert ce_error < 1e-5
    assert mtp_vs_main > 1e-3  # the depths' logits differ: the check can tell them apart
