"""Tokenizers as Megatron builds them; the SentencePiece trainer and its CLI.

References are the libraries themselves (sentencepiece's processor, the transformers
tokenizer), never our wrappers.
"""

import argparse
import json
import random

import pytest

from megatron_gem.data import tokenizer as T

WORDS = "the cat dog sat on mat a big small red blue runs jumps quickly over under".split()


def _sentences(seed, n=200):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    return T.train_sentencepiece(_sentences(0) + ["System: User: Assistant:"], d / "tok", 64)


def _hf_dir(path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", "\n"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(" +"), "removed"),
            pre_tokenizers.Split(Regex("\n"), "isolated"),
        ]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )
    hf.save_pretrained(str(path))
    return str(path), vocab


def test_sentencepiece_ids_and_special_tokens_match_the_library(sp_model):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=sp_model)
    tok = T.build_tokenizer("SentencePieceTokenizer", sp_model)
    assert (ref.unk_id(), ref.bos_id(), ref.eos_id(), ref.pad_id()) == (0, 1, 2, 3)
    assert tok.eod == ref.eos_id() and tok.pad == ref.pad_id() and tok.vocab_size == 64
    assert T.pad_or_eod(tok) == 3
    for text in _sentences(7, 30):  # fresh text, not the training text
        assert tok.tokenize(text) == ref.encode(text)
        assert T.text_to_ids(tok, text) == ref.encode(text)
    # The same flags through a (partial) Megatron args namespace give the same tokenizer.
    args = argparse.Namespace(tokenizer_type="SentencePieceTokenizer", tokenizer_model=sp_model)
    tok2 = T.tokenizer_from_megatron_args(args)
    assert tok2.tokenize("the red cat") == ref.encode("the red cat")
    assert not hasattr(args, "padded_vocab_size")  # the caller's args are left alone


def test_train_sentencepiece_is_deterministic_and_never_overwrites(tmp_path, sp_model):
    import sentencepiece as spm

    text = _sentences(0) + ["System: User: Assistant:"]
    again = T.train_sentencepiece(text, tmp_path / "again", 64)
    a = spm.SentencePieceProcessor(model_file=sp_model)
    b = spm.SentencePieceProcessor(model_file=again)

    def pieces(p):
        return [(p.id_to_piece(i), p.get_score(i)) for i in range(p.get_piece_size())]

    assert pieces(a) == pieces(b)
    before = open(again, "rb").read()
    with pytest.raises(ValueError, match="exists"):
        T.train_sentencepiece(_sentences(1), tmp_path / "again", 64)
    assert open(again, "rb").read() == before
    # A file input, and overwrite=True replaces.
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(_sentences(3)) + "\n")
    T.train_sentencepiece(f, tmp_path / "again", 40, overwrite=True)
    assert spm.SentencePieceProcessor(model_file=again).get_piece_size() == 40
    with pytest.raises(ValueError, match="vocab_size=5000"):
        T.train_sentencepiece(_sentences(0), tmp_path / "big", 5000)
    with pytest.raises(ValueError, match="vocab_size"):
        T.train_sentencepiece(_sentences(0), tmp_path / "tiny", 2)
    assert not list(tmp_path.glob(".sp-train-*"))  # no temporary left behind


def test_bad_tokenizer_flags_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-type 'NullTokenizer'"):
        T.build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="--tokenizer-model .*no such file"):
        T.build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="--tokenizer-model is required"):
        T.build_tokenizer("HuggingFaceTokenizer")


def test_huggingface_tokenizer_ids_eod_and_no_added_specials(tmp_path):
    from transformers import AutoTokenizer

    path, vocab = _hf_dir(tmp_path / "hf")
    ref = AutoTokenizer.from_pretrained(path)
    tok = T.build_tokenizer("HuggingFaceTokenizer", path)
    assert tok.eod == vocab["</s>"] == ref.eos_token_id and T.pad_or_eod(tok) == vocab["<pad>"]
    text = "the cat\nsat  on a mat"
    want = [vocab[w] for w in ["the", "cat", "\n", "sat", "on", "a", "mat"]]
    assert T.text_to_ids(tok, text) == want == ref(text, add_special_tokens=False)["input_ids"]
    assert T.hf_tokenizer(tok) is not None


def test_iter_training_text_reads_text_jsonl_and_chat(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("line one\n\nline two\n")
    js = tmp_path / "b.jsonl"
    js.write_text(
        json.dumps({"text": "doc"})
        + "\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            }
        )
        + "\n"
    )
    assert list(T.iter_training_text([str(txt), str(js)])) == [
        "line one",
        "line two",
        "doc",
        "User: hi",
        "Assistant: yo",
    ]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: no 'text' or 'messages'"):
        list(T.iter_training_text([str(bad)]))


def test_train_tokenizer_cli(tmp_path, capsys):
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "train_tokenizer", pathlib.Path(__file__).parents[2] / "tools" / "train_tokenizer.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(4)))
    prefix = tmp_path / "tok"
    assert (
        cli.main(["--input", str(corpus), "--model-prefix", str(prefix), "--vocab-size", "48"]) == 0
    )
    assert (tmp_path / "tok.model").exists() and "--tokenizer-model" in capsys.readouterr().out
    assert (
        cli.main(["--input", str(corpus), "--model-prefix", str(prefix), "--vocab-size", "48"]) == 2
    )
    assert "exists" in capsys.readouterr().err
