"""Vocab-parallel GEM across tensor-parallel ranks: 4 gloo CPU processes in ONE spawn.

The spawn runs every multi-rank check (TP=2 and TP=4 against TP=1 and float64, collective counts,
Megatron's cross-entropy at beta = 1, ignored targets, bad input) and records each check's
outcome per rank; the tests below assert on those records, one test per check.
"""

import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import IMPLS
from test_gem_loss import reference_grad

WORLD = 4
VOCAB = 4 * 13  # odd shards: 26 per rank at TP=2, 13 at TP=4
SHAPE = (7, 3)  # [s, b]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_case(seed, vocab=VOCAB, pad=3):
    """Same full logits on every rank (fixed seed); the last `pad` columns are padding (-inf)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (
        (torch.randn(*SHAPE, vocab, generator=gen, dtype=torch.float64) * 3).float().double()
    )  # fp32-exact
    logits[..., vocab - pad :] = float("-inf")
    labels = torch.randint(0, vocab - pad, SHAPE, generator=gen)
    labels[torch.rand(SHAPE, generator=gen) < 0.25] = -100
    grad_out = torch.rand(SHAPE, generator=gen, dtype=torch.float64) + 0.5
    return logits, labels, grad_out


def _reference_stats(logits, labels):
    """float64 cross-entropy and entropy of p = softmax(z) per token (0 where ignored)."""
    valid = labels != -100
    ce = (
        torch.logsumexp(logits, -1) - logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ) * valid
    entropy = (
        -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).nan_to_num().sum(-1) * valid
    )
    return ce, entropy


def _shard(full, rank, size):
    width = full.shape[-1] // size
    return full[..., rank * width : (rank + 1) * width]


class _CollectiveCounter:
    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "broadcast",
        "reduce",
    )

    def __init__(self):
        self.count = 0
        self._orig = {}

    def __enter__(self):
        for name in self.NAMES:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*a, _orig=orig, **k):
                self.count += 1
                return _orig(*a, **k)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def _close(a, b, tol=1e-6):
    a, b = a.double(), b.double()
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol:.0e} * {scale:.3g}"


def _run_checks(rank, tp2, tp4, impl):
    from functools import partial

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    import megatron_gem

    gem_loss = partial(megatron_gem.gem_loss, impl=impl)
    vocab_parallel_gem_loss = partial(megatron_gem.vocab_parallel_gem_loss, impl=impl)

    tp2_rank = rank % 2  # initialize_model_parallel(2) groups ranks {0,1} and {2,3}
    checks = {}

    def check(name):
        def deco(fn):
            try:
                fn()
                checks[f"{impl}:{name}"] = None
            except Exception:
                checks[f"{impl}:{name}"] = traceback.format_exc()

        return deco

    @check("tp2_tp4_equal_tp1_and_float64")
    def _():
        for h in ("linear", "logsigmoid"):
            for beta in (1.0, 0.7, 0.2):
                logits, labels, grad_out = _full_case(seed=int(beta * 10) + (h == "linear"))
                z1 = logits.float().requires_grad_()
                loss1 = gem_loss(z1, labels, beta=beta, h=h)
                (loss1 * grad_out.float()).sum().backward()
                ref_loss, ref_grad = reference_grad(
                    logits.clamp(min=-1e30), labels, beta, h, grad_out
                )
                _close(loss1, ref_loss)
                for group, r, size in ((tp2, tp2_rank, 2), (tp4, rank, 4)):
                    z = _shard(logits, r, size).float().contiguous().requires_grad_()
                    loss, ce, ent = vocab_parallel_gem_loss(
                        z, labels, beta=beta, h=h, tp_group=group, return_stats=True
                    )
                    (loss * grad_out.float()).sum().backward()
                    _close(loss, loss1)
                    _close(z.grad, _shard(z1.grad, r, size))
                    _close(z.grad, _shard(ref_grad, r, size))
                    ref_ce, ref_ent = _reference_stats(logits, labels)
                    _close(ce, ref_ce)
                    _close(ent, ref_ent)

    @check("padding_only_shard_and_low_shards_match_float64")
    def _():
        # TP4: the last shard is all padding (-inf) and shard 1 sits 80 below the others, so
        # its rescaling factor exp((shard max - max) / beta) underflows at beta = 0.3
        width = VOCAB // 4
        logits, labels, grad_out = _full_case(seed=23, pad=width)
        logits[..., width : 2 * width] -= 80
        for beta in (1.0, 0.3):
            z = _shard(logits, rank, 4).float().contiguous().requires_grad_()
            loss, ce, ent = vocab_parallel_gem_loss(
                z, labels, beta=beta, tp_group=tp4, return_stats=True
            )
            (loss * grad_out.float()).sum().backward()
            ref_loss, ref_grad = reference_grad(
                logits.clamp(min=-1e30), labels, beta, "linear", grad_out
            )
            _close(loss, ref_loss)
            _close(z.grad, _shard(ref_grad, rank, 4))
            ref_ce, ref_ent = _reference_stats(logits, labels)
            _close(ce, ref_ce)
            _close(ent, ref_ent)
        # a NaN logit on one rank poisons its row's loss on every rank, and only that row's
        logits[2, 1, 2 * width + 1] = float("nan")
        labels[2, 1] = 0
        loss = vocab_parallel_gem_loss(
            _shard(logits, rank, 4).float().contiguous(), labels, tp_group=tp4
        )
        assert torch.isnan(loss[2, 1]) and torch.isfinite(loss).sum() == loss.numel() - 1, loss

    @check("bf16_tp4_within_1e-2")
    def _():
        logits, labels, grad_out = _full_case(seed=21)
        z = _shard(logits, rank, 4).to(torch.bfloat16).contiguous().requires_grad_()
        loss = vocab_parallel_gem_loss(z, labels, beta=0.7, tp_group=tp4)
        (loss * grad_out.float()).sum().backward()
        full_bf16 = logits.to(torch.bfloat16).double().clamp(min=-1e30)
        ref_loss, ref_grad = reference_grad(full_bf16, labels, 0.7, "linear", grad_out)
        _close(loss, ref_loss, tol=1e-2)
        _close(z.grad, _shard(ref_grad, rank, 4), tol=1e-2)
        assert z.grad.dtype == torch.bfloat16

    @check("at_most_two_collectives_forward_none_backward")
    def _():
        for h in ("linear", "logsigmoid"):
            for stats in (False, True):
                logits, labels, _ = _full_case(seed=5)
                z = _shard(logits, rank, 4).float().contiguous().requires_grad_()
                with _CollectiveCounter() as fwd:
                    out = vocab_parallel_gem_loss(z, labels, h=h, tp_group=tp4, return_stats=stats)
                loss = out[0] if stats else out
                with _CollectiveCounter() as bwd:
                    loss.sum().backward()
                assert 1 <= fwd.count <= 2, (
                    f"{fwd.count} collectives in the forward ({h}, stats={stats})"
                )
                assert bwd.count == 0, f"{bwd.count} collectives in the backward"

    @check("beta1_linear_gradient_equals_megatron_cross_entropy_tp2")
    def _():
        logits, labels, grad_out = _full_case(seed=8, pad=0)
        labels = labels.clamp(min=0)  # Megatron's CE has no ignore_index
        shard = _shard(logits, tp2_rank, 2).float().contiguous()
        z_ce = shard.clone().requires_grad_()
        ce = vocab_parallel_cross_entropy(z_ce, labels, tp_group=tp2)
        (ce * grad_out.float()).sum().backward()
        z = shard.clone().requires_grad_()
        loss, our_ce, _ = vocab_parallel_gem_loss(
            z, labels, beta=1.0, h="linear", tp_group=tp2, return_stats=True
        )
        (loss * grad_out.float()).sum().backward()
        _close(z.grad, z_ce.grad)
        _close(our_ce, ce.detach())

    @check("default_group_is_megatron_tensor_parallel_group")
    def _():
        logits, labels, _ = _full_case(seed=13)
        shard = _shard(logits, tp2_rank, 2).float().contiguous()
        explicit = vocab_parallel_gem_loss(shard, labels, tp_group=tp2)
        default = vocab_parallel_gem_loss(shard, labels)
        assert torch.equal(explicit, default)

    @check("all_ignored_gives_zeros_on_every_rank")
    def _():
        logits, _, _ = _full_case(seed=3)
        z = _shard(logits, rank, 4).float().contiguous().requires_grad_()
        labels = torch.full(SHAPE, -100)
        loss, ce, ent = vocab_parallel_gem_loss(z, labels, tp_group=tp4, return_stats=True)
        loss.sum().backward()
        for t in (loss, ce, ent, z.grad):
            assert torch.equal(t, torch.zeros_like(t)), t
        labels = torch.randint(0, VOCAB - 3, SHAPE)
        labels[0] = -100
        z2 = _shard(logits, rank, 4).float().contiguous().requires_grad_()
        loss2 = vocab_parallel_gem_loss(z2, labels, tp_group=tp4)
        loss2.sum().backward()
        assert (loss2[0] == 0).all() and (z2.grad[0] == 0).all() and (loss2[1:] != 0).any()

    @check("huge_logits_finite")
    def _():
        logits, labels, _ = _full_case(seed=17)
        logits[0, 0, :10] = 1e4
        logits[1, 0, :] = -1e4
        logits[2, 1, 40] = 1e4
        z = _shard(logits, rank, 4).float().contiguous().requires_grad_()
        loss, ce, ent = vocab_parallel_gem_loss(
            z, labels, beta=0.3, h="logsigmoid", tp_group=tp4, return_stats=True
        )
        loss.sum().backward()
        for t in (loss, ce, ent, z.grad):
            assert torch.isfinite(t).all()

    @check("shard_size_mismatch_raises_on_every_rank")
    def _():
        width = 26 + tp2_rank  # 26 on one rank, 27 on the other
        z = torch.randn(*SHAPE, width)
        try:
            vocab_parallel_gem_loss(z, torch.zeros(SHAPE, dtype=torch.long), tp_group=tp2)
        except ValueError as e:
            assert "shard size differs" in str(e) and "this rank has" in str(e), e
        else:
            raise AssertionError("no ValueError")

    @check("target_outside_global_vocab_raises_on_every_rank")
    def _():
        labels = torch.zeros(SHAPE, dtype=torch.long)
        labels[1, 1] = VOCAB  # valid locally for no rank, outside the global vocabulary
        try:
            vocab_parallel_gem_loss(torch.randn(*SHAPE, 13), labels, tp_group=tp4)
        except ValueError as e:
            assert f"[0, {VOCAB})" in str(e) and f"[{VOCAB}]" in str(e), e
        else:
            raise AssertionError("no ValueError")

    return checks


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from megatron.core import parallel_state

    tp4 = dist.new_group(list(range(WORLD)))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        checks = {}
        for impl in IMPLS:  # both implementations in the one spawn
            checks.update(
                _run_checks(rank, parallel_state.get_tensor_model_parallel_group(), tp4, impl)
            )
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(checks if "checks" in locals() else {"spawn": traceback.format_exc()}, f)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.load(open(out / f"rank{r}.json")) for r in range(WORLD)]


CHECKS = [
    "tp2_tp4_equal_tp1_and_float64",
    "padding_only_shard_and_low_shards_match_float64",
    "bf16_tp4_within_1e-2",
    "at_most_two_collectives_forward_none_backward",
    "beta1_linear_gradient_equals_megatron_cross_entropy_tp2",
    "default_group_is_megatron_tensor_parallel_group",
    "all_ignored_gives_zeros_on_every_rank",
    "huge_logits_finite",
    "shard_size_mismatch_raises_on_every_rank",
    "target_outside_global_vocab_raises_on_every_rank",
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CHECKS)
def test_multi_rank(rank_results, name, impl):
    name = f"{impl}:{name}"
    for rank, checks in enumerate(rank_results):
        assert name in checks, f"rank {rank} did not run {name}: {checks.get('spawn', '')}"
        assert checks[name] is None, f"rank {rank}:\n{checks[name]}"
