"""Sweep records -> a markdown table and a PNG of each task's primary metric vs net compute saved."""

from __future__ import annotations

import math
from pathlib import Path

from .metrics import LOWER_IS_BETTER, primary_records, summarize


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def markdown_table(records: list[dict]) -> str:
    """Two tables: every point (primary metric, skip fraction, net saving), then the paper's figures."""
    lines = [
        "| task | method | budget | metric | value | stderr | skipped (paper) | net FLOP saving | decoding |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, recs in sorted(primary_records(records).items()):
        for r in sorted(recs, key=lambda r: (r["method"] != "base", r["method"], r["budget"])):
            lines.append(
                f"| {task} | {r['method']} | {r['budget']:g} | {r['metric']} | {_num(r['value'])} | {_num(r['stderr'])} "
                f"| {_pct(r['skip_fraction'])} | {_pct(r['net_saving'])} | {r.get('decode', '')} |"
            )
    lines += [
        "",
        "| task | method | metric | base | at 0% | saved at 90% of base | saved at 95% of base | AUC (mean over budgets) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summarize(records):
        lines.append(
            f"| {s['task']} | {s['method']} | {s['metric']} | {_num(s['base'])} | {_num(s['at_0'])} "
            f"| {_pct(s['saved_at_90'])} | {_pct(s['saved_at_95'])} | {_num(s['auc'])} |"
        )
    return "\n".join(lines) + "\n"


# The same colour for a method in every figure.
COLORS = {"gateskip": "C0", "random": "C1", "shortgpt": "C2", "calm": "C3", "mod": "C4"}


def plot(records: list[dict], path: str | Path) -> Path:
    """One panel per task: primary metric vs net FLOP saving, one line per method; the
    ungated base model as a dashed line and 90 % of it as a dotted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = primary_records(records)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.5 * max(1, len(tasks)), 3.6), squeeze=False)
    for ax, (task, recs) in zip(axes[0], sorted(tasks.items())):
        for method in sorted({r["method"] for r in recs}):
            pts = sorted((r for r in recs if r["method"] == method), key=lambda r: r["budget"])
            xs = [100 * r["net_saving"] for r in pts]
            ys = [r["value"] for r in pts]
            if method == "base":
                ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label="base (ungated)")
                target = ys[0] / 0.9 if recs[0]["metric"] in LOWER_IS_BETTER else 0.9 * ys[0]
                ax.axhline(target, color="grey", linestyle=":", linewidth=1, label="90% of base")
            else:
                ax.plot(xs, ys, marker="o", label=method, color=COLORS.get(method))
        ax.set_title(task)
        ax.set_xlabel("net FLOP saving (% of decoder layers)")
        ax.set_ylabel(recs[0]["metric"])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    from ..files import save_figure

    return save_figure(fig, path, dpi=120)
