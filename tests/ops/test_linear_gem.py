"""megatron_gem.ops.linear_gem (output layer + GEM loss, chunked, no full logits) against float64.

The reference materialises ``logits64 = hidden64 @ weight64.T`` in float64, takes the paper's loss
and its gradient wrt the logits from ``reference_grad`` (float64 autograd, q and w detached), and
chains it to ``hidden`` and ``weight`` by float64 autograd. TP 2 and 4 run in ONE gloo spawn.
"""

import json
import os
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_gem import vocab_parallel_linear_gem_loss
from test_gem_loss import reference_grad
from test_gem_loss_parallel import _free_port

TOKENS, HIDDEN, VOCAB = 37, 24, 53  # odd sizes; chunk 8 gives 5 chunks, the last of 5 rows


def _case(shape, hidden_size, vocab, seed, ignore_frac=0.2):
    """fp32-exact float64 hidden [*shape, H], weight [V, H] (logits ~ 3 N(0, 1)), labels and
    grad_out."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen, dtype=torch.float64).float().double()
    weight = (
        (torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 3 / hidden_size**0.5)
        .float()
        .double()
    )
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_frac] = -100
    grad_out = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    return hidden, weight, labels, grad_out


def _reference(hidden64, weight64, labels, beta, h, grad_out):
    """float64 loss, dhidden, dweight of sum(loss * grad_out) through the materialised logits."""
    x = hidden64.clone().requires_grad_()
    w = weight64.clone().requires_grad_()
    logits = x @ w.T
    loss, g = reference_grad(logits.detach(), labels, beta, h, grad_out)
    dx, dw = torch.autograd.grad(logits, (x, w), g)
    return loss, dx, dw


def _close(actual, expected, tol):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale)


def _run(hidden64, weight64, labels, grad_out, dtype, **kw):
    x = hidden64.to(dtype).requires_grad_()
    w = weight64.to(dtype).requires_grad_()
    loss = vocab_parallel_linear_gem_loss(x, w, labels, **kw)
    (loss * grad_out.float()).sum().backward()
    return loss, x.grad, w.grad


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
@pytest.mark.parametrize("beta", [1.0, 0.7])
@pytest.mark.parametrize("shape,chunk", [((TOKENS,), 8), ((5, 3), 4), ((TOKENS,), None)])
def test_fp32_matches_float64_materialised_reference(h, beta, shape, chunk):
    hidden, weight, labels, grad_out = _case(
        shape, HIDDEN, VOCAB, seed=zlib.crc32(repr((h, beta, shape)).encode())
    )
    ref_loss, ref_dx, ref_dw = _reference(hidden, weight, labels, beta, h, grad_out)
    loss, dx, dw = _run(
        hidden, weight, labels, grad_out, torch.float32, beta=beta, h=h, chunk_tokens=chunk
    )
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    assert dx.dtype == dw.dtype == torch.float32
    assert (loss[labels == -100] == 0).all() and (labels == -100).any()
    _close(loss, ref_loss, 1e-6)
    _close(dx, ref_dx, 1e-6)
    _close(dw, ref_dw, 1e-6)


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_bf16_within_1e_2(h):
    hidden, weight, labels, grad_out = _case((TOKENS,), HIDDEN, VOCAB, seed=11)
    hidden, weight = hidden.bfloat16().double(), weight.bfloat16().double()  # bf16-exact
    ref_loss, ref_dx, ref_dw = _reference(hidden, weight, labels, 0.7, h, grad_out)
    loss, dx, dw = _run(
        hidden, weight, labels, grad_out, torch.bfloat16, beta=0.7, h=h, chunk_tokens=8
    )
    assert loss.dtype == torch.float32 and dx.dtype == dw.dtype == torch.bfloat16
    _close(loss, ref_loss, 1e-2)
    _close(dx, ref_dx, 1e-2)
    _close(dw, ref_dw, 1e-2)


def test_stats_match_float64_cross_entropy_and_entropy():
    hidden, weight, labels, _ = _case((TOKENS,), HIDDEN, VOCAB, seed=5)
    loss, ce, ent = vocab_parallel_linear_gem_loss(
        hidden.float(), weight.float(), labels, beta=0.7, return_stats=True, chunk_tokens=8
    )
    logits = hidden @ weight.T
    valid = labels != -100
    ref_ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    ref_ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1) * valid
    _close(ce, ref_ce, 1e-6)
    _close(ent, ref_ent, 1e-6)


def test_tied_weight_gradients_accumulate():
    """The embedding's weight feeds the input and the output layer: both gradients add up."""
    emb64, _, labels, grad_out = _case((VOCAB,), HIDDEN, VOCAB, seed=3)
    emb64 = emb64 * 3 / HIDDEN**0.5
    ids = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(ids, -1)
    labels[::5] = -100
    grad_out = grad_out[:TOKENS]

    w = emb64.clone().requires_grad_()
    logits = (w[ids] * 0.5) @ w.T
    _, g = reference_grad(logits.detach(), labels, 0.7, "linear", grad_out)
    (ref_dw,) = torch.autograd.grad(logits, w, g)

    emb = emb64.float().requires_grad_()
    loss = vocab_parallel_linear_gem_loss(emb[ids] * 0.5, emb, labels, beta=0.7, chunk_tokens=8)
    (loss * grad_out.float()).sum().backward()
    _close(emb.grad, ref_dw, 1e-6)


def test_saves_no_logits_sized_tensor():
    """What the forward keeps for the backward: hidden, weight and per-row vectors, nothing of
    [tokens, V] (here V > H, so the logits are the largest tensor the op could keep)."""
    hidden, weight, labels, grad_out = _case((TOKENS,), HIDDEN, VOCAB, seed=2)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    for h in ("linear", "logsigmoid"):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            vocab_parallel_linear_gem_loss(x, w, labels, h=h, chunk_tokens=8)
        assert (TOKENS, HIDDEN) in saved and (VOCAB, HIDDEN) in saved, saved
        assert all(torch.Size(s).numel() < TOKENS * VOCAB for s in saved), saved


def test_bad_input_raises_value_error():
    hidden, weight, labels, _ = _case((TOKENS,), HIDDEN, VOCAB, seed=1)
    x, w = hidden.float(), weight.float()
    with pytest.raises(ValueError, match="hidden must be"):
        vocab_parallel_linear_gem_loss(x.long(), w, labels)
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_linear_gem_loss(x, w, labels[:-1])
    with pytest.raises(ValueError, match="integer"):
        vocab_parallel_linear_gem_loss(x, w, labels.float())
    with pytest.raises(ValueError, match="weight must be"):
        vocab_parallel_linear_gem_loss(x, w[:, :-1], labels)
    with pytest.raises(ValueError, match="weight .* must match"):
        vocab_parallel_linear_gem_loss(x, w.double(), labels)
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        vocab_parallel_linear_gem_loss(x, w, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="beta"):
        vocab_parallel_linear_gem_loss(x, w, labels, beta=0.0)
    bad = labels.clone()
    bad[0] = VOCAB
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab_parallel_linear_gem_loss(x, w, bad)


# --- TP 2 and 4: 4 gloo processes, one spawn ---------------------------------------------------

WORLD = 4
TP_VOCAB = 4 * 13  # 26 rows per shard at TP 2, 13 at TP 4
TP_SHAPE = (7, 3)  # [s, b]: 21 tokens, chunk 4 gives 6 chunks, the last of 1 row


def _tp_checks(rank, tp2, tp4):
    results = {}
    for h in ("linear", "logsigmoid"):
        for beta in (1.0, 0.7):
            name = f"{h}_beta{beta}"
            try:
                hidden, weight, labels, grad_out = _case(
                    TP_SHAPE, HIDDEN, TP_VOCAB, seed=zlib.crc32(name.encode())
                )
                ref_loss, ref_dx, ref_dw = _reference(hidden, weight, labels, beta, h, grad_out)
                for group, r, size in ((tp2, rank % 2, 2), (tp4, rank, 4)):
                    width = TP_VOCAB // size
                    shard = weight[r * width : (r + 1) * width]
                    calls = []
                    orig = dist.all_reduce

                    def counted(*a, _orig=orig, **k):
                        calls.append(k.get("op"))
                        return _orig(*a, **k)

                    dist.all_reduce = counted
                    try:
                        loss, dx, dw = _run(
                            hidden,
                            shard,
                            labels,
                            grad_out,
                            torch.float32,
                            beta=beta,
                            h=h,
                            tp_group=group,
                            chunk_tokens=4,
                        )
                    finally:
                        dist.all_reduce = orig
                    # the op's two collectives (MAX, then SUM) for all chunks; none backward
                    assert calls == [dist.ReduceOp.MAX, dist.ReduceOp.SUM], calls
                    _close(loss, ref_loss, 1e-6)
                    # dhidden is this rank's partial sum: the ranks' sum is the full gradient
                    dist.all_reduce(dx, group=group)
                    _close(dx, ref_dx, 1e-6)
                    _close(dw, ref_dw[r * width : (r + 1) * width], 1e-6)
                results[name] = None
            except Exception:
                results[name] = traceback.format_exc()
    return results


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank makes both
        results = _tp_checks(rank, pairs[rank // 2], dist.new_group(list(range(WORLD))))
    except Exception:
        results = {"spawn": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("linear_tp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.load(open(out / f"rank{r}.json")) for r in range(WORLD)]


@pytest.mark.parametrize(
    "name", [f"{h}_beta{b}" for h in ("linear", "logsigmoid") for b in (1.0, 0.7)]
)
def test_tp2_tp4_match_float64(tp_results, name):
    for rank, results in enumerate(tp_results):
        assert name in results, f"rank {rank} did not run {name}: {results.get('spawn', '')}"
        assert results[name] is None, f"rank {rank}:\n{results[name]}"
