"""Issue 11, inputs: no tool's output may overlap its inputs, and every bad JSONL line is named.

* Every tool that writes (prepare_sft_data, preprocess_data, train_tokenizer, evaluate, the
  study's --out) refuses, before it writes anything, an output that is, contains or lies inside
  one of its inputs, in one line naming both paths. Each case takes a checksum listing of the
  inputs' folder before and after and asserts they are equal.
* Every JSONL reader is ``megatron_gem.data.jsonl``: a BOM at the start of a file is accepted; a
  non-UTF-8 byte or a BOM on a later line is an error of that line (file:line, column, byte),
  which ``--on-error skip`` skips and counts; invalid JSON names its real column.

CLIs run in-process (the tools' ``main``), so Megatron is imported once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

import pytest

import megatron_gem.eval as E
from megatron_gem.data import jsonl as J
import megatron_gem.study as S
from megatron_gem.data import tokenizer as T

REPO = Path(__file__).resolve().parents[2]
WORDS = "the cat dog sat on mat a big small red blue runs jumps quickly over under".split()
BOM = b"\xef\xbb\xbf"
# A latin-1 'e acute' (0xe9) after a UTF-8 one (2 bytes): column 13 is byte 14 of the line.
LATIN1_LINE = b'{"text": "\xc3\xa9t\xe9 x"}'
NOT_UTF8 = "not UTF-8 (byte 0xe9 at column 13, byte 14 of the line)"
# Invalid JSON whose error is at column 20 (after the second comma).
BAD_JSON = b'{"text": "the cat",, "x": 1}'
BAD_JSON_REASON = "invalid JSON (Expecting property name enclosed in double quotes at column 20)"
LATE_BOM = "a UTF-8 byte-order mark (BOM) at column 1"


def _cli(name):
    spec = importlib.util.spec_from_file_location(f"cli_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def checksums(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _refused(capsys, rc, *words):
    """The CLI exited non-zero with ONE error line holding every word (paths included)."""
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "\n" not in err and err.startswith("error: "), err
    for w in words:
        assert str(w) in err, (w, err)
    return err


def _sentences(seed, n):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10))) for _ in range(n)]


def _chat(text):
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]}


def _jsonl_bytes(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    model = T.train_sentencepiece(_sentences(0, 200) + ["System: User: Assistant:"], d / "tok", 64)
    return model, T.build_tokenizer("SentencePieceTokenizer", model)


def _hf_tokenizer_dir(path: Path) -> Path:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", "\n", "User:", "Assistant:"] + WORDS)
    }
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(" +"), "removed")
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    ).save_pretrained(str(path))
    return path


# --------------------------------------------------------------------------- outputs apart


def test_prepare_sft_data_refuses_an_output_overlapping_an_input(tmp_path, sp, capsys):
    cli = _cli("prepare_sft_data")
    inp = tmp_path / "inp"
    inp.mkdir()
    chat = inp / "x.bin"  # chat JSONL under the name an output will have
    chat.write_bytes(_jsonl_bytes([_chat(s) for s in _sentences(1, 5)]))
    hf = _hf_tokenizer_dir(inp / "hf")
    tpl = inp / "t.sft.json"
    tpl.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    before = checksums(inp)
    sp_args = [
        "--seq-length",
        "32",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sp[0],
    ]
    rc = cli.main(
        ["--input", str(chat), "--output-prefix", str(inp / "x"), "--overwrite", *sp_args]
    )
    _refused(
        capsys, rc, f"--output-prefix file {inp / 'x.bin'} is --input {chat}", "nothing was written"
    )
    hf_args = [
        "--seq-length",
        "32",
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(hf),
    ]
    rc = cli.main(
        ["--input", str(chat), "--output-prefix", str(hf / "sft"), "--overwrite", *hf_args]
    )
    _refused(capsys, rc, f"{hf / 'sft.bin'} lies inside --tokenizer-model {hf}")
    rc = cli.main(
        [
            "--input",
            str(chat),
            "--output-prefix",
            str(inp / "t"),
            "--chat-template",
            str(tpl),
            "--template",
            "chat",
            "--overwrite",
            *hf_args,
        ]
    )
    _refused(capsys, rc, f"{inp / 't.sft.json'} is --chat-template {tpl}")
    # New: a --chat-template that is neither a file nor jinja (a mistyped path, which rendered
    # as literal text), and a template file that is not UTF-8 (was: a traceback).
    rc = cli.main(
        [
            "--input",
            str(chat),
            "--output-prefix",
            str(tmp_path / "o1"),
            "--chat-template",
            str(inp / "missing.jinja"),
            *hf_args,
        ]
    )
    _refused(
        capsys,
        rc,
        f"--chat-template '{inp / 'missing.jinja'}': no such file, and not a jinja template",
    )
    bad_tpl = tmp_path / "bad.jinja"
    bad_tpl.write_bytes(b"{{ m }}\xff")
    rc = cli.main(
        [
            "--input",
            str(chat),
            "--output-prefix",
            str(tmp_path / "o2"),
            "--chat-template",
            str(bad_tpl),
            *hf_args,
        ]
    )
    _refused(capsys, rc, f"--chat-template {bad_tpl}: not UTF-8")
    assert checksums(inp) == before and not list(tmp_path.glob("o[12]*"))
    # Apart from the inputs it writes (the check is no blanket refusal).
    assert (
        cli.main(["--input", str(chat), "--output-prefix", str(tmp_path / "out" / "x"), *sp_args])
        == 0
    )
    assert checksums(inp) == before


def test_preprocess_data_refuses_an_output_overlapping_an_input(tmp_path, sp, capsys):
    cli = _cli("preprocess_data")
    inp = tmp_path / "inp"
    inp.mkdir()
    corpus = inp / "c_text_document.idx"
    corpus.write_bytes(_jsonl_bytes([{"text": s} for s in _sentences(2, 5)]))
    model = inp / "m_text_document.bin"
    model.write_bytes(Path(sp[0]).read_bytes())
    before = checksums(inp)
    rc = cli.main(
        [
            "--input",
            str(corpus),
            "--output-prefix",
            str(inp / "c"),
            "--overwrite",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            sp[0],
        ]
    )
    _refused(capsys, rc, f"--output-prefix file {corpus} is --input {corpus}")
    rc = cli.main(
        [
            "--input",
            str(corpus),
            "--output-prefix",
            str(inp / "m"),
            "--overwrite",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(model),
        ]
    )
    _refused(capsys, rc, f"--output-prefix file {model} is --tokenizer-model {model}")
    assert checksums(inp) == before


def test_train_tokenizer_refuses_an_output_overlapping_an_input(tmp_path, capsys):
    cli = _cli("train_tokenizer")
    inp = tmp_path / "inp"
    inp.mkdir()
    text = inp / "tok.vocab"  # plain-text training input named like the vocabulary output
    text.write_text("\n".join(_sentences(3, 100)) + "\n")
    before = checksums(inp)
    rc = cli.main(
        [
            "--input",
            str(text),
            "--model-prefix",
            str(inp / "tok"),
            "--vocab-size",
            "40",
            "--overwrite",
        ]
    )
    _refused(capsys, rc, f"--model-prefix file {text} is --input {text}")
    with pytest.raises(ValueError, match=f"{text} is --input {text}"):  # files given as paths
        T.train_sentencepiece([text], inp / "tok", 40, overwrite=True)
    assert checksums(inp) == before


def test_evaluate_refuses_an_output_overlapping_an_input(tmp_path, capsys):
    cli = _cli("evaluate")
    inp = tmp_path / "inp"
    (inp / "model").mkdir(parents=True)
    (inp / "model" / "config.json").write_text("{}")
    prompts = inp / "p.jsonl"
    prompts.write_bytes(
        _jsonl_bytes([{"id": "q", "messages": [{"role": "user", "content": "hi"}], "valid": ["a"]}])
    )
    gens = inp / "g.jsonl"
    gens.write_bytes(_jsonl_bytes([{"prompt_id": "q", "generations": ["a", "b"]}]))
    before = checksums(inp)
    base = ["--prompts", str(prompts), "--generations", str(gens), "--overwrite"]
    _refused(
        capsys, cli.main(base + ["--out", str(prompts)]), f"--out {prompts} is --prompts {prompts}"
    )
    _refused(
        capsys, cli.main(base + ["--out", str(inp)]), f"--out {inp} contains --prompts {prompts}"
    )
    _refused(
        capsys,
        cli.main(base + ["--out", str(tmp_path / "r.json"), "--csv", str(gens)]),
        f"--csv {gens} is --generations {gens}",
    )
    _refused(
        capsys,
        cli.main(base + ["--model", str(inp / "model"), "--out", str(inp / "model" / "r.json")]),
        f"lies inside --model {inp / 'model'}",
    )
    r = tmp_path / "r.json"
    _refused(capsys, cli.main(base + ["--out", str(r), "--csv", str(r)]), f"--csv {r} is --out {r}")
    assert checksums(inp) == before and not r.exists()
    # The output is written through a fresh temporary name: a user's "r.json.tmp" survives.
    (tmp_path / "r.json.tmp").write_text("mine")
    assert cli.main(base + ["--out", str(r)]) == 0
    assert (tmp_path / "r.json.tmp").read_text() == "mine" and json.loads(r.read_text())["sets"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inp", "r.json", "r.json.tmp"]


def test_study_refuses_an_out_overlapping_its_data_or_an_hf_model(tmp_path, capsys):
    inp = tmp_path / "inp"
    inp.mkdir()
    for name in ("pre", "sft", "eval"):
        (inp / f"{name}.jsonl").write_bytes(_jsonl_bytes([_chat("the cat")]))
    hf = inp / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    before = checksums(inp)
    data = ["--sft-data", str(inp / "sft.jsonl"), "--eval-data", str(inp / "eval.jsonl")]
    rc = S.main(
        [
            "run",
            "--preset",
            "ci",
            "--out",
            str(inp),
            *data,
            "--pretrain-data",
            str(inp / "pre.jsonl"),
        ]
    )
    _refused(capsys, rc, f"--out {inp} contains --pretrain-data {inp / 'pre.jsonl'}")
    rc = S.main(["run", "--preset", "ci", "--out", str(hf / "study"), "--sizes", f"m={hf}", *data])
    _refused(capsys, rc, f"--out {hf / 'study'} lies inside --sizes m=HF_DIR {hf}")
    rc = S.main(
        [
            "run",
            "--preset",
            "ci",
            "--out",
            str(inp / "sft.jsonl"),
            *data,
            "--pretrain-data",
            str(inp / "pre.jsonl"),
        ]
    )
    _refused(capsys, rc, f"--out {inp / 'sft.jsonl'} is --sft-data {inp / 'sft.jsonl'}")
    assert checksums(inp) == before and not (hf / "study").exists()


# -------------------------------------------------------------------------- bad bytes, BOM, columns


def _bad_file(path: Path, good_rows, make=lambda r: r) -> Path:
    """Lines: 1 BOM + good, 2 not UTF-8, 3 good, 4 invalid JSON, 5 BOM at a later line, 6 good."""
    g = [json.dumps(make(r)).encode() for r in good_rows]
    path.write_bytes(
        BOM + b"\n".join([g[0], LATIN1_LINE, g[1], BAD_JSON, BOM + g[2], g[3]]) + b"\n"
    )
    return path


def _clean_file(path: Path, good_rows, make=lambda r: r) -> Path:
    """The lines of ``_bad_file`` that are kept (1, 3 and 6), without a BOM."""
    path.write_bytes(_jsonl_bytes([make(good_rows[k]) for k in (0, 1, 3)]))
    return path


SKIPPED = {NOT_UTF8: [2], BAD_JSON_REASON: [4]}


def _skipped_like(skipped_lines):
    """The report's reasons, the late-BOM reason shortened to its words."""
    return {
        (LATE_BOM if r.startswith(LATE_BOM) else r): lines for r, lines in skipped_lines.items()
    }


def test_sft_data_bad_bytes_bom_and_columns(tmp_path, sp, capsys):
    from megatron_gem.data import sft as D

    texts = _sentences(4, 4)
    src = _bad_file(tmp_path / "chat.jsonl", texts, _chat)
    clean = _clean_file(tmp_path / "clean.jsonl", texts, _chat)
    with pytest.raises(
        ValueError, match=rf"chat.jsonl:2: {NOT_UTF8.replace('(', '.').replace(')', '.')}"
    ):
        D.prepare_sft_data(str(src), str(tmp_path / "a" / "sft"), sp[1], 64)
    rep = D.prepare_sft_data(str(src), str(tmp_path / "a" / "sft"), sp[1], 64, on_error="skip")
    assert (
        rep.kept == 3
        and rep.truncated == 0
        and _skipped_like(rep.skipped_lines) == {**SKIPPED, LATE_BOM: [5]}
    )
    assert "BOM" in rep.format() and "lines 5" in rep.format()
    # The kept samples are exactly those of the clean file: line 1's BOM is dropped, not encoded.
    D.prepare_sft_data(str(clean), str(tmp_path / "b" / "sft"), sp[1], 64)
    for ext in (".bin", ".idx"):
        assert (tmp_path / "a" / f"sft{ext}").read_bytes() == (
            tmp_path / "b" / f"sft{ext}"
        ).read_bytes()
    # The CLI: one line, file:line; skip reports the bad lines.
    cli = _cli("prepare_sft_data")
    argv = [
        "--input",
        str(src),
        "--output-prefix",
        str(tmp_path / "c" / "sft"),
        "--seq-length",
        "64",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sp[0],
    ]
    _refused(capsys, cli.main(argv), f"{src}:2: {NOT_UTF8}", "--on-error skip")
    assert cli.main(argv + ["--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert "kept 3 samples" in out and f"1 x {NOT_UTF8} (lines 2)" in out
    assert f"1 x {BAD_JSON_REASON} (lines 4)" in out


def test_preprocess_bad_bytes_bom_and_columns(tmp_path, sp):
    from megatron_gem.data import text as P

    texts = _sentences(5, 4)
    doc = lambda t: {"text": t}  # noqa: E731
    src = _bad_file(tmp_path / "c.jsonl", texts, doc)
    clean = _clean_file(tmp_path / "clean.jsonl", texts, doc)
    with pytest.raises(ValueError, match=r"c.jsonl:2: not UTF-8 \(byte 0xe9 at column 13"):
        P.preprocess_jsonl(str(src), str(tmp_path / "a"), "SentencePieceTokenizer", sp[0])
    rep = P.preprocess_jsonl(
        str(src), str(tmp_path / "a"), "SentencePieceTokenizer", sp[0], on_error="skip", workers=2
    )  # decoded in the workers
    assert rep.documents["text"] == 3 and _skipped_like(rep.skipped_lines) == {
        **SKIPPED,
        LATE_BOM: [5],
    }
    P.preprocess_jsonl(str(clean), str(tmp_path / "b"), "SentencePieceTokenizer", sp[0])
    for ext in (".bin", ".idx"):
        assert (
            Path(f"{tmp_path / 'a'}_text_document{ext}").read_bytes()
            == Path(f"{tmp_path / 'b'}_text_document{ext}").read_bytes()
        )


def test_tokenizer_training_text_bad_bytes_bom_and_columns(tmp_path, capsys):
    txt = tmp_path / "a.txt"
    txt.write_bytes(BOM + b"first line\r\nsecond\n")
    assert list(T.iter_training_text([str(txt)])) == ["first line", "second"]  # no U+FEFF
    js = tmp_path / "b.jsonl"
    js.write_bytes(BOM + _jsonl_bytes([{"text": "doc"}]))
    assert list(T.iter_training_text([str(js)])) == ["doc"]
    for name, body, want in [
        ("c.txt", b"ok\n" + LATIN1_LINE + b"\n", f"c.txt:2: {NOT_UTF8}"),
        ("d.jsonl", _jsonl_bytes([{"text": "a"}, BAD_JSON]), f"d.jsonl:2: {BAD_JSON_REASON}"),
        (
            "e.jsonl",
            _jsonl_bytes([{"text": "a"}]) + BOM + _jsonl_bytes([{"text": "b"}]),
            f"e.jsonl:2: {LATE_BOM}",
        ),
    ]:
        (tmp_path / name).write_bytes(body)
        with pytest.raises(ValueError) as err:
            list(T.iter_training_text([str(tmp_path / name)]))
        assert want in str(err.value)
    # The CLI names the line too (the error passes through SentencePiece's sentence iterator).
    cli = _cli("train_tokenizer")
    rc = cli.main(
        [
            "--input",
            str(tmp_path / "c.txt"),
            "--model-prefix",
            str(tmp_path / "tok"),
            "--vocab-size",
            "40",
        ]
    )
    _refused(capsys, rc, f"c.txt:2: {NOT_UTF8}")
    # Empty input (was: SentencePiece's "[!sentences_.empty()]").
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"\n \n")
    rc = cli.main(
        [
            "--input",
            str(tmp_path / "empty.jsonl"),
            str(tmp_path / "blank.txt"),
            "--model-prefix",
            str(tmp_path / "tok"),
            "--vocab-size",
            "40",
        ]
    )
    _refused(
        capsys,
        rc,
        "no text to train the tokenizer on",
        "empty.jsonl",
        "blank.txt",
        "empty, or blank",
    )
    assert not list(tmp_path.glob("tok*"))


def test_evaluation_readers_bad_bytes_bom_and_columns(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    p = tmp_path / "p.jsonl"
    p.write_bytes(BOM + _jsonl_bytes([{"id": "q", "messages": msgs}]))
    prompts = E.read_prompts(p)
    assert [x.id for x in prompts] == ["q"]
    g = tmp_path / "g.jsonl"
    g.write_bytes(BOM + _jsonl_bytes([{"prompt_id": "q", "generations": ["x"]}]))
    assert E.read_generations(g, prompts) == [["x"]]
    h = tmp_path / "h.jsonl"
    h.write_bytes(BOM + _jsonl_bytes([{"text": "doc"}]))
    assert E.read_texts(h) == ["doc"]
    for reader, body, want in [
        (E.read_prompts, _jsonl_bytes([{"messages": msgs}, LATIN1_LINE]), f"x.jsonl:2: {NOT_UTF8}"),
        (E.read_texts, _jsonl_bytes([{"text": "a"}, BAD_JSON]), f"x.jsonl:2: {BAD_JSON_REASON}"),
        (
            lambda f: E.read_generations(f, prompts),
            _jsonl_bytes([{"index": 0, "generations": []}])
            + BOM
            + _jsonl_bytes([{"index": 0, "generations": ["a"]}]),
            f"x.jsonl:2: {LATE_BOM}",
        ),
        # New checks: a role SFT never trains on, with file:line (was: unnamed, after loading
        # the model); an index that is a boolean (was: taken as 1).
        (
            E.read_prompts,
            _jsonl_bytes([{"messages": [{"role": "tool", "content": "x"}]}]),
            "x.jsonl:1: messages[0] has role 'tool'; use one of ('system', 'user', 'assistant')",
        ),
        (
            lambda f: E.read_generations(f, prompts),
            _jsonl_bytes([{"index": True, "generations": ["a"]}]),
            "x.jsonl:1: index True out of range",
        ),
    ]:
        (tmp_path / "x.jsonl").write_bytes(body)
        with pytest.raises(ValueError) as err:
            reader(tmp_path / "x.jsonl")
        assert want in str(err.value)


def test_study_data_bad_bytes_bom_and_config_file(tmp_path, capsys):
    pre = tmp_path / "pre.jsonl"
    pre.write_bytes(BOM + _jsonl_bytes([{"text": s} for s in _sentences(6, 60)]))
    sft = _bad_file(tmp_path / "sft.jsonl", _sentences(7, 4), _chat)
    ev = tmp_path / "eval.jsonl"
    ev.write_bytes(BOM + _jsonl_bytes([{"messages": [{"role": "user", "content": "the cat"}]}]))
    cfg = S.preset("ci", pretrain_data=str(pre), sft_data=str(sft), eval_data=str(ev))
    with pytest.raises(ValueError, match=rf"--sft-data {sft}:2: not UTF-8 \(byte 0xe9"):
        S.run_local(S.Study(cfg, tmp_path / "s1", log=lambda m: None), only=["data"])
    # With good SFT data the data stage runs; the held-out split of the BOM-started pre-training
    # file keeps every document byte for byte (and no BOM inside the split files).
    sft.write_bytes(_jsonl_bytes([_chat(s) for s in _sentences(7, 4)]))
    study = S.Study(
        S.preset("ci", pretrain_data=str(pre), sft_data=str(sft), eval_data=str(ev)),
        tmp_path / "s2",
        log=lambda m: None,
    )
    assert S.run_local(study, only=["data"]) == ["data"]
    d = study.by_name["data"].out
    docs = pre.read_bytes()[len(BOM) :].splitlines()
    assert (d / "heldout.jsonl").read_bytes().splitlines() == [docs[49]]
    assert (d / "pretrain.jsonl").read_bytes().splitlines() == docs[:49] + docs[50:]
    # --config: a named error for each kind of mistake, no traceback.
    conf = tmp_path / "c.json"
    for body, want in [
        (b'{"sft_iters": 6,}', f"--config {conf}:1: invalid JSON"),
        (b"[1]", "must be a JSON object of StudyConfig fields, got list"),
        (b'{"sft_itres": 6}', "unknown key(s) ['sft_itres']"),
        (b'{"sizes": [{"name": "a", "layers": 2}]}', f"--config {conf}: "),
        (b'{"sizes": [{"name": "a", "layers": 2}]}', "layers"),
    ]:
        conf.write_bytes(body)
        _refused(
            capsys, S.main(["run", "--out", str(tmp_path / "s3"), "--config", str(conf)]), want
        )
    assert not (tmp_path / "s3").exists()


def test_one_reader_yields_line_numbers_and_reasons(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(BOM + b'{"a": 1}\r\n\n  \n[2]\n' + LATIN1_LINE + b"\n" + BAD_JSON + b"\n")
    got = [(n, v.reason if isinstance(v, J.BadLine) else v) for n, v in J.read_jsonl(f)]
    assert got == [(1, {"a": 1}), (4, [2]), (5, NOT_UTF8), (6, BAD_JSON_REASON)]
    with pytest.raises(ValueError, match="no such file"):
        list(J.read_jsonl(tmp_path / "missing.jsonl"))
