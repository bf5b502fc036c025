"""What the gates learned: `gateskip analyze MODEL --gates PATH --out DIR`.

One forward over sample text collects every module's token importances (the mean gate
value, the figure budgets rank by); a second at a budget records which tokens skipped.
From them come plots (per-layer mean heatmap, per-layer distributions, importance by
token class, one text's skip pattern, calibrated thresholds) and a short markdown
summary that tests the paper's reading: the first (BOS) token acts as an anchor with
high gate values in early layers, punctuation stays high, deep layers turn selective.
"""

from __future__ import annotations

import argparse
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.budget import as_budget, check_ratio
from ..core.gates import importance
from ..core.model import is_gated
from ..core.plan import GateTrace, SkipPlan
from ..data.samples import sample_sequences
from ..errors import GateSkipError
from ..files import atomic_folder, save_figure, write_json, write_text
from ..validate import (check_output_folder, existing_path, fits_context, integer, output_path, ratio, text_source,
                       token_batch)

# Token classes, in the order plots and tables list them.
CLASSES = ("first", "punctuation", "function word", "content word", "other")
FUNCTION_WORDS = frozenset(
    "a an the and or but nor so yet if then than of to in on at by for with from into onto upon as is are was were be "
    "been being am do does did have has had i me my mine you your yours thou thee thy thine he him his she her hers it its "
    "we us our they them their this that these those there here who whom whose which what when where why how not no all "
    "any some such shall will would should can could may might must o oh".split()
)
PLOTS = {
    "heatmap": "importance_heatmap.png",
    "distribution": "importance_distribution.png",
    "classes": "importance_by_token_class.png",
    "pattern": "skip_pattern.png",
    "thresholds": "thresholds.png",
}
SUMMARY, STATS = "analysis.md", "analysis.json"


@dataclass
class GateRecord:
    """Importances of every gated module for every token of a batch.

    keys: module keys in execution order ("attn.0", "mlp.0", ...).
    importance: (modules, B, T) mean gate values, measured with nothing skipped.
    valid: (B, T) real (non-padding) tokens.
    keep: (modules, B, T) which tokens ran each module at `budget` (None without one).
    """

    keys: list[str]
    ids: torch.Tensor
    importance: torch.Tensor
    valid: torch.Tensor
    keep: torch.Tensor | None = None
    budget: float | None = None

    def branch(self, name: str) -> tuple[list[int], torch.Tensor]:
        """(layers, importances (layers, B, T)) of one branch."""
        rows = [(int(k.split(".")[1]), i) for i, k in enumerate(self.keys) if k.startswith(name + ".")]
        return [layer for layer, _ in rows], self.importance[[i for _, i in rows]]


def _traced(model, ids: torch.Tensor, mask: torch.Tensor, budget,
            keys: list[str] | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """(module keys, importances, keep decisions at `budget` or None). With `keys`, the decisions
    of modules that evaluated no gate (fixed by the budget: every token runs them, or none does,
    e.g. at budget 1) are filled in from the budget, in the order of `keys`."""
    trace = GateTrace()
    plan = SkipPlan(budget=budget, trace=trace)
    model(ids, attention_mask=mask, skip_plan=plan, logits_to_keep=1)
    traced = [k for k, _, _ in trace.entries]
    imp = torch.stack([importance(v) for _, v, _ in trace.entries]).float().cpu() if trace.entries else None
    keep = None
    if plan.budget is not None:  # budgets are deterministic: replaying them on the traced values gives the decisions
        valid = mask.bool()
        protect = _protected(model, plan, valid)
        found = {k: plan.budget.keep(importance(v), ok, protect, k) for k, v, ok in trace.entries}
        for k in keys or traced:
            if k not in found:  # fixed: all valid tokens run it, or only the protected ones
                runs = plan.budget.fixed(k)
                found[k] = valid if runs else valid & protect if protect is not None else torch.zeros_like(valid)
        keep = torch.stack([found[k] for k in keys or traced]).cpu()
    return traced, imp, keep


def _protected(model, plan: SkipPlan, valid: torch.Tensor) -> torch.Tensor | None:
    """The first real token of each row when the plan (or, by default, the gates) may not skip it."""
    skip_bos = plan.skip_bos if plan.skip_bos is not None else model.gate_bank.config.skip_bos
    if skip_bos:
        return None
    positions = torch.arange(valid.shape[1], device=valid.device)
    return positions[None, :] == valid.int().argmax(1)[:, None]


@torch.no_grad()
def collect(model, ids: torch.Tensor, mask: torch.Tensor | None = None, budget: float | None = None) -> GateRecord:
    """Importances with no skipping, and the keep decisions at `budget` (a ratio or a Budget).

    Importances at a budget differ from the unskipped ones in later layers (skips upstream change
    the residual stream), which is why they are measured apart."""
    if not is_gated(model):
        raise GateSkipError("analysis needs a model with gates (load_gates or add_gates first)")
    device = next(model.parameters()).device
    ids, mask = token_batch((ids, mask), "collect's ids and mask", mask_required=False)
    mask = torch.ones_like(ids) if mask is None else mask
    ids, mask = ids.to(device), mask.to(device)
    keys, imp, _ = _traced(model, ids, mask, None)
    keep = None
    if budget is not None:
        _, _, keep = _traced(model, ids, mask, as_budget(budget), keys)
    return GateRecord(keys, ids.cpu(), imp, mask.bool().cpu(), keep, budget)


def token_class(text: str) -> str:
    """The class of one decoded token (position aside): punctuation, function word, content word or other."""
    s = text.strip()
    if s and all(c in string.punctuation or c in "“”‘’—–…" for c in s):
        return "punctuation"
    if s.isalpha():
        return "function word" if s.lower() in FUNCTION_WORDS else "content word"
    return "other"  # whitespace, newlines, numbers, special tokens, mixed pieces


def classify(tokenizer, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T) class index into CLASSES; the first real token of each row is "first"; padding is -1."""
    lookup = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
    for t in ids[valid].unique().tolist():
        lookup[t] = CLASSES.index(token_class(tokenizer.decode([t])))
    out = lookup[ids].masked_fill(~valid, -1)
    first = valid.int().argmax(1)
    out[torch.arange(ids.shape[0]), first] = CLASSES.index("first")
    return out


def class_means(record: GateRecord, classes: torch.Tensor) -> dict[str, list[float | None]]:
    """Mean importance of each token class at each module (None where the class has no token)."""
    out = {}
    for c, name in enumerate(CLASSES):
        sel = classes == c
        n = int(sel.sum())
        out[name] = [float(m[sel].mean()) if n else None for m in record.importance]
    return out


def class_keep_rates(record: GateRecord, classes: torch.Tensor) -> dict[str, float | None]:
    """Share of each class's token x module evaluations that ran (were kept) at the record's budget."""
    if record.keep is None:
        return {}
    out = {}
    for c, name in enumerate(CLASSES):
        sel = classes == c
        out[name] = float(record.keep[:, sel].float().mean()) if int(sel.sum()) else None
    return out


def first_token_rank(record: GateRecord) -> list[float]:
    """Per module: share of sequences whose first real token has the highest importance of its row."""
    first = record.valid.int().argmax(1)
    imp = record.importance.masked_fill(~record.valid, float("-inf"))
    top = imp.argmax(-1)  # (modules, B)
    return (top == first[None]).float().mean(1).tolist()


def anchor_finding(record: GateRecord, classes: torch.Tensor, layers: int) -> dict:
    """The paper's BOS-anchor claim, tested per branch on the early third of the layers: an anchor
    has a higher mean importance than every other token class and is the most important token
    of its sequence in at least half of the sequences (a hair's lead in the mean is not enough)."""
    early = max(1, layers // 3)
    means = class_means(record, classes)
    ranks = first_token_rank(record)
    found = {"early_layers": early}
    for branch in ("attn", "mlp"):
        idx = [i for i, k in enumerate(record.keys) if k.startswith(branch + ".") and int(k.split(".")[1]) < early]
        if not idx:
            continue
        first = sum(means["first"][i] for i in idx) / len(idx)
        rest_sel = (classes >= 0) & (classes != CLASSES.index("first"))
        rest = float(record.importance[idx][:, rest_sel].mean()) if int(rest_sel.sum()) else None
        others = {n: sum(means[n][i] for i in idx) / len(idx) for n in CLASSES[1:] if means[n][0] is not None}
        top = sum(ranks[i] for i in idx) / len(idx)
        every = [i for i, k in enumerate(record.keys) if k.startswith(branch + ".")]
        found[branch] = {
            "first": first, "other_tokens": rest, "by_class": others, "first_is_top_share": top,
            "anchor": rest is not None and first > max(others.values(), default=rest) and top >= 0.5,
            # Where in the whole depth the first token leads every class (the anchor may sit elsewhere).
            "first_leads_layers": [int(record.keys[i].split(".")[1]) for i in every
                                   if means["first"][i] > max((means[n][i] for n in CLASSES[1:] if means[n][i] is not None),
                                                              default=float("inf"))],
        }
    return found


def depth_selectivity(record: GateRecord) -> dict[str, list[float]]:
    """Per branch and layer, the standard deviation of importances over tokens: how selective a layer is."""
    out = {}
    for branch in ("attn", "mlp"):
        _, imp = record.branch(branch)
        out[branch] = [float(m[record.valid].std()) for m in imp]
    return out


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Save and close a figure, written whole to a temporary name first (files.atomic_path)."""
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_heatmap(record: GateRecord, path: Path) -> Path:
    plt = _pyplot()
    branches = [b for b in ("attn", "mlp") if record.branch(b)[0]]
    grid = torch.stack([record.branch(b)[1][:, record.valid].mean(1) for b in branches]).numpy()
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * grid.shape[1] + 2), 2.2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(branches)), branches)
    ax.set_xlabel("layer")
    ax.set_title("mean token importance (mean gate value) per layer")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_distribution(record: GateRecord, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.3 * len(record.keys) / 2 + 2), 5), sharex=True)
    for ax, branch in zip(axes, ("attn", "mlp")):
        layers, imp = record.branch(branch)
        if layers:
            ax.boxplot([m[record.valid].numpy() for m in imp], positions=layers, showfliers=False, widths=0.6)
        ax.set_ylabel(f"{branch} importance")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("layer")
    axes[0].set_title("distribution of token importance per layer (boxes: quartiles, whiskers: 1.5 IQR)")
    return _save(fig, path)


def plot_classes(record: GateRecord, means: dict[str, list[float | None]], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, branch in zip(axes, ("attn", "mlp")):
        idx = [i for i, k in enumerate(record.keys) if k.startswith(branch + ".")]
        layers = [int(record.keys[i].split(".")[1]) for i in idx]
        for name in CLASSES:
            ys = [means[name][i] for i in idx]
            if idx and ys[0] is not None:
                ax.plot(layers, ys, marker=".", label=name)
        ax.set_title(f"{branch}: mean importance by token class")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean importance")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_skip_pattern(record: GateRecord, tokenizer, path: Path, row: int = 0, max_tokens: int = 48) -> Path:
    """Tokens x modules of one sequence at the record's budget: dark = skipped."""
    plt = _pyplot()
    cols = record.valid[row].nonzero().flatten()[:max_tokens]
    grid = (~record.keep[:, row, cols]).float().numpy()  # modules x tokens
    labels = [repr(tokenizer.decode([int(t)]))[1:-1][:10] for t in record.ids[row, cols]]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(cols) + 2), max(4, 0.12 * len(record.keys) + 1.5)))
    ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(cols)), labels, rotation=90, fontsize=7)
    step = max(1, len(record.keys) // 20)
    ax.set_yticks(range(0, len(record.keys), step), record.keys[::step], fontsize=7)
    ax.set_title(f"skipped (black) per token and module at budget {record.budget:g}")
    return _save(fig, path)


def plot_thresholds(thresholds: dict[str, dict[str, float]], keys: list[str], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
    for ax, branch in zip(axes, ("attn", "mlp")):
        for ratio in sorted(thresholds, key=float):
            pts = [(int(k.split(".")[1]), thresholds[ratio][k])
                   for k in keys if k.startswith(branch + ".") and k in thresholds[ratio]]
            pts = [(x, y) for x, y in pts if abs(y) != float("inf")]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=f"ratio {ratio}")
        ax.set_title(f"{branch}: calibrated importance thresholds")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("threshold (skip below)")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------- report


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "layers 0-2, 5, 7-8"."""
    parts, start = [], None
    for i, x in enumerate(layers):
        start = x if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            parts.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return "layers " + ", ".join(parts)


def summary_markdown(stats: dict, plots: dict[str, str]) -> str:
    """A short human reading of the statistics, every claim with its numbers."""
    lines = ["# Gate analysis", "",
             f"{stats['tokens']} tokens in {stats['sequences']} sequences of {stats['text']}; "
             f"gates: {stats['gates']} ({stats['gate_kind']}).", ""]
    if stats["untrained"]:
        lines += ["**These gates are untrained** (fresh initialisation): importances sit near sigmoid(bias) with a "
                  "tiny spread, so every pattern below is noise from the random init, not something learned.", ""]
    spread = stats["importance_range"]
    lines += [f"Importance over all modules and tokens: mean {_f(stats['importance_mean'])}, "
              f"min {_f(spread[0])}, max {_f(spread[1])}.", ""]
    a = stats["anchor"]
    lines += ["## Does the first token act as an anchor? (paper: BOS tokens get the highest gate values in early layers)",
              "", f"First token: {stats['first_token']!r}. Early layers = layers 0-{a['early_layers'] - 1}.", "",
              "| branch | first token | other tokens | punctuation | function words | content words "
              "| first token is the top token of its sequence | anchor? |",
              "|---|---|---|---|---|---|---|---|"]
    for branch in ("attn", "mlp"):
        if branch in a:
            r = a[branch]
            c = r["by_class"]
            lines.append(f"| {branch} | {_f(r['first'])} | {_f(r['other_tokens'])} | {_f(c.get('punctuation'))} "
                         f"| {_f(c.get('function word'))} | {_f(c.get('content word'))} | {100 * r['first_is_top_share']:.0f}% "
                         f"| {'yes' if r['anchor'] else 'no'} |")
    lines.append("")
    for branch in ("attn", "mlp"):
        if branch in a:
            leads = a[branch]["first_leads_layers"]
            lines.append(f"- {branch}: the first token's mean importance leads every other class in {len(leads)} of "
                         f"{len(stats['selectivity'][branch])} layers" + (f" ({_layer_ranges(leads)})." if leads else "."))
    verdicts = [f"{b}: {'supported' if a[b]['anchor'] else 'not supported'}" for b in ("attn", "mlp") if b in a]
    lines += ["", f"Finding: the anchor claim is {'; '.join(verdicts)} on this model and text "
                  "(anchor = in the early layers the first token's mean importance is above every other token class's "
                  "and it is its sequence's most important token in at least half of the sequences).", ""]
    sel = stats["selectivity"]
    third = max(1, len(sel["attn"]) // 3)
    for branch in ("attn", "mlp"):
        s = sel[branch]
        if s:
            lines.append(f"- {branch} selectivity (std of importance over tokens): first third {_f(sum(s[:third]) / third)}, "
                         f"last third {_f(sum(s[-third:]) / third)}.")
    if stats["keep_rates"]:
        lines += ["", f"## Which tokens are kept at budget {stats['budget']:g}", "",
                  "| class | tokens | share of module evaluations kept |", "|---|---|---|"]
        for name in CLASSES:
            rate = stats["keep_rates"].get(name)
            lines.append(f"| {name} | {stats['class_counts'][name]} | {'-' if rate is None else f'{100 * rate:.1f}%'} |")
    lines += ["", "## Calibrated thresholds", ""]
    if stats["thresholds"]:
        lines.append("Ratios calibrated in the gate file: " + ", ".join(sorted(stats["thresholds"], key=float)) + ".")
    else:
        lines.append("The gate file holds no calibrated thresholds (`gateskip calibrate` adds them).")
    lines += ["", "## Plots", ""] + [f"- {name}: ![{name}]({file})" for name, file in plots.items()]
    return "\n".join(lines) + "\n"


def analyze(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor | None, out: str | Path, budget: float = 0.25,
            text: str = "sample text", gates: str = "in memory", untrained: bool = False) -> dict:
    """Collect gate statistics on (ids, mask), write plots, analysis.md and analysis.json to `out`; return the stats."""
    out = Path(out)
    record = collect(model, ids, mask, check_ratio(budget))
    classes = classify(tokenizer, record.ids, record.valid)
    means = class_means(record, classes)
    bank = model.gate_bank
    flat = record.importance[:, record.valid]
    stats = {
        "text": text, "gates": gates, "gate_kind": bank.config.kind, "untrained": untrained,
        "sequences": int(ids.shape[0]), "tokens": int(record.valid.sum()), "budget": budget,
        "first_token": tokenizer.decode([int(record.ids[0, int(record.valid[0].int().argmax())])]),
        "importance_mean": float(flat.mean()), "importance_range": [float(flat.min()), float(flat.max())],
        "modules": record.keys,
        "mean_per_module": record.importance[:, record.valid].mean(1).tolist(),
        "class_counts": {n: int((classes == c).sum()) for c, n in enumerate(CLASSES)},
        "class_means": means,
        "first_is_top_share": first_token_rank(record),
        "anchor": anchor_finding(record, classes, bank.num_layers),
        "selectivity": depth_selectivity(record),
        "keep_rates": class_keep_rates(record, classes),
        "thresholds": bank.thresholds,
    }
    with atomic_folder(out) as folder:  # all of it or nothing: a failed write leaves no partial analysis
        plots = {
            "mean importance per layer": plot_heatmap(record, folder / PLOTS["heatmap"]).name,
            "importance distribution per layer": plot_distribution(record, folder / PLOTS["distribution"]).name,
            "importance by token class": plot_classes(record, means, folder / PLOTS["classes"]).name,
            f"skip pattern at budget {budget:g}": plot_skip_pattern(record, tokenizer, folder / PLOTS["pattern"]).name,
        }
        if bank.thresholds:
            plots["calibrated thresholds"] = plot_thresholds(bank.thresholds, record.keys,
                                                             folder / PLOTS["thresholds"]).name
        write_json(folder / STATS, stats, indent=1, default=str)
        write_text(folder / SUMMARY, summary_markdown(stats, plots))
    return stats


# ---------------------------------------------------------------- command line


def register(subparsers) -> None:
    """Add `gateskip analyze`."""
    p = subparsers.add_parser("analyze", help="gate statistics and plots (importance per layer, token classes, skip pattern)")
    p.add_argument("model", help="bundled model name, local folder or hub id")
    p.add_argument("--gates", type=existing_path,
                   help="gate file or folder (without it: fresh untrained low-rank gates, a control)")
    p.add_argument("--text", default="bundled", type=text_source, help="sample text: 'bundled' (read from its end, which gateskip demo "
                   "does not train on), a .txt/.jsonl file or a dataset folder")
    p.add_argument("--out", type=output_path, required=True, help="folder for the plots, analysis.md and analysis.json")
    p.add_argument("--budget", type=ratio, default=0.25, help="skip ratio for the skip pattern and keep rates")
    p.add_argument("--sequences", type=integer(1), default=8, help="sample sequences")
    p.add_argument("--length", type=integer(2), default=128, help="tokens per sample sequence")
    p.add_argument("--overwrite", action="store_true", help="replace the analysis an earlier run left in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.config import GateConfig
    from ..loading import load_model
    from ..core.model import add_gates, load_gates

    check_output_folder(args.out, writes=(SUMMARY, STATS, *PLOTS.values()), overwrite=args.overwrite)
    model, tokenizer = load_model(args.model)
    fits_context(model, args.length, "--length")
    if args.gates:
        load_gates(model, args.gates)
    else:
        torch.manual_seed(0)
        add_gates(model, GateConfig(kind="lowrank"))
    ids, mask = sample_sequences(tokenizer, args.text, args.sequences, args.length)
    analyze(model, tokenizer, ids, mask, args.out, args.budget, text=args.text,
                    gates=args.gates or "fresh low-rank gates", untrained=not args.gates)
    print((args.out / SUMMARY).read_text().split("\n## Plots")[0])
    print(f"wrote {args.out / SUMMARY}, {args.out / STATS} and {len(list(args.out.glob('*.png')))} plots to {args.out}")
    return 0
