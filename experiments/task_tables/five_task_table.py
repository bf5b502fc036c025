"""Round 5's task table (experiments/allocation_search/choose_searches.sh): merge the sweep folders of the two halves of the
tasks and render the five-task table, the means with their standard errors, and gateskip
against ShortGPT at each budget.

    python experiments/task_tables/five_task_table.py runs/r5/table-a runs/r5/table-b --out docs/results/allocation_search/choose_searches

`--label FOLDER=NAME` names the gateskip records of one folder NAME instead (round 6: the
paper's configuration and round 5's allocations beside the shipped ones). A later folder's
record for the same (task, method, budget) replaces an earlier one's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

TASKS = ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande"]
NAMES = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "piqa": "PIQA", "hellaswag": "HellaSwag",
         "winogrande": "WinoGrande"}
METRIC = "acc"


def records(folders: list[Path], labels: dict[Path, str] | None = None) -> list[dict]:
    out = []
    for folder in folders:
        path = folder / "results.json"
        if path.is_file():
            name = (labels or {}).get(folder)
            out += [{**r, "method": name} if name and r["method"] == "gateskip" else r
                    for r in json.loads(path.read_text())["records"] if r["metric"] == METRIC]
    return out


def rows(recs: list[dict]) -> list[dict]:
    """One row per (method, budget) with a value per task, the five-task mean and its stderr."""
    grouped: dict[tuple[str, float], dict[str, dict]] = defaultdict(dict)
    for r in recs:
        grouped[(r["method"], r["budget"])][r["task"]] = r
    order = {"base": 0, "gateskip": 1, "shortgpt": 2, "random": 3}  # other names (labels) after these
    out = []
    for (method, budget), by_task in sorted(grouped.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 9))):
        complete = all(t in by_task for t in TASKS)
        values = [by_task[t]["value"] for t in TASKS if t in by_task]
        errs = [by_task[t]["stderr"] or 0.0 for t in TASKS if t in by_task]
        out.append({
            "method": method, "budget": budget, "complete": complete,
            "tasks": {t: (by_task[t]["value"], by_task[t]["stderr"]) for t in TASKS if t in by_task},
            "mean": sum(values) / len(values), "mean_stderr": math.sqrt(sum(e * e for e in errs)) / len(errs),
            "net_saving": sum(by_task[t]["net_saving"] for t in by_task) / len(by_task),
            "skip_fraction": sum(by_task[t]["skip_fraction"] for t in by_task) / len(by_task),
        })
    return out


def markdown(table: list[dict]) -> str:
    base = next((r for r in table if r["method"] == "base" and r["complete"]), None)
    head = ("| method | budget | net saved (paper's skip) | " + " | ".join(NAMES[t] for t in TASKS)
            + " | mean ± se | % of base |")
    lines = [head, "|" + "---|" * (len(TASKS) + 5)]
    for r in table:
        cells = [f"{r['tasks'][t][0]:.3f}" if t in r["tasks"] else "-" for t in TASKS]
        share = f"{100 * r['mean'] / base['mean']:.1f}" if base and r["complete"] else "-"
        mean = f"{r['mean']:.3f} ± {r['mean_stderr']:.3f}" + ("" if r["complete"] else " (partial)")
        lines.append(f"| {r['method']} | {r['budget']:g} | {100 * r['net_saving']:.1f} % ({100 * r['skip_fraction']:.1f} %) | "
                     + " | ".join(cells) + f" | {mean} | {share} |")
    return "\n".join(lines) + "\n"


def comparisons(table: list[dict]) -> str:
    """gateskip against ShortGPT at the same budget: the difference of the five-task means and
    its standard error (unpaired, so conservative: both are scored on the same items)."""
    by = {(r["method"], r["budget"]): r for r in table if r["complete"]}
    lines = ["| budget | net saved, gateskip / ShortGPT | gateskip - ShortGPT (mean of five) | se | verdict |",
             "|---|---|---|---|---|"]
    for (method, budget), g in sorted(by.items()):
        s = by.get(("shortgpt", budget))
        if method != "gateskip" or s is None:
            continue
        diff = g["mean"] - s["mean"]
        se = math.hypot(g["mean_stderr"], s["mean_stderr"])
        verdict = "within 1 se" if abs(diff) <= se else ("gateskip ahead" if diff > 0 else "ShortGPT ahead")
        saved = f"{100 * g['net_saving']:.1f} / {100 * s['net_saving']:.1f} %"
        lines.append(f"| {budget:g} | {saved} | {diff:+.3f} | {se:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = next((r for r in table if r["method"] == "base" and r["complete"]), None)
    others = sorted({r["method"] for r in table} - {"base", "gateskip", "shortgpt", "random"})
    for method, style in (("gateskip", "o-"), ("shortgpt", "s-"), ("random", "x"), *((m, "^:") for m in others)):
        pts = sorted((r["net_saving"], r["mean"], r["mean_stderr"]) for r in table if r["method"] == method and r["complete"])
        if base and method in ("gateskip", "shortgpt"):
            pts = [(0.0, base["mean"], base["mean_stderr"])] + pts
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar([100 * v for v in x], y, yerr=e, fmt=style, capsize=3, label=method)
    if base:
        ax.axhline(base["mean"], color="grey", lw=0.8, ls="--", label="base")
    ax.set_xlabel("net FLOPs saved, gates included (%)")
    ax.set_ylabel("mean accuracy, five tasks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--label", action="append", default=[], metavar="FOLDER=NAME",
                   help="name this folder's gateskip records NAME")
    args = p.parse_args()
    labels = {Path(f): name for f, _, name in (item.partition("=") for item in args.label)}
    table = rows(records(args.folders, labels))
    text = f"Five tasks, metric {METRIC}, lm-eval standard errors.\n\n{markdown(table)}\n{comparisons(table)}"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(text)
        (args.out / "table.json").write_text(json.dumps(table, indent=1))
        plot(table, args.out / "tasks.png")
        for folder in args.folders:
            if (folder / "results.json").is_file() and not folder.resolve().is_relative_to(args.out.resolve()):
                (args.out / folder.name).mkdir(exist_ok=True)
                for name in ("results.json", "results.md"):
                    if (folder / name).is_file():
                        shutil.copy(folder / name, args.out / folder.name / name)
        print(f"wrote {args.out}/table.md, table.json, tasks.png")


if __name__ == "__main__":
    main()
