"""Host synchronisations and collectives of the GEM op, counted.

On CPU nothing really waits for a device, so the calls that would make the host wait on a GPU are
instrumented: ``Tensor.item/.tolist/.cpu/.numpy/.nonzero``, ``bool()/float()/int()/index`` of a
tensor, ``torch.tensor`` of Python data (a host-to-device copy), ``torch.equal``,
``torch.nonzero``. A call counts only when a ``megatron_gem`` frame is on the stack (the op, not
the test). ``sync_checks=False`` must make none in forward and backward (TP 1 and TP 2, both h,
with and without statistics); ``sync_checks=True`` makes some (so the counter can fail). An
out-of-vocabulary target then surfaces from ``raise_deferred_errors()``.
"""

import functools
import json
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import megatron_gem
from megatron_gem import gem_loss, raise_deferred_errors, vocab_parallel_gem_loss
from conftest import IMPLS
from test_gem_loss import reference_grad
from test_gem_loss_parallel import VOCAB, _close, _CollectiveCounter, _free_port, _full_case, _shard

_MISSING = object()
TENSOR_METHODS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
)


def _from_package():
    frame = sys._getframe(2)  # the wrapper's caller and up
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("megatron_gem"):
            return True
        frame = frame.f_back
    return False


class SyncCounter:
    """Counts calls that would synchronise the host with a GPU, made under megatron_gem."""

    def __init__(self):
        self.calls = []
        self._saved = []

    @property
    def count(self):
        return len(self.calls)

    def _patch(self, owner, name, counts=lambda *a, **k: True):
        original = getattr(owner, name)
        self._saved.append((owner, name, vars(owner).get(name, _MISSING)))

        def wrapped(*args, **kwargs):
            if counts(*args, **kwargs) and _from_package():
                self.calls.append(name)
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)

    def __enter__(self):
        for name in TENSOR_METHODS:
            self._patch(torch.Tensor, name)
        self._patch(
            torch, "tensor", counts=lambda data, *a, **k: not isinstance(data, torch.Tensor)
        )
        self._patch(torch, "equal")
        self._patch(torch, "nonzero")
        return self

    def __exit__(self, *exc):
        for owner, name, value in reversed(self._saved):
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


pytestmark = pytest.mark.usefixtures("each_impl")  # every check on both impls


def _forward_backward(z, labels, grad_out, **kw):
    out = vocab_parallel_gem_loss(z, labels, **kw)
    loss = out[0] if kw.get("return_stats") else out
    (loss * grad_out).sum().backward()
    return out


def test_counter_sees_syncs_only_from_the_package():
    originals = [getattr(torch.Tensor, n) for n in TENSOR_METHODS] + [torch.tensor, torch.equal]
    t = torch.ones(3)
    with SyncCounter() as syncs:
        t.sum().item(), bool(t.all()), torch.tensor([1.0])  # the test's own calls: not counted
        assert syncs.count == 0
        gem_loss(torch.randn(4, 9), torch.randint(0, 9, (4,)))  # sync_checks=True: counted
    assert syncs.calls == ["tolist"], syncs.calls
    restored = [getattr(torch.Tensor, n) for n in TENSOR_METHODS] + [torch.tensor, torch.equal]
    assert all(a is b for a, b in zip(originals, restored))


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
@pytest.mark.parametrize("stats", [False, True])
def test_sync_free_single_device_no_sync_same_result(h, stats):
    logits, labels, grad_out = _full_case(seed=31)
    kw = dict(beta=0.6, h=h, return_stats=stats)
    z_ref = logits.float().requires_grad_()
    ref = _forward_backward(z_ref, labels, grad_out.float(), **kw)
    z = logits.float().requires_grad_()
    with SyncCounter() as syncs:
        out = _forward_backward(z, labels, grad_out.float(), sync_checks=False, **kw)
        loss = gem_loss(logits.float(), labels, beta=0.6, h=h, sync_checks=False)
    assert syncs.count == 0, syncs.calls
    for a, b in zip(out if stats else [out], ref if stats else [ref]):
        assert torch.equal(a, b)
    assert torch.equal(z.grad, z_ref.grad)
    assert torch.equal(loss, ref[0] if stats else ref)
    raise_deferred_errors()  # clean calls: nothing pending


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 7, -5])
def test_bad_target_deferred_to_raise_deferred_errors(bad):
    logits, labels, _ = _full_case(seed=4)
    gem_loss(logits.float(), labels, sync_checks=False)  # clean
    raise_deferred_errors()  # no-op after a clean call
    labels[3, 1] = bad
    labels[5, 2] = VOCAB + 100  # a later bad id: the first one is reported
    for _ in range(2):  # stays pending across calls
        loss = gem_loss(logits.float(), labels, sync_checks=False)
    assert torch.isfinite(loss[0]).all()
    with pytest.raises(
        ValueError, match=rf"outside the vocabulary \[0, {VOCAB}\).*e\.g\. \[{bad}\]"
    ):
        raise_deferred_errors()
    raise_deferred_errors()  # reset by the raise
    with pytest.raises(ValueError, match=rf"e\.g\. \[{bad}, {VOCAB + 100}\]"):
        gem_loss(logits.float(), labels)  # sync_checks=True: at once, as before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real syncs)")
def test_cuda_sync_debug_mode_sees_no_sync():
    """On a GPU, torch's own detector: sync_checks=False runs under set_sync_debug_mode("error");
    sync_checks=True trips it (so the check can fail)."""
    logits, labels, grad_out = _full_case(seed=12)
    z = logits.float().cuda()
    labels, grad_out = labels.cuda(), grad_out.float().cuda()
    for h in ("linear", "logsigmoid"):
        for stats in (False, True):
            kw = dict(h=h, return_stats=stats)
            _forward_backward(z.clone().requires_grad_(), labels, grad_out, **kw)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                _forward_backward(
                    z.clone().requires_grad_(), labels, grad_out, sync_checks=False, **kw
                )
                with pytest.raises(RuntimeError, match="synchroniz"):
                    _forward_backward(z.clone().requires_grad_(), labels, grad_out, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    raise_deferred_errors()


def _run_checks(rank, tp2, impl):

    vocab_parallel_gem_loss = functools.partial(megatron_gem.vocab_parallel_gem_loss, impl=impl)
    checks = {}

    def check(name):
        def deco(fn):
            try:
                fn()
                checks[f"{impl}:{name}"] = None
            except Exception:
                checks[f"{impl}:{name}"] = traceback.format_exc()

        return deco

    @check("no_sync_at_most_two_collectives_forward_none_backward_tp1_tp2")
    def _():
        for group, r, size in ((None, 0, 1), (tp2, rank, 2)):
            logits, labels, grad_out = _full_case(seed=40 + size)
            shard = _shard(logits, r, size).float().contiguous()
            # the first sync-free call on a (shard size, group) checks the shards once
            vocab_parallel_gem_loss(shard, labels, tp_group=group, sync_checks=False)
            for h in ("linear", "logsigmoid"):
                for stats in (False, True):
                    kw = dict(beta=0.7, h=h, tp_group=group, return_stats=stats)
                    z = shard.clone().requires_grad_()
                    with SyncCounter() as syncs, _CollectiveCounter() as fwd:
                        out = vocab_parallel_gem_loss(z, labels, sync_checks=False, **kw)
                    loss = out[0] if stats else out
                    with SyncCounter() as bwd_syncs, _CollectiveCounter() as bwd:
                        (loss * grad_out.float()).sum().backward()
                    case = f"TP{size} {h} stats={stats}"
                    assert syncs.count == 0 and bwd_syncs.count == 0, (case, syncs.calls)
                    assert fwd.count <= 2 and bwd.count == 0, (case, fwd.count, bwd.count)
                    assert fwd.count >= (size > 1), case
                    ref_loss, ref_grad = reference_grad(
                        logits.clamp(min=-1e30), labels, 0.7, h, grad_out
                    )
                    _close(loss, ref_loss)
                    _close(z.grad, _shard(ref_grad, r, size))
                    with SyncCounter() as checked:
                        _forward_backward(
                            shard.clone().requires_grad_(), labels, grad_out.float(), **kw
                        )
                    assert checked.count > 0, case  # sync_checks=True: the counter can fail

    @check("bad_target_deferred_on_every_rank_tp2")
    def _():
        logits, labels, _ = _full_case(seed=9)
        labels[2, 0] = VOCAB  # global: every rank sees it
        shard = _shard(logits, rank, 2).float().contiguous()
        vocab_parallel_gem_loss(shard, labels, tp_group=tp2, sync_checks=False)  # no error
        try:
            raise_deferred_errors()
        except ValueError as e:
            assert f"[0, {VOCAB})" in str(e) and f"e.g. [{VOCAB}]" in str(e), e
        else:
            raise AssertionError("no ValueError")
        raise_deferred_errors()  # reset

    @check("shard_mismatch_raises_on_first_sync_free_call")
    def _():
        z = torch.randn(3, 20 + rank)  # 20 on rank 0, 21 on rank 1
        try:
            vocab_parallel_gem_loss(
                z, torch.zeros(3, dtype=torch.long), tp_group=tp2, sync_checks=False
            )
        except ValueError as e:
            assert "shard size differs" in str(e), e
        else:
            raise AssertionError("no ValueError")

    return checks


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        group, checks = dist.new_group([0, 1]), {}
        for impl in IMPLS:  # both implementations in the one spawn
            checks.update(_run_checks(rank, group, impl))
    except Exception:
        checks = {"spawn": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(checks, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncs")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


@pytest.mark.parametrize(
    "name",
    [
        "no_sync_at_most_two_collectives_forward_none_backward_tp1_tp2",
        "bad_target_deferred_on_every_rank_tp2",
        "shard_mismatch_raises_on_first_sync_free_call",
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_multi_rank(rank_results, name, impl):
    name = f"{impl}:{name}"
    for rank, checks in enumerate(rank_results):
        assert name in checks, f"rank {rank} did not run {name}: {checks.get('spawn', '')}"
        assert checks[name] is None, f"rank {rank}:\n{checks[name]}"
