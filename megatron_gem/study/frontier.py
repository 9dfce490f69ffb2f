"""The honest frontier and quality matching of a study's result records (pure Python, no plots).

Records are the report's run records (``report.make_record``): one dict per evaluated
checkpoint with ``method``, ``beta``, ``model_size``, ``seed``, ``step``, optionally ``lr``, and
the metrics (``"<prompt set>/<metric>"``, ``forgetting`` at top level).

* **Frontier**: per model size, method and seed, the checkpoints no other checkpoint of the
  same method beats on both axes (quality up; diversity up or forgetting down), pooled over
  learning rates and steps (``pareto``). CE's frontier is interpolated piecewise-linearly
  between its non-dominated points; at a quality below its lowest point it is flat (that
  checkpoint has more quality and that value); above its highest point it does not exist
  (``frontier_at``).
* **Beyond**: a GEM checkpoint lies beyond CE's frontier (same size and seed) when it is better
  than the interpolated frontier at its quality by more than ``NOISE``, or has a higher
  quality than every CE checkpoint (``beyond_frontier``).
* **Matching**: the last checkpoint of each non-CE run next to CE (same size and seed, any lr
  and step): the CE checkpoint of closest quality if within ``tol``, else CE interpolated
  along one run's curve between the two consecutive checkpoints that bracket the quality,
  else none (``match_quality``).
* **Verdict**: a few sentences per size from those numbers (``verdict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

TOP_LEVEL = ("forgetting", "heldout_loss")  # record keys without a prompt set
LOWER_IS_BETTER = ("forgetting", "heldout_loss")
REFERENCE = "CE"
DEFAULT_TOL = 0.02  # quality tolerance of a matched pair
NOISE = 1e-6  # gains up to this are float noise (GEM beta = 1 has CE's gradient)


def value(rec: dict, metric: str, prompt_set: str) -> float | None:
    v = rec.get(metric) if metric in TOP_LEVEL else rec.get(f"{prompt_set}/{metric}")
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def method_name(rec: dict) -> str:
    """The method without its learning rate: ``CE``, ``GEM β=0.7``."""
    m, b = str(rec["method"]), rec.get("beta")
    if m.lower() == "ce":
        return "CE"
    name = m.upper() if m.lower() == "gem" else m
    return f"{name} β={b:g}" if isinstance(b, (int, float)) else name


def checkpoint_name(rec: dict) -> str:
    lr = rec.get("lr")
    return (f"lr {lr:g} " if isinstance(lr, (int, float)) else "") + f"step {rec['step']}"


@dataclass(frozen=True)
class Point:
    q: float  # quality
    y: float  # the other axis, as measured
    rec: dict

    def better(self, lower: bool) -> float:
        """The other axis with higher = better."""
        return -self.y if lower else self.y


def points(records: Sequence[dict], y_metric: str, prompt_set: str) -> list[Point]:
    out = []
    for r in records:
        q, y = value(r, "quality", prompt_set), value(r, y_metric, prompt_set)
        if q is not None and y is not None:
            out.append(Point(q, y, r))
    return out


def pareto(pts: Sequence[Point], lower: bool) -> list[Point]:
    """The non-dominated points (quality up, y up, or down with ``lower``), by quality; of equal
    points the first is kept."""
    front = []
    for i, p in enumerate(pts):
        dominated = False
        for j, o in enumerate(pts):
            if j == i:
                continue
            ge = o.q >= p.q and o.better(lower) >= p.better(lower)
            strict = o.q > p.q or o.better(lower) > p.better(lower)
            if ge and (strict or j < i):  # beaten, or an equal point came first
                dominated = True
                break
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p.q, -p.better(lower)))


def frontier_at(front: Sequence[Point], q: float, lower: bool) -> float | None:
    """The frontier's value (as measured) at quality ``q``: linear between its points, flat
    below its lowest quality, None above its highest."""
    if not front or q > front[-1].q:
        return None
    if q <= front[0].q:
        return front[0].y
    for a, b in zip(front, front[1:]):
        if a.q <= q <= b.q:
            if b.q == a.q:
                return max(a.y, b.y) if not lower else min(a.y, b.y)
            t = (q - a.q) / (b.q - a.q)
            return a.y + t * (b.y - a.y)
    return None  # unreachable: front is sorted by quality


@dataclass
class SeedBeyond:
    """One seed of one non-CE method against CE's frontier of that seed."""

    seed: object
    best_gain: float | None  # max over its checkpoints within CE's quality range (+: beyond)
    best: Point | None  # the checkpoint of best_gain
    n_beyond: int  # checkpoints beyond (within the range, gain > NOISE, or above it)
    n_points: int
    above: Point | None  # its best checkpoint above CE's highest quality, if any
    ce_max_q: float

    @property
    def is_beyond(self) -> bool:
        return self.n_beyond > 0


def gain(p: Point, ce_front: Sequence[Point], lower: bool) -> float | None:
    """How much better than CE's frontier at p's quality (+: beyond; None: above its range)."""
    q = min(p.q, ce_front[-1].q) if p.q <= ce_front[-1].q + NOISE else p.q  # noise: on it
    f = frontier_at(ce_front, q, lower)
    if f is None:
        return None
    return (f - p.y) if lower else (p.y - f)


def beyond_frontier(pts: Sequence[Point], ce_front: Sequence[Point], lower: bool, seed=None):
    gains = [(gain(p, ce_front, lower), p) for p in pts]
    inside = [(g, p) for g, p in gains if g is not None]
    above = [p for g, p in gains if g is None]
    best_g, best_p = max(inside, key=lambda gp: gp[0]) if inside else (None, None)
    return SeedBeyond(
        seed=seed,
        best_gain=best_g,
        best=best_p,
        n_beyond=sum(g > NOISE for g, _ in inside) + len(above),
        n_points=len(pts),
        above=max(above, key=lambda p: p.q) if above else None,
        ce_max_q=ce_front[-1].q,
    )


@dataclass
class Axis:
    """One size on one pair of axes: every method's frontier per seed, and each non-CE
    method's comparison with CE's per seed."""

    size: str
    y_metric: str
    lower: bool
    fronts: dict  # {(method, seed): [Point, ...]}
    beyond: dict  # {method: [SeedBeyond per seed that has CE]}
    missing_ce: dict  # {method: [seeds without CE checkpoints]}


def _group(records):
    g: dict = {}
    for r in records:
        g.setdefault((r["model_size"], method_name(r), r.get("seed", 0)), []).append(r)
    return g


def _order(methods):
    return sorted(methods, key=lambda m: (m != REFERENCE, m))


def frontiers(records: Sequence[dict], y_metric: str, prompt_set: str) -> list[Axis]:
    """Per model size (first-seen order), the frontiers and the beyond-CE comparisons."""
    lower = y_metric in LOWER_IS_BETTER
    groups = _group(records)
    out = []
    for size in dict.fromkeys(r["model_size"] for r in records):
        fronts, beyond, missing = {}, {}, {}
        mine = {k: v for k, v in groups.items() if k[0] == size}
        for (_, m, seed), recs in sorted(
            mine.items(), key=lambda kv: (kv[0][1] != REFERENCE, kv[0][1], str(kv[0][2]))
        ):
            pts = points(recs, y_metric, prompt_set)
            if pts:
                fronts[(m, seed)] = pareto(pts, lower)
        for m in _order({m for _, m, _ in mine}):
            if m == REFERENCE:
                continue
            for (_, m2, seed), recs in sorted(mine.items(), key=lambda kv: str(kv[0][2])):
                if m2 != m:
                    continue
                ce = fronts.get((REFERENCE, seed))
                pts = points(recs, y_metric, prompt_set)
                if not ce:
                    missing.setdefault(m, []).append(seed)
                elif pts:
                    beyond.setdefault(m, []).append(beyond_frontier(pts, ce, lower, seed))
        out.append(Axis(size, y_metric, lower, fronts, beyond, missing))
    return out


# ---- quality matching -----------------------------------------------------------------------


@dataclass
class Match:
    size: str
    seed: object
    rec: dict  # the non-CE checkpoint (its run's last)
    kind: str  # "checkpoint" | "interpolated" | "none"
    ce: dict  # {"quality", <metrics>...} of the CE checkpoint or interpolation ({} for none)
    how: str  # which CE checkpoint(s)


def _run_key(r):
    return (r["model_size"], method_name(r), r.get("lr"), r.get("seed", 0))


def match_quality(
    records: Sequence[dict], prompt_set: str, metrics: Sequence[str], tol: float = DEFAULT_TOL
) -> list[Match]:
    """The last checkpoint of each non-CE run (per lr and seed) against CE of the same size and
    seed: (1) the CE checkpoint of closest quality when |difference| <= tol (ties: the earlier
    step, then the lower lr); else (2) CE interpolated linearly in quality between two
    consecutive checkpoints of one CE run that bracket the quality (the closest such pair);
    else (3) none. ``metrics``: the values carried (and interpolated) besides quality."""
    if not tol >= 0:
        raise ValueError(f"quality tolerance must be >= 0, got {tol!r}")
    runs: dict = {}
    for r in records:
        runs.setdefault(_run_key(r), []).append(r)
    for v in runs.values():
        v.sort(key=lambda r: r["step"])
    out = []
    for key, v in runs.items():
        size, m, _, seed = key
        if m == REFERENCE:
            continue
        last = v[-1]
        q = value(last, "quality", prompt_set)
        if q is None:
            continue
        ce_runs = [
            [r for r in w if value(r, "quality", prompt_set) is not None]
            for k, w in sorted(runs.items(), key=lambda kw: (str(kw[0][2]), str(kw[0][3])))
            if k[0] == size and k[1] == REFERENCE and k[3] == seed
        ]
        ce_all = [r for w in ce_runs for r in w]

        def vals(r):
            return {k: value(r, k, prompt_set) for k in ("quality", *metrics)}

        near = [r for r in ce_all if abs(value(r, "quality", prompt_set) - q) <= tol + 1e-12]
        if near:
            best = min(
                near,
                key=lambda r: (
                    abs(value(r, "quality", prompt_set) - q),
                    r["step"],
                    r.get("lr") or 0,
                ),
            )
            out.append(Match(size, seed, last, "checkpoint", vals(best), checkpoint_name(best)))
            continue
        pairs = []
        for w in ce_runs:
            for a, b in zip(w, w[1:]):
                qa, qb = value(a, "quality", prompt_set), value(b, "quality", prompt_set)
                if qa != qb and min(qa, qb) <= q <= max(qa, qb):
                    pairs.append((abs(qb - qa), a["step"], a, b))
        if pairs:
            _, _, a, b = min(pairs, key=lambda p: (p[0], p[1], p[2].get("lr") or 0))
            va, vb = vals(a), vals(b)
            t = (q - va["quality"]) / (vb["quality"] - va["quality"])
            ce = {
                k: (None if va[k] is None or vb[k] is None else va[k] + t * (vb[k] - va[k]))
                for k in va
            }
            ce["quality"] = q  # by construction
            lr = a.get("lr")
            how = (f"lr {lr:g} " if isinstance(lr, (int, float)) else "") + (
                f"steps {a['step']}-{b['step']}"
            )
            out.append(Match(size, seed, last, "interpolated", ce, how))
            continue
        out.append(Match(size, seed, last, "none", {}, "no CE checkpoint within tolerance"))
    return out


# ---- verdict --------------------------------------------------------------------------------


def _signed(x: float) -> str:
    t = f"{x:+.3f}"
    return "0.000" if float(t) == 0 else t  # no "-0.000": a difference that rounds to none


def _span(xs) -> str:
    """The range of per-seed values, as printed (one value when they print the same)."""
    lo, hi = (_signed(min(xs)), _signed(max(xs))) if xs else ("–", "–")
    return lo if lo == hi else f"{lo} to {hi}"


def axis_sentence(axis: Axis, method: str, y_label: str) -> str:
    """What one method's comparison with CE's frontier on one pair of axes shows."""
    sb = axis.beyond.get(method, [])
    n = len(sb)
    if not n:
        return f"{method}: no seed with both {method} and CE checkpoints ({y_label})."
    k = sum(s.is_beyond for s in sb)
    gains = [s.best_gain for s in sb if s.best_gain is not None]
    unit = "less forgetting" if axis.lower else f"more {y_label}"
    g = f"best gain at equal quality per seed {_span(gains)} ({unit} than CE's frontier)"
    above = sum(s.above is not None for s in sb)
    above_txt = (
        f"; in {above} seed(s) a checkpoint has a higher quality than every CE checkpoint"
        if above
        else ""
    )
    if k == 0:
        where = "in the one seed" if n == 1 else f"in every seed ({n})"
        head = f"{method} is on or inside CE's frontier {where}"
        tail = ": no advantage over CE along CE's checkpoints."
    elif k == n and n == 1:
        head = f"{method} lies beyond CE's frontier in the one seed"
        tail = ": one seed, an observation, not a result."
    elif k == n:
        head = f"{method} lies beyond CE's frontier in every seed ({n} of {n})"
        tail = ": supported at this size, within the learning rates and steps tried."
    else:
        head = f"{method} lies beyond CE's frontier in {k} of {n} seeds"
        tail = ": not consistent across seeds, no claim."
    return f"{head}; {g}{above_txt}{tail}"


def verdict(
    size: str,
    axes: Sequence[Axis],
    matches: Sequence[Match],
    labels: dict,
    tol: float = DEFAULT_TOL,
    lrs: Sequence = (),
    steps: Sequence = (),
) -> list[str]:
    """Plain sentences for one size, from the numbers only. ``labels``: axis metric -> words
    (e.g. {"effective_valid": "effective valid answers", "forgetting": "forgetting"})."""
    out = []
    tuned = []
    if len(lrs) > 1:
        tuned.append("learning rates " + ", ".join(f"{x:g}" for x in lrs))
    if len(steps) > 1:
        tuned.append("steps " + ", ".join(map(str, steps)))
    if tuned:
        out.append(f"CE's frontier pools {' and '.join(tuned)}.")
    if len(lrs) <= 1:
        out.append(
            "Only one learning rate: CE was not tuned over learning rates, so this frontier is "
            "over steps only; a tuned CE could move it."
        )
    for axis in axes:
        if axis.size != size:
            continue
        for m in _order(axis.beyond):
            out.append(axis_sentence(axis, m, labels.get(axis.y_metric, axis.y_metric)))
        for m, seeds in axis.missing_ce.items():
            out.append(f"{m}: no CE run for seed(s) {', '.join(map(str, seeds))}: not compared.")
    mine = [x for x in matches if x.size == size]
    if mine:
        kinds = {k: sum(x.kind == k for x in mine) for k in ("checkpoint", "interpolated", "none")}
        out.append(
            f"Quality-matched (tolerance {tol:g}): {kinds['checkpoint']} of {len(mine)} "
            f"last checkpoints have a CE checkpoint within tolerance, {kinds['interpolated']} "
            f"are compared with CE interpolated between two checkpoints, {kinds['none']} have "
            "no CE counterpart."
        )
    return out
