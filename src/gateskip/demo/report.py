"""The main job's verdict and report: what the stages measured, compared at equal net saving,
in report.md and on the console."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .. import files as outputs
from ..evaluation.analysis import SUMMARY as ANALYSIS_SUMMARY
from ..evaluation.sweep import FIGURE, TABLE
from ..search.allocation import describe
from ..search.proxy import CONTINUATION_TOKENS, PROMPT_TOKENS, TARGETS as PROXY_TARGETS, interpolate
from ..search.proxy import table as proxy_table
from .job import Job, JobSizes
from .stages import PROXY_FIELDS

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _acc(records: list[dict], task: str, method: str, budget: float) -> dict | None:
    key = (task, method, budget, "acc")
    return next((r for r in records if (r["task"], r["method"], r["budget"], r["metric"]) == key), None)


def at_saving(points: list[dict], saving: float) -> dict | None:
    """A method's accuracy at a net saving, linear between its measured points around it (None
    outside them). The standard error is interpolated linearly too: the points share items."""
    pts = sorted(points, key=lambda r: r["net_saving"])
    for a, b in zip(pts, pts[1:]):
        if a["net_saving"] - 1e-9 <= saving <= b["net_saving"] + 1e-9:
            span = b["net_saving"] - a["net_saving"]
            w = 0.0 if span <= 0 else (saving - a["net_saving"]) / span
            se = None if a["stderr"] is None or b["stderr"] is None else (1 - w) * a["stderr"] + w * b["stderr"]
            measured = min(w, 1 - w) < 0.02
            return {"value": a["value"] + w * (b["value"] - a["value"]), "stderr": se, "net_saving": saving,
                    "from": [(b if w > 0.5 else a)["budget"]] if measured else [a["budget"], b["budget"]]}
    return None


def task_comparisons(job: Job, records: list[dict]) -> list[dict]:
    """Per task and target: the gates' point against ShortGPT at the gates' measured net saving
    (its curve through the base, interpolated), the difference and its combined standard error
    sqrt(se1^2 + se2^2); the methods score the same items, so that error is conservative."""
    rows = []
    for task in job.sizes.tasks:
        base = _acc(records, task, "base", 0.0)
        curve = [base] + [r for r in records if (r["task"], r["method"], r["metric"]) == (task, "shortgpt", "acc")]
        for t in job.sizes.targets:
            g = _acc(records, task, "gateskip", t)
            if g is None or base is None:
                continue
            sg = at_saving(curve, g["net_saving"])
            diff = None if sg is None else g["value"] - sg["value"]
            errors = None if sg is None else (g["stderr"], sg["stderr"])
            se = None if errors is None or None in errors else math.hypot(*errors)
            rows.append({"task": task, "target": t, "gateskip": g, "shortgpt": sg, "difference": diff, "stderr": se,
                         "random": _acc(records, task, "random", t)})
    return rows


def _point(x: dict | None) -> str:
    return "-" if x is None else f"{x['value']:.3f} ± {_num(x['stderr'])} at {_pct(x['net_saving'])}"


def _shortgpt_source(sg: dict, layers: int) -> str:
    removed = " and ".join(str(round(b * layers)) for b in sg["from"])
    if len(sg["from"]) == 1:
        return f"measured, {removed} layers removed"
    return f"interpolated between its points with {removed} layers removed"


def _proxy_line(t: float, gates: dict, curves: dict, src: str) -> str:
    """The proxy at one target: the gates' measured point, ShortGPT and random at the same saving."""
    saving, base = gates["net_saving"], curves["base"][0]
    at = {m: {f: interpolate(curves[m], saving, f) for f in PROXY_FIELDS} for m in ("shortgpt", "random")}
    sg = at["shortgpt"]["loss"]
    gap = "" if sg is None else f" (ShortGPT - gateskip {sg - gates['loss']:+.3f})"
    return (f"{_pct(t)} net saving, {src}, at the {_pct(saving)} the gates measured: loss gateskip {gates['loss']:.3f} "
            f"vs ShortGPT {_num(sg)}{gap} vs random {_num(at['random']['loss'])} (base {base['loss']:.3f}); KL to the "
            f"base {gates['kl']:.3f} vs {_num(at['shortgpt']['kl'])} vs {_num(at['random']['kl'])}; agreement with the "
            f"base's greedy tokens {gates['agreement']:.3f} vs {_num(at['shortgpt']['agreement'])} vs "
            f"{_num(at['random']['agreement'])}")


def _task_line(c: dict, items: int, layers: int) -> str:
    """One task at one target: the gates against ShortGPT at the same saving, and random."""
    line = f"{_pct(c['target'])} net saving, {c['task']} acc (lm-eval, {items} items): gateskip {_point(c['gateskip'])} vs "
    if c["shortgpt"] is None:
        line += "ShortGPT: no measured points around that saving"
    else:
        line += f"ShortGPT {_point(c['shortgpt'])} ({_shortgpt_source(c['shortgpt'], layers)}): {c['difference']:+.3f}, "
        if c["stderr"] is None:
            line += "no standard error"
        else:
            line += f"{'exceeds' if abs(c['difference']) > c['stderr'] else 'within'} the combined standard error {c['stderr']:.3f}"
    if c["random"] is not None:
        line += f"; random (equal share {c['target']:g}) {_point(c['random'])}"
    return line


def verdict(job: Job, layers: int, proxy: dict, comparisons: list[dict], records: list[dict]) -> list[str]:
    """Budget 0 against the base, then at each target gateskip vs ShortGPT (and random) on the proxy and every task."""
    s = job.sizes
    zero = proxy["budget_zero"]
    src = f"proxy ({proxy['blocks']} x {proxy['length']} held-out tokens, {proxy['prompts']} prompts)"
    lines = [f"budget 0 == base ({src}): {zero['application']} gates at target 0 give "
             + ("logits identical to the base model's, bit for bit" if zero["identical"]
                else f"logits differing from the base model's by up to {zero['max_abs_diff']:.3g}")
             + "; at 0 ShortGPT and random skip nothing either, so the base row is every method's 0 point"]
    lines += [f"base {task} acc (lm-eval, {s.items} items): {_point(_acc(records, task, 'base', 0.0))}" for task in s.tasks]
    gates = {p["target"]: p for p in proxy["curves"]["gateskip"]}
    for t in s.targets:
        lines.append(_proxy_line(t, gates[t], proxy["curves"], src))
        lines += [_task_line(c, s.items, layers) for c in comparisons if c["target"] == t]
    return lines


def other_findings(trained: dict, demo: bool, speed: dict, stats: dict) -> list[str]:
    """Training, speed and analysis, one line each, with their numbers."""
    what = "training demonstration (gates not evaluated)" if demo else "training"
    lines = [f"{what} (train/metrics.jsonl, {trained['steps']} steps, influence objective, frozen backbone): regression "
             f"loss {trained['loss_first']:.4f} at step 1, {trained['loss_last_quarter']:.4f} over the last quarter"
             + (f"; validation LM loss {trained['val_loss']:.3f} at an equal share of {trained['val_skip']:g} (masked)"
                if trained["val_loss"] is not None else "")]
    pre = [r for r in speed["prefill"]["rows"] if r["target"]]
    dec = [r for r in speed["decode"]["rows"] if r["target"]]
    lines.append("prefill speedup vs ungated (speed.json): " + ", ".join(
        f"{r['speedup']:.2f}x at {r['target']:g} (ideal {r['ideal_speedup']:.2f}x)" for r in pre))
    lines.append("decoding speedup vs ungated (speed.json): " + ", ".join(
        f"{r['speedup']:.2f}x at {r['target']:g} ({_pct(r['net_saving'])} net saved per token)" for r in dec))
    a = stats["anchor"]
    lines.append("analysis (analysis/analysis.json): first-token anchor in early layers: " + ", ".join(
        f"{b} {'yes' if a[b]['anchor'] else 'no'} (first {a[b]['first']:.4f} vs others {a[b]['other_tokens']:.4f})"
        for b in ("attn", "mlp") if b in a))
    return lines


def _comparison_table(comparisons: list[dict], records: list[dict], layers: int) -> list[str]:
    rows = ["| task | target | gateskip | ShortGPT at the same saving | gateskip - ShortGPT | combined stderr "
            "| random (equal share) |", "|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(c["task"] for c in comparisons):
        rows.append(f"| {task} | 0 | base {_point(_acc(records, task, 'base', 0.0))} | same | 0 | - | same |")
        for c in (c for c in comparisons if c["task"] == task):
            sg = "-" if c["shortgpt"] is None else f"{_point(c['shortgpt'])} ({_shortgpt_source(c['shortgpt'], layers)})"
            diff = "-" if c["difference"] is None else f"{c['difference']:+.3f}"
            rows.append(f"| {task} | {c['target']:g} | {_point(c['gateskip'])} | {sg} | {diff} | {_num(c['stderr'])} "
                        f"| {_point(c['random'])} |")
    return rows


def _samples_md(samples: list[dict]) -> list[str]:
    md = []
    for prompt in dict.fromkeys(r["prompt"] for r in samples):
        framed = next(r.get("chat_template", False) for r in samples if r["prompt"] == prompt)
        md += [f"Prompt{' (through the chat template)' if framed else ''}: `{prompt!r}`", "", "| method | target | net saving | continuation |", "|---|---|---|---|"]
        for r in (r for r in samples if r["prompt"] == prompt):
            text = r["text"].replace("\n", " / ").replace("|", "\\|")
            note = f" ({r['note']})" if r.get("note") else ""
            md.append(f"| {r['method']}{note} | {r['target']:g} | {_pct(r['net_saving'])} | {text} |")
        md.append("")
    return md


def samples_table(samples: list[dict]) -> Table:
    """The continuations, one section per prompt."""
    table = Table("prompt", "method", "target", "net saving", "continuation", title="free generation (samples.json)")
    rows = list(samples)
    for i, r in enumerate(rows):
        first = i == 0 or rows[i - 1]["prompt"] != r["prompt"]
        last = i == len(rows) - 1 or rows[i + 1]["prompt"] != r["prompt"]
        table.add_row(r["prompt"].split("\n")[0].removeprefix("Question: ") if first else "", r["method"],
                      f"{r['target']:g}", _pct(r["net_saving"]), r["text"].strip(), end_section=last)
    return table


def _header_md(job: Job, info: dict, wall: float) -> list[str]:
    stages = job.stages.values()
    return ["# GateSkip main job", "",
            f"Model `{job.model}`; evaluated gates: `{info['gates']}`; {torch.get_num_threads()} threads on "
            f"{os.cpu_count()} cores. This invocation: wall time {wall / 60:.1f} min, CPU time "
            f"{time.process_time() / 60:.1f} min; the stages as measured when they ran: "
            f"{sum(v['seconds'] for v in stages) / 60:.1f} min wall, {sum(v['cpu_seconds'] for v in stages) / 60:.1f} min CPU.",
            "", "| stage | wall | CPU (all threads) | in this invocation |", "|---|---|---|---|"] + [
            f"| {k} | {v['seconds']:.0f} s | {v['cpu_seconds']:.0f} s "
            f"| {'reused (time of the run that made it)' if v['reused'] else 'ran'} |" for k, v in job.stages.items()]


def _verdict_md(lines: list[str]) -> list[str]:
    return ["", "## Verdict", "",
            "Net saving: FLOPs of the decoder layers saved against the base model, the gates' own cost included, as "
            "measured in each run. ShortGPT at budget b removes round(b x layers) whole layers (Block Influence on the "
            "search text); random skips an equal share b per module. ShortGPT (and random on the proxy) is read off its "
            "curve at the saving the gates measured at each target, linear between measured points; random's task "
            "points are shown as measured. A task difference is set against the combined standard error "
            "sqrt(se1^2 + se2^2); the methods score the same items, so that error is conservative.", ""] + [
            f"- {line}" for line in lines]


def gate_provenance(file: Path) -> str:
    """How the gates were made, from the train_config.json a training run leaves beside them."""
    path = Path(file).parent / "train_config.json"
    if not path.is_file():
        return "no train_config.json beside the gate file"
    c = json.loads(path.read_text())
    gates = c.get("gates") or {"application": c.get("gate_application", "soft"), "kind": c.get("gate_kind")}
    return (f"trained by `{path}`: objective {c.get('objective', 'lm')}, {gates['application']} "
            f"{gates['kind']} gates, {c.get('steps')} steps on {', '.join(map(str, c.get('data', [])))}")


def _gates_md(info: dict) -> list[str]:
    return ["", "## Gates", "", f"`{info['gates']}` ({gate_provenance(Path(info['gates']))}); its stored allocations:",
            "", "```", describe(info["allocations"]), "```", "", "![allocations](proxy/allocations.png)", ""]


def _proxy_md(proxy: dict) -> list[str]:
    return ["## Proxy: held-out loss and KL against net saving", "",
            f"{proxy['blocks']} blocks x {proxy['length']} tokens of `{proxy['text']}` (the corpus's held-out side); "
            "physical execution; the table reads every curve at the nominal savings, linear between measured points "
            "(gateskip.search.proxy; '-': outside the measured range).", "", "LM loss (nats)", "",
            proxy_table(proxy["curves"], PROXY_TARGETS, "loss"), "", "KL to the base (nats)", "",
            proxy_table(proxy["curves"], PROXY_TARGETS, "kl"), "",
            f"Next-token agreement with the base on its greedy continuations ({proxy['prompts']} held-out prompts of "
            f"{PROMPT_TOKENS} tokens, {CONTINUATION_TOKENS} new tokens each; gates under their decoding thresholds)", "",
            proxy_table(proxy["curves"], PROXY_TARGETS, "agreement"), "", "![proxy](proxy/proxy.png)", ""]


def _tasks_md(job: Job, info: dict) -> list[str]:
    return (["## Tasks", "", f"lm-eval on the bundled copies, first {job.sizes.items} items per task, accuracy ± "
             "standard error (net saving measured in the run). ShortGPT is read off its curve (the base, then "
             "round(b x layers) layers removed at each budget b) at the net saving the gates measured, since the two "
             "rarely save exactly the same:", ""]
            + _comparison_table(info["comparisons"], info["records"], info["layers"])
            + ["", "Every point:", "", (job.out / "tasks" / TABLE).read_text(), f"![accuracy vs compute](tasks/{FIGURE})", ""])


def _speed_md(speed: dict) -> list[str]:
    label = lambda r: "ungated" if r["target"] is None else f"{r['target']:g}"  # noqa: E731
    md = ["## Speed (wall clock, side by side, interleaved rounds)", "",
          f"Prefill: batch {' x '.join(map(str, speed['prefill']['batch']))} held-out tokens, allocation quantiles.", "",
          "| prefill target | tokens/s | speedup | net FLOP saving | ideal speedup |", "|---|---|---|---|---|"]
    md += [f"| {label(r)} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | {_pct(r.get('net_saving'))} | "
           f"{'-' if r['target'] is None else format(r['ideal_speedup'], '.2f') + 'x'} |" for r in speed["prefill"]["rows"]]
    md += ["", f"Decoding: {speed['decode']['new_tokens']} greedy tokens after {speed['decode']['prompt']!r}, batch 1, "
           "the allocation's calibrated thresholds.", "",
           "| decode target | tokens/s | speedup | net FLOP saving per decoded token |", "|---|---|---|---|"]
    md += [f"| {label(r)} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {_pct(r.get('net_saving'))} |"
           for r in speed["decode"]["rows"]]
    spec = speed["decode"].get("speculative")
    if spec:
        md += [f"| self-speculative, drafts at {spec['draft_target']:g} | {spec['tokens_per_s']:.1f} | {spec['speedup']:.2f}x | "
               f"{100 * spec['acceptance']:.0f}% of drafts accepted, {spec['tokens_per_pass']:.2f} tokens per verify pass |"]
    return md + [""]


def write_report(job: Job, info: dict, lines: list[str], wall: float) -> Path:
    """report.md (everything, with the plots), summary.json (the numbers)."""
    md = _header_md(job, info, wall) + _verdict_md(lines) + _gates_md(info) + _proxy_md(info["proxy"])
    md += _tasks_md(job, info)
    md += ["## Free generation", "", f"Greedy, up to {job.sizes.new_tokens} new tokens; gateskip decodes with the "
           "allocation's calibrated thresholds; net saving over the whole generation (prompt and new tokens).", ""]
    md += _samples_md(info["samples"]) + _speed_md(info["speed"])
    md += ["## Training", "", info["training_note"], "",
           "## Gate analysis", "", f"See [analysis/{ANALYSIS_SUMMARY}](analysis/{ANALYSIS_SUMMARY}).", "",
           "![importance heatmap](analysis/importance_heatmap.png)", "",
           "![importance by token class](analysis/importance_by_token_class.png)", "",
           "![skip pattern](analysis/skip_pattern.png)", ""]
    path = job.out / "report.md"
    outputs.write_text(path, "\n".join(md))
    job.write_json("summary.json", {"model": job.model, "gates": info["gates"], "wall_seconds": round(wall, 1),
                                    "stages": job.stages, "verdict": lines, "training": info["training"],
                                    "proxy": info["proxy"], "tasks": info["records"],
                                    "task_comparisons": info["comparisons"], "samples": info["samples"],
                                    "speed": info["speed"], "anchor": info["analysis"]["anchor"]})
    return path


def training_note(sizes: JobSizes, demonstration: bool) -> str:
    return (f"Influence objective (gateskip.training.influence), frozen backbone, unit low-rank gates (rank {sizes.gate_rank}), "
            f"{sizes.train_steps} steps of {sizes.train_batch} x {sizes.train_seq_len} tokens from the first "
            f"{sizes.train_tokens} tokens of `data/train.jsonl.gz`, gate lr {sizes.gate_lr:g}, first token protected. "
            + ("A demonstration only: the evaluated gates are the shipped ones." if demonstration else
               f"Allocations for every target were then searched on {sizes.allocation_sequences} x {sizes.search_length} "
               "tokens of the training text (`gates/`)."))


def print_summary(console: Console, lines: list[str], samples: list[dict], report: Path, minutes: float) -> None:
    console.rule("[bold]summary[/]")
    table = Table(show_header=False, box=None)
    for line in lines:
        table.add_row("•", line)
    console.print(table)
    console.print(samples_table(samples))
    console.print(f"report: {report} (plots in {report.parent}/proxy, tasks and analysis); wall time {minutes:.1f} min")
