"""Pre-training data: JSONL -> indexed dataset, read back with Megatron's own readers."""

import json
import random

import numpy as np
import pytest

from megatron_gem.data import text as P
from megatron_gem.data import tokenizer as T

WORDS = "the cat dog sat on mat a big small red blue runs jumps quickly over under".split()


def _docs(seed, n):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return T.train_sentencepiece(_docs(0, 200), tmp_path_factory.mktemp("sp") / "tok", 60)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_documents_end_with_eod_and_read_back_with_indexed_dataset(tmp_path, sp_model):
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ref = spm.SentencePieceProcessor(model_file=sp_model)
    texts = _docs(1, 40)
    rows = [{"text": t, "title": t.split()[0]} for t in texts]
    rows.insert(5, {"text": "", "title": "x"})  # line 6: empty text
    rows.insert(9, "")  # line 10: blank
    src = _write(tmp_path / "c.jsonl", rows)
    rep = P.preprocess_jsonl(
        src, str(tmp_path / "out"), "SentencePieceTokenizer", sp_model, json_keys=["text", "title"]
    )
    prefix = P.output_prefix_for(str(tmp_path / "out"), "text")
    assert prefix == str(tmp_path / "out_text_document") and rep.outputs["text"] == prefix
    ds = IndexedDataset(prefix)
    assert ds.index.dtype == np.uint16 and len(ds) == 40
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(ds[i], ref.encode(t) + [ref.eos_id()])
    titles = IndexedDataset(P.output_prefix_for(str(tmp_path / "out"), "title"))
    assert len(titles) == 41 and list(titles[5]) == ref.encode("x") + [2]
    assert (rep.lines, rep.blank, rep.documents["text"]) == (42, 1, 40)
    assert rep.tokens["text"] == sum(len(ref.encode(t)) + 1 for t in texts)
    assert rep.skipped == {"empty 'text'": 1} and rep.skipped_lines["empty 'text'"] == [6]
    # Same bytes with two workers and without eod when asked.
    P.preprocess_jsonl(
        src,
        str(tmp_path / "w2"),
        "SentencePieceTokenizer",
        sp_model,
        json_keys=["text", "title"],
        workers=2,
    )
    for ext in (".bin", ".idx"):
        assert (
            open(prefix + ext, "rb").read()
            == open(str(tmp_path / "w2_text_document") + ext, "rb").read()
        )
    P.preprocess_jsonl(
        src, str(tmp_path / "noeod"), "SentencePieceTokenizer", sp_model, append_eod=False
    )
    noeod = IndexedDataset(str(tmp_path / "noeod_text_document"))  # keep it: items view its mmap
    assert list(noeod[0]) == ref.encode(texts[0])


def test_loads_as_megatron_gpt_dataset(tmp_path, sp_model):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    texts = _docs(2, 30)
    src = _write(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    P.preprocess_jsonl(src, str(tmp_path / "d"), "SentencePieceTokenizer", sp_model)
    tok = T.build_tokenizer("SentencePieceTokenizer", sp_model)
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=16,
        blend=([str(tmp_path / "d_text_document")], None),
        split="1,0,0",
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [25, 0, 0], lambda: True, config
    ).build()
    assert len(train) >= 25
    stream = {tuple(T.text_to_ids(tok, t)) for t in texts}
    item = train[0]
    assert item["tokens"].shape == (16,) and (item["labels"][:-1] == item["tokens"][1:]).all()
    # Every eod-delimited run fully inside the sample is one of the documents.
    seq = item["tokens"].tolist() + [int(item["labels"][-1])]
    cuts = [i for i, t in enumerate(seq) if t == tok.eod]
    for a, b in zip(cuts[:-1], cuts[1:]):
        assert tuple(seq[a + 1 : b]) in stream


def test_malformed_lines_fail_with_line_number_or_are_counted(tmp_path, sp_model):
    src = _write(
        tmp_path / "c.jsonl", [{"text": "the cat"}, "{oops", {"body": "x"}, [1], {"text": "a dog"}]
    )
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match=r"c.jsonl:2: invalid JSON"):
        P.preprocess_jsonl(src, out, "SentencePieceTokenizer", sp_model)
    assert not list(tmp_path.glob("o_*"))  # nothing half-written
    rep = P.preprocess_jsonl(src, out, "SentencePieceTokenizer", sp_model, on_error="skip")
    assert rep.documents["text"] == 2 and sum(rep.skipped.values()) == 3
    assert rep.skipped_lines == {
        "invalid JSON (Expecting property name enclosed in double quotes at column 2)": [2],
        "no string 'text'": [3],
        "not a JSON object (got list)": [4],
    }
    with pytest.raises(ValueError, match="exists"):
        P.preprocess_jsonl(src, out, "SentencePieceTokenizer", sp_model, on_error="skip")
    with pytest.raises(ValueError, match="--workers"):
        P.preprocess_jsonl(src, out, "SentencePieceTokenizer", sp_model, workers=0)


def test_huggingface_tokenizer_and_cli(tmp_path, capsys):
    import importlib.util
    import pathlib

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(" +"), "removed")
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="</s>"
    ).save_pretrained(str(tmp_path / "hf"))
    texts = _docs(3, 10)
    src = _write(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    spec = importlib.util.spec_from_file_location(
        "preprocess_data", pathlib.Path(__file__).parents[2] / "tools" / "preprocess_data.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = [
        "--input",
        src,
        "--output-prefix",
        str(tmp_path / "h"),
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(tmp_path / "hf"),
    ]
    assert cli.main(argv) == 0
    assert "10 documents" in capsys.readouterr().out
    ds = IndexedDataset(str(tmp_path / "h_text_document"))
    for i, t in enumerate(texts):
        assert list(ds[i]) == [vocab[w] for w in t.split()] + [vocab["</s>"]]
    assert cli.main(argv) == 2 and "exists" in capsys.readouterr().err
