"""megatron_gem.ops.gem_loss on one device, against a float64 reference written from the
paper's formula.

The reference never uses the closed form the op implements: it evaluates
``L = -sum_v q_v w_v (log p_y - log p_v)`` with log-softmax, and gets its gradient from float64
autograd with ``q`` and ``w`` detached (the paper's "held constant").
"""

import zlib

import pytest
import torch

from megatron_gem import gem_loss, vocab_parallel_gem_loss

pytestmark = pytest.mark.usefixtures("each_impl")  # every check on both impls


def reference_gem(logits, labels, beta, h, ignore_index=-100):
    """float64 loss and d(sum(loss * grad_out))/dlogits from the paper's definition."""
    z = logits.detach().double().requires_grad_()
    valid = labels != ignore_index
    y = labels.clamp(min=0).unsqueeze(-1)
    logp = torch.log_softmax(z, -1)
    q = torch.softmax(z / beta, -1).detach()
    if h == "linear":
        w = torch.ones_like(q)
    else:
        w = torch.sigmoid(0.01 * (z - z.gather(-1, y))).detach()
    loss = -(q * w * (logp.gather(-1, y) - logp)).sum(-1) * valid
    return z, loss


def reference_grad(logits, labels, beta, h, grad_out, ignore_index=-100):
    z, loss = reference_gem(logits, labels, beta, h, ignore_index)
    (g,) = torch.autograd.grad((loss * grad_out.double()).sum(), z)
    return loss.detach(), g


def random_case(shape, vocab, seed, ignore_frac=0.2, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    # float64 values that fp32 holds exactly: the reference sees the op's own inputs (at
    # beta = 0.05 the fp32 rounding of the logits alone moves q by ~1e-5)
    logits = (
        (torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * scale).float().double()
    )
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_frac] = -100
    grad_out = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    return logits, labels, grad_out


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
@pytest.mark.parametrize("beta", [1.0, 0.7, 0.31, 0.05])
@pytest.mark.parametrize("shape,vocab", [((3, 5), 37), ((11,), 97), ((2, 1, 3), 7)])
def test_fp32_matches_float64_reference(h, beta, shape, vocab):
    logits64, labels, grad_out = random_case(
        shape, vocab, seed=zlib.crc32(repr((h, beta, shape)).encode())
    )
    ref_loss, ref_grad = reference_grad(logits64, labels, beta, h, grad_out)
    z = logits64.float().requires_grad_()
    loss = gem_loss(z, labels, beta=beta, h=h)
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    (loss * grad_out.float()).sum().backward()
    scale = ref_loss.abs().max().item()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(
        z.grad.double(), ref_grad, rtol=1e-6, atol=1e-6 * ref_grad.abs().max().item()
    )


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_stats_match_float64_cross_entropy_and_entropy(h, beta):
    logits64, labels, _ = random_case((4, 9), 53, seed=7)
    loss, ce, ent = vocab_parallel_gem_loss(
        logits64.float(), labels, beta=beta, h=h, return_stats=True
    )
    valid = labels != -100
    ref_ce = torch.nn.functional.cross_entropy(
        logits64.reshape(-1, 53), labels.reshape(-1), reduction="none"
    ).view_as(ce)
    p = torch.softmax(logits64, -1)
    ref_ent = -(p * torch.log_softmax(logits64, -1)).sum(-1) * valid
    torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, gem_loss(logits64.float(), labels, beta=beta, h=h))


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_bf16_logits_within_1e_2(h):
    logits64, labels, grad_out = random_case((6, 5), 301, seed=3)
    z = logits64.to(torch.bfloat16).requires_grad_()
    ref_loss, ref_grad = reference_grad(z.detach(), labels, 0.7, h, grad_out)  # same bf16 values
    loss = gem_loss(z, labels, beta=0.7, h=h)
    (loss * grad_out.float()).sum().backward()
    assert z.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(z.grad.double(), ref_grad, rtol=1e-2, atol=1e-2)


def test_beta_one_linear_gradient_is_cross_entropy_gradient_and_rows_sum_to_zero():
    logits64, labels, _ = random_case((5, 7), 41, seed=11, ignore_frac=0.0)
    z = logits64.float().requires_grad_()
    gem_loss(z, labels, beta=1.0).sum().backward()
    zc = logits64.clone().requires_grad_()
    torch.nn.functional.cross_entropy(zc.view(-1, 41), labels.view(-1), reduction="sum").backward()
    torch.testing.assert_close(z.grad.double(), zc.grad, rtol=0, atol=1e-6)
    z2 = logits64.float().requires_grad_()
    gem_loss(z2, labels, beta=0.4).sum().backward()
    assert z2.grad.double().sum(-1).abs().max() < 1e-6


def test_loss_is_non_positive_when_target_is_argmax():
    logits64, _, _ = random_case((8, 3), 29, seed=5)
    labels = logits64.argmax(-1)
    for beta in (1.0, 0.7, 0.1):
        assert (gem_loss(logits64.float(), labels, beta=beta) <= 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_caller_logits_are_never_modified(dtype):
    logits64, labels, _ = random_case((4, 6), 33, seed=2)
    z = logits64.to(dtype).requires_grad_()
    before = z.detach().clone()
    loss, _, _ = vocab_parallel_gem_loss(z, labels, beta=0.6, return_stats=True)
    loss.sum().backward()
    assert torch.equal(z.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_the_same_gradient_over_the_logits(dtype):
    logits64, labels, grad_out = random_case((3, 5), 37, seed=12)
    fresh = logits64.to(dtype).requires_grad_()
    (vocab_parallel_gem_loss(fresh, labels, beta=0.7, h="logsigmoid") * grad_out).sum().backward()
    base = logits64.to(dtype).requires_grad_()
    logits = base * 1  # an intermediate, as the output layer's logits are
    loss = vocab_parallel_gem_loss(logits, labels, beta=0.7, h="logsigmoid", inplace_backward=True)
    (loss * grad_out).sum().backward()
    assert torch.equal(base.grad, fresh.grad)
    assert torch.equal(logits.detach(), fresh.grad)  # the gradient took the logits' memory


def test_gradient_is_multiplied_by_grad_output_before_the_cast():
    # fp16 cannot hold q ~ 1e-9 (smallest subnormal ~6e-8); q * 1e4 ~ 1e-5 it can. A gradient cast
    # to fp16 before the multiplication would be exactly 0 there.
    logits = torch.zeros(1, 64, dtype=torch.float64)
    logits[0, 0] = 20.0
    labels = torch.tensor([0])
    grad_out = torch.tensor([1e4], dtype=torch.float64)
    _, ref_grad = reference_grad(logits, labels, 1.0, "linear", grad_out)
    z = logits.half().requires_grad_()
    gem_loss(z, labels, beta=1.0).backward(grad_out.half())
    assert z.grad.dtype == torch.float16
    assert ref_grad[0, 1].abs() < 1e-4 and ref_grad[0, 1] > 0  # q_1 * 1e4 ~ 2e-5
    torch.testing.assert_close(z.grad[0, 1:].double(), ref_grad[0, 1:], rtol=2e-3, atol=0)


def test_ignored_targets_give_zero_loss_and_gradient():
    logits64, labels, _ = random_case((3, 4), 17, seed=4)
    labels[0] = -100
    z = logits64.float().requires_grad_()
    loss = gem_loss(z, labels)
    loss.sum().backward()
    assert (loss[0] == 0).all() and (z.grad[0] == 0).all()
    all_ignored = torch.full((3, 4), -7)
    z2 = logits64.float().requires_grad_()
    loss2, ce2, ent2 = vocab_parallel_gem_loss(z2, all_ignored, ignore_index=-7, return_stats=True)
    loss2.sum().backward()
    for t in (loss2, ce2, ent2, z2.grad):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_padded_minus_inf_and_huge_logits_stay_finite(h):
    logits64, labels, _ = random_case((4, 5), 23, seed=9)
    labels = labels.clamp(max=19)
    logits64[..., 20:] = float("-inf")  # padded vocabulary
    logits64[0, 0, :5] = 1e4
    logits64[0, 1, :5] = -1e4
    logits64[1, 0, 3] = 1e4
    z = logits64.float().requires_grad_()
    loss, ce, ent = vocab_parallel_gem_loss(z, labels, beta=0.7, h=h, return_stats=True)
    loss.sum().backward()
    for t in (loss, ce, ent, z.grad):
        assert torch.isfinite(t).all()
    assert (z.grad[..., 20:] == 0).all()
    finite = logits64.clone()
    finite[..., 20:] = -1e30  # exp underflows to exactly 0: the same math without -inf
    ref_loss, _ = reference_grad(finite, labels, 0.7, h, torch.ones(4, 5, dtype=torch.float64))
    torch.testing.assert_close(
        loss.double(), ref_loss, rtol=1e-6, atol=1e-6 * ref_loss.abs().max().item()
    )


def test_non_contiguous_grad_output():
    logits64, labels, _ = random_case((3, 4), 19, seed=12, ignore_frac=0.0)
    z = logits64.float().requires_grad_()
    gem_loss(z, labels).mean().backward()  # mean's grad_output is an expanded scalar
    _, ref = reference_grad(
        logits64, labels, 0.7, "linear", torch.full((3, 4), 1 / 12, dtype=torch.float64)
    )
    torch.testing.assert_close(z.grad.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta=0.0), "beta=0.0"),
        (dict(beta=1.5), "beta=1.5"),
        (dict(beta=-0.3), "beta=-0.3"),
        (dict(beta="0.7"), "beta='0.7'"),
        (dict(h="sigmoid"), "h='sigmoid'"),
        (dict(ignore_index=1.5), "ignore_index=1.5"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gem_loss(torch.randn(2, 5), torch.tensor([1, 2]), **kwargs)


def test_bad_inputs_raise_value_error_naming_them():
    z = torch.randn(2, 3, 11)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 11\).*\[11\]"):
        gem_loss(z, torch.tensor([[0, 1, 2], [3, 4, 11]]))
    with pytest.raises(ValueError, match=r"\[-5\]"):
        gem_loss(z, torch.tensor([[0, 1, 2], [3, 4, -5]]))
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        gem_loss(z, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype=torch.int64"):
        gem_loss(torch.ones(2, 3, 11, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        gem_loss(z, torch.zeros(2, 3))


def test_nvtx_ranges_wrap_forward_and_backward(monkeypatch):
    pushed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: pushed.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: pushed.append("pop"))
    z = torch.randn(3, 7, requires_grad=True)
    gem_loss(z, torch.tensor([0, 1, 2])).sum().backward()
    assert pushed == [
        "megatron_gem/gem_loss/forward",
        "pop",
        "megatron_gem/gem_loss/backward",
        "pop",
    ]
