"""Study report: every record in the CSV/tables/plots, equal-step choice, quality matching, PNGs."""

import csv
import io
import re

import pytest

from megatron_gem.study import report as R


def rec(method, beta, size, step, q, div, forg, seed=0, params=None, sets=("all", "unseen")):
    r = {
        "method": method,
        "beta": beta,
        "model_size": size,
        "params": params,
        "seed": seed,
        "step": step,
        "forgetting": forg,
        "heldout_loss": 2.0 + forg,
    }
    for s in sets:
        r[f"{s}/quality"] = q
        r[f"{s}/effective_valid"] = div
        r[f"{s}/ngram_diversity"] = div / 10
    return r


def study():
    out = []
    for size, params in (("s1", 1.5e5), ("s2", 6e5)):
        for k, step in enumerate((10, 20, 30)):
            out.append(
                rec("ce", None, size, step, 0.5 + 0.15 * k, 4 - k, 0.1 * (k + 1), params=params)
            )
            out.append(
                rec("gem", 0.7, size, step, 0.4 + 0.15 * k, 6 - k, 0.05 * (k + 1), params=params)
            )
    out.append(rec("gem", 0.7, "s2", 40, 0.9, 2.5, 0.3, params=6e5))  # GEM ran longer on s2
    return out


def test_labels_and_equal_steps():
    assert R.method_label({"method": "ce", "beta": None}) == "CE"
    assert R.method_label({"method": "gem", "beta": 0.7}) == "GEM β=0.7"
    chosen, steps = R.equal_step_records(study())
    assert steps == {"s1": 30, "s2": 30}  # s2's GEM step 40 is not shared by CE
    assert sorted((r["model_size"], R.method_label(r), r["step"]) for r in chosen) == [
        ("s1", "CE", 30),
        ("s1", "GEM β=0.7", 30),
        ("s2", "CE", 30),
        ("s2", "GEM β=0.7", 30),
    ]
    recs = [rec("ce", None, "x", 5, 0.5, 1, 0.1), rec("gem", 1.0, "x", 7, 0.5, 1, 0.1)]
    chosen, steps = R.equal_step_records(recs)
    assert steps == {"x": None} and {r["step"] for r in chosen} == {5, 7}


def test_csv_has_every_record():
    recs = study()
    rows = list(csv.DictReader(io.StringIO(R.results_csv(recs))))
    assert len(rows) == len(recs)
    got = {(r["model_size"], r["method"], r["step"]): float(r["all/quality"]) for r in rows}
    for r in recs:
        assert got[(r["model_size"], r["method"], str(r["step"]))] == pytest.approx(
            r["all/quality"]
        )
    assert rows[0]["beta"] == "" and "GEM β=0.7" in {r["label"] for r in rows}


def test_markdown_shows_every_run_and_checkpoint():
    recs = study()
    md = R.report_markdown(recs, prompt_set="unseen", notes=["lr 1e-3 for every run"])
    assert "response text only" in md and "* lr 1e-3 for every run" in md
    eq = md.split("## Equal-steps comparison")[1].split("## Trade-offs")[0]
    for s in ("all", "unseen"):
        block = eq.split(f"### Prompt set `{s}`")[1].split("###")[0]
        assert len(re.findall(r"^\| s\d \|", block, re.M)) == 4  # one row per run
    curves = md.split("## Trade-offs across checkpoints")[1].split("## Frontier")[0]
    assert len(re.findall(r"^\| (CE|GEM β=0.7) \|", curves, re.M)) == len(
        recs
    )  # one row per checkpoint
    # Quality-matched (tolerance 0.02): GEM's last checkpoint on s1 has quality 0.7, CE has
    # 0.65 (step 20) and 0.8 (step 30): none within 0.02, so CE is interpolated between them:
    # t = 1/3, effective valid 3 - 1/3 = 2.667, forgetting 0.2 + 0.1/3 = 0.233.
    qm = md.split("## Quality-matched comparison")[1]
    assert re.search(
        r"\| s1 \| 0 \| GEM β=0.7 \| 30 \| 0.700 \| 4.000 \| 0.150 \| interpolated "
        r"\| steps 20-30 \| 0.700 \| 0.000 \| 2.667 \| 1.333 \| 0.233 \| -0.083 \|",
        qm,
    )
    # s2: GEM's last (step 40) has quality 0.9, above CE's best 0.8: no counterpart.
    assert re.search(r"\| s2 \| 0 \| GEM β=0.7 \| 40 \| 0.900 \| 2.500 \| 0.300 \| none \|", qm)


def test_write_report_files_and_plots(tmp_path):
    paths = R.write_report(study(), tmp_path / "out", prompt_set="unseen")
    assert set(paths) == {
        "csv",
        "report",
        "metrics_vs_size",
        "quality_vs_diversity",
        "quality_vs_forgetting",
        "frontier",
    }
    for key in ("metrics_vs_size", "quality_vs_diversity", "quality_vs_forgetting", "frontier"):
        data = paths[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
        assert f"]({paths[key].name})" in paths["report"].read_text()
    assert not list((tmp_path / "out").glob("*.tmp*"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        R.write_report(study(), tmp_path / "out")
    # Without forgetting or valid sets: the plots that cannot be drawn are neither written nor
    # linked.
    recs = [
        {
            k: v
            for k, v in r.items()
            if k not in ("forgetting", "heldout_loss") and "quality" not in k
        }
        for r in study()
        if r["model_size"] == "s1"
    ]
    paths = R.write_report(recs, tmp_path / "bare", diversity_metric="ngram_diversity")
    assert set(paths) == {"csv", "report", "metrics_vs_size"}
    assert "quality_vs" not in paths["report"].read_text()
    assert "frontier" not in paths["report"].read_text().lower()


def test_bad_input():
    with pytest.raises(ValueError, match="no run records"):
        R.write_report([], "unused")
    with pytest.raises(ValueError, match=r"record 0 lacks \['step'\]"):
        R.results_csv([{"method": "ce", "model_size": "s"}])
    with pytest.raises(ValueError, match="prompt_set 'seen'"):
        R.write_report(study(), "unused-dir-never-written", prompt_set="seen")


def test_report_with_quality_and_forgetting_but_no_diversity(tmp_path):
    """Records with quality and forgetting but no diversity metric at all: the frontier and the
    matching are drawn on forgetting alone (once a crash: the diversity axis was assumed)."""
    recs = [
        {k: v for k, v in r.items() if "diversity" not in k and "effective_valid" not in k}
        for r in study()
    ]
    paths = R.write_report(recs, tmp_path / "out", prompt_set="unseen")
    assert set(paths) == {"csv", "report", "metrics_vs_size", "quality_vs_forgetting", "frontier"}
    text = paths["report"].read_text()
    assert "#### Quality vs forgetting" in text and "Quality vs effective" not in text
    assert "## Quality-matched comparison" in text
