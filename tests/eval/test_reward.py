"""Rewards for best-of-k: module:function callables and a tiny random HF reward model."""

import pytest
import torch

import megatron_gem.eval as E
from megatron_gem.eval.reward import RewardModel, compute_rewards, load_reward

transformers = pytest.importorskip("transformers")
U = [{"role": "user", "content": "name a"}]


def test_load_reward_specs_and_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(messages, response):\n    return float(len(response))\n"
        "def bad(messages, response):\n    return float('nan')\n"
        "not_callable = 3\n"
    )
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_reward("my_rewards:length")
    by_file = load_reward(f"{tmp_path / 'my_rewards.py'}:length")
    assert by_module(U, "abc") == 3.0 == by_file(U, "abc")
    prompts = [E.EvalPrompt("p", U), E.EvalPrompt("q", U)]
    assert compute_rewards(by_module, prompts, [["a", "bb"], ["ccc"]]) == [[1.0, 2.0], [3.0]]
    with pytest.raises(ValueError, match=r"reward my_rewards:bad: prompt 'p' sample 0: .*nan"):
        compute_rewards(load_reward("my_rewards:bad"), prompts, [["a"], ["b"]])
    for spec, match in (
        ("my_rewards", "expected module:function"),
        ("no_such_mod_x:f", "'no_such_mod_x:f': cannot import no_such_mod_x: ModuleNotFound"),
        ("broken:f", "'broken:f': cannot import broken: ModuleNotFoundError"),
        ("my_rewards:missing", "my_rewards has no callable 'missing'"),
        ("my_rewards:not_callable", "no callable 'not_callable'"),
        ("nofile.py:f", "no file nofile.py"),
    ):
        with pytest.raises(ValueError, match=match):
            load_reward(spec)


def _save_reward_model(path, num_labels, id2label=None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "User", "Assistant", ":", "name", "a", "b", "c"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
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
        pad_token_id=0,
        num_labels=num_labels,
        **(
            {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
            if id2label
            else {}
        ),
    )
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def test_reward_model_logit_of_single_or_positive_label(tmp_path):
    tok = _save_reward_model(tmp_path / "rm1", 1)
    rm = RewardModel(tmp_path / "rm1", batch_size=2)
    pairs = [(U, "a"), (U, "a b c b"), (U, "c")]  # different lengths: padded batches
    got = rm.score_many(pairs)
    # reference: each conversation alone, unpadded, the logit at its last token
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm1")
    for (m, r), g in zip(pairs, got):
        ids = tok(f"User: name a Assistant: {r}", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0, 0].item()
        assert g == pytest.approx(ref, abs=1e-5)
    assert rm(U, "c") == pytest.approx(got[2], abs=1e-6)
    _save_reward_model(tmp_path / "rm2", 2, {0: "NEGATIVE", 1: "POSITIVE"})
    rm2 = RewardModel(tmp_path / "rm2")
    assert rm2.label == 1
    _save_reward_model(tmp_path / "rm3", 3, {0: "a", 1: "b", 2: "c"})
    with pytest.raises(ValueError, match="3 labels .* none named 'positive'"):
        RewardModel(tmp_path / "rm3")
    with pytest.raises(ValueError, match="no config.json"):
        RewardModel(tmp_path / "missing")


def test_cli_best_of_k_with_a_reward_model(tmp_path):
    import json

    from megatron_gem.eval import cli

    _save_reward_model(tmp_path / "rm", 1)
    (tmp_path / "p.jsonl").write_text(json.dumps({"messages": U, "answer": "1"}) + "\n")
    gens = ["a", "b c", "c", "a b"]
    (tmp_path / "g.jsonl").write_text(json.dumps({"index": 0, "generations": gens}) + "\n")
    out = tmp_path / "r.json"
    argv = ["--prompts", str(tmp_path / "p.jsonl"), "--generations", str(tmp_path / "g.jsonl")]
    assert cli.main(argv + ["--reward-model", str(tmp_path / "rm"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    rewards = RewardModel(tmp_path / "rm").score_many([(U, g) for g in gens])
    assert r["prompts"][0]["rewards"] == pytest.approx(rewards, abs=1e-6)
    a = r["sets"]["all"]
    assert a["best_of_k_reward@1"] == pytest.approx(sum(rewards) / 4, abs=1e-6)
    assert a["best_of_k_reward@4"] == pytest.approx(max(rewards), abs=1e-6)
    assert a["best_of_k_win_rate@1"] == 0.5 and a["best_of_k_quality@4"] == 0.0
