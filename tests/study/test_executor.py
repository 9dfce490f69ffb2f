"""The local executor with ``jobs`` > 1 (stubbed stages, no training): independent training
runs overlap, no stage starts before its inputs are done, every stage is marked; a failing
stage stops the study with its error, is not marked, and nothing after it starts."""

from __future__ import annotations

import threading
import time

import pytest

import megatron_gem.study as S
from megatron_gem.study import executors, steps
from megatron_gem.study.cli import main


def _stub(monkeypatch, fail: str | None = None, hold: float = 0.0):
    """Every stage but data: record (start, end, thread) and create the output folder. Training
    stages wait until another training stage runs (at most ``hold`` s), so an overlap is seen."""
    spans: dict[str, tuple[float, float, str]] = {}
    training = threading.Semaphore(0)

    def run(study, s):
        t0 = time.monotonic()
        if s.kind in executors.SUBPROCESS_KINDS:
            training.release()
            time.sleep(hold)
        if s.name == fail:
            spans["failed at"] = (time.monotonic(), 0.0, "")
            raise RuntimeError(f"stage {s.name}: training failed (exit 1); log {s.slug}.log")
        s.out.mkdir(parents=True)
        spans[s.name] = (t0, time.monotonic(), threading.current_thread().name)

    for kind in ("prep", "pretrain", "sft", "import", "export", "eval", "report"):
        monkeypatch.setitem(steps.RUNNERS, kind, run)
    return spans


def test_two_jobs_overlap_training_and_respect_dependencies(tmp_path, monkeypatch):
    spans = _stub(monkeypatch, hold=0.2)
    study = S.Study(S.preset("ci"), tmp_path / "study", log=lambda m: None)
    ran = S.run_local(study, jobs=2)
    assert sorted(ran) == sorted(s.name for s in study.stages)
    assert study.pending() == []
    for s in study.stages:  # no stage started before each of its inputs had finished
        if s.name in spans:
            for d in s.deps:
                if d in spans:
                    assert spans[d][1] <= spans[s.name][0], (d, s.name)
    # the two sizes' pre-training (and SFT runs) ran at the same time, in worker threads
    pre = [spans[f"pretrain:{z.name}"] for z in study.cfg.sizes]
    assert pre[0][0] < pre[1][1] and pre[1][0] < pre[0][1]
    main_thread = threading.main_thread().name
    assert {spans[n][2] for n in spans if n.startswith(("pretrain:", "sft:"))} != {main_thread}
    assert {spans[n][2] for n in spans if n.startswith(("eval:", "export:"))} == {main_thread}
    assert S.run_local(S.Study(study.cfg, study.out, log=lambda m: None), jobs=2) == []


def test_a_failing_stage_stops_the_study_unmarked(tmp_path, monkeypatch):
    bad = "sft:xs:ce"
    spans = _stub(monkeypatch, fail=bad, hold=0.2)
    logs: list[str] = []
    study = S.Study(S.preset("ci"), tmp_path / "study", log=logs.append)
    with pytest.raises(RuntimeError, match=f"stage {bad}: training failed.*sft-xs-ce.log"):
        S.run_local(study, jobs=2)
    assert study.marker(study.by_name[bad]) is None and not study.done(study.by_name[bad])
    assert not any(n.startswith(("export:xs:ce:", "eval:xs:ce:")) for n in spans)
    assert "report" not in spans
    failed_at = spans.pop("failed at")[0]
    assert all(t0 <= failed_at for t0, _, _ in spans.values())  # nothing new after it
    for name in spans:  # what did run finished and is marked done
        assert study.done(study.by_name[name]), name
    assert any("stopped: stage sft:xs:ce: training failed" in m for m in logs)
    # run again (the stage fixed): only what is missing runs
    _stub(monkeypatch)
    again = S.run_local(S.Study(study.cfg, study.out, log=lambda m: None), jobs=2)
    assert bad in again and not set(again) & set(spans)


def test_jobs_must_be_positive(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "s"), "--preset", "ci", "--jobs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --jobs must be an integer >= 1, got 0"
    assert not (tmp_path / "s").exists()
