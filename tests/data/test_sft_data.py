"""SFT data: prompt masks exactly on assistant tokens, the report, packing, Megatron datasets.

Expected ids and masks are built independently of the encoders: from sentencepiece's own
processor piece by piece (plain template) and by hand from the vocabulary (chat template).
"""

import argparse
import collections
import json
import random

import numpy as np
import pytest

from megatron_gem.data import sft as D
from megatron_gem.data import tokenizer as T

WORDS = "the cat dog sat on mat a big small red blue runs jumps quickly over under".split()
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Rewrites history (drops earlier answers), like templates that strip reasoning.
UNSTABLE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "<|im_start|>assistant\n<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _conversation(rng, turns=None, lo=0, hi=8):
    msgs = [{"role": "system", "content": _words(rng, 1, 4)}] if rng.random() < 0.5 else []
    for _ in range(turns or rng.randint(1, 3)):
        msgs.append({"role": "user", "content": _words(rng, lo, hi)})
        msgs.append({"role": "assistant", "content": _words(rng, lo, hi)})
    return msgs


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    text = [_words(rng, 2, 12) for _ in range(300)] + ["System: User: Assistant:"] * 3
    model = T.train_sentencepiece(text, d / "tok", 72)
    return model, T.build_tokenizer("SentencePieceTokenizer", model)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>"]
    names = ["<unk>", "<pad>", "</s>", "\n", "system", "user", "assistant"] + specials + WORDS
    vocab = {w: i for i, w in enumerate(names)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(" +"), "removed"),
            pre_tokenizers.Split(Regex("\n"), "isolated"),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        additional_special_tokens=specials,
    )
    tok.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("hf")
    tok.save_pretrained(str(path))
    return str(path), vocab, T.build_tokenizer("HuggingFaceTokenizer", str(path))


def _expected_chat(vocab, msgs):
    """The chat template's tokens and assistant mask, written out by hand."""
    ids, mask = [], []
    for m in msgs:
        head = ["<|im_start|>", m["role"], "\n"]
        body = m["content"].split() + ["<|im_end|>", "\n"]
        ids += [vocab[t] for t in head + body]
        mask += [False] * 3 + [m["role"] == "assistant"] * len(body)
    return np.array(ids), np.array(mask)


def _expected_plain(model, msgs):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=model)
    ids, mask = [], []
    for m in msgs:
        head = ref.encode(D.PLAIN_HEADERS[m["role"]])
        body = ref.encode(m["content"]) + ([ref.eos_id()] if m["role"] == "assistant" else [])
        ids += head + body
        mask += [False] * len(head) + [m["role"] == "assistant"] * len(body)
    return np.array(ids), np.array(mask)


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# --------------------------------------------------------------------------- encoders


def test_masks_exactly_on_assistant_tokens_both_templates(sp, hf):
    model, sp_tok = sp
    _, vocab, hf_tok = hf
    plain, chat = D.make_encoder(sp_tok), D.make_encoder(hf_tok)
    assert isinstance(plain, D.PlainTemplateEncoder) and isinstance(chat, D.ChatTemplateEncoder)
    assert isinstance(D.make_encoder(hf_tok, "plain"), D.PlainTemplateEncoder)
    rng = random.Random(11)
    for _ in range(25):
        msgs = _conversation(rng)
        ids, mask = plain.encode(msgs)
        want_ids, want_mask = _expected_plain(model, msgs)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)
        ids, mask = chat.encode(msgs)
        want_ids, want_mask = _expected_chat(vocab, msgs)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)


def test_chat_template_with_byte_level_bpe_masks_the_answer_text(tmp_path):
    """A GPT-2-style byte-level BPE (merges across words, offsets in bytes): decoding the
    masked tokens gives exactly the answers with their end-of-turn markers, and the rest the
    prompt text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(4)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(
        [_words(rng, 5, 15) + "\nsystem user assistant, é!" for _ in range(200)], trainer
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = TEMPLATE
    hf.save_pretrained(str(tmp_path))
    enc = D.make_encoder(T.build_tokenizer("HuggingFaceTokenizer", str(tmp_path)))
    for _ in range(20):
        msgs = _conversation(rng, lo=1)
        for m in msgs:
            m["content"] += rng.choice(["", ",", " é!", "\n"])
        ids, mask = enc.encode(msgs)
        answers = "".join(m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant")
        assert hf.decode(ids[mask], skip_special_tokens=False) == answers
        full = hf.apply_chat_template(msgs, tokenize=False)
        assert hf.decode(ids, skip_special_tokens=False) == full
        assert len(hf.decode(ids[~mask], skip_special_tokens=False)) == len(full) - len(answers)


def test_chat_template_that_rewrites_history_is_refused(sp, hf):
    _, _, hf_tok = hf
    enc = D.ChatTemplateEncoder(hf_tok, chat_template=UNSTABLE)
    msgs = _conversation(random.Random(1), turns=2, lo=1)
    with pytest.raises(D.SampleError, match="not prefix-stable at message"):
        enc.encode(msgs)
    enc.encode(msgs[-2:])  # one turn renders consistently
    with pytest.raises(ValueError, match="needs --tokenizer-type HuggingFaceTokenizer"):
        D.make_encoder(sp[1], "chat")


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{bad", "invalid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"text": "x"}', "no 'messages' key"),
        ('{"messages": []}', "not a non-empty list"),
        ('{"messages": ["hi"]}', "message 0 is not an object"),
        ('{"messages": [{"role": "tool", "content": "x"}]}', "message 0 has role 'tool'"),
        ('{"messages": [{"role": "user", "content": 3}]}', "message 0 has no string 'content'"),
    ],
)
def test_malformed_lines_are_named(line, reason):
    with pytest.raises(D.SampleError, match=reason):
        D.parse_chat_line(line)


# --------------------------------------------------------------------------- preparation


def test_prepare_reports_kept_truncated_skipped_with_line_numbers(tmp_path, hf):
    _, vocab, tok = hf
    S = 24  # a sample keeps at most 25 tokens; each message is 5 + words tokens

    def u(s):
        return {"role": "user", "content": s}

    def a(s):
        return {"role": "assistant", "content": s}

    long_answer = " ".join(["cat"] * 30)
    rows = [
        {"messages": [u("the cat"), a("a dog")]},  # 1 kept
        "",  # 2 blank
        "{bad",  # 3 malformed
        {"text": "x"},  # 4 malformed
        {"messages": [{"role": "tool", "content": "x"}]},  # 5 malformed
        {"messages": [u("no answer here")]},  # 6 no assistant
        {"messages": [u("the cat"), a(long_answer)]},  # 7 kept, truncated
        {"messages": [{"role": "system", "content": " ".join(["big"] * 25)}, u("x"), a("y")]},  # 8
        {"messages": [u("red"), a("blue"), u("big"), a("small mat")]},  # 9 kept: 25 tokens
        {"messages": [u(3)]},  # 10 malformed
        "[1]",  # 11 malformed
    ]
    src = _write_jsonl(tmp_path / "chat.jsonl", rows)
    prefix = str(tmp_path / "out" / "sft")
    with pytest.raises(ValueError, match=r"chat.jsonl:3: invalid JSON"):
        D.prepare_sft_data(src, prefix, tok, S)
    assert not list((tmp_path / "out").iterdir())  # nothing half-written
    rep = D.prepare_sft_data(src, prefix, tok, S, on_error="skip")
    assert (rep.lines, rep.blank, rep.kept, rep.truncated, rep.num_skipped) == (11, 1, 3, 1, 7)
    by_reason = {r: rep.skipped_lines[r] for r in rep.skipped}
    assert by_reason == {
        "invalid JSON (Expecting property name enclosed in double quotes at column 2)": [3],
        "no 'messages' key": [4],
        "message 0 has role 'tool' (expected one of ('system', 'user', 'assistant'))": [5],
        "no assistant message": [6],
        "no assistant token within --seq-length (prompt fills it)": [8],
        "message 0 has no string 'content'": [10],
        "not a JSON object (got list)": [11],
    }
    text = rep.format()
    assert "kept 3 samples (1 truncated" in text and "skipped 7" in text and "lines 8" in text
    data = D.SFTIndexedData(prefix)
    assert len(data) == 3
    for i, row in enumerate(rows[k] for k in (0, 6, 8)):
        want_ids, want_mask = _expected_chat(vocab, row["messages"])
        ids, mask = data.sample(i)
        np.testing.assert_array_equal(ids, want_ids[: S + 1])
        np.testing.assert_array_equal(mask, want_mask[: S + 1])
    assert rep.tokens == sum(len(data.sample(i)[0]) for i in range(3))
    meta = json.load(open(prefix + ".sft.json"))
    assert (
        meta["report"]["kept"] == 3 and meta["template"] == "chat" and meta["eod"] == vocab["</s>"]
    )
    # Two workers: the same bytes and the same report.
    rep2 = D.prepare_sft_data(src, str(tmp_path / "w2" / "sft"), tok, S, on_error="skip", workers=2)
    assert rep2.as_dict() == rep.as_dict()
    for ext in (".bin", ".idx"):
        assert (
            open(prefix + ext, "rb").read() == open(str(tmp_path / "w2" / "sft") + ext, "rb").read()
        )
    with pytest.raises(ValueError, match=r"chat.jsonl:3: invalid JSON"):
        D.prepare_sft_data(src, str(tmp_path / "w3" / "sft"), tok, S, workers=2)
    with pytest.raises(ValueError, match="exists"):
        D.prepare_sft_data(src, prefix, tok, S, on_error="skip")
    D.prepare_sft_data(src, prefix, tok, S, on_error="skip", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "sft.bin",
        "sft.idx",
        "sft.sft.json",
    ]


def test_pack_next_fit_keeps_order_and_fills_greedily():
    sizes = np.random.default_rng(3).integers(1, 14, size=57)
    b = D.pack_next_fit(sizes, 13)
    assert b[0] == 0 and b[-1] == 57 and (np.diff(b) > 0).all()
    sums = [sizes[x:y].sum() for x, y in zip(b[:-1], b[1:])]
    assert max(sums) <= 13
    for k in range(len(sums) - 1):  # the next item did not fit
        assert sums[k] + sizes[b[k + 1]] > 13


# --------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def sp_data(sp, tmp_path_factory):
    model, tok = sp
    d = tmp_path_factory.mktemp("spdata")
    rng = random.Random(5)
    rows = [{"messages": _conversation(rng, lo=1)} for _ in range(60)]
    src = _write_jsonl(d / "chat.jsonl", rows)
    rep = D.prepare_sft_data(src, str(d / "sft"), tok, 48)
    assert rep.kept == 60
    samples, data = {}, D.SFTIndexedData(str(d / "sft"))
    for i, row in enumerate(rows):  # stored = the independent plain-template construction
        ids, mask = data.sample(i)
        want_ids, want_mask = _expected_plain(model, row["messages"])
        np.testing.assert_array_equal(ids, want_ids[:49])  # prepared for --seq-length 48
        np.testing.assert_array_equal(mask, want_mask[:49])
        samples[tuple(ids.tolist())] = i
    assert len(samples) == 60
    return str(d / "sft"), model, samples


def _args(model, **kw):
    a = dict(seq_length=48, seed=7, tokenizer_type="SentencePieceTokenizer", tokenizer_model=model)
    a.update(kw)
    return argparse.Namespace(**a)


def _check_item(item, S, pad):
    """Independent checks of one packed item; returns the samples (as id tuples) it holds."""
    import torch

    shapes = {k: tuple(v.shape) for k, v in item.items() if k != "dataset_id"}  # blends add it
    assert shapes == {
        "tokens": (S,),
        "labels": (S,),
        "loss_mask": (S,),
        "position_ids": (S,),
        "attention_mask": (1, S, S),
    }
    assert item["tokens"].dtype == item["labels"].dtype == item["position_ids"].dtype == torch.int64
    assert item["loss_mask"].dtype == torch.float32 and item["attention_mask"].dtype == torch.bool
    tok, lab = item["tokens"].numpy(), item["labels"].numpy()
    lm, pos = item["loss_mask"].numpy(), item["position_ids"].numpy()
    starts = np.flatnonzero(pos == 0).tolist() + [S]
    assert starts[0] == 0
    seg = np.zeros(S, dtype=int)
    held = []
    for k, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        seg[a:b] = k
        np.testing.assert_array_equal(pos[a:b], np.arange(b - a))
        np.testing.assert_array_equal(lab[a : b - 1], tok[a + 1 : b])  # next token, same sample
        held.append((tuple(tok[a:b].tolist()) + (int(lab[b - 1]),), lm[a:b]))
    # Block-diagonal causal mask, True = masked, built here from the position-id restarts.
    q, k = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    want = ~((seg[q] == seg[k]) & (k <= q))
    np.testing.assert_array_equal(item["attention_mask"][0].numpy(), want)
    return held


def test_packed_datasets_hold_every_sample_once_per_epoch_with_exact_masks(sp_data):
    prefix, model, samples = sp_data
    S = 48
    train, valid, test = D.build_sft_datasets(
        _args(model, data_path=[prefix], split="8,1,1"), [None, None, None]
    )
    assert (train.num_epochs, valid.num_epochs) == (1, 1)
    counts = collections.Counter()
    data = D.SFTIndexedData(prefix)
    for ds in (train, valid, test):
        for i in range(len(ds)):
            held = _check_item(ds[i], S, data.pad)
            for ids, lm in held:
                if ids in samples:
                    j = samples[ids]
                    counts[j] += 1
                    np.testing.assert_array_equal(lm, data.sample(j)[1][1:])
                else:  # only the padding tail is not a sample: no loss there
                    assert ids == (data.pad,) * len(ids) and not lm.any()
    assert counts == collections.Counter(range(60))  # 48/6/6 split, each sample exactly once
    # More samples than one epoch: more epochs, len >= request, each sample once per epoch.
    (train3, _, _) = D.build_sft_datasets(
        _args(model, data_path=[prefix], split="8,1,1"), [3 * len(train) + 1, None, None]
    )
    assert len(train3) >= 3 * len(train) + 1 and train3.num_epochs == 4
    seen = collections.Counter()
    for i in range(len(train3)):
        seen.update(
            samples[ids] for ids, _ in _check_item(train3[i], S, data.pad) if ids in samples
        )
    assert set(seen.values()) == {4} and len(seen) == 48
    # Deterministic from the seed; another seed shuffles differently.
    again = D.build_sft_datasets(
        _args(model, data_path=[prefix], split="8,1,1"), [None, None, None]
    )[0]
    other = D.build_sft_datasets(
        _args(model, data_path=[prefix], split="8,1,1", seed=8), [None, None, None]
    )[0]
    for k in ("tokens", "loss_mask", "attention_mask"):
        assert all(np.array_equal(train[i][k], again[i][k]) for i in range(len(train)))
    assert any(not np.array_equal(train[i]["tokens"], other[i]["tokens"]) for i in range(3))


def test_load_time_truncation_blends_and_per_split_paths(sp_data, tmp_path):
    prefix, model, samples = sp_data
    S = 24  # shorter than the data was prepared for: longer samples are cut to 25 tokens
    (train, _, _) = D.build_sft_datasets(
        _args(model, data_path=[prefix], split="1,0,0", seq_length=S), [None, 0, 0]
    )
    data = D.SFTIndexedData(prefix)
    assert train.num_truncated == sum(len(data.sample(j)[0]) > S + 1 for j in range(60)) > 0
    cut = {tuple(data.sample(j)[0][: S + 1].tolist()): j for j in range(len(data))}
    seen, with_loss = 0, 0
    for i in range(len(train)):
        for ids, lm in _check_item(train[i], S, data.pad):
            if ids in cut:
                np.testing.assert_array_equal(lm, data.sample(cut[ids])[1][1 : S + 1])
                seen, with_loss = seen + 1, with_loss + bool(lm.any())
    assert seen == 60 and with_loss > 0
    # A weighted blend (Megatron's BlendedDataset) and per-split paths give >= the request.
    blend = _args(model, data_path=["0.3", prefix, "0.7", prefix], split="90,10,0")
    tr, va, te = D.build_sft_datasets(blend, [50, 7, 0])
    assert len(tr) >= 50 and len(va) >= 7 and te is None
    _check_item(tr[49], 48, data.pad)
    per = _args(model, train_data_path=[prefix], valid_data_path=[prefix])
    tr, va, te = D.build_sft_datasets(per, [30, 5, None])
    assert len(tr) >= 30 and len(va) >= 5 and te is None


def test_build_errors_are_clear(sp_data, hf, tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix, model, _ = sp_data
    with pytest.raises(ValueError, match="needs --data-path"):
        D.build_sft_datasets(_args(model), [1, 1, 1])
    with pytest.raises(ValueError, match="--seq-length"):
        D.build_sft_datasets(_args(model, data_path=[prefix], seq_length=None), [1, 1, 1])
    with pytest.raises(ValueError, match="valid split is empty"):
        D.build_sft_datasets(_args(model, data_path=[prefix], split="998,1,1"), [1, 1, 1])
    b = IndexedDatasetBuilder(str(tmp_path / "pre.bin"), dtype=np.uint16)
    b.add_item(torch.tensor([1, 2, 3]))
    b.end_document()
    b.finalize(str(tmp_path / "pre.idx"))
    with pytest.raises(ValueError, match="pre-training data cannot be used with --sft"):
        D.build_sft_datasets(
            _args(model, data_path=[str(tmp_path / "pre")], split="1,0,0"), [1, 0, 0]
        )
    hf_args = argparse.Namespace(
        data_path=[prefix],
        split="1,0,0",
        seq_length=48,
        seed=1,
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=hf[0],
    )
    with pytest.raises(ValueError, match="made with a tokenizer with"):
        D.build_sft_datasets(hf_args, [1, 0, 0])


def test_hf_chat_path_end_to_end_and_cli(hf, tmp_path, capsys):
    import importlib.util
    import pathlib

    path, vocab, tok = hf
    rng = random.Random(9)
    rows = [{"messages": _conversation(rng, lo=1)} for _ in range(20)] + ["{oops"]
    src = _write_jsonl(tmp_path / "c.jsonl", rows)
    spec = importlib.util.spec_from_file_location(
        "prepare_sft_data", pathlib.Path(__file__).parents[2] / "tools" / "prepare_sft_data.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    base = [
        "--input",
        src,
        "--output-prefix",
        str(tmp_path / "sft"),
        "--seq-length",
        "40",
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        path,
    ]
    assert cli.main(base) == 2
    assert "c.jsonl:21: invalid JSON" in capsys.readouterr().err
    assert cli.main(base + ["--on-error", "skip", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "kept 20 samples" in out and "1 x invalid JSON" in out and "lines 21" in out
    assert "[[" in out and "--sft --data-path" in out
    args = argparse.Namespace(
        data_path=[str(tmp_path / "sft")],
        split="1,0,0",
        seq_length=40,
        seed=3,
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=path,
    )
    train, _, _ = D.build_sft_datasets(args, [10, 0, 0])
    data = D.SFTIndexedData(str(tmp_path / "sft"))
    by_ids = {tuple(_expected_chat(vocab, r["messages"])[0][:41].tolist()): r for r in rows[:20]}
    found = 0
    for i in range(len(train)):
        for ids, lm in _check_item(train[i], 40, data.pad):
            if ids in by_ids:
                found += 1
                np.testing.assert_array_equal(
                    lm, _expected_chat(vocab, by_ids[ids]["messages"])[1][1:41]
                )
    assert found >= 20
