"""GemGPTModel's loss hook and the entry's loss_func, against float64 references (no process group)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_gem.model import GemGPTModel, as_gem_model, unwrap_gem_model


def _bare_model(loss="gem", beta=0.7, h="linear"):
    """A GemGPTModel with only what compute_language_model_loss needs (no Megatron init)."""
    model = object.__new__(GemGPTModel)
    torch.nn.Module.__init__(model)
    model.tp_group = None
    model.set_loss(loss, beta, h)
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
    grad = q * w - (q * w).sum(-1, keepdim=True) * torch.nn.functional.one_hot(labels_bs, z.shape[-1])
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
    torch.testing.assert_close(logits.grad.double(), ref_grad * upstream.T.double().unsqueeze(-1), atol=1e-5, rtol=1e-5)
    assert model.pop_token_stats() is None  # popped once


def test_last_call_stats_are_kept_and_arguments_checked():
    model = _bare_model()
    logits = torch.randn(4, 2, 9)
    first = torch.randint(0, 9, (2, 4))
    second = (first + 1) % 9
    model.compute_language_model_loss(first, logits)  # e.g. an MTP depth
    model.compute_language_model_loss(second, logits)  # the main head comes last
    ce, _ = model.pop_token_stats()
    torch.testing.assert_close(ce.double(), _reference(logits, second, 0.7, "linear")[1], atol=2e-5, rtol=1e-5)
    for bad in [("mse", 0.7, "linear"), ("gem", 0.0, "linear"), ("gem", 1.2, "linear"), ("gem", 0.7, "tanh")]:
        with pytest.raises(ValueError):
            model.set_loss(*bad)
    with pytest.raises(ValueError, match="GPTModel"):
        as_gem_model(torch.nn.Linear(2, 2))
    wrapped = SimpleNamespace(module=SimpleNamespace(module=model))
    assert unwrap_gem_model(wrapped) is model and unwrap_gem_model(torch.nn.Linear(1, 1)) is None


@pytest.fixture
def megatron_args():
    from megatron.training import global_vars

    saved = global_vars._GLOBAL_ARGS
    global_vars._GLOBAL_ARGS = SimpleNamespace(loss="gem", check_for_nan_in_loss_and_grad=False, check_for_spiky_loss=False)
    try:
        yield global_vars._GLOBAL_ARGS
    finally:
        global_vars._GLOBAL_ARGS = saved


def test_loss_func_reduces_like_upstream_and_ignores_masked_labels(megatron_args):
    """Sums over unmasked tokens; changing only masked (prompt) labels changes nothing."""
    from megatron_gem.train import loss_func

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
