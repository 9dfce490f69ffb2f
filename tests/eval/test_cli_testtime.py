"""The evaluation CLI on GSM8K-style and HumanEval-style JSONL with the user's generations, with
--model on an HF checkpoint, and with --engine vllm (a fake engine)."""

import csv
import json
from types import SimpleNamespace

import pytest

from megatron_gem.eval import cli
from megatron_gem.eval import vllm_sampling as V

transformers = pytest.importorskip("transformers")


def _write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


GSM8K = [
    {
        "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7",
    },
    {"question": "What is 10 times 12?", "answer": "10 * 12 = <<10*12=120>>120\n#### 120"},
]
GSM8K_GENS = [
    # answers 7, 7, 8, 7: 3 correct
    {"index": 0, "generations": ["3 + 4 = 7\n#### 7", "So \\boxed{7}.", "#### 8", "7 apples"]},
    # answers 120, 120, 1200, none: 2 correct
    {"index": 1, "generations": ["120", "10*12 = 120. #### 120", "#### 1,200", "I don't know"]},
]
HUMANEVAL = [
    {
        "task_id": "Toy/0",
        "prompt": 'def add(a, b):\n    """Sum of a and b."""\n',
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "entry_point": "add",
    },
    {
        "task_id": "Toy/1",
        "prompt": "def square(x):\n",
        "test": "def check(candidate):\n    assert candidate(3) == 9\n",
        "entry_point": "square",
    },
]
HUMANEVAL_GENS = [
    {
        "prompt_id": "Toy/0",  # passes, fails, passes (a fenced full definition)
        "generations": [
            "    return a + b\n",
            "    return a * b\n",
            "```python\ndef add(a, b):\n    return b + a\n```",
        ],
    },
    # passes; an endless loop killed by --code-timeout
    {
        "prompt_id": "Toy/1",
        "generations": ["    return x ** 2\n", "    while True:\n        pass\n"],
    },
]


def _csv(path):
    with open(path) as f:
        return {r["set"]: r for r in csv.DictReader(f)}


def test_cli_gsm8k_and_humaneval_with_generations(tmp_path, capsys):
    (tmp_path / "short_reward.py").write_text(
        "def score(messages, response):\n    return -float(len(response))\n"
    )
    args = ["--prompts", _write(tmp_path / "gsm8k.jsonl", GSM8K)]
    args += ["--generations", _write(tmp_path / "g.jsonl", GSM8K_GENS)]
    out, table = tmp_path / "gsm8k.json", tmp_path / "gsm8k.csv"
    reward = f"{tmp_path / 'short_reward.py'}:score"
    assert cli.main(args + ["--out", str(out), "--csv", str(table), "--reward", reward]) == 0
    a = json.loads(out.read_text())["sets"]["all"]
    # prompt 0: c = 3 of 4; prompt 1: c = 2 of 4, pass@2 = 1 - C(2,2)/C(4,2) = 5/6
    assert a["pass@1"] == pytest.approx((0.75 + 0.5) / 2)
    assert a["pass@2"] == pytest.approx((1 + 5 / 6) / 2) and a["pass@4"] == 1.0
    # maj@2: in each prompt only the pair (wrong answer, other wrong one / nothing) loses: 5/6
    assert a["maj@2"] == pytest.approx(5 / 6) and a["maj@4"] == 1.0
    assert a["best_of_k_win_rate@1"] == 0.5 and "best_of_k_quality@4" in a
    # best-of-4 by the shortest response: "#### 8" (wrong) and "120" (right)
    assert a["best_of_k_quality@4"] == 0.5
    row = _csv(table)["all"]
    assert float(row["pass@2"]) == pytest.approx(a["pass@2"]) and row["n_maj@4"] == "2"
    header = list(row)
    assert header.index("pass@1") < header.index("pass@2") < header.index("pass@4")
    assert header.index("pass@4") < header.index("maj@1")
    printed = capsys.readouterr().out
    assert "pass@k (all): pass@1=0.6250  pass@2=0.9167  pass@4=1.0000\n" in printed
    assert "maj@k (all): maj@1=0.6250  maj@2=0.8333  maj@4=1.0000\n" in printed
    assert "n_pass" not in printed

    args = ["--prompts", _write(tmp_path / "he.jsonl", HUMANEVAL)]
    args += ["--generations", _write(tmp_path / "he_g.jsonl", HUMANEVAL_GENS)]
    args += ["--code-timeout", "1", "--out", str(tmp_path / "he.json")]
    assert cli.main(args + ["--csv", str(tmp_path / "he.csv")]) == 0
    r = json.loads((tmp_path / "he.json").read_text())
    assert [p["status"] for p in r["prompts"]] == [
        ["passed", "failed", "passed"],
        ["passed", "timeout"],
    ]
    a = r["sets"]["all"]
    assert a["pass@1"] == pytest.approx((2 / 3 + 1 / 2) / 2) and a["pass@2"] == 1.0
    assert a["n_pass@3"] == 1 and not any(k.startswith("maj@") for k in a)
    assert float(_csv(tmp_path / "he.csv")["all"]["pass@1"]) == pytest.approx(7 / 12)
    # a reward that cannot be imported: one line naming it, exit 2
    bad = args[:-2] + ["--out", str(tmp_path / "x.json"), "--reward", "no_such_mod:f"]
    assert cli.main(bad) == 2
    assert "error: reward 'no_such_mod:f': cannot import no_such_mod" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama + word-level tokenizer that can say numbers and '####'."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "User", "Assistant", ":", "####", "7", "120"]
    words += ["What", "is", "10", "times", "12", "?", "Tom", "has", "3"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = transformers.LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf") / "sft"
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_model_and_vllm_engine_on_gsm8k(hf_dir, tmp_path, monkeypatch):
    prompts = _write(tmp_path / "gsm8k.jsonl", GSM8K)
    out = tmp_path / "r.json"
    base = ["--prompts", prompts, "--model", str(hf_dir), "--n", "4", "--max-new-tokens", "3"]
    assert (
        cli.main(base + ["--out", str(out), "--save-generations", str(tmp_path / "g.jsonl")]) == 0
    )
    r = json.loads(out.read_text())
    gens = [p["generations"] for p in r["prompts"]]
    assert r["sampling"]["n"] == 4 and all(len(g) == 4 for g in gens)
    for p in r["prompts"]:  # pass@k from the samples' own correctness
        c = sum(p["correct"])
        assert p["metrics"]["pass@1"] == c / 4 and p["metrics"]["pass@4"] == float(c > 0)
        assert {"maj@1", "maj@2", "maj@4"} <= set(p["metrics"])

    # --engine vllm: the same prompt ids, sampled by a (fake) engine, written as generations
    seen = {}

    class FakeLLM:
        def generate(self, inputs, sampling_params, use_tqdm):
            seen["inputs"], seen["params"] = inputs, sampling_params
            answer = [[8, 2], [9, 2]]  # "7" then "120", each with </s>
            return [
                SimpleNamespace(
                    outputs=[SimpleNamespace(index=j, token_ids=answer[i]) for j in range(4)]
                )
                for i in range(len(inputs))
            ]

    monkeypatch.setattr(V, "load_vllm", lambda model_dir, **kw: FakeLLM())
    monkeypatch.setattr(V, "_params_class", lambda: dict)
    g2 = tmp_path / "g2.jsonl"
    argv = base + [
        "--engine",
        "vllm",
        "--out",
        str(tmp_path / "v.json"),
        "--save-generations",
        str(g2),
    ]
    assert cli.main(argv) == 0
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tok("User: " + GSM8K[1]["question"] + " Assistant:", add_special_tokens=False)[
        "input_ids"
    ]
    assert seen["inputs"][1]["prompt_token_ids"] == ids
    assert seen["params"][0]["n"] == 4 and seen["params"][0]["max_tokens"] == 3
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["sampling"]["engine"] == "vllm" and v["sets"]["all"]["pass@1"] == 1.0
    assert [json.loads(x)["generations"] for x in g2.read_text().splitlines()] == [
        ["7"] * 4,
        ["120"] * 4,
    ]
    with pytest.raises(SystemExit):  # vLLM only samples: no held-out loss
        cli.main(argv + ["--heldout", prompts, "--overwrite"])
