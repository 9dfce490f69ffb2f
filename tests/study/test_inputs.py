"""The study's inputs, without training: every option and every line of the user's JSONL checked
before the first stage (errors name the user's file and line), the input fingerprints (an edited
input reruns exactly the stages that read it; the training stages are stubbed), the generation
budget warning, the evaluation's torch threads, the SFT schedule and lr sweep flags."""

from __future__ import annotations

import json

import pytest

import megatron_gem.study as S
from megatron_gem.study import steps
from megatron_gem.study.cli import main


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def user_data(tmp_path):
    """Tiny valid JSONL inputs of every kind, each with at least 3 lines."""
    chat = [{"role": "user", "content": "Name a colour."}]
    files = {
        "pretrain": _write(
            tmp_path / "pre.jsonl", [{"text": f"the cat {i} is red."} for i in range(6)]
        ),
        "sft": _write(
            tmp_path / "sft.jsonl",
            [{"messages": chat + [{"role": "assistant", "content": c}]} for c in "abc"],
        ),
        "eval": _write(
            tmp_path / "eval.jsonl",
            [{"id": f"p{i}", "messages": chat, "valid": ["red", "blue"]} for i in range(3)],
        ),
        "heldout": _write(tmp_path / "held.jsonl", [{"text": f"a dog {i}."} for i in range(3)]),
    }
    return files


def data_args(files):
    return [f"--{k}-data={p}" for k, p in files.items()]


BAD_LINE = {  # line 3 of each input, malformed as that input's reader sees it
    "pretrain": '{"txt": "no text key"}',
    "sft": '{"messages": [{"role": "bot", "content": "x"}]}',
    "eval": '{"messages": [{"role": "user", "content": "hi"}], "valid": "red"}',
    "heldout": "not json",
}


@pytest.mark.parametrize("which", sorted(BAD_LINE))
def test_a_malformed_line_in_any_input_fails_before_any_stage(tmp_path, capsys, which):
    files = user_data(tmp_path)
    lines = files[which].read_text().splitlines()
    lines[2] = BAD_LINE[which]
    files[which].write_text("\n".join(lines) + "\n")
    out = tmp_path / "study"
    assert main(["run", "--preset", "ci", "--out", str(out), *data_args(files)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: --{which}-data {files[which]}:3: "), err
    assert not out.exists()  # nothing ran, nothing was written


@pytest.mark.parametrize(
    "args, match",
    [
        (["--seeds", "0"], "--seeds: each seed must be an integer >= 1, got 0"),
        (["--seeds", "1.5"], "--seeds: comma-separated integers, got '1.5'"),
        (["--seeds", ""], "--seeds: comma-separated integers"),
        (["--world-seed", "0"], "--world-seed: each seed must be an integer >= 1"),
        (["--betas", "0"], "each beta must be in"),
        (["--betas", "x"], "--betas: comma-separated numbers"),
        (["--sft-lrs", "1e-3,0"], "--sft-lrs: a learning rate must be in"),
        (["--sft-lrs", "1e-3,1e-3"], "--sft-lrs must be distinct"),
        (["--sft-lrs", "nan"], "--sft-lrs: comma-separated numbers"),
        (["--sft-lr", "2"], "--sft-lr: a learning rate must be in"),
        (["--pretrain-lr", "-1"], "--pretrain-lr: a learning rate must be in"),
        (["--sft-min-lr", "0.01"], r"--sft-min-lr must be in \[0, the smallest SFT lr 0.001\]"),
        (["--sft-weight-decay", "-0.1"], "--sft-weight-decay must be >= 0"),
        (["--sft-warmup-iters", "6"], r"--sft-warmup-iters must be in \[0, sft_iters\)"),
        (["--eval-threads", "-1"], "--eval-threads must be an integer >= 0"),
        (["--match-tolerance", "2"], r"--match-tolerance must be in \[0, 1\]"),
        (["--sizes", "t:2x64x4x3"], "num_attention_heads 4 is not divisible by num_query_groups"),
        (["--sizes", "t:2x96x3", "--tp", "2", "--nproc", "2"], "tp 2 must divide"),
        (["--sizes", "t:2x0"], "hidden_size must be a positive integer"),
    ],
)
def test_bad_options_fail_at_once(tmp_path, capsys, args, match):
    import re

    out = tmp_path / "study"
    assert main(["run", "--preset", "ci", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert not out.exists()


def test_bad_sft_lr_decay_style_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--out", str(tmp_path / "s"), "--sft-lr-decay-style", "WSD"])
    assert e.value.code == 2 and "invalid choice: 'WSD'" in capsys.readouterr().err


def _stub_runners(monkeypatch):
    """Every stage but data: create the output folder (the marker goes there), nothing else."""
    for kind in ("prep", "pretrain", "sft", "import", "export", "eval", "report"):
        monkeypatch.setitem(steps.RUNNERS, kind, lambda study, s: s.out.mkdir(parents=True))


def test_inputs_fingerprinted_an_edit_reruns_exactly_what_reads_it(tmp_path, monkeypatch):
    _stub_runners(monkeypatch)
    files = user_data(tmp_path)
    cfg = S.preset("ci", **{f"{k}_data": str(p) for k, p in files.items()})
    study = S.Study(cfg, tmp_path / "study", log=lambda m: None)
    names = [s.name for s in study.stages]
    assert S.run_local(study) == names
    data = study.marker(study.by_name["data"])
    assert data["inputs"]["--sft-data"] == {
        "path": str(files["sft"]),
        "sha256": S.stages.sha256_file(files["sft"]),
    }
    assert set(data["files"]) == {"pretrain.jsonl", "sft.jsonl", "eval.jsonl", "heldout.jsonl"}
    again = lambda: S.run_local(S.Study(cfg, tmp_path / "study", log=lambda m: None))  # noqa: E731
    assert again() == []  # unchanged: nothing reruns
    # The same content rewritten (a new mtime): still nothing (content hashes, not times).
    files["heldout"].write_bytes(files["heldout"].read_bytes())
    assert again() == []
    # Held-out documents: read only by the evaluations (the forgetting), so: data, every
    # evaluation, the report; no tokenizer, training or export.
    with open(files["heldout"], "a") as f:
        f.write(json.dumps({"text": "one more document."}) + "\n")
    evals = [n for n in names if n.startswith("eval:")]
    assert again() == ["data", *evals, "report"]
    assert again() == []
    # SFT data: the tokenizer and the SFT data are made from it: everything but the copy's
    # readers that did not change... i.e. every stage (prep feeds every other stage).
    with open(files["sft"], "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    assert again() == names
    # A malformed edit: refused before anything runs, naming the user's file and line.
    with open(files["eval"], "a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match=rf"^--eval-data {files['eval']}:4: "):
        again()


def test_generation_budget_warns_of_answers_longer_than_max_new_tokens(tmp_path, monkeypatch):
    import megatron_gem.eval as E

    # One token per word: "a b" is 2 tokens; the end token does not count (a response cut at
    # the budget is still scored).
    fmt = E.formats.PlainTemplateFormat(
        lambda t: [len(w) for w in t.split()], lambda ids: "", eos_id=0
    )
    monkeypatch.setattr(E, "megatron_chat_format", lambda tok: fmt)
    chat = [{"role": "user", "content": "q"}]
    path = _write(
        tmp_path / "eval.jsonl",
        [
            {"id": "p1", "messages": chat, "valid": ["a b", "a b c d"]},  # 2 and 4 tokens
            {"id": "p2", "messages": chat, "valid": ["w x y z"]},  # 4: none fits in 3
            {"id": "p3", "messages": chat},  # no valid set: not counted
        ],
    )
    b = steps.generation_budget(None, path, 3)
    assert b == {
        "max_new_tokens": 3,
        "valid_answers": 3,
        "too_long": 2,
        "longest": 4,
        "prompts_with_valid": 2,
        "unreachable_prompts": ["p2"],
    }
    w = steps.budget_warnings(b, 3, "my.jsonl")
    assert w[0].startswith("2 of 3 valid answers (67%) of my.jsonl need more than max_new_tokens")
    assert w[1].startswith("1 of 2 prompts have no valid answer within 3 tokens (ids p2)")
    assert steps.budget_warnings(steps.generation_budget(None, path, 4), 4, "x") == []


def test_one_torch_thread_per_evaluation_by_default():
    import torch

    assert S.preset("default").eval_threads == 1
    before = torch.get_num_threads()
    with steps.eval_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with steps.eval_threads(0):  # 0: torch's default, untouched
        assert torch.get_num_threads() == before


def test_sft_lr_sweep_and_schedule_flags(tmp_path):
    args = ["--sft-lrs", "1e-3,3e-3", "--sft-lr-decay-style", "linear", "--sft-min-lr", "0"]
    args += ["--sft-weight-decay", "0", "--sft-warmup-iters", "2", "--seeds", "3,4"]
    from megatron_gem.study.cli import build_parser, config_from_args

    cfg = config_from_args(
        build_parser().parse_args(["run", "--out", "x", "--preset", "ci", *args])
    )
    assert cfg.lrs() == (1e-3, 3e-3) and cfg.seeds == (3, 4)
    assert [r[0] for r in cfg.runs()] == [
        "ce-lr0.001-s3",
        "gem-b1-lr0.001-s3",
        "ce-lr0.003-s3",
        "gem-b1-lr0.003-s3",
        "ce-lr0.001-s4",
        "gem-b1-lr0.001-s4",
        "ce-lr0.003-s4",
        "gem-b1-lr0.003-s4",
    ]
    study = S.Study(cfg, tmp_path / "s", log=lambda m: None)
    a = steps.train_argv(study, study.by_name["sft:xs:gem-b1-lr0.003-s4"])

    def flag(f):
        return a[a.index(f) + 1]

    assert (flag("--lr"), flag("--min-lr"), flag("--lr-decay-style")) == ("0.003", "0", "linear")
    assert (flag("--weight-decay"), flag("--lr-warmup-iters"), flag("--seed")) == ("0.0", "2", "4")
    p = steps.train_argv(study, study.by_name["pretrain:xs"])  # pre-training keeps its own
    assert (
        p[p.index("--lr-decay-style") + 1] == "cosine" and p[p.index("--weight-decay") + 1] == "0.1"
    )
    ev = study.by_name["eval:xs:ce-lr0.001-s3:3"]
    assert ev.info["lr"] == 1e-3 and "data" in ev.deps


def test_the_sft_preparation_report_is_printed_in_full():
    from types import SimpleNamespace

    from megatron_gem.data.sft import SFTPrepReport

    rep = SFTPrepReport(lines=7, blank=1, kept=3, truncated=1, tokens=90, loss_tokens=20)
    rep.skip("no assistant message", 3)
    rep.skip("no assistant message", 5)
    rep.skip("no assistant token within --seq-length (prompt fills it)", 6)
    logs = []
    steps._log_report(SimpleNamespace(log=logs.append), "SFT data (my.jsonl)", rep.format())
    assert logs == [
        "   SFT data (my.jsonl): read 7 lines (1 blank, ignored)",
        "      kept 3 samples (1 truncated to --seq-length), 90 tokens, 20 with loss",
        "      skipped 3 samples",
        "        2 x no assistant message (lines 3, 5)",
        "        1 x no assistant token within --seq-length (prompt fills it) (lines 6)",
    ]


NEW_OPTIONS = (
    "sft_lrs",
    "sft_lr_decay_style",
    "sft_min_lr",
    "sft_weight_decay",
    "sft_warmup_iters",
    "eval_threads",
    "match_tolerance",
)


def test_a_study_folder_without_the_new_options_is_the_same_study_at_their_defaults(tmp_path):
    out = tmp_path / "s"
    S.Study(S.preset("ci"), out, log=lambda m: None).init_folder()
    stored = json.loads((out / "study.json").read_text())
    for k in NEW_OPTIONS:
        del stored[k]
    (out / "study.json").write_text(json.dumps(stored))
    S.Study(S.preset("ci"), out, log=lambda m: None).init_folder()  # accepted
    with pytest.raises(ValueError, match=r"differs in: sft_lrs\)"):
        S.Study(S.preset("ci", sft_lrs=(1e-3, 2e-3)), out).init_folder()


def test_the_default_preset_is_a_scaling_study():
    """The README's main job (issue 16, must-hold 1): >= 2 sizes x >= 2 seeds x CE and GEM at
    two betas x >= 2 lrs, checkpoints to trace curves, one process per run (2 at a time on 2
    cores); the frontier and matching on the prompts SFT taught."""
    cfg = S.preset("default")
    assert len(cfg.sizes) >= 2 and len(cfg.seeds) >= 2 and len(cfg.lrs()) >= 2
    assert len(cfg.betas) == 2 and 1.0 not in cfg.betas
    assert len(cfg.sft_steps()) >= 4 and (cfg.tp, cfg.nproc) == (1, 1)
    assert cfg.prompt_set == "seen"
    runs = cfg.runs()
    assert len(runs) == len(cfg.seeds) * len(cfg.lrs()) * (1 + len(cfg.betas))
    assert {(m, b, seed, lr) for _, m, b, seed, lr in runs} == {
        (m, b, seed, lr)
        for seed in cfg.seeds
        for lr in cfg.lrs()
        for m, b in [("ce", None), *(("gem", b) for b in cfg.betas)]
    }
    params = [z.num_layers * z.hidden_size**2 for z in cfg.sizes]
    assert params == sorted(set(params))  # distinct sizes, smallest first
