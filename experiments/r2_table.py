"""The round-2 table of docs/experiment.md from the two sweeps' results.json files.

    python experiments/r2_table.py runs/r2-eval-lowrank runs/r2-eval-baselines [--plot FILE.png]

Accuracy with the net FLOP saving in brackets, per budget and method; then each method's
accuracy relative to the base at 15 % and 25 % net saving, interpolated linearly between
the measured points on either side (a point exactly there is used as is), and the largest
measured net saving that keeps 90 % / 95 % of the base accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    args = sys.argv[1:]
    plot = args.pop(args.index("--plot") + 1) if "--plot" in args else None
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
    for t in tasks:
        for m in methods:
            curve = sorted((r["net_saving"], r["value"]) for (tt, mm, _), r in point.items() if tt == t and mm == m)
            at0 = point[(t, m, 0.0)]["value"] if (t, m, 0.0) in point else base[t]
            print(f"| {t} | {m} | {at0:.3f} | {retained(curve, 0.15, base[t])} | {retained(curve, 0.25, base[t])} "
                  f"| {saved_at(curve, 0.90 * base[t])} | {saved_at(curve, 0.95 * base[t])} |")
    if plot:
        draw(plot, tasks, methods, point, base)


def draw(path: str, tasks, methods, point, base) -> None:
    """Accuracy against net FLOP saving, one panel per task, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for m in methods:
            xs, ys = zip(*sorted((100 * r["net_saving"], r["value"]) for (tt, mm, _), r in point.items() if tt == t and mm == m))
            ax.plot(xs, ys, marker="o", label=m)
        ax.axhline(base[t], color="grey", linestyle="--", label="base")
        ax.axhline(0.95 * base[t], color="grey", linestyle=":", label="95 % of base")
        ax.set(title=t, xlabel="net FLOP saved (%)", ylabel="accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def saved_at(curve: list[tuple[float, float]], floor: float) -> str:
    """The largest measured net saving whose accuracy is at least `floor` (as the sweep reports it)."""
    ok = [x for x, y in curve if y >= floor - 1e-9]
    return f"{100 * max(ok):.1f} %" if ok else "none"


def retained(curve: list[tuple[float, float]], target: float, base: float) -> str:
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= target <= x1:
            y = y0 if x1 == x0 else y0 + (y1 - y0) * (target - x0) / (x1 - x0)
            return f"{100 * y / base:.0f} %"
    return "not reached"


if __name__ == "__main__":
    main()
