"""The round-2 table of docs/experiment.md from the two sweeps' results.json files.

    python experiments/task_tables/two_task_table.py runs/r2-eval-lowrank runs/r2-eval-baselines [--plot FILE.png]

Accuracy with the net FLOP saving in brackets, per budget and method; then each method's
accuracy relative to the base at 15 % and 25 % net saving, interpolated linearly between
the measured points on either side (a point exactly there is used as is), and the sweeps'
own summary figures (gateskip.evaluation.summarize): accuracy at 0 % and the largest
measured net saving that keeps 90 % / 95 % of the base accuracy. --plot draws the combined
sweeps with the sweeps' own figure (gateskip.evaluation.report.plot).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gateskip.evaluation import summarize
from gateskip.evaluation.report import plot


def main() -> None:
    args = sys.argv[1:]
    figure = args.pop(args.index("--plot") + 1) if "--plot" in args else None
    folders = [a for a in args if a != "--plot"]
    records = [r for folder in folders for r in json.loads((Path(folder) / "results.json").read_text())["records"]
               if r["metric"] == "acc"]
    tasks = sorted({r["task"] for r in records})
    methods = [m for m in ("gateskip", "random", "shortgpt") if any(r["method"] == m for r in records)]
    base = {t: next(r["value"] for r in records if r["task"] == t and r["method"] == "base") for t in tasks}
    budgets = sorted({r["budget"] for r in records if r["method"] != "base"})
    point = {(r["task"], r["method"], r["budget"]): r for r in records}
    print("| task | budget | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for t in tasks:
        for b in budgets:
            cells = []
            for m in methods:
                r = point.get((t, m, b))
                cells.append("" if r is None else f"{r['value']:.3f} ({100 * r['net_saving']:.1f} %)")
            print(f"| {t} | {b:g} | " + " | ".join(cells) + " |")
        print(f"| {t} | base | {base[t]:.3f} | | |")
    print()
    print("| task | method | at 0 % | retained at 15 % net saved | retained at 25 % net saved "
          "| net saved at >= 90 % of base | at >= 95 % |")
    print("|---|---|---|---|---|---|---|")
    summary = {(row["task"], row["method"]): row for row in summarize(list(point.values()))}
    for t in tasks:
        for m in methods:
            row = summary[(t, m)]
            curve = sorted((r["net_saving"], r["value"]) for (tt, mm, _), r in point.items() if tt == t and mm == m)
            at0 = base[t] if row["at_0"] is None else row["at_0"]
            print(f"| {t} | {m} | {at0:.3f} | {retained(curve, 0.15, base[t])} | {retained(curve, 0.25, base[t])} "
                  f"| {percent(row['saved_at_90'])} | {percent(row['saved_at_95'])} |")
    if figure:
        plot(list(point.values()), figure)


def percent(saving: float | None) -> str:
    return "none" if saving is None else f"{100 * saving:.1f} %"


def retained(curve: list[tuple[float, float]], target: float, base: float) -> str:
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= target <= x1:
            y = y0 if x1 == x0 else y0 + (y1 - y0) * (target - x0) / (x1 - x0)
            return f"{100 * y / base:.0f} %"
    return "not reached"


if __name__ == "__main__":
    main()
