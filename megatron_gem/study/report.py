"""Study reports: results.csv, report.md and PNG plots from a list of run records.

A run record is a flat dict, one per evaluated checkpoint of one SFT run::

    {"method": "gem", "beta": 0.7, "model_size": "tiny", "params": 1.2e6, "seed": 0, "step": 40,
     "all/quality": 0.81, "unseen/effective_valid": 3.2, ..., "forgetting": 0.12}

(``make_record`` builds one from ``evaluation.evaluate``'s result.) Every record is shown: the
CSV has one row per record, the equal-steps table one row per run, and the trade-off curves one
point per saved checkpoint. Nothing is selected or averaged away.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from megatron_gem.eval import flat_metrics
from megatron_gem.study import frontier as F

# Metrics shown in tables and plots, in order; (label, higher is better).
SHOWN = {
    "quality": ("quality (valid fraction)", True),
    "valid_mass": ("valid-set probability mass", True),
    "effective_valid": ("effective no. of valid answers", True),
    "coverage": ("coverage of valid set", True),
    "ngram_diversity": ("n-gram diversity", True),
    "self_bleu_diversity": ("self-BLEU diversity", True),
    "embedding_diversity": ("embedding diversity", True),
}
TOP_LEVEL = {
    "forgetting": ("forgetting (nats/token)", False),
    "heldout_loss": ("held-out loss (nats/token)", False),
}
KEY_COLUMNS = ("method", "beta", "lr", "model_size", "params", "seed", "step")

CSV_FILE, REPORT_FILE = "results.csv", "report.md"
SIZE_PNG, DIVERSITY_PNG, FORGETTING_PNG, FRONTIER_PNG = (
    "metrics_vs_size.png",
    "quality_vs_diversity.png",
    "quality_vs_forgetting.png",
    "frontier.png",
)
TEST_TIME_PNG = "test_time_scaling.png"
# Test-time scaling metrics: "<set>/pass@<k>" and "<set>/maj@<k>" (megatron_gem.eval).
TEST_TIME = {"pass": "pass@k", "maj": "maj@k"}


def make_record(
    method: str,
    beta: float | None,
    model_size: str,
    step: int,
    result: dict,
    params: float | None = None,
    seed: int = 0,
    **extra,
) -> dict:
    """A run record from one ``evaluation.evaluate`` result."""
    return {
        "method": method,
        "beta": beta,
        "model_size": model_size,
        "params": params,
        "seed": seed,
        "step": step,
        **extra,
        **flat_metrics(result),
    }


def method_label(rec: dict) -> str:
    """``CE``, ``GEM β=0.7``; with the lr (``CE lr=0.001``) when the records have several
    (``_check`` stores the label)."""
    return rec.get("label") or F.method_name(rec)


def _check(records: Sequence[dict]) -> list[dict]:
    if not records:
        raise ValueError("write_report: no run records")
    out = []
    for i, r in enumerate(records):
        missing = [k for k in ("method", "model_size", "step") if r.get(k) is None]
        if missing:
            raise ValueError(f"write_report: record {i} lacks {missing} (keys: {sorted(r)})")
        out.append({"beta": None, "lr": None, "params": None, "seed": 0, **r})
    several_lrs = len({r["lr"] for r in out if r["lr"] is not None}) > 1
    for r in out:
        if not r.get("label"):
            lr = f" lr={r['lr']:g}" if several_lrs and r["lr"] is not None else ""
            r["label"] = F.method_name(r) + lr
    return out


def _get(rec: dict, metric: str, prompt_set: str):
    v = rec.get(metric) if metric in TOP_LEVEL else rec.get(f"{prompt_set}/{metric}")
    return (
        float(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else None
    )


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _sizes(records) -> list[str]:
    """Model sizes in increasing params (when every record has params), else first-seen order."""
    sizes = list(dict.fromkeys(r["model_size"] for r in records))
    params = {r["model_size"]: r["params"] for r in records}
    if all(isinstance(params[s], (int, float)) for s in sizes):
        sizes.sort(key=lambda s: params[s])
    return sizes


def _runs(records):
    """{(size, label, seed): [records sorted by step]}"""
    runs = defaultdict(list)
    for r in records:
        runs[(r["model_size"], method_label(r), r["seed"])].append(r)
    for v in runs.values():
        v.sort(key=lambda r: r["step"])
    return runs


def equal_step_records(records: Sequence[dict]) -> tuple[list[dict], dict[str, int | None]]:
    """For each model size, the checkpoint of every run at the largest step that all runs of that
    size reached (None and each run's last checkpoint when they share no step)."""
    records = _check(records)
    runs = _runs(records)
    chosen, steps = [], {}
    for size in _sizes(records):
        mine = {k: v for k, v in runs.items() if k[0] == size}
        common = set.intersection(*({r["step"] for r in v} for v in mine.values()))
        step = max(common) if common else None
        steps[size] = step
        for v in mine.values():
            chosen.append(next(r for r in v if r["step"] == step) if step is not None else v[-1])
    return chosen, steps


def _metrics_present(records, prompt_set):
    m = [k for k in SHOWN if any(_get(r, k, prompt_set) is not None for r in records)]
    return m + [k for k in TOP_LEVEL if any(_get(r, k, prompt_set) is not None for r in records)]


def _label(metric):
    return (SHOWN.get(metric) or TOP_LEVEL[metric])[0]


def _arrow(metric):
    return "↑" if (SHOWN.get(metric) or TOP_LEVEL[metric])[1] else "↓"


# ---- CSV --------------------------------------------------------------------------------------


def results_csv(records: Sequence[dict]) -> str:
    records = _check(records)
    metric_cols = sorted({k for r in records for k in r} - set(KEY_COLUMNS) - {"label"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["label", *KEY_COLUMNS, *metric_cols], lineterminator="\n")
    w.writeheader()
    for r in sorted(
        records, key=lambda r: (str(r["model_size"]), method_label(r), r["seed"], r["step"])
    ):
        w.writerow(
            {
                "label": method_label(r),
                **{k: ("" if r.get(k) is None else r[k]) for k in w.fieldnames[1:]},
            }
        )
    return buf.getvalue()


# ---- Markdown -------------------------------------------------------------------------------


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows
    ]


def _diversity_metric(records, prompt_set, wanted):
    if wanted:
        return wanted
    for m in ("effective_valid", "ngram_diversity", "self_bleu_diversity"):
        if any(_get(r, m, prompt_set) is not None for r in records):
            return m
    return None


def report_markdown(
    records: Sequence[dict],
    prompt_set: str = "all",
    diversity_metric: str | None = None,
    title: str = "CE vs GEM: quality, diversity and forgetting",
    plots: Sequence[str] = (SIZE_PNG, DIVERSITY_PNG, FORGETTING_PNG, FRONTIER_PNG),
    notes: Sequence[str] = (),
    tol: float = F.DEFAULT_TOL,
) -> str:
    """The Markdown report; ``plots``: the PNG file names to link (those that were written);
    ``notes``: lines about the setup (data, learning rate, sampling...) shown under the title."""
    records = _check(records)
    sets = sorted(
        {k.split("/")[0] for r in records for k in r if "/" in k}, key=lambda s: (s != "all", s)
    )
    div = _diversity_metric(records, prompt_set, diversity_metric)
    chosen, steps = equal_step_records(records)
    L = [f"# {title}", ""]
    if notes:
        L += [f"* {n}" for n in notes] + [""]
    L += [
        f"{len(records)} evaluated checkpoints of {len(_runs(records))} runs "
        f"({len(_sizes(records))} model size(s)). Every run and every saved checkpoint appears "
        f"below and in [`{CSV_FILE}`]({CSV_FILE}); nothing is selected.",
        "",
        "All metrics are computed on the **response text only** (the tokens generated after the "
        "prompt; the prompt is never scored or compared). Quality = fraction of samples in the "
        "prompt's valid set; valid-set mass = exact probability of the valid responses; effective "
        "valid answers = exp(entropy) of the model's distribution restricted to the valid set; "
        "coverage = share of the valid set sampled; n-gram diversity = distinct/total n-grams "
        "(n = 1..3) over a prompt's samples; self-BLEU diversity = 1 - BLEU of each sample against "
        "all others; forgetting = held-out pre-training loss after SFT minus before (lower is "
        "better). Means over prompts; ↑ higher is better, ↓ lower is better.",
        "",
    ]
    # Equal steps.
    L += [
        "## Equal-steps comparison",
        "",
        "Each run at the largest step that all runs of its model size reached.",
        "",
    ]
    for s in sets:
        ms = _metrics_present(records, s)
        L += [f"### Prompt set `{s}`", ""]
        header = ["model size", "method", "seed", "step"] + [f"{_label(m)} {_arrow(m)}" for m in ms]
        rows = [
            [r["model_size"], method_label(r), r["seed"], r["step"]] + [_get(r, m, s) for m in ms]
            for r in chosen
        ]
        L += _table(header, rows) + [""]
    no_common = [z for z, st in steps.items() if st is None]
    if no_common:
        L += [
            f"Runs of size(s) {', '.join(map(str, no_common))} share no step: "
            "their last checkpoints are shown.",
            "",
        ]
    if SIZE_PNG in plots:
        L += [f"![metrics vs model size]({SIZE_PNG})", ""]
    # Trade-off curves.
    L += [
        "## Trade-offs across checkpoints",
        "",
        "Learning rate and number of steps move quality, diversity and forgetting together, so the "
        "comparison that matters is along the curves: a method is better only if it reaches more "
        f"diversity (or less forgetting) **at the same quality**. Prompt set `{prompt_set}`.",
        "",
    ]
    for name, alt in (
        (DIVERSITY_PNG, "quality vs diversity"),
        (FORGETTING_PNG, "quality vs forgetting"),
    ):
        if name in plots:
            L += [f"![{alt}]({name})", ""]
    cols = [m for m in ("quality", div, "forgetting") if m]
    runs = _runs(records)
    for size in _sizes(records):
        L += [f"### Model size `{size}`", ""]
        rows = [
            [lab, seed, r["step"]] + [_get(r, m, prompt_set) for m in cols]
            for (z, lab, seed), v in runs.items()
            if z == size
            for r in v
        ]
        L += _table(
            ["method", "seed", "step"] + [f"{_label(m)} {_arrow(m)}" for m in cols], rows
        ) + [""]
    L += frontier_markdown(records, prompt_set, div, tol, plots)
    L += matched_markdown(records, prompt_set, div, tol)
    L += _test_time_section(records, TEST_TIME_PNG in plots)
    return "\n".join(L)


# ---- test-time scaling: pass@k and maj@k against k ----------------------------------------


def test_time_ks(records: Sequence[dict], prompt_set: str, kind: str) -> list[int]:
    """The k of every ``<prompt_set>/<kind>@<k>`` metric in the records, ascending."""
    pre = f"{prompt_set}/{kind}@"
    return sorted(
        {
            int(k[len(pre) :])
            for r in records
            for k in r
            if k.startswith(pre) and k[len(pre) :].isdigit()
        }
    )


def test_time_sets(records: Sequence[dict]) -> list[str]:
    """Prompt sets with pass@k or maj@k: task-group sets (``rare-unseen``...) first, then the
    splits, ``all`` last."""
    sets = {
        k.split("/")[0]
        for r in records
        for k in r
        if "/" in k and k.split("/")[1].split("@")[0] in TEST_TIME and "@" in k
    }
    return sorted(sets, key=lambda s: ("-" not in s, s == "all", s))


def test_time_table(records: Sequence[dict], prompt_set: str) -> tuple[list[str], list[list]]:
    """(header, rows): each run at the equal-steps checkpoint, its pass@k then maj@k for every
    k in the records."""
    chosen, _ = equal_step_records(records)
    cols = [(kind, k) for kind in TEST_TIME for k in test_time_ks(records, prompt_set, kind)]
    header = ["model size", "method", "seed", "step"] + [f"{kind}@{k}" for kind, k in cols]
    rows = [
        [r["model_size"], method_label(r), r["seed"], r["step"]]
        + [_get(r, f"{kind}@{k}", prompt_set) for kind, k in cols]
        for r in chosen
    ]
    return header, rows


def test_time_findings(records: Sequence[dict], prompt_set: str) -> list[str]:
    """Plain sentences on the numbers of ``test_time_table``: per kind, each run's value from
    the smallest to the largest k, which run is highest at each end, and where a run that
    starts below CE ends above it (or the reverse)."""
    chosen, _ = equal_step_records(records)
    out = []
    for kind, name in TEST_TIME.items():
        ks = test_time_ks(records, prompt_set, kind)
        if len(ks) < 2:
            continue
        lo, hi = ks[0], ks[-1]
        for (size, seed), group in _by_size_seed(chosen).items():
            pts = {
                method_label(r): (
                    _get(r, f"{kind}@{lo}", prompt_set),
                    _get(r, f"{kind}@{hi}", prompt_set),
                )
                for r in group
            }
            pts = {lab: v for lab, v in pts.items() if None not in v}
            if not pts:
                continue
            where = f"model size `{size}`, seed {seed}: " if len(_by_size_seed(chosen)) > 1 else ""
            text = (
                f"{where}{name} from k = {lo} to k = {hi}: "
                + ", ".join(f"{lab} {a:.3f} → {b:.3f}" for lab, (a, b) in pts.items())
                + f"; highest at k = {lo}: {_highest(pts, 0)}, at k = {hi}: {_highest(pts, 1)}."
            )
            ce = pts.get("CE")
            if ce:
                flips = [
                    f"{lab} {'overtakes' if a < ce[0] else 'falls behind'} CE"
                    for lab, (a, b) in pts.items()
                    if lab != "CE" and (a - ce[0]) * (b - ce[1]) < 0
                ]
                if flips:
                    text += " Between the two ends " + "; ".join(flips) + "."
            out.append(text)
    return out


def _n_prompts(records, prompt_set: str, metric: str) -> str:
    """ " (N prompts)" from the records' ``n_<metric>`` when they agree, else ""."""
    ns = {r.get(f"{prompt_set}/n_{metric}") for r in records} - {None}
    if len(ns) != 1:
        return ""
    n = ns.pop()
    return f" ({n:g} prompt{'' if n == 1 else 's'})"


def _highest(pts: dict, i: int) -> str:
    """The run(s) with the highest value (equal as shown, to 3 decimals)."""
    top = max(round(v[i], 3) for v in pts.values())
    best = [lab for lab, v in pts.items() if round(v[i], 3) == top]
    return best[0] if len(best) == 1 else " and ".join(best) + " (equal)"


def _by_size_seed(chosen):
    groups = defaultdict(list)
    for r in sorted(chosen, key=lambda r: _labels(chosen).index(method_label(r))):
        groups[(r["model_size"], r["seed"])].append(r)
    return groups


def _test_time_section(records, with_plot: bool) -> list[str]:
    sets = test_time_sets(records)
    if not sets:
        return []
    L = [
        "## Test-time scaling: pass@k and maj@k",
        "",
        "From each prompt's N samples: pass@k = probability that at least one of k samples "
        "drawn from them is valid (the unbiased estimator 1 - C(N-c, k)/C(N, k), c valid); "
        "maj@k = probability that the most frequent answer among k samples is valid (ties to "
        "the answer sampled first). Means over the prompts of each set; each run at the "
        "equal-steps checkpoint. A model that keeps several answers gains more from k in "
        "pass@k; maj@k rises with k only where the right answer is the model's most likely "
        "one.",
        "",
    ]
    if with_plot:
        L += [f"![pass@k and maj@k vs k]({TEST_TIME_PNG})", ""]
    for s in sets:
        L += [f"### Prompt set `{s}`{_n_prompts(records, s, 'pass@1')}", ""]
        L += _table(*test_time_table(records, s)) + [""]
        L += [f"* {t}" for t in test_time_findings(records, s)] + [""]
    return L


def plot_test_time_curves(records, path, sets: Sequence[str] | None = None):
    """pass@k (top row) and maj@k (bottom row) against k (log2 axis), one column per prompt
    set, one line per run at the equal-steps checkpoint."""
    plt = _pyplot()
    records = _check(records)
    sets = list(sets or _plot_sets(records))
    chosen, steps = equal_step_records(records)
    fig, axes = plt.subplots(
        2, len(sets), figsize=(4.4 * len(sets), 7.4), squeeze=False, sharex="col"
    )
    labs = _labels(records)
    sty = _styles(labs)
    multi = len(_by_size_seed(chosen)) > 1
    for col, s in enumerate(sets):
        for row, (kind, name) in enumerate(TEST_TIME.items()):
            ax = axes[row][col]
            ks = test_time_ks(records, s, kind)
            for r in sorted(chosen, key=lambda r: labs.index(method_label(r))):
                pts = [(k, _get(r, f"{kind}@{k}", s)) for k in ks]
                pts = [p for p in pts if p[1] is not None]
                if not pts:
                    continue
                lab = method_label(r) + (f" ({r['model_size']}, seed {r['seed']})" if multi else "")
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    label=lab,
                    mfc="none",
                    mew=1.5,
                    **sty[method_label(r)],
                )
            ax.set_xscale("log", base=2)
            if ks:
                ax.set_xticks(ks, [str(k) for k in ks])
                ax.minorticks_off()
            # from 0, so that small values look small (these sets are a few dozen prompts)
            ax.set_ylim(0, min(1.02, max(0.1, 1.15 * ax.get_ylim()[1])))
            ax.set_title(f"{name}, set '{s}'" + _n_prompts(records, s, f"{kind}@1"), fontsize=11)
            if row == len(TEST_TIME) - 1:
                ax.set_xlabel("k (of the N samples)")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:  # the legend of the panel with the most lines
        h, lab = ax.get_legend_handles_labels()
        if len(h) > len(handles):
            handles, labels = h, lab
    # The title on top, the legend under it: its rows (one line per run, size and seed: 24
    # in the default study) get their own height, so neither covers the other or the panels.
    ncol = min(6, max(1, len(labels)))
    rows = -(-len(labels) // ncol)
    fig.set_figheight(fig.get_figheight() + 0.25 * rows)
    h = fig.get_figheight()
    step_txt = ", ".join(f"{z}: step {st}" for z, st in steps.items())
    fig.suptitle(f"Test-time scaling ({step_txt})", y=1 - 0.1 / h, va="top")
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 1 - 0.45 / h),
        ncol=ncol,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.55 + 0.25 * rows) / h))
    _save(fig, path)


def _plot_sets(records) -> list[str]:
    """The task-group sets when there are any (the embedded world's rare and single-answer
    tasks), else the splits (every test-time set but ``all`` when there are others)."""
    sets = test_time_sets(records)
    groups = [s for s in sets if "-" in s]
    return groups or [s for s in sets if s != "all"] or sets


def _lrs_steps(records, size):
    ce = [r for r in records if r["model_size"] == size and F.method_name(r) == F.REFERENCE]
    lrs = sorted({r["lr"] for r in ce if r.get("lr") is not None})
    return lrs, sorted({r["step"] for r in ce})


def frontier_markdown(records, prompt_set, div, tol=F.DEFAULT_TOL, plots=()) -> list[str]:
    """The frontier section: per size, the verdict, each method's non-dominated checkpoints
    per seed and each non-CE method's distance to CE's frontier per seed."""
    records = _check(records)
    axes_metrics = [m for m in (div, "forgetting") if m]
    axes = {m: F.frontiers(records, m, prompt_set) for m in axes_metrics}
    if not any(a.fronts for v in axes.values() for a in v):
        return []
    matches = F.match_quality(records, prompt_set, axes_metrics, tol)
    words = {m: _label(m).split(" (")[0] for m in axes_metrics}
    L = [
        "## Frontier: the best of each method, pooled over learning rates and steps",
        "",
        "Per model size, method and seed, the **non-dominated checkpoints**: those that no "
        "other checkpoint of the same method beats on both axes (quality ↑ and diversity ↑, or "
        "quality ↑ and forgetting ↓), over every learning rate and step. CE's frontier is "
        "interpolated linearly between its non-dominated checkpoints (flat below its lowest "
        "quality; it does not extend above its highest). A checkpoint lies **beyond** CE's "
        "frontier (same size and seed) if it is better than that line at its own quality, by "
        f"more than {F.NOISE:g}, or has a higher quality than every CE checkpoint. The gain is "
        "the distance to the line at equal quality (+: beyond, −: inside). "
        f"Prompt set `{prompt_set}`.",
        "",
    ]
    if FRONTIER_PNG in plots:
        L += [f"![frontier]({FRONTIER_PNG})", ""]
    for size in _sizes(records):
        lrs, steps = _lrs_steps(records, size)
        mine = [a for v in axes.values() for a in v if a.size == size]
        L += [f"### Model size `{size}`", "", "Verdict:", ""]
        L += [f"* {t}" for t in F.verdict(size, mine, matches, words, tol, lrs, steps)] + [""]
        for a in mine:
            L += [f"#### Quality vs {words[a.y_metric]} {_arrow(a.y_metric)}", ""]
            rows = [
                [
                    m,
                    seed,
                    "; ".join(f"{F.checkpoint_name(p.rec)} ({p.q:.3f}, {p.y:.3f})" for p in f),
                ]
                for (m, seed), f in a.fronts.items()
            ]
            L += _table(["method", "seed", "non-dominated checkpoints (quality, value)"], rows)
            L += [""]
            rows = [
                [
                    m,
                    sb.seed,
                    sb.best_gain,
                    F.checkpoint_name(sb.best.rec) if sb.best else None,
                    f"{sb.n_beyond} of {sb.n_points}",
                    f"{F.checkpoint_name(sb.above.rec)} ({sb.above.q:.3f} > {sb.ce_max_q:.3f})"
                    if sb.above
                    else None,
                ]
                for m, v in a.beyond.items()
                for sb in v
            ]
            if rows:
                L += _table(
                    [
                        "method",
                        "seed",
                        "best gain at equal quality",
                        "at",
                        "checkpoints beyond",
                        "above CE's best quality",
                    ],
                    rows,
                ) + [""]
    return L


def matched_markdown(records, prompt_set, div, tol=F.DEFAULT_TOL) -> list[str]:
    """The quality-matched comparison: each non-CE run's last checkpoint next to CE at the
    same quality (within ``tol``, else interpolated, else none), with the gaps."""
    records = _check(records)
    metrics = [m for m in (div, "forgetting") if m]
    matches = F.match_quality(records, prompt_set, metrics, tol)
    if not matches:
        return []
    L = [
        "## Quality-matched comparison",
        "",
        "The last checkpoint of each non-CE run next to CE of the same size and seed (any "
        f"learning rate and step) at the same quality: the CE checkpoint of closest quality if "
        f"it is within ±{tol:g}; otherwise CE **interpolated** linearly between the two "
        "consecutive checkpoints of one CE run whose qualities bracket it (an estimate, not a "
        "trained model); otherwise no counterpart. A diversity or forgetting gain that "
        "disappears here came from training less, not from the loss.",
        "",
    ]
    rows = []
    for x in matches:
        r = x.rec
        q = _get(r, "quality", prompt_set)
        own = {m: _get(r, m, prompt_set) for m in ("quality", *metrics)}
        ce = x.ce

        def d(m):
            a, b = own.get(m), ce.get(m)
            return None if a is None or b is None else a - b

        rows.append(
            [x.size, x.seed, method_label(r), r["step"], q]
            + [own[m] for m in metrics]
            + [x.kind, x.how if x.kind != "none" else "–", ce.get("quality"), d("quality")]
            + [v for m in metrics for v in (ce.get(m), d(m))]
        )
    L += _table(
        ["model size", "seed", "run", "step", "quality"]
        + [_label(m) for m in metrics]
        + ["CE match", "CE checkpoint(s)", "CE quality", "Δ quality"]
        + [h for m in metrics for h in (f"CE {_label(m)}", f"Δ {_label(m).split(' (')[0]}")],
        rows,
    ) + [""]
    none = sum(x.kind == "none" for x in matches)
    if none:
        L += [f"{none} run(s): no CE checkpoint within tolerance (and none bracketing).", ""]
    return L


# ---- plots ----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10}
    )
    return plt


def _colours(labels):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
_LINES = ("-", "--", "-.", ":")


def _styles(labels):
    """Colour, marker, line style and marker size per method: identical results (e.g. GEM at
    beta = 1 and CE) stay visible as nested markers instead of hiding each other."""
    cols = _colours(labels)
    return {
        lab: dict(
            color=cols[lab],
            marker=_MARKERS[i % len(_MARKERS)],
            ls=_LINES[i % len(_LINES)],
            ms=max(4.0, 9.0 - 1.5 * i),
        )
        for i, lab in enumerate(labels)
    }


def _min_span(ax, metric):
    """Keep tiny differences from filling the axis: at least 0.1 (0.5 for counts) of y range."""
    span = 0.5 if metric == "effective_valid" else 0.1
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (hi + lo) / 2
        ax.set_ylim(mid - span / 2, mid + span / 2)


def _labels(records):
    # CE first, then the others by beta.
    labs = {
        method_label(r): (
            F.method_name(r) != "CE",
            str(r["method"]),
            r.get("beta") or 0,
            r.get("lr") or 0,
        )
        for r in records
    }
    return sorted(labs, key=lambda k: labs[k])


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def plot_metrics_vs_size(records, path, prompt_set="all"):
    plt = _pyplot()
    records = _check(records)
    chosen, steps = equal_step_records(records)
    ms = _metrics_present(records, prompt_set)
    sizes = _sizes(records)
    params = {r["model_size"]: r["params"] for r in records}
    numeric = all(isinstance(params[s], (int, float)) and params[s] > 0 for s in sizes)
    xs = {s: (params[s] if numeric else i) for i, s in enumerate(sizes)}
    ncol = min(3, len(ms))
    nrow = math.ceil(len(ms) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.6 * nrow + 0.6), squeeze=False)
    sty = _styles(_labels(records))
    for ax, m in zip(axes.flat, ms):
        for lab in _labels(records):
            pts = [
                (xs[r["model_size"]], _get(r, m, prompt_set))
                for r in chosen
                if method_label(r) == lab
            ]
            pts = [p for p in pts if p[1] is not None]
            if not pts:
                continue
            # Every seed as a point; the line through the per-size means.
            ax.scatter(
                [p[0] for p in pts], [p[1] for p in pts], color=sty[lab]["color"], s=14, alpha=0.5
            )
            by_x = defaultdict(list)
            for x, y in pts:
                by_x[x].append(y)
            xm = sorted(by_x)
            ax.plot(
                xm,
                [sum(by_x[x]) / len(by_x[x]) for x in xm],
                label=lab,
                mfc="none",
                mew=1.5,
                **sty[lab],
            )
        _min_span(ax, m)
        ax.set_title(f"{_label(m)} {_arrow(m)}")
        ax.set_xlabel("model parameters" if numeric else "model size")
        ax.set_ylabel(_label(m).split(" (")[0])
        if numeric:
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks([xs[s] for s in sizes], [f"{s}\n{_human(params[s])}" for s in sizes])
            lo, hi = min(xs.values()), max(xs.values())
            ax.set_xlim(lo / 1.4, hi * 1.4)
        else:
            ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
            ax.set_xlim(-0.5, len(sizes) - 0.5)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ms) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=min(6, len(labels)),
        frameon=False,
        bbox_to_anchor=(0.5, 1.0),
    )
    step_txt = ", ".join(f"{s}: {st}" for s, st in steps.items())
    fig.suptitle(
        f"Metrics vs model size at equal steps ({step_txt}); prompt set '{prompt_set}'",
        y=1 - 0.45 / fig.get_figheight(),
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    _save(fig, path)


def plot_tradeoff(records, path, x_metric, prompt_set="all", title=""):
    plt = _pyplot()
    records = _check(records)
    sizes = _sizes(records)
    fig, axes = plt.subplots(
        1, len(sizes), figsize=(max(7.0, 5.2 * len(sizes)), 5.0), squeeze=False
    )
    sty = _styles(_labels(records))
    runs = _runs(records)
    for ax, size in zip(axes.flat, sizes):
        seen_lab = set()
        for lab in _labels(records):
            for (z, l2, seed), v in runs.items():
                if z != size or l2 != lab:
                    continue
                pts = [
                    (_get(r, x_metric, prompt_set), _get(r, "quality", prompt_set), r["step"])
                    for r in v
                ]
                pts = [p for p in pts if p[0] is not None and p[1] is not None]
                if not pts:
                    continue
                col = sty[lab]["color"]
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    mfc="none",
                    mew=1.5,
                    label=None if lab in seen_lab else lab,
                    **sty[lab],
                )
                seen_lab.add(lab)
                ax.scatter([pts[-1][0]], [pts[-1][1]], color=col, s=60, marker="*", zorder=3)
                for x, y, st in (pts[0], pts[-1]):
                    ax.annotate(
                        str(st),
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=8,
                        color=col,
                    )
        ax.margins(0.12)
        _min_span(ax, "quality")
        ax.set_title(f"model size {size}")
        ax.set_xlabel(f"{_label(x_metric)} {_arrow(x_metric)}")
        ax.set_ylabel("quality (valid fraction) ↑")
        ax.grid(alpha=0.3)
        if seen_lab:
            ax.legend(loc="best")
    fig.suptitle(
        f"{title}, prompt set '{prompt_set}'\n"
        "one line per run through its checkpoints (numbers: step; ★ last)"
    )
    fig.tight_layout()
    _save(fig, path)


def plot_frontier(records, path, axes_metrics, prompt_set="all"):
    """One panel per (axis, size): every checkpoint faint, each method's non-dominated
    checkpoints per seed joined (CE's line is the frontier the others are compared with)."""
    plt = _pyplot()
    records = _check(records)
    sizes = _sizes(records)
    fig, grid = plt.subplots(
        len(axes_metrics),
        len(sizes),
        figsize=(max(7.0, 5.2 * len(sizes)), 4.6 * len(axes_metrics)),
        squeeze=False,
    )
    methods = sorted({F.method_name(r) for r in records}, key=lambda m: (m != F.REFERENCE, m))
    sty = _styles(methods)
    for row, metric in enumerate(axes_metrics):
        for col, axis in enumerate(F.frontiers(records, metric, prompt_set)):
            ax = grid[row][sizes.index(axis.size)] if axis.size in sizes else grid[row][col]
            for m in methods:
                pts = F.points(
                    [r for r in records if r["model_size"] == axis.size and F.method_name(r) == m],
                    metric,
                    prompt_set,
                )
                ax.scatter(
                    [p.y for p in pts], [p.q for p in pts], color=sty[m]["color"], s=12, alpha=0.3
                )
                first = True
                for (m2, _), front in axis.fronts.items():
                    if m2 != m:
                        continue
                    ax.plot(
                        [p.y for p in front],
                        [p.q for p in front],
                        mfc="none",
                        mew=1.5,
                        label=m if first else None,
                        **sty[m],
                    )
                    first = False
            ax.margins(0.12)
            _min_span(ax, "quality")
            ax.set_title(f"model size {axis.size}")
            ax.set_xlabel(f"{_label(metric)} {_arrow(metric)}")
            ax.set_ylabel("quality (valid fraction) ↑")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
    fig.suptitle(
        f"Frontier per method and seed, prompt set '{prompt_set}'\n"
        "(non-dominated checkpoints over lr and steps; faint: every checkpoint)"
    )
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path):
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---- everything -----------------------------------------------------------------------------


def write_report(
    records: Sequence[dict],
    out_dir: str | os.PathLike,
    prompt_set: str = "all",
    diversity_metric: str | None = None,
    overwrite: bool = False,
    title: str = "CE vs GEM: quality, diversity and forgetting",
    notes: Sequence[str] = (),
    tol: float = F.DEFAULT_TOL,
) -> dict[str, Path]:
    """Write results.csv, report.md and the PNG plots into out_dir; returns their paths.

    ``prompt_set`` picks the set for the plots and curves (tables show every set);
    ``diversity_metric`` the x axis of the quality-vs-diversity plot (default: effective number of
    valid answers when present, else n-gram diversity).
    """
    records = _check(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out / CSV_FILE,
        "report": out / REPORT_FILE,
        "metrics_vs_size": out / SIZE_PNG,
        "quality_vs_diversity": out / DIVERSITY_PNG,
        "quality_vs_forgetting": out / FORGETTING_PNG,
        "frontier": out / FRONTIER_PNG,
    }
    clash = [str(p) for p in [*paths.values(), out / TEST_TIME_PNG] if p.exists()]
    if clash and not overwrite:
        raise FileExistsError(f"write_report: {', '.join(clash)} exist(s); pass overwrite=True")
    if not any(k.startswith(f"{prompt_set}/") for r in records for k in r):
        raise ValueError(f"write_report: prompt_set {prompt_set!r} is in no record")
    div = _diversity_metric(records, prompt_set, diversity_metric)
    if div and div not in SHOWN:
        raise ValueError(f"write_report: diversity_metric {div!r} is not one of {sorted(SHOWN)}")
    has_quality = any(_get(r, "quality", prompt_set) is not None for r in records)
    has_forgetting = any(_get(r, "forgetting", prompt_set) is not None for r in records)
    plot_metrics_vs_size(records, paths["metrics_vs_size"], prompt_set)
    if div and has_quality:
        plot_tradeoff(
            records, paths["quality_vs_diversity"], div, prompt_set, "Quality vs diversity"
        )
    else:
        paths.pop("quality_vs_diversity")
    if has_forgetting and has_quality:
        plot_tradeoff(
            records,
            paths["quality_vs_forgetting"],
            "forgetting",
            prompt_set,
            "Quality vs forgetting",
        )
    else:
        paths.pop("quality_vs_forgetting")
    front_axes = [m for m, ok in ((div, div and has_quality), ("forgetting", has_forgetting)) if ok]
    if has_quality and front_axes:
        plot_frontier(records, paths["frontier"], front_axes, prompt_set)
    else:
        paths.pop("frontier")
    if test_time_sets(records):
        paths["test_time"] = out / TEST_TIME_PNG
        plot_test_time_curves(records, paths["test_time"])
    pngs = [p.name for k, p in paths.items() if p.suffix == ".png"]
    for key, text in (
        ("csv", results_csv(records)),
        ("report", report_markdown(records, prompt_set, div, title, pngs, notes, tol)),
    ):
        tmp = paths[key].with_name(paths[key].name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, paths[key])
    return paths
