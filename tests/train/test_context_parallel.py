"""Packed SFT with context parallelism (``megatron_gem.train.context_parallel``), on CPU.

Every check compares with ``_te_layout``, a plain reimplementation of the layout Transformer
Engine documents for THD context parallelism (``thd_get_partitioned_indices`` and
``get_cu_seqlens_on_cp_rank``): each packed sub-sequence, padded to a multiple of 2*cp, is
cut into 2*cp equal chunks and rank r keeps chunks r and 2*cp-1-r, sub-sequence after
sub-sequence. Odd real lengths and cp in {1, 2, 3, 4}; the packed dataset on the THD path
builds no S x S mask; ``get_sft_batch`` hands each CP rank its tokens and TE's metadata.
The CP attention itself needs Transformer Engine and GPUs: not run here.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

CPS = (1, 2, 3, 4)


# ------------------------------------------------------------------- independent reference
def _te_layout(real_lengths, cp):
    """Plain loops: (padded lengths, per-rank global positions, per-rank real-token counts)."""
    m = 2 * cp if cp > 1 else 1
    padded = [-(-n // m) * m for n in real_lengths]
    positions = {r: [] for r in range(cp)}
    real_on_rank = {r: [] for r in range(cp)}
    start = 0
    for n, p in zip(real_lengths, padded):
        if cp == 1:
            positions[0] += list(range(start, start + p))
            real_on_rank[0].append(n)
        else:
            chunk = p // (2 * cp)
            for r in range(cp):
                mine = []
                for k in (r, 2 * cp - 1 - r):
                    mine += list(range(start + k * chunk, start + (k + 1) * chunk))
                positions[r] += mine
                real_on_rank[r].append(sum(1 for x in mine if x - start < n))
        start += p
    return padded, positions, real_on_rank


def _cumsum(xs):
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def _odd_lengths(g, count):
    return [2 * int(torch.randint(0, 9, (1,), generator=g)) + 1 for _ in range(count)]


# ------------------------------------------------------------------- the index and metadata
@pytest.mark.parametrize("cp", CPS)
def test_partition_index_and_rank_cu_seqlens_match_te_layout(cp):
    from megatron_gem.train.context_parallel import (
        check_thd_cp_layout,
        cu_seqlens_on_cp_rank,
        thd_partition_index,
    )

    g = torch.Generator().manual_seed(cp)
    for trial in range(12):
        real = _odd_lengths(g, int(torch.randint(1, 7, (1,), generator=g)))
        padded, want_pos, want_real = _te_layout(real, cp)
        total = sum(padded)
        cu = torch.tensor(_cumsum(real), dtype=torch.int32)
        cup = torch.tensor(_cumsum(padded), dtype=torch.int32)
        check_thd_cp_layout(cu, cup, cp, total)
        seen = []
        for r in range(cp):
            index = thd_partition_index(cup, cp, r, total)
            assert index.dtype == torch.int64 and index.tolist() == want_pos[r], (real, cp, r)
            seen += index.tolist()
            local_cu, local_cup = cu_seqlens_on_cp_rank(cu, cup, cp, r)
            assert local_cu.dtype == local_cup.dtype == torch.int32
            assert local_cu.tolist() == _cumsum(want_real[r])
            assert local_cup.tolist() == _cumsum([p // cp for p in padded])
            # the rank's slice [local_cup[i], local_cup[i+1]) holds sub-sequence i only
            for i in range(len(real)):
                part = index[local_cup[i] : local_cup[i + 1]]
                assert bool(((part >= cup[i]) & (part < cup[i + 1])).all())
        assert sorted(seen) == list(range(total)), "every position on exactly one rank"
        assert sum(want_real[r][i] for r in range(cp) for i in range(len(real))) == sum(real)


def test_layout_errors_name_the_problem():
    from megatron_gem.train.context_parallel import check_thd_cp_layout, thd_partition_index

    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="sub-sequence 1 has padded length 6, not a positive"):
        check_thd_cp_layout(cu, torch.tensor([0, 4, 10]), 2, 10)
    with pytest.raises(ValueError, match="run from 0 to the sequence length 12"):
        check_thd_cp_layout(cu, torch.tensor([0, 4, 8]), 2, 12)
    with pytest.raises(ValueError, match="sub-sequence 1 has 5 real tokens but a padded length"):
        check_thd_cp_layout(cu, torch.tensor([0, 4, 8]), 2, 8)
    with pytest.raises(ValueError, match="cp_rank must be in"):
        thd_partition_index(torch.tensor([0, 8]), 2, 2, 8)


# ------------------------------------------------------------------- the packed dataset
class _Samples:
    """A low-level SFT dataset in memory: random ids and assistant masks of given lengths."""

    pad = 0

    def __init__(self, lengths, seed=0):
        rng = np.random.default_rng(seed)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.ids = [rng.integers(1, 100, n) for n in lengths]
        self.masks = [rng.random(n) < 0.6 for n in lengths]

    def __len__(self):
        return len(self.lengths)

    def sample(self, i, max_tokens=None):
        n = len(self.ids[i]) if max_tokens is None else min(len(self.ids[i]), max_tokens)
        return self.ids[i][:n], self.masks[i][:n]


LENGTHS = [6, 9, 14, 4, 21, 8, 10, 12, 3, 60, 16, 2, 30]  # odd positions (n - 1) among them
S = 48  # a multiple of 2*cp for cp in {1, 2, 3, 4}


def _dataset(cp, mask):
    from megatron.core.datasets.utils import Split

    from megatron_gem.data.sft import PackedSFTDataset, SFTDatasetConfig

    config = SFTDatasetConfig(
        random_seed=3,
        sequence_length=S,
        blend=None,
        blend_per_split=[None, None, None],
        split=None,
        tokenizer=None,
        create_attention_mask=mask,
        pad_to_multiple_of=2 * cp if cp > 1 else 1,
    )
    data = _Samples(LENGTHS)
    ds = PackedSFTDataset(data, "mem", np.arange(len(data)), None, Split.train, config)
    return data, [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("cp", CPS)
def test_thd_dataset_pads_per_sample_and_builds_no_dense_mask(cp):
    from megatron_gem.train.context_parallel import check_thd_cp_layout, partition_thd_batch

    data, items = _dataset(cp, mask=False)
    m = 2 * cp if cp > 1 else 1
    found = []
    for item in items:
        assert "attention_mask" not in item, "the THD path must not build the S x S mask"
        cu, cup = item["cu_seqlens"].tolist(), item["cu_seqlens_padded"].tolist()
        check_thd_cp_layout(item["cu_seqlens"], item["cu_seqlens_padded"], cp, S)
        real = [b - a for a, b in zip(cu, cu[1:])]
        padded, want_pos, _ = _te_layout(real, cp)
        assert cup == _cumsum(padded) and all(p % m == 0 for p in padded)
        for i, (a, n, p) in enumerate(zip(cup, real, padded)):
            assert item["position_ids"][a : a + p].tolist() == list(range(p))
            assert float(item["loss_mask"][a + n : a + p].sum()) == 0  # padding: no loss
            assert item["tokens"][a + n : a + p].eq(data.pad).all()
            if int(item["tokens"][a]) == data.pad:  # the tail (sample ids are never pad)
                assert i == len(real) - 1 and n == p and float(item["loss_mask"][a:].sum()) == 0
                continue
            ids = item["tokens"][a : a + n].tolist() + [int(item["labels"][a + n - 1])]
            found.append(ids)
            sample = next(k for k in range(len(data)) if data.ids[k][: n + 1].tolist() == ids)
            assert item["loss_mask"][a : a + n].tolist() == data.masks[sample][1 : n + 1].tolist()
        # each rank's share, per tensor, against the reference positions
        batch = {k: item[k].unsqueeze(0) for k in item}
        loss_on_ranks = 0.0
        for r in range(cp):
            mine = partition_thd_batch(batch, cp, r)
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert mine[key].shape == (1, S // cp)
                assert mine[key][0].tolist() == item[key][want_pos[r]].tolist(), (key, r)
            assert mine["cu_seqlens"] is batch["cu_seqlens"]  # metadata stays global
            loss_on_ranks += float(mine["loss_mask"].sum())
        assert loss_on_ranks == float(item["loss_mask"].sum())
    # one epoch: every sample (truncated to S + 1 tokens) exactly once
    want = sorted(data.ids[k][: S + 1].tolist() for k in range(len(data)))
    assert sorted(found) == want


def test_thd_items_equal_the_mask_items_without_cp():
    """cp = 1: the THD items hold the same tokens as the dense-mask items, and their
    cu_seqlens are the blocks of that mask."""
    _, thd = _dataset(1, mask=False)
    _, dense = _dataset(1, mask=True)
    assert len(thd) == len(dense)
    for t, d in zip(thd, dense):
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(t[key], d[key])
        visible = ~d["attention_mask"][0]
        starts = [i for i in range(S) if int(visible[i].int().argmax()) == i]
        assert t["cu_seqlens_padded"].tolist() == t["cu_seqlens"].tolist() == starts + [S]


# ------------------------------------------------------------------- get_sft_batch
@pytest.fixture
def one_rank(tmp_path, monkeypatch):
    """A 1-rank gloo world answering Megatron's TP/PP/CP queries (CP rank set per test)."""
    import megatron.core.parallel_state as ps
    import megatron.training as mtraining

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    state = {}
    for name, value in (
        ("is_pipeline_first_stage", True),
        ("is_pipeline_last_stage", True),
        ("get_tensor_model_parallel_rank", 0),
        ("get_tensor_model_parallel_src_rank", 0),
        ("get_tensor_model_parallel_world_size", 1),
        ("get_tensor_model_parallel_group", None),
    ):
        monkeypatch.setattr(ps, name, lambda *a, _v=value, **k: _v)
    monkeypatch.setattr(ps, "get_context_parallel_rank", lambda *a, **k: state["cp_rank"])
    monkeypatch.setattr(mtraining, "get_args", lambda: state["args"])
    yield state
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("cp", (2, 3))
def test_get_sft_batch_gives_each_cp_rank_its_chunks_and_global_metadata(one_rank, cp):
    from megatron_gem.train.batches import get_sft_batch

    _, items = _dataset(cp, mask=False)
    item = max(items, key=lambda it: len(it["cu_seqlens"]))
    assert len(item["cu_seqlens"]) > 3
    real = (item["cu_seqlens"][1:] - item["cu_seqlens"][:-1]).tolist()
    padded, want_pos, _ = _te_layout(real, cp)
    one_rank["args"] = types.SimpleNamespace(
        sft=True,
        transformer_impl="transformer_engine",
        mtp_num_layers=None,
        pipeline_model_parallel_size=1,
        context_parallel_size=cp,
        micro_batch_size=1,
        seq_length=S,
    )
    for r in range(cp):
        one_rank["cp_rank"] = r
        loader = iter([{k: v.unsqueeze(0) for k, v in item.items()}])
        tokens, labels, loss_mask, attention_mask, position_ids, psp = get_sft_batch(loader)
        assert attention_mask is None
        for got, key in ((tokens, "tokens"), (labels, "labels"), (loss_mask, "loss_mask")):
            assert got[0].tolist() == item[key][want_pos[r]].tolist(), (key, r)
        assert position_ids[0].tolist() == item["position_ids"][want_pos[r]].tolist()
        # global metadata: the padded boundaries, as upstream pretrain_gpt.py passes them
        assert psp.qkv_format == "thd"
        for cu in (psp.cu_seqlens_q, psp.cu_seqlens_kv, psp.cu_seqlens_q_padded):
            assert cu.dtype == torch.int32 and cu.tolist() == _cumsum(padded)
        assert psp.cu_seqlens_kv_padded.tolist() == _cumsum(padded)
        assert psp.max_seqlen_q == psp.max_seqlen_kv == max(padded)
        assert _cumsum(padded) != _cumsum(real)  # the item has padding: the check means it


def test_cp_argument_limits(capsys):
    from megatron_gem.train.arguments import validate_sft_packing_args

    te = dict(sft=True, context_parallel_size=4, micro_batch_size=1)
    validate_sft_packing_args(types.SimpleNamespace(**te, transformer_impl="transformer_engine"))
    with pytest.raises(SystemExit) as exc:
        validate_sft_packing_args(types.SimpleNamespace(**te, transformer_impl="local"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --context-parallel-size" in err
    assert "transformer_engine" in err


@pytest.mark.parametrize(
    "impl, cp", [("transformer_engine", 2), ("transformer_engine", 1), ("local", 1)]
)
def test_build_sft_datasets_selects_the_thd_layout_from_args(monkeypatch, impl, cp):
    """The TE path is chosen by --transformer-impl (no TE needed to build the data): no dense
    mask and per-sample padding to 2*cp; the local spec keeps the mask."""
    from megatron_gem.data.sft import PackedSFTDataset, build_sft_datasets

    data = _Samples(LENGTHS)
    monkeypatch.setattr(
        PackedSFTDataset, "build_low_level_dataset", staticmethod(lambda path, config: data)
    )
    args = types.SimpleNamespace(
        seq_length=S,
        seed=3,
        data_path=["mem"],
        split="100,0,0",
        tokenizer_type=None,
        transformer_impl=impl,
        context_parallel_size=cp,
    )
    train, _, _ = build_sft_datasets(args, [4, 0, 0])
    item = train[0]
    if impl == "local":
        assert item["attention_mask"].shape == (1, S, S) and "cu_seqlens" not in item
        return
    assert "attention_mask" not in item
    padded = (item["cu_seqlens_padded"][1:] - item["cu_seqlens_padded"][:-1]).tolist()
    assert all(p % (2 * cp if cp > 1 else 1) == 0 for p in padded)
    if cp == 1:
        assert torch.equal(item["cu_seqlens"], item["cu_seqlens_padded"])
    else:
        items = [train[i] for i in range(len(train))]
        assert any(not torch.equal(it["cu_seqlens"], it["cu_seqlens_padded"]) for it in items)
