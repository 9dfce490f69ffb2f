"""Packed SFT through pipeline stages and Transformer Engine's THD path (``megatron_gem.train``).

End to end on CPU (gloo): a 4-layer tiny model trains on packed SFT data with PP=1, saving a
``torch_dist`` checkpoint at iteration 2 and going on to iteration 4; a PP=2 run with 2 virtual
stages of one layer (two middle chunks) resumes that checkpoint and must log the same ``lm loss``
at iterations 3 and 4 and the same validation/test loss. Without the packing mask on the middle
chunks, packed samples attend to each other there and the losses differ.

Unit checks (no TE here): the ``cu_seqlens`` built from the packed ``position_ids`` against an
independent construction from the dataset's block-diagonal mask, and ``forward_step`` handing
the model ``packed_seq_params`` and no dense mask when ``--transformer-impl transformer_engine``.
"""

from __future__ import annotations

import json
import random
import types

import numpy as np
import pytest
import torch

from conftest import parse_megatron_log, run_train

TINY4 = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --ffn-hidden-size 128 --seq-length 64 --max-position-embeddings 64 "
    "--position-embedding-type rope --swiglu --normalization RMSNorm --disable-bias-linear "
    "--untie-embeddings-and-output-weights --micro-batch-size 2 --global-batch-size 4 "
    "--lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 1 --seed 1234 "
    "--log-interval 1 --eval-iters 1 --eval-interval 1000 --num-workers 0 "
    # dropout off: PP=1 and PP=4 draw dropout masks from different RNG streams
    "--attention-dropout 0.0 --hidden-dropout 0.0 --ckpt-format torch_dist --no-load-rng"
).split()
SAVE_AT, ITERS = 2, 4


def _write_chat(path, n=48, seed=0):
    """Short chats (~8 tokens), so that several pack into one sequence of 32."""
    rng = random.Random(seed)
    things = ["apple", "sky", "grass", "sun", "night", "snow", "carrot", "grape"]
    colors = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
    lines = []
    for _ in range(n):
        i = rng.randrange(len(things))
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"{things[i]}?"},
                        {"role": "assistant", "content": colors[i]},
                    ]
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from megatron_gem.data.sft import prepare_sft_data
    from megatron_gem.data.tokenizer import build_tokenizer, train_sentencepiece

    d = tmp_path_factory.mktemp("sft_pp")
    chats = _write_chat(d / "chat.jsonl")
    model = train_sentencepiece(
        [m["content"] for c in chats for m in c["messages"]] * 4, d / "tok", 128
    )
    prepare_sft_data(
        str(d / "chat.jsonl"), str(d / "chat"), build_tokenizer("SentencePieceTokenizer", model), 64
    )
    flags = [
        "--split",
        "80,10,10",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        model,
        "--sft",
        "--data-path",
        str(d / "chat"),
    ]
    return d, flags


@pytest.fixture(scope="module")
def pp_runs(sft_data):
    d, flags = sft_data
    ckpt = d / "ckpt"
    ref = run_train(
        1,
        TINY4
        + flags
        + ["--train-iters", str(ITERS), "--save", str(ckpt), "--save-interval", str(SAVE_AT)],
    )
    # PP=2 x 2 virtual stages of one layer: chunks (rank 1, vp 0) and (rank 0, vp 1) are middle
    # stages. (PP=4, one layer per stage, was checked the same way by hand; it costs 4 processes.)
    pp = run_train(
        2,
        TINY4
        + flags
        + [
            "--train-iters",
            str(ITERS),
            "--load",
            str(ckpt),
            "--ckpt-step",
            str(SAVE_AT),
            "--pipeline-model-parallel-size",
            "2",
            "--num-layers-per-virtual-pipeline-stage",
            "1",
        ],
        timeout=400,
    )
    assert f"at iteration {SAVE_AT}" in pp
    return parse_megatron_log(ref), parse_megatron_log(pp)


def test_sft_virtual_pipeline_middle_stages_keep_the_packing_mask(pp_runs):
    ref, pp = pp_runs
    assert sorted(ref["train"]) == list(range(1, ITERS + 1))
    assert sorted(pp["train"]) == list(range(SAVE_AT + 1, ITERS + 1))
    # Megatron's first logged line of a run keeps its running sums, so the resumed run's second
    # line is the mean of iterations SAVE_AT+1 and SAVE_AT+2 (its first is iteration SAVE_AT+1).
    first, second = SAVE_AT + 1, SAVE_AT + 2
    expect = {
        first: ref["train"][first]["lm loss"],
        second: (ref["train"][first]["lm loss"] + ref["train"][second]["lm loss"]) / 2,
    }
    for i, want in expect.items():
        assert abs(pp["train"][i]["lm loss"] - want) <= 1e-5, (
            i,
            want,
            pp["train"][i],
            ref["train"],
        )
    for split in ("validation", "test"):
        assert abs(ref[split][ITERS]["lm loss"] - pp[split][ITERS]["lm loss"]) <= 1e-5, (
            split,
            ref[split],
            pp[split],
        )


# --------------------------------------------------------------------------------------- unit
def _cu_from_mask(mask: torch.Tensor) -> list[int]:
    """Independent: a segment starts at row i when i is the first column row i may attend to."""
    m = (~mask.reshape(mask.shape[-2], mask.shape[-1])).numpy()
    first_visible = m.argmax(axis=1)
    starts = [i for i in range(m.shape[0]) if first_visible[i] == i]
    return starts + [m.shape[0]]


@pytest.fixture(scope="module")
def sft_items(sft_data):
    from megatron_gem.data.sft import build_sft_datasets

    d, _ = sft_data
    args = types.SimpleNamespace(
        seq_length=64, seed=7, data_path=[str(d / "chat")], split="80,10,10", tokenizer_type=None
    )
    train, _, _ = build_sft_datasets(args, [24, 0, 0])
    return [train[i] for i in range(len(train))]


def test_cu_seqlens_from_position_ids_match_the_block_diagonal_mask(sft_items):
    from megatron_gem.train.batches import (
        cu_seqlens_from_position_ids,
        packed_seq_params_from_cu_seqlens,
    )

    multi = 0
    for item in sft_items:
        want = _cu_from_mask(item["attention_mask"])
        cu, max_seqlen = cu_seqlens_from_position_ids(item["position_ids"].unsqueeze(0))
        assert cu.dtype == torch.int32 and cu.tolist() == want
        assert max_seqlen == max(b - a for a, b in zip(want, want[1:]))
        psp = packed_seq_params_from_cu_seqlens(cu, max_seqlen)
        assert psp.qkv_format == "thd"
        assert psp.cu_seqlens_q.dtype == psp.cu_seqlens_kv.dtype == torch.int32
        assert psp.cu_seqlens_q.tolist() == psp.cu_seqlens_kv.tolist() == want
        assert psp.max_seqlen_q == psp.max_seqlen_kv == max_seqlen
        multi += len(want) > 3  # two samples or more, plus the padding tail
    assert multi > 0, "no packed sequence holds two samples: the check would be vacuous"


def test_cu_seqlens_at_odd_random_lengths():
    from megatron_gem.train.batches import cu_seqlens_from_position_ids

    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        lengths = torch.randint(
            1, 9, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g
        ).tolist()
        pos = torch.cat([torch.arange(n) for n in lengths])
        cu, max_seqlen = cu_seqlens_from_position_ids(pos)
        assert cu.tolist() == [0] + list(np.cumsum(lengths)) and max_seqlen == max(lengths)
    with pytest.raises(ValueError, match="micro-batch-size 1"):
        cu_seqlens_from_position_ids(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="starting at 0"):
        cu_seqlens_from_position_ids(torch.arange(1, 9))


@pytest.fixture
def one_rank(tmp_path, monkeypatch):
    """A 1-rank gloo world, Megatron's TP/PP queries answered for PP=1 TP=1, no CUDA needed."""
    import megatron.core.parallel_state as ps
    import megatron.training as mtraining

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    for name, value in (
        ("is_pipeline_first_stage", True),
        ("is_pipeline_last_stage", True),
        ("get_tensor_model_parallel_rank", 0),
        ("get_tensor_model_parallel_src_rank", 0),
        ("get_tensor_model_parallel_world_size", 1),
        ("get_tensor_model_parallel_group", None),
    ):
        monkeypatch.setattr(ps, name, lambda *a, _v=value, **k: _v)

    class Timer:
        def start(self):
            pass

        def stop(self):
            pass

    monkeypatch.setattr(mtraining, "get_timers", lambda: lambda *a, **k: Timer())
    holder = {}
    monkeypatch.setattr(mtraining, "get_args", lambda: holder["args"])
    yield holder
    torch.distributed.destroy_process_group()


class _RecordingModel:
    vp_stage = None

    def __call__(self, tokens, position_ids, attention_mask, **kwargs):
        self.call = dict(
            tokens=tokens, position_ids=position_ids, attention_mask=attention_mask, **kwargs
        )
        return torch.zeros(tokens.shape)


class _DeviceOnly:
    """Stands for the broadcast ``max_seqlen`` on the device: reading it would be a host sync."""

    def __getattr__(self, name):
        raise AssertionError(f"TP rank 0 read the broadcast max_seqlen back (.{name})")


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_forward_step_hands_the_packing_to_attention(one_rank, sft_items, impl, monkeypatch):
    import megatron_gem.train.batches as batches
    from megatron_gem.train.entry import forward_step

    broadcast = batches._broadcast_over_tp

    def broadcast_device_max_seqlen(batch, *a, **k):
        out = broadcast(batch, *a, **k)
        return dict(out, max_seqlen=_DeviceOnly()) if "max_seqlen" in out else out

    monkeypatch.setattr(batches, "_broadcast_over_tp", broadcast_device_max_seqlen)

    item = next(it for it in sft_items if len(_cu_from_mask(it["attention_mask"])) > 3)
    one_rank["args"] = types.SimpleNamespace(
        sft=True,
        transformer_impl=impl,
        mtp_num_layers=None,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        micro_batch_size=1,
        seq_length=64,
    )
    model = _RecordingModel()
    forward_step(iter([{k: v.unsqueeze(0) for k, v in item.items()}]), model)
    call = model.call
    assert torch.equal(call["tokens"], item["tokens"].unsqueeze(0))
    assert torch.equal(call["labels"], item["labels"].unsqueeze(0))
    if impl == "transformer_engine":
        assert call["attention_mask"] is None
        psp = call["packed_seq_params"]
        cu = _cu_from_mask(item["attention_mask"])
        assert psp.qkv_format == "thd" and psp.cu_seqlens_q.tolist() == cu
        # TP rank 0 takes max_seqlen from the host (no sync)
        assert psp.max_seqlen_q == psp.max_seqlen_kv == max(b - a for a, b in zip(cu, cu[1:]))
    else:
        assert "packed_seq_params" not in call
        assert torch.equal(call["attention_mask"], item["attention_mask"].unsqueeze(0))


def test_sft_packing_argument_limits(capsys):
    from megatron_gem.train.arguments import validate_sft_packing_args

    base = dict(sft=True, context_parallel_size=1, micro_batch_size=2, transformer_impl="local")
    validate_sft_packing_args(types.SimpleNamespace(**base))  # local spec: any micro-batch
    validate_sft_packing_args(
        types.SimpleNamespace(**dict(base, sft=False, context_parallel_size=2))
    )
    for change, flag in (
        (dict(context_parallel_size=2), "--context-parallel-size"),
        (dict(transformer_impl="transformer_engine"), "--micro-batch-size"),
    ):
        with pytest.raises(SystemExit) as exc:
            validate_sft_packing_args(types.SimpleNamespace(**dict(base, **change)))
        assert exc.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    validate_sft_packing_args(
        types.SimpleNamespace(
            **dict(base, transformer_impl="transformer_engine", micro_batch_size=1)
        )
    )
