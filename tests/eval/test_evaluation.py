"""Sampling, exact scoring, held-out loss and the evaluation CLI on tiny random HF models."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import megatron_gem.eval as E
from megatron_gem.eval import metrics as M

transformers = pytest.importorskip("transformers")

# Char-level format: ids 0 pad, 1 bos, 2 eos, 3.. = letters a..m (a tokenizer-like object, no HF).
LETTERS = "abcdefghijklm"
V = 3 + len(LETTERS)


def char_format():
    return E.ChatFormat(
        encode=lambda s: [3 + LETTERS.index(c) for c in s if c != " "],
        decode=lambda ids: "".join(LETTERS[i - 3] for i in ids if i >= 3),
        render=lambda msgs: msgs[-1]["content"],
        eos_id=2,
        pad_id=0,
        bos_id=1,
    )


def tiny_llama(vocab=V, seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with (
        torch.no_grad()
    ):  # sharper distributions than the tiny init gives, so greedy ties are unlikely
        model.lm_head.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def ref_logprob(model64, ctx, tgt):
    """Independent reference: float64 model, one sequence, one full forward per target token."""
    seq, total = list(ctx), 0.0
    for t in tgt:
        logits = model64(input_ids=torch.tensor([seq])).logits[0, -1]
        total += torch.log_softmax(logits.double(), -1)[t].item()
        seq.append(t)
    return total


def test_sequence_logprobs_match_float64_reference(model):
    import copy

    m64 = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(1)
    pairs = [
        (
            torch.randint(
                3, V, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g
            ).tolist(),
            torch.randint(
                2, V, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g
            ).tolist(),
        )
        for _ in range(11)
    ]
    got = E.sequence_logprobs(model, pairs, batch_size=4)  # padded batches of mixed lengths
    with torch.no_grad():
        for (c, t), v in zip(pairs, got):
            assert v == pytest.approx(ref_logprob(m64, c, t), abs=2e-4)


def test_response_probabilities_sum_to_one(model):
    """Exactness of 'sequence probability incl. the end token': over all responses of up to 2
    tokens plus the mass of not having ended after 2 tokens, probabilities sum to 1."""
    fmt = char_format()
    ctx = fmt.prompt_ids([{"role": "user", "content": "cab"}])
    body = [t for t in range(V) if t != fmt.eos_id]
    pairs = [
        (ctx, list(s) + [fmt.eos_id]) for k in range(2) for s in itertools.product(body, repeat=k)
    ]
    pairs += [(ctx, list(s)) for s in itertools.product(body, repeat=2)]  # not ended after 2 tokens
    total = math.fsum(math.exp(x) for x in E.sequence_logprobs(model, pairs, batch_size=128))
    assert total == pytest.approx(1.0, abs=1e-4)


def test_greedy_batched_equals_manual_greedy_loop(model):
    fmt = char_format()
    prompts = [[{"role": "user", "content": c}] for c in ("a", "bcdefg", "mmk", "hij")]
    got = E.sample(
        model, fmt, prompts, E.SamplingConfig(n=2, temperature=0, max_new_tokens=6, batch_size=3)
    )
    for p, g in zip(prompts, got):
        seq, new = fmt.prompt_ids(p), []
        with torch.no_grad():
            for _ in range(6):
                t = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                if t == fmt.eos_id:
                    break
                seq.append(t)
                new.append(t)
        assert g == [fmt.decode(new)] * 2


def test_sampling_distribution_temperature_and_top_k(model):
    fmt = char_format()
    prompt = [{"role": "user", "content": "dab"}]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([fmt.prompt_ids(prompt)])).logits[0, -1].double()

    def expected(probs):  # distribution over decoded strings (special tokens decode to "")
        out = {}
        for t, p in enumerate(probs.tolist()):
            s = fmt.decode([t])
            out[s] = out.get(s, 0.0) + p
        return out

    # Settings of the model directory's generation config must not leak into sampling.
    model.generation_config = transformers.GenerationConfig(
        suppress_tokens=[int(logits.argmax())], repetition_penalty=50.0
    )
    n = 4000
    for temp, top_k in ((0.7, 0), (1.3, 3)):
        z = logits / temp
        if top_k:
            z = torch.where(
                z >= z.topk(top_k).values[-1], z, torch.tensor(-math.inf, dtype=z.dtype)
            )
        want = expected(torch.softmax(z, -1))
        got = E.sample(
            model,
            fmt,
            [prompt],
            E.SamplingConfig(n=n, temperature=temp, top_k=top_k, max_new_tokens=1, seed=3),
        )[0]
        freq = {s: got.count(s) / n for s in set(got)}
        tv = 0.5 * sum(abs(freq.get(s, 0) - want.get(s, 0)) for s in set(freq) | set(want))
        assert tv < 0.04, (temp, top_k, tv)
        if top_k:
            assert len(freq) <= top_k
    assert model.generation_config.repetition_penalty == 50.0  # restored
    model.generation_config = transformers.GenerationConfig()
    cfg = E.SamplingConfig(n=5, max_new_tokens=4, seed=11)
    assert E.sample(model, fmt, [prompt], cfg) == E.sample(model, fmt, [prompt], cfg)


def test_heldout_loss_matches_reference(model):
    import copy

    m64 = copy.deepcopy(model).double()
    fmt = char_format()
    texts = ["abc de", "m", "hhhh gg fe"]
    got = E.heldout_loss(model, fmt, texts, batch_size=2)
    with torch.no_grad():
        lp = [ref_logprob(m64, d[:1], d[1:]) for d in map(fmt.document_ids, texts)]
    n = sum(len(fmt.document_ids(t)) - 1 for t in texts)
    assert got == pytest.approx(-sum(lp) / n, abs=1e-4)
    # Windows: with max_len=4, each window of up to 4 tokens predicts its last 3 from its first.
    d = fmt.document_ids("hhhh gg fe")  # 10 tokens -> windows 4, 4, 2
    with torch.no_grad():
        lp = [ref_logprob(m64, w[:1], w[1:]) for w in (d[0:4], d[4:8], d[8:10])]
    assert E.heldout_loss(model, fmt, ["hhhh gg fe"], max_len=4) == pytest.approx(
        -sum(lp) / 7, abs=1e-4
    )


def test_summarise_hand_example():
    prompts = [
        E.EvalPrompt("p0", [{"role": "user", "content": "q"}], ["a", "b"], "seen"),
        E.EvalPrompt("p1", [{"role": "user", "content": "q"}], ["x"], "unseen"),
        E.EvalPrompt("p2", [{"role": "user", "content": "q"}], None, "unseen"),
    ]
    gens = [["a", "A.", "c"], ["x", "x"], ["a b", "a c"]]
    lps = [[math.log(0.5), math.log(0.25)], [math.log(0.1)], None]
    sets, per = E.summarise(prompts, gens, lps)
    assert (
        per[0]["metrics"]["quality"] == pytest.approx(2 / 3)
        and per[0]["metrics"]["coverage"] == 0.5
    )
    assert per[0]["metrics"]["valid_mass"] == pytest.approx(0.75)
    assert (
        sets["all"]["quality"] == pytest.approx((2 / 3 + 1) / 2) and sets["all"]["n_quality"] == 2
    )
    assert sets["seen"]["effective_valid"] == pytest.approx(
        math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    )
    assert sets["unseen"]["valid_mass"] == pytest.approx(0.1)
    # n-gram diversity: p1 ["x","x"] -> 1/2 ; p2 ["a b","a c"] -> (3/4 + 2/2) / 2
    assert sets["unseen"]["ngram_diversity"] == pytest.approx((0.5 + 0.875) / 2)
    assert sets["unseen"]["n_prompts"] == 2 and sets["all"]["n_samples"] == 7
    assert sets["unseen"]["self_bleu_diversity"] == pytest.approx(
        (0.0 + (1 - M.self_bleu(["a b", "a c"]) / 100)) / 2
    )
    assert "quality" not in per[2]["metrics"]
    # Listed twice: counted once; "A" and "a" are different sequences of the same answer: added.
    m = E.prompt_metrics(
        ["a"], ["a", "A", "a", "b"], [math.log(0.2), math.log(0.1), math.log(0.2), math.log(0.3)]
    )
    assert m["valid_mass"] == pytest.approx(0.6)
    assert m["effective_valid"] == pytest.approx(math.exp(-(0.5 * math.log(0.5) * 2)))
    with pytest.raises(ValueError, match="2 log-probabilities for 1 valid"):
        E.prompt_metrics(["a"], ["a"], [0.0, 0.0])


def _write(path, lines):
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def test_readers_give_line_numbered_errors(tmp_path):
    ok = {"messages": [{"role": "user", "content": "q"}], "valid": ["a"]}
    cases = [
        (["{bad json"], r":1: invalid JSON"),
        ([ok, {"valid": ["a"]}], r":2: missing 'messages'"),
        (
            [ok, {"messages": [{"role": "user", "content": "q"}], "valid": "a"}],
            r":2: 'valid' must be",
        ),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ],
            r":1: the last",
        ),
        ([{**ok, "id": "x"}, {**ok, "id": "x"}], r":2: duplicate id 'x' \(first on line 1\)"),
        ([{"messages": [{"role": "user"}]}], r":1: messages\[0\]"),
    ]
    for lines, match in cases:
        with pytest.raises(ValueError, match=match):
            E.read_prompts(_write(tmp_path / "p.jsonl", lines))
    prompts = E.read_prompts(
        _write(tmp_path / "p.jsonl", [{**ok, "id": "a"}, ok, "", {**ok, "split": "unseen"}])
    )
    assert [p.id for p in prompts] == ["a", "1", "2"] and prompts[2].split == "unseen"
    gens = E.read_generations(
        _write(
            tmp_path / "g.jsonl",
            [
                {"prompt_id": "a", "generations": ["u"]},
                {"index": 1, "generations": ["v", "w"]},
                {"prompt_id": 2, "generations": ["z"]},
                {"prompt_id": "a", "generations": ["u2"]},
            ],
        ),
        prompts,
    )
    assert gens == [["u", "u2"], ["v", "w"], ["z"]]
    for lines, match in [
        ([{"prompt_id": "nope", "generations": []}], r":1: prompt_id 'nope'"),
        ([{"index": 7, "generations": []}], r":1: index 7 out of range"),
        ([{"generations": ["a"]}], r":1: needs 'prompt_id' or 'index'"),
        ([{"index": 0, "generations": "a"}], r":1: 'generations' must be"),
        ([{"index": 0, "generations": ["a"]}], r"no generations for prompt id\(s\) \['1', '2'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            E.read_generations(_write(tmp_path / "g.jsonl", lines), prompts)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama + word-level HF tokenizer saved as an HF model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "User",
        "Assistant",
        ":",
        ".",
        "name",
        "a",
        "b",
        "c",
        "d",
        "and",
    ]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    d = tmp_path_factory.mktemp("hf")
    for name, seed in (("base", 0), ("sft", 1)):
        tiny_llama(len(words), seed).save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d


def test_evaluate_end_to_end_on_hf_dir(hf_dir):
    model, tok = E.load_hf(hf_dir / "sft")
    fmt = E.hf_chat_format(tok)
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert fmt.prompt_ids([{"role": "user", "content": "name a"}]) == ids("User:") + ids(
        "name a"
    ) + ids("Assistant:")
    prompts = [
        E.EvalPrompt("0", [{"role": "user", "content": "name a"}], ["a", "b and c"], "seen"),
        E.EvalPrompt("1", [{"role": "user", "content": "name b . d"}], ["d"], "unseen"),
    ]
    r = E.evaluate(
        model,
        fmt,
        prompts,
        E.SamplingConfig(n=6, max_new_tokens=5),
        heldout_texts=["a b c d", "a and b"],
        heldout_loss_before=2.0,
    )
    assert set(r["sets"]) == {"all", "seen", "unseen"}
    for s in r["sets"].values():
        assert (
            0 <= s["quality"] <= 1 and 0 < s["valid_mass"] <= 1 and 1 <= s["effective_valid"] <= 2
        )
        assert 0 <= s["self_bleu_diversity"] <= 1
    lp = E.score_valid(model, fmt, prompts)
    assert r["prompts"][0]["metrics"]["valid_mass"] == pytest.approx(
        sum(math.exp(x) for x in lp[0])
    )
    assert r["forgetting"] == pytest.approx(r["heldout_loss"] - 2.0)
    assert all(len(p["generations"]) == 6 for p in r["prompts"])
    with pytest.raises(ValueError, match="no config.json"):
        E.load_hf(hf_dir / "missing")


def test_cli_on_user_jsonl(hf_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "megatron_gem_evaluate_cli", Path(__file__).resolve().parents[2] / "tools" / "evaluate.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    prompts = _write(
        tmp_path / "eval.jsonl",
        [
            {
                "id": "q1",
                "split": "seen",
                "messages": [{"role": "user", "content": "name a"}],
                "valid": ["a", "b"],
            },
            {"id": "q2", "messages": [{"role": "user", "content": "name c"}]},
        ],
    )
    gens = _write(
        tmp_path / "gens.jsonl",
        [
            {"prompt_id": "q1", "generations": ["a", "b", "c", "a"]},
            {"index": 1, "generations": ["a b c", "a b d"]},
        ],
    )
    out = tmp_path / "r.json"
    assert (
        cli.main(
            [
                "--prompts",
                str(prompts),
                "--generations",
                str(gens),
                "--out",
                str(out),
                "--csv",
                str(tmp_path / "r.csv"),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert r["sets"]["seen"]["quality"] == 0.75 and r["sets"]["seen"]["coverage"] == 1.0
    assert "valid_mass" not in r["sets"]["seen"]  # no model: nothing to score
    assert "response text only" in r["note"]
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("set,")
    # Refuses to overwrite; sampling from a model + forgetting against a base model.
    with pytest.raises(SystemExit):
        cli.main(["--prompts", str(prompts), "--generations", str(gens), "--out", str(out)])
    assert "--overwrite" in capsys.readouterr().err
    held = _write(tmp_path / "held.jsonl", [{"text": "a b c d"}, {"text": "a and b"}])
    assert (
        cli.main(
            [
                "--prompts",
                str(prompts),
                "--model",
                str(hf_dir / "sft"),
                "--n",
                "3",
                "--max-new-tokens",
                "4",
                "--heldout",
                str(held),
                "--base-model",
                str(hf_dir / "base"),
                "--out",
                str(out),
                "--overwrite",
                "--save-generations",
                str(tmp_path / "g2.jsonl"),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert r["forgetting"] == pytest.approx(r["heldout_loss"] - r["heldout_loss_before"])
    assert 0 < r["sets"]["seen"]["valid_mass"] <= 1
    g2 = E.read_generations(tmp_path / "g2.jsonl", E.read_prompts(prompts))
    assert [len(g) for g in g2] == [3, 3]
    # Malformed input: a clear message with the line number, exit code 2.
    bad = _write(
        tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]}, "{oops"]
    )
    assert (
        cli.main(
            ["--prompts", str(bad), "--generations", str(gens), "--out", str(tmp_path / "x.json")]
        )
        == 2
    )
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err


class _FakeMegatronTokenizer:
    """What sft_data needs of a Megatron (non-HF) tokenizer: tokenize, detokenize, eod."""

    eod, pad = 2, 0

    def tokenize(self, text):
        return [3 + LETTERS.index(c) for c in text.lower() if c in LETTERS]

    def detokenize(self, ids):
        return "".join(LETTERS[i - 3] for i in ids if i >= 3)


class _HFWrap:
    """What sft_data needs of a Megatron HuggingFace tokenizer."""

    library = "huggingface"

    def __init__(self, hf):
        self._tokenizer = type("T", (), {"tokenizer": hf})()
        self.chat_template = hf.chat_template
        self.eod = hf.eos_token_id


def _check_same_as_training(encoder, fmt, convs):
    """prompt_ids + response_ids == the SFT sample, and the loss mask is exactly the response."""
    for conv in convs:
        ids, mask = encoder.encode(conv)
        prompt = fmt.prompt_ids(conv[:-1])
        resp = fmt.response_ids(conv[-1]["content"], conv[:-1])
        assert ids.tolist()[: len(prompt) + len(resp)] == prompt + resp
        if len(conv) == 2:
            assert not mask[: len(prompt)].any()
        assert mask[len(prompt) : len(prompt) + len(resp)].all()
        assert not mask[len(prompt) + len(resp) :].any()


def test_formats_match_sft_data_encoders():
    from megatron_gem.data import sft as sft_data
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    convs = [
        [{"role": "user", "content": "name a"}, {"role": "assistant", "content": "b and c"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c d"},
            {"role": "assistant", "content": "d"},
        ],
    ]
    # Plain template on a SentencePiece-like Megatron tokenizer.
    mt = _FakeMegatronTokenizer()
    fmt = E.megatron_chat_format(mt)
    assert isinstance(fmt, E.PlainTemplateFormat) and fmt.eos_id == 2
    _check_same_as_training(sft_data.PlainTemplateEncoder(mt), fmt, convs)
    with pytest.raises(ValueError, match="role 'tool'"):
        fmt.prompt_ids([{"role": "tool", "content": "x"}])
    # HF chat template with its own end-of-turn special token.
    words = [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "user",
        "assistant",
        "system",
        ":",
        "name",
        "be",
        "brief",
        "a",
        "b",
        "c",
        "d",
        "and",
        "<|end|>",
    ]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|end|>"],
    )
    hf.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    fmt = E.megatron_chat_format(_HFWrap(hf))
    assert isinstance(fmt, E.ChatTemplateFormat) and fmt.stop_ids == (2, 16)
    _check_same_as_training(sft_data.ChatTemplateEncoder(_HFWrap(hf)), fmt, convs)
    assert fmt.decode_response(fmt.response_ids("b and c", convs[0][:1]) + [11]) == "b and c"
    assert isinstance(E.hf_chat_format(hf, "plain"), E.PlainTemplateFormat)


def test_embedded_world_pipeline_with_sentencepiece(tmp_path):
    """The chain a study driver runs: world -> SentencePiece -> format -> evaluate -> report
    rows."""
    from megatron_gem.study import report as R
    from megatron_gem.study import world as W
    from megatron_gem.data.tokenizer import build_tokenizer, iter_training_text, train_sentencepiece

    files = W.write_world(
        tmp_path / "w",
        W.WorldConfig(n_animals=12, relation_animals=6, pretrain_docs=150, heldout_docs=8),
    )
    sp = train_sentencepiece(
        iter_training_text([str(files.pretrain), str(files.sft), str(files.eval)]),
        tmp_path / "sp",
        160,
    )
    tok = build_tokenizer("SentencePieceTokenizer", sp)
    fmt = E.megatron_chat_format(tok)
    prompts = E.read_prompts(files.eval)
    for p in prompts[:5]:  # no unknown pieces in prompts or answers; answers decode back exactly
        assert 0 not in fmt.prompt_ids(p.messages)
        assert fmt.decode_response(fmt.response_ids(p.valid[0])) == p.valid[0]
    model = tiny_llama(vocab=tok.vocab_size)
    heldout = E.read_texts(files.heldout)
    before = E.heldout_loss(model, fmt, heldout)
    res = E.evaluate(
        model,
        fmt,
        prompts,
        E.SamplingConfig(n=3, max_new_tokens=4),
        heldout_texts=heldout,
        heldout_loss_before=before,
    )
    assert res["forgetting"] == pytest.approx(0.0, abs=1e-9)
    assert {"all", "seen", "unseen"} <= set(res["sets"])
    assert res["sets"]["all"]["n_quality"] == len(prompts)
    recs = [
        R.make_record(m, b, "tiny", 10, res, params=model.num_parameters())
        for m, b in (("ce", None), ("gem", 1.0))
    ]
    assert (
        recs[0]["unseen/quality"] == res["sets"]["unseen"]["quality"]
        and recs[0]["forgetting"] == res["forgetting"]
    )
    md = R.report_markdown(recs, prompt_set="unseen")
    equal_steps = md.split("## Trade-offs")[0]  # (the test-time tables have such rows too)
    assert equal_steps.count("| tiny | CE | 0 | 10 |") == 3  # all, seen, unseen tables
