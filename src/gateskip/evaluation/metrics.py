"""The paper's summary figures, computed from sweep records.

For each task and method, on the curve of the task's primary metric against net FLOP
saving:
- at_0: the metric at budget 0;
- saved_at_90 / saved_at_95: the largest net saving among the measured points whose
  metric is at least 90 % / 95 % of the ungated base model's (None if no point is);
  a lower bound, since only measured points count;
- auc: the mean of the metric over the swept budget range (trapezoid rule on the
  budget axis, divided by its width), so methods swept at the same budgets compare
  directly; for a single budget it is that point's value.
For lower-is-better metrics (perplexity) "at least 90 %" reads "at most 1/0.9 times".
"""

from __future__ import annotations

from collections import defaultdict

# The figure a task is judged by, in order of preference.
PRIMARY = ("acc", "exact_match", "pass@1", "word_perplexity")
LOWER_IS_BETTER = ("word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity")


def primary_metric(metrics: set[str]) -> str | None:
    return next((m for m in PRIMARY if m in metrics), None)


def primary_records(records: list[dict]) -> dict[str, list[dict]]:
    """Records of each task's primary metric, grouped by task."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    out = {}
    for task, rows in by_task.items():
        metric = primary_metric({r["metric"] for r in rows})
        if metric is not None:
            out[task] = [r for r in rows if r["metric"] == metric]
    return out


def _meets(value: float, target: float, lower_is_better: bool) -> bool:
    return value <= target if lower_is_better else value >= target


def _auc(points: list[tuple[float, float]]) -> float:
    points = sorted(points)
    if len(points) == 1:
        return points[0][1]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def summarize(records: list[dict]) -> list[dict]:
    """One row per (task, method) with the paper's figures; see the module docstring."""
    rows = []
    for task, recs in sorted(primary_records(records).items()):
        metric = recs[0]["metric"]
        lower = metric in LOWER_IS_BETTER
        base = next((r["value"] for r in recs if r["method"] == "base"), None)
        for method in sorted({r["method"] for r in recs}):
            pts = sorted((r for r in recs if r["method"] == method), key=lambda r: r["budget"])
            at_0 = next((r["value"] for r in pts if r["budget"] == 0), None)
            row = {"task": task, "method": method, "metric": metric, "base": base, "at_0": at_0,
                   "auc": _auc([(r["budget"], r["value"]) for r in pts])}
            for share in (90, 95):
                saved = None
                if base is not None:
                    target = base / (share / 100) if lower else base * share / 100
                    ok = [r["net_saving"] for r in pts if _meets(r["value"], target, lower)]
                    saved = max(ok) if ok else None
                row[f"saved_at_{share}"] = saved
            rows.append(row)
    return rows
