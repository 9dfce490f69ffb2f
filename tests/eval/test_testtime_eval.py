"""Test-time curves in the evaluation: hand-computed pass@k, maj@k, best-of-k per prompt and set;
the GSM8K and HumanEval prompt shapes and their errors."""

import json

import pytest

import megatron_gem.eval as E
from megatron_gem.eval.api import default_ks, metric_order

U = [{"role": "user", "content": "q"}]


def test_default_ks():
    assert [default_ks(n) for n in (1, 2, 3, 4, 5)] == [
        [1],
        [1, 2],
        [1, 2, 3],
        [1, 2, 4],
        [1, 2, 4, 5],
    ]
    assert default_ks(16) == [1, 2, 4, 8, 16] and default_ks(33)[-2:] == [32, 33]
    with pytest.raises(ValueError, match="positive"):
        default_ks(0)


def test_hand_computed_curves_valid_math_and_code(tmp_path):
    prompts = [
        E.EvalPrompt("v", U, ["owl", "bat"], "seen"),
        E.EvalPrompt("m", U, None, "unseen", answer="42"),
        E.EvalPrompt(
            "c",
            U,
            None,
            "unseen",
            code=E.CodeTask("def f(x):\n", "def check(g):\n    assert g(2) == 4\n", "f"),
        ),
    ]
    gens = [
        ["Owl.", "cow", "owl", "bat"],  # answers owl, cow, owl, bat: 3 of 4 valid
        ["#### 42", "so \\boxed{42.0}", "I think 41", "no idea", "$42."],  # 42 42 41 None 42
        ["    return x * 2\n", "    return x + 3\n"],  # passes, fails
    ]
    rewards = [[0.1, 0.9, 0.5, 0.3], None, None]
    sandbox = E.SandboxConfig(timeout=30, temp_root=str(tmp_path))
    sets, per = E.summarise(prompts, gens, rewards=rewards, sandbox=sandbox)
    v, m, c = (r["metrics"] for r in per)
    # valid, N = 4, c = 3: pass@2 = 1 - C(1,2)/C(4,2) = 1. maj@2 over the 6 pairs (a tie goes to
    # the earlier answer): owl-cow, owl-owl, owl-bat, owl-bat win; cow-owl, cow-bat lose: 4/6.
    assert (v["pass@1"], v["pass@2"], v["pass@4"]) == (0.75, 1.0, 1.0)
    assert (v["maj@1"], v["maj@2"], v["maj@4"]) == (0.75, pytest.approx(4 / 6), 1.0)
    # best-of-k by reward: k=1 the mean reward, k=4 the max (0.9, "cow": not valid); k=2 picks
    # the higher of each pair: cow, owl, bat, cow, cow, owl -> 3/6 valid; win rate vs one sample
    assert v["best_of_k_reward@1"] == pytest.approx(0.45) and v["best_of_k_reward@4"] == 0.9
    assert v["best_of_k_win_rate@1"] == 0.5 and v["best_of_k_win_rate@4"] == pytest.approx(7 / 8)
    assert v["best_of_k_quality@2"] == pytest.approx(0.5) and v["best_of_k_quality@4"] == 0.0
    # math, N = 5, c = 3: pass@2 = 1 - C(2,2)/C(5,2) = 0.9; maj@2: of the 10 pairs only
    # 41-None and 41-42 (tie: 41 first) lose: 0.8; maj@4: every 4-subset has 42 on top.
    assert per[1]["extracted"] == ["42", "42.0", "41", None, "$42"]
    assert per[1]["correct"] == [True, True, False, False, True]
    assert (m["quality"], m["pass@1"], m["pass@2"], m["pass@4"], m["pass@5"]) == (
        0.6,
        0.6,
        pytest.approx(0.9),
        1.0,
        1.0,
    )
    assert (m["maj@1"], m["maj@2"], m["maj@4"], m["maj@5"]) == (0.6, pytest.approx(0.8), 1.0, 1.0)
    assert not any(k.startswith("best_of_k") for k in m)
    # code: one pass, one fail; no maj@k (no answers to vote on)
    assert per[2]["status"] == ["passed", "failed"]
    assert (c["pass@1"], c["pass@2"]) == (0.5, 1.0) and "maj@1" not in c
    # set means over the prompts where a key is defined
    a = sets["all"]
    assert a["pass@1"] == pytest.approx((0.75 + 0.6 + 0.5) / 3) and a["n_pass@1"] == 3
    assert a["pass@4"] == 1.0 and a["n_pass@4"] == 2 and a["n_pass@5"] == 1
    assert a["maj@2"] == pytest.approx((4 / 6 + 0.8) / 2) and a["n_maj@2"] == 2
    assert sets["unseen"]["pass@2"] == pytest.approx((0.9 + 1.0) / 2)
    assert sets["seen"]["best_of_k_reward@4"] == 0.9 and "best_of_k_reward@4" not in sets["unseen"]
    flat = E.flat_metrics({"sets": sets})
    assert flat["unseen/pass@2"] == sets["unseen"]["pass@2"] and "all/maj@4" in flat
    assert metric_order(["maj@2", "pass@16", "x", "pass@2", "quality"]) == [
        "quality",
        "pass@2",
        "pass@16",
        "maj@2",
        "x",
    ]


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_prompt_shapes_and_errors(tmp_path):
    lines = [
        {"question": "Janet has 3 ducks...", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"messages": U, "answer": 12.5, "id": "q2", "split": "unseen"},
        {
            "task_id": "HumanEval/0",
            "prompt": "def f():\n",
            "test": "def check(c): pass\n",
            "entry_point": "f",
        },
        {"messages": U, "valid": ["a"]},
    ]
    ps = E.read_prompts(_write(tmp_path / "p.jsonl", lines))
    assert [p.task for p in ps] == ["math", "math", "code", "valid"]
    assert ps[0].messages == [{"role": "user", "content": "Janet has 3 ducks..."}]
    assert (ps[0].id, ps[0].answer, ps[1].answer) == ("0", "7", "12.5")
    assert ps[2].id == "HumanEval/0" and ps[2].code.entry_point == "f"
    assert ps[2].messages[0]["content"] == "def f():\n"
    bad = [
        ({"messages": U, "valid": ["a"], "answer": "1"}, "not 'valid' and 'answer'"),
        ({"question": "q", "answer": "steps #### none"}, "no number after '####'"),
        ({"prompt": "def f():\n", "test": "t"}, "needs 'test' and 'entry_point'"),
        ({"prompt": "def f():\n", "test": "t", "entry_point": "f()"}, "function name"),
        ({"question": ""}, "'question' must be a non-empty string"),
        ({"text": "x"}, "GSM8K's 'question'"),
    ]
    for rec, match in bad:
        with pytest.raises(ValueError, match=f"p2.jsonl:2: .*{match}"):
            E.read_prompts(_write(tmp_path / "p2.jsonl", [lines[0], rec]))


def test_humaneval_samples_file_reads_as_generations(tmp_path):
    ps = [E.EvalPrompt("HumanEval/0", U), E.EvalPrompt("HumanEval/1", U)]
    lines = [
        {"task_id": "HumanEval/0", "completion": "a"},
        {"task_id": "HumanEval/1", "completion": "b"},
        {"task_id": "HumanEval/0", "completion": "c"},
    ]
    assert E.read_generations(_write(tmp_path / "s.jsonl", lines), ps) == [["a", "c"], ["b"]]
    bad = [{"task_id": "HumanEval/0", "completion": 3}]
    with pytest.raises(ValueError, match="s2.jsonl:1: 'completion' must be a string, got 3"):
        E.read_generations(_write(tmp_path / "s2.jsonl", bad), ps)
    with pytest.raises(ValueError, match="prompt_id 'HumanEval/9' is not in the prompts file"):
        E.read_generations(_write(tmp_path / "s3.jsonl", [{"task_id": "HumanEval/9"}]), ps)
