"""The honest frontier and quality matching (megatron_gem.study.frontier) on hand-made result
tables; every expected number is computed by hand in the comments."""

import csv
import io

import pytest

from megatron_gem.study import frontier as F
from megatron_gem.study import report as R


def rec(method, beta, lr, step, q, div, forg, seed=1, size="m"):
    return {
        "method": method,
        "beta": beta,
        "lr": lr,
        "model_size": size,
        "params": 1000,
        "seed": seed,
        "step": step,
        "forgetting": forg,
        "unseen/quality": q,
        "unseen/effective_valid": div,
    }


def ce(seed=1):
    # (quality, effective valid, forgetting); lr 3e-3 step 10 is dominated on both axes by
    # lr 1e-3 step 20 (0.6 >= 0.5, 6 >= 5, 0.4 <= 0.5).
    return [
        rec("ce", None, 1e-3, 10, 0.40, 8.0, 0.20, seed),
        rec("ce", None, 1e-3, 20, 0.60, 6.0, 0.40, seed),
        rec("ce", None, 3e-3, 10, 0.50, 5.0, 0.50, seed),
        rec("ce", None, 3e-3, 20, 0.80, 2.0, 0.90, seed),
    ]


def gem_beyond(seed=1):
    return [
        # CE's diversity line at 0.5: 8 + (0.5-0.4)/(0.6-0.4) * (6-8) = 7.0 -> gain +0.5;
        # forgetting line at 0.5: 0.2 + 0.5 * (0.4-0.2) = 0.3 -> gain 0.3 - 0.25 = +0.05.
        rec("gem", 0.7, 1e-3, 10, 0.50, 7.5, 0.25, seed),
        # at 0.7: diversity 6 + 0.5 * (2-6) = 4.0 -> -1.0; forgetting 0.4 + 0.5 * 0.5 = 0.65
        # -> 0.65 - 0.8 = -0.15.
        rec("gem", 0.7, 1e-3, 20, 0.70, 3.0, 0.80, seed),
        # quality 0.85 > CE's best 0.8: above CE's frontier (no line there).
        rec("gem", 0.7, 3e-3, 20, 0.85, 1.0, 1.00, seed),
    ]


def gem_inside(seed=2):
    return [
        # at 0.5: 7.0 - 6.5 -> -0.5; forgetting 0.3 - 0.35 = -0.05
        rec("gem", 0.7, 1e-3, 10, 0.50, 6.5, 0.35, seed),
        # exactly CE's checkpoint lr 1e-3 step 20: gain 0 -> on the frontier, not beyond
        rec("gem", 0.7, 1e-3, 20, 0.60, 6.0, 0.40, seed),
    ]


def test_pareto_and_the_interpolated_frontier():
    pts = F.points(ce(), "effective_valid", "unseen")
    front = F.pareto(pts, lower=False)
    assert [(p.q, p.y) for p in front] == [(0.4, 8.0), (0.6, 6.0), (0.8, 2.0)]
    fr = F.pareto(F.points(ce(), "forgetting", "unseen"), lower=True)
    assert [(p.q, p.y) for p in fr] == [(0.4, 0.2), (0.6, 0.4), (0.8, 0.9)]
    assert F.frontier_at(front, 0.5, False) == pytest.approx(7.0)
    assert F.frontier_at(front, 0.7, False) == pytest.approx(4.0)
    assert F.frontier_at(front, 0.3, False) == 8.0  # flat below the lowest quality
    assert F.frontier_at(front, 0.81, False) is None  # nothing above the highest
    assert F.frontier_at(fr, 0.7, True) == pytest.approx(0.65)
    # Equal points: one is kept; a point equal on one axis and worse on the other is dropped.
    twice = F.points(
        [
            ce()[0],
            dict(ce()[0], step=30),
            dict(ce()[0], step=40, **{"unseen/effective_valid": 7.0}),
        ],
        "effective_valid",
        "unseen",
    )
    assert [p.rec["step"] for p in F.pareto(twice, False)] == [10]


def test_gem_beyond_ce_in_one_seed_of_two():
    recs = ce(1) + ce(2) + gem_beyond(1) + gem_inside(2)
    (div,) = F.frontiers(recs, "effective_valid", "unseen")
    (forg,) = F.frontiers(recs, "forgetting", "unseen")
    s1, s2 = div.beyond["GEM β=0.7"]
    assert s1.seed == 1 and s1.best_gain == pytest.approx(0.5)
    assert (s1.best.rec["lr"], s1.best.rec["step"]) == (1e-3, 10)
    assert s1.n_beyond == 2 and s1.n_points == 3  # +0.5, and 0.85 above CE's 0.8
    assert s1.above.q == 0.85 and s1.ce_max_q == 0.8 and s1.is_beyond
    assert s2.best_gain == pytest.approx(0.0) and s2.n_beyond == 0 and not s2.is_beyond
    f1, f2 = forg.beyond["GEM β=0.7"]
    assert f1.best_gain == pytest.approx(0.05) and f1.n_beyond == 2
    assert f2.best_gain == pytest.approx(0.0) and not f2.is_beyond
    # GEM's own frontier in seed 1 keeps all three checkpoints (each has the most diversity
    # at its quality); in seed 2 step 20 (0.6, 6.0) and step 10 (0.5, 6.5).
    assert len(div.fronts[("GEM β=0.7", 1)]) == 3
    assert [p.rec["step"] for p in div.fronts[("GEM β=0.7", 2)]] == [10, 20]
    words = {"effective_valid": "effective valid answers", "forgetting": "forgetting"}
    text = F.verdict("m", [div, forg], [], words, lrs=[1e-3, 3e-3], steps=[10, 20])
    assert text[0] == "CE's frontier pools learning rates 0.001, 0.003 and steps 10, 20."
    assert text[1] == (
        "GEM β=0.7 lies beyond CE's frontier in 1 of 2 seeds; best gain at equal quality per "
        "seed 0.000 to +0.500 (more effective valid answers than CE's frontier); in 1 seed(s) "
        "a checkpoint has a higher quality than every CE checkpoint: not consistent across "
        "seeds, no claim."
    )
    assert "0.000 to +0.050 (less forgetting than CE's frontier)" in text[2]


def test_gem_beyond_in_every_seed_and_inside_in_every_seed():
    beyond = [r for r in gem_beyond(1) if r["step"] == 10 and r["lr"] == 1e-3]
    recs = ce(1) + ce(2) + beyond + [dict(beyond[0], seed=2)]
    (div,) = F.frontiers(recs, "effective_valid", "unseen")
    assert [s.best_gain for s in div.beyond["GEM β=0.7"]] == pytest.approx([0.5, 0.5])
    s = F.axis_sentence(div, "GEM β=0.7", "effective valid answers")
    assert s.startswith("GEM β=0.7 lies beyond CE's frontier in every seed (2 of 2)")
    assert s.endswith("supported at this size, within the learning rates and steps tried.")
    # Inside in both seeds: (0.5, 6.5) is 0.5 below CE's line in each.
    inside = [r for r in gem_inside(2) if r["step"] == 10]
    recs = ce(1) + ce(2) + [dict(inside[0], seed=1), inside[0]]
    (div,) = F.frontiers(recs, "effective_valid", "unseen")
    assert [s.best_gain for s in div.beyond["GEM β=0.7"]] == pytest.approx([-0.5, -0.5])
    s = F.axis_sentence(div, "GEM β=0.7", "effective valid answers")
    assert s == (
        "GEM β=0.7 is on or inside CE's frontier in every seed (2); best gain at equal quality "
        "per seed -0.500 (more effective valid answers than CE's frontier): no advantage over "
        "CE along CE's checkpoints."
    )
    # GEM at beta = 1 with CE's numbers up to float noise is not "beyond".
    same = [dict(r, method="gem", beta=1.0) for r in ce(1)]
    same[1]["unseen/effective_valid"] += 1e-9
    (div,) = F.frontiers(ce(1) + same, "effective_valid", "unseen")
    assert not div.beyond["GEM β=1"][0].is_beyond


def matching_table():
    return ce(1) + [
        # run lr 5e-4: last quality 0.61; CE lr 1e-3 step 20 has 0.60 (|0.01| <= 0.02)
        rec("gem", 0.7, 5e-4, 10, 0.30, 9.0, 0.10),
        rec("gem", 0.7, 5e-4, 20, 0.61, 6.5, 0.35),
        # run lr 1e-3: last quality 0.70; CE's nearest are 0.1 away; CE run lr 3e-3 goes from
        # 0.5 (step 10) to 0.8 (step 20): t = (0.7-0.5)/0.3 = 2/3, effective valid
        # 5 + 2/3 * (2-5) = 3.0, forgetting 0.5 + 2/3 * (0.9-0.5) = 0.7667
        rec("gem", 0.7, 1e-3, 20, 0.70, 3.5, 0.60),
        # run lr 3e-3: last quality 0.95; CE reaches 0.8 at most: no counterpart
        rec("gem", 0.7, 3e-3, 20, 0.95, 1.0, 1.00),
    ]


def test_quality_matching_within_tolerance_interpolated_or_none():
    m = F.match_quality(matching_table(), "unseen", ["effective_valid", "forgetting"])
    by_lr = {x.rec["lr"]: x for x in m}
    assert len(m) == 3
    a = by_lr[5e-4]
    assert a.kind == "checkpoint" and a.how == "lr 0.001 step 20"
    assert a.ce == {"quality": 0.6, "effective_valid": 6.0, "forgetting": 0.4}
    b = by_lr[1e-3]
    assert b.kind == "interpolated" and b.how == "lr 0.003 steps 10-20"
    assert b.ce["quality"] == pytest.approx(0.7)
    assert b.ce["effective_valid"] == pytest.approx(3.0)
    assert b.ce["forgetting"] == pytest.approx(0.5 + 0.4 * 2 / 3)
    c = by_lr[3e-3]
    assert c.kind == "none" and c.ce == {} and c.how == "no CE checkpoint within tolerance"
    # A wider tolerance matches 0.70 to a checkpoint: 0.6 (0.1 - float noise) beats 0.8.
    wide = F.match_quality(matching_table(), "unseen", ["effective_valid"], tol=0.1)
    assert {x.rec["lr"]: x.how for x in wide}[1e-3] == "lr 0.001 step 20"
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        F.match_quality(matching_table(), "unseen", [], tol=-1)


def test_report_shows_frontier_matching_and_the_lr():
    recs = matching_table()
    md = R.report_markdown(recs, prompt_set="unseen")
    front = md.split("## Frontier")[1].split("## Quality-matched")[0]
    assert "Verdict:" in front and "GEM β=0.7 lies beyond CE's frontier in the one seed" in front
    assert "one seed, an observation, not a result." in front
    qm = md.split("## Quality-matched comparison")[1]
    assert "| m | 1 | GEM β=0.7 lr=0.003 | 20 | 0.950 | 1.000 | 1.000 | none | – |" in qm
    assert (
        "| m | 1 | GEM β=0.7 lr=0.0005 | 20 | 0.610 | 6.500 | 0.350 | checkpoint | "
        "lr 0.001 step 20 | 0.600 | 0.010 | 6.000 | 0.500 | 0.400 | -0.050 |"
    ) in qm
    assert "| interpolated | lr 0.003 steps 10-20 | 0.700 | 0.000 | 3.000 | 0.500 |" in qm
    assert "no CE checkpoint within tolerance" in qm
    rows = list(csv.DictReader(io.StringIO(R.results_csv(recs))))
    assert {(r["label"], r["lr"]) for r in rows} >= {("CE lr=0.001", "0.001")}
    # One lr: labels without it, and the verdict says CE was not tuned over lrs.
    one = [r for r in ce(1) + gem_beyond(1) if r["lr"] == 1e-3]
    md = R.report_markdown(one, prompt_set="unseen")
    assert "| GEM β=0.7 | 1 |" in md and "Only one learning rate" in md
