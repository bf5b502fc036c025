"""The main job (`gateskip demo`, what `make demo` runs): GateSkip end to end on one machine.

    train gates -> calibrate thresholds -> accuracy sweep vs random skipping
    -> prefill and decoding benchmarks -> gate analysis -> report folder

Sized to finish in about a quarter of an hour on 2 CPU cores with the bundled
SmolLM2-135M (`--quick`: a minute-scale version for tests). Every stage writes its
result into the report folder before the next one starts, and a rerun with the same
folder reuses what is there (trained gates, calibration, sweep points, benchmarks,
analysis), so an interrupted job continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import checkpoint
from .analysis import SUMMARY as ANALYSIS_SUMMARY, analyze, sample_sequences
from .baselines import make_method
from .calibrate import calibrate, ratio_key, sample_tokens
from .errors import GateSkipError
from .evaluation.metrics import summarize
from .evaluation.sweep import FIGURE, TABLE, Sweep, SweepSettings, run_sweep
from .flops import ModelDims, flop_report
from .generation import generate, reports
from .model import GATE_FILE, load_gates, save_gates
from .plan import SkipPlan
from .stats import SkipStats
from .timing import time_interleaved
from .train import TrainConfig, train

DECODE_PROMPT = "Question: Why do leaves change colour in autumn? Answer:"


@dataclass(frozen=True)
class JobSizes:
    """How much work each stage does. FULL is the main job; QUICK exercises every stage in seconds."""

    train_steps: int = 40
    train_batch: int = 4
    train_seq_len: int = 128
    train_tokens: int = 300_000  # the first tokens of the bundled text; analysis reads its (unseen) end
    gate_lr: float = 5e-3
    target_skip: float = 0.25
    calib_sequences: int = 8
    calib_length: int = 256
    tasks: tuple[str, ...] = ("arc_easy", "piqa")
    limit: int = 30
    budgets: tuple[float, ...] = (0.0, 0.1, 0.25)  # accuracy sweep: a 135M model is at chance well before 0.5
    speed_budgets: tuple[float, ...] = (0.25, 0.5)  # prefill and decoding benchmarks
    prefill_batch: int = 4
    prefill_length: int = 256
    decode_tokens: int = 32
    rounds: int = 2
    analysis_sequences: int = 8
    analysis_length: int = 128


FULL = JobSizes()
QUICK = JobSizes(train_steps=2, train_batch=1, train_seq_len=32, train_tokens=4_000, calib_sequences=2, calib_length=32,
                 tasks=("arc_easy",), limit=2, budgets=(0.0, 0.5), speed_budgets=(0.5,), prefill_batch=1, prefill_length=32,
                 decode_tokens=4, rounds=1, analysis_sequences=2, analysis_length=24)


class Job:
    """The report folder and the stages' bookkeeping: timings, and which stages were reused."""

    def __init__(self, model: str, out: Path, sizes: JobSizes, console: Console):
        self.model, self.out, self.sizes, self.console = model, Path(out), sizes, console
        self.out.mkdir(parents=True, exist_ok=True)
        self.stages: dict[str, dict] = {}
        self.gates_changed = False  # set when training or calibration ran: later results are stale
        # Timings of earlier invocations: a reused stage reports what it cost when it ran.
        saved = self.out / "summary.json"
        self.earlier: dict[str, dict] = json.loads(saved.read_text())["stages"] if saved.is_file() else {}
        self._check_same_job()

    def _check_same_job(self) -> None:
        """Reusing results is only right for the same model and sizes."""
        path = self.out / "job.json"
        now = {"model": self.model, "sizes": dataclasses.asdict(self.sizes)}
        now["sizes"]["tasks"] = list(self.sizes.tasks)
        now["sizes"]["budgets"] = list(self.sizes.budgets)
        now["sizes"]["speed_budgets"] = list(self.sizes.speed_budgets)
        if path.is_file() and json.loads(path.read_text()) != now:
            raise GateSkipError(f"{self.out} holds a main job with another model or size; choose another --out or delete it")
        path.write_text(json.dumps(now, indent=1))

    def stage(self, name: str, reused: bool):
        """Context manager that times a stage and prints its start and end."""
        job = self

        class _Stage:
            def __enter__(self):
                self.start, self.cpu = time.perf_counter(), time.process_time()
                job.console.rule(f"[bold]{name}[/]" + (" (reusing earlier result)" if reused else ""))

            def __exit__(self, *exc):
                seconds, cpu = time.perf_counter() - self.start, time.process_time() - self.cpu
                if exc[0] is None:
                    measured = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)}
                    if reused and name in job.earlier:
                        measured = {k: job.earlier[name][k] for k in measured}
                    job.stages[name] = {**measured, "reused": reused}
                    job.console.print(f"[dim]{name}: {seconds:.0f} s wall, {cpu:.0f} s CPU[/]")

        return _Stage()

    def reusable(self, path: Path) -> bool:
        """Whether a stage's output at `path` can be reused; stale output (made with other gates) is deleted."""
        if self.gates_changed and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return path.exists()

    def write_json(self, name: str, data) -> None:
        tmp = self.out / (name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.out / name)


# ---------------------------------------------------------------- stages


def stage_train(job: Job) -> Path:
    """Fine-tune low-rank gates on the frozen backbone (resumes an interrupted run).

    The first token is protected: SmolLM2 uses it as its attention sink, and skipping it alone
    wrecks the model long before the gates could learn to keep it."""
    s = job.sizes
    run_dir = job.out / "train"
    final = run_dir / "final" / GATE_FILE
    with job.stage("1. train gates", reused=final.is_file()):
        if not final.is_file():
            job.gates_changed = True
            cfg = TrainConfig(
                model=job.model, out=str(run_dir), steps=s.train_steps, mode="frozen", gate_kind="lowrank",
                batch_size=s.train_batch, seq_len=s.train_seq_len, gate_lr=s.gate_lr, target_skip=s.target_skip,
                max_tokens=s.train_tokens, eval_blocks=16, save_every=max(1, s.train_steps // 4), protect_first_token=True,
                resume=bool(checkpoint.checkpoints(run_dir)),
            )
            train(cfg)
    return final


def training_summary(run_dir: Path) -> dict:
    """Losses from metrics.jsonl, compared at equal skip ratios: the loss of the first step (nothing
    skipped yet) and, over the steps at the full target ratio, the first half against the second."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "lm" in r]
    val = [r for r in rows if "val_loss" in r]
    full = [r for r in steps if r["skip_ratio"] == steps[-1]["skip_ratio"]]
    half = max(1, len(full) // 2)
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    return {
        "steps": len(steps), "lm_step1": steps[0]["lm"], "target_skip": steps[-1]["skip_ratio"],
        "lm_full_skip_early": mean(full[:half], "lm"), "lm_full_skip_late": mean(full[-half:], "lm"),
        "gate_first": steps[0]["mean_gate"], "gate_last": steps[-1]["mean_gate"],
        "val_loss": val[-1]["val_loss"] if val else None, "val_skip": val[-1]["val_skip_ratio"] if val else None,
        "tokens_per_s": mean(steps, "tokens_per_s"),
    }


def stage_calibrate(job: Job, model, tokenizer, trained: Path) -> Path:
    """Thresholds for every budget used, so decoding can skip; saved with the gates in the report folder."""
    s = job.sizes
    gates = job.out / "gates" / GATE_FILE
    ratios = sorted({b for b in s.budgets + s.speed_budgets if b > 0})
    done = job.reusable(gates) and all(ratio_key(r) in load_gates(model, gates).gate_bank.thresholds for r in ratios)
    with job.stage("2. calibrate thresholds", reused=done):
        if not done:
            job.gates_changed = True
            load_gates(model, trained)
            calibrate(model, sample_tokens(tokenizer, "bundled", s.calib_sequences, s.calib_length), ratios)
            save_gates(model, gates)
    return gates


def stage_sweep(job: Job, model, tokenizer, gates: Path) -> list[dict]:
    """Accuracy at each budget for the trained gates and random skipping, against the ungated base."""
    s = job.sizes
    folder = job.out / "sweep"
    settings = SweepSettings(model=job.model, gates=str(gates), limit=s.limit, data="bundled", calibrated=True)
    sweep = Sweep(settings, list(s.tasks), list(s.budgets), ["gateskip", "random"], folder)
    n_points = len(s.tasks) * (1 + 2 * len(s.budgets))
    results = folder / "results.json"
    done = job.reusable(folder) and results.is_file() and len(json.loads(results.read_text())["records"]) > 0
    with job.stage(f"3. accuracy sweep ({n_points} points)", reused=done):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        methods = {name: make_method(name, model) for name in ("base", "gateskip", "random")}
        records = run_sweep(sweep, model, tokenizer, methods)
    return records


def _prefill(model, ids: torch.Tensor, budgets, rounds: int) -> dict:
    dims, config = ModelDims.from_config(model.config), model.gate_bank.config
    runs = {"ungated": lambda: model(ids, logits_to_keep=1)}
    saving = {}
    for b in budgets:
        stats = SkipStats()
        model(ids, skip_plan=SkipPlan(budget=b, stats=stats), logits_to_keep=1)
        saving[b] = flop_report(stats, dims, config)
        runs[f"{b:g}"] = lambda b=b: model(ids, skip_plan=SkipPlan(budget=b), logits_to_keep=1)
    times = time_interleaved(runs, rounds=rounds)
    rows = [{"budget": None, "seconds": times["ungated"], "tokens_per_s": ids.numel() / times["ungated"], "speedup": 1.0}]
    for b in budgets:
        t = times[f"{b:g}"]
        rows.append({"budget": b, "seconds": t, "tokens_per_s": ids.numel() / t, "speedup": times["ungated"] / t,
                     "skip_fraction": saving[b].paper_fraction, "net_saving": saving[b].net_saving,
                     "ideal_speedup": 1 / (1 - saving[b].net_saving)})
    return {"batch": list(ids.shape), "rows": rows}


def _decode(model, tokenizer, budgets, new_tokens: int, rounds: int) -> dict:
    ids = tokenizer(DECODE_PROMPT, return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
              top_k=None, pad_token_id=tokenizer.eos_token_id)
    runs = {"ungated": lambda: model.generate(ids, **kw)}
    for b in budgets:
        runs[f"{b:g}"] = lambda b=b: generate(model, ids, budget=b, **kw)
    times = time_interleaved(runs, rounds=rounds)
    reference = model.generate(ids, **kw)[0, ids.shape[1]:]
    rows = [{"budget": None, "tokens_per_s": new_tokens / times["ungated"], "speedup": 1.0,
             "text": tokenizer.decode(reference, skip_special_tokens=True)}]
    for b in budgets:
        gen = generate(model, ids, budget=b, **kw)
        dec = reports(model, gen.prefill, gen.decode)["decoding"]
        out = gen.sequences[0, ids.shape[1]:]
        rows.append({"budget": b, "tokens_per_s": new_tokens / times[f"{b:g}"], "speedup": times["ungated"] / times[f"{b:g}"],
                     "skip_fraction": dec.paper_fraction, "net_saving": dec.net_saving,
                     "same_tokens_as_ungated": float((out == reference).float().mean()),
                     "text": tokenizer.decode(out, skip_special_tokens=True)})
    return {"prompt": DECODE_PROMPT, "new_tokens": new_tokens, "rows": rows}


def stage_benchmarks(job: Job, model, tokenizer) -> dict:
    """Prefill (physical skipping, quantile budget) and greedy decoding (calibrated thresholds), side by side."""
    s = job.sizes
    path = job.out / "benchmarks.json"
    with job.stage("4. prefill and decoding benchmarks", reused=job.reusable(path)):
        if path.is_file():
            return json.loads(path.read_text())
        ids, _ = sample_sequences(tokenizer, "bundled", s.prefill_batch, s.prefill_length)
        with torch.inference_mode():
            job.console.print(f"prefill: batch {ids.shape[0]} x {ids.shape[1]} tokens, {s.rounds} interleaved rounds")
            budgets = (0.0, *s.speed_budgets)
            result = {"threads": torch.get_num_threads(), "prefill": _prefill(model, ids, budgets, s.rounds)}
            job.console.print(f"decoding: {s.decode_tokens} new tokens, batch 1, greedy")
            result["decode"] = _decode(model, tokenizer, budgets, s.decode_tokens, s.rounds)
        job.write_json(path.name, result)
    return result


def stage_analysis(job: Job, model, tokenizer, gates: Path) -> dict:
    s = job.sizes
    folder = job.out / "analysis"
    with job.stage("5. gate analysis", reused=job.reusable(folder) and (folder / "analysis.json").is_file()):
        if (folder / "analysis.json").is_file():
            return json.loads((folder / "analysis.json").read_text())
        ids, mask = sample_sequences(tokenizer, "bundled", s.analysis_sequences, s.analysis_length)
        return analyze(model, tokenizer, ids, mask, folder, budget=0.25,
                       text="the end of the bundled text (not trained on)", gates=str(gates))


# ---------------------------------------------------------------- report


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def findings(job: Job, trained: dict, records: list[dict], bench: dict, stats: dict) -> list[str]:
    """The few sentences the summary leads with, each with its numbers."""
    lines = [f"training ({trained['steps']} steps, frozen backbone, low-rank gates, first token protected): LM loss "
             f"{trained['lm_step1']:.3f} at step 1 (nothing skipped); at skip {trained['target_skip']:g} it fell from "
             f"{trained['lm_full_skip_early']:.3f} to {trained['lm_full_skip_late']:.3f} (first vs second half of those "
             f"steps); mean gate {trained['gate_first']:.3f} -> {trained['gate_last']:.3f}"
             + (f"; validation loss {trained['val_loss']:.3f} at skip {trained['val_skip']:g}"
                if trained["val_loss"] is not None else "")]
    rows = summarize(records)
    for task in job.sizes.tasks:
        pts = {(r["method"], r["budget"]): r for r in records if r["task"] == task and r["metric"] == "acc"}
        if ("base", 0.0) not in pts:
            continue
        parts = [f"base {pts[('base', 0.0)]['value']:.3f}"]
        for b in job.sizes.budgets:
            g, r = pts.get(("gateskip", b)), pts.get(("random", b))
            if g and r:
                parts.append(f"at {b:g}: gates {g['value']:.3f} ({_pct(g['net_saving'])} net saved) vs random {r['value']:.3f}")
        saved = next((r["saved_at_90"] for r in rows if r["task"] == task and r["method"] == "gateskip"), None)
        lines.append(f"{task} acc (limit {job.sizes.limit}): " + "; ".join(parts) + f"; net saved at 90% of base: {_pct(saved)}")
    pre = [r for r in bench["prefill"]["rows"] if r["budget"]]
    dec = [r for r in bench["decode"]["rows"] if r["budget"]]
    lines.append("prefill speedup vs ungated: " + ", ".join(
        f"{r['speedup']:.2f}x at {r['budget']:g} (ideal {r['ideal_speedup']:.2f}x)" for r in pre))
    lines.append("decoding speedup vs ungated: " + ", ".join(
        f"{r['speedup']:.2f}x at {r['budget']:g} ({_pct(r['skip_fraction'])} of decode evaluations skipped)" for r in dec))
    a = stats["anchor"]
    lines.append("BOS/first-token anchor in early layers: " + ", ".join(
        f"{b} {'yes' if a[b]['anchor'] else 'no'} (first {a[b]['first']:.4f} vs others {a[b]['other_tokens']:.4f})"
        for b in ("attn", "mlp") if b in a))
    return lines


def write_report(job: Job, trained: dict, records: list[dict], bench: dict, stats: dict, lines: list[str], wall: float) -> Path:
    """report.md (everything, with the plots), summary.json (the numbers)."""
    s = job.sizes
    timings = ["| stage | wall | CPU (all threads) | in this invocation |", "|---|---|---|---|"] + [
        f"| {k} | {v['seconds']:.0f} s | {v['cpu_seconds']:.0f} s "
        f"| {'reused (time of the run that made it)' if v['reused'] else 'ran'} |"
        for k, v in job.stages.items()]
    md = ["# GateSkip main job", "",
          f"Model `{job.model}`; {torch.get_num_threads()} threads on {os.cpu_count()} cores. This invocation: wall time "
          f"{wall / 60:.1f} min, CPU time {time.process_time() / 60:.1f} min; the stages as measured when they ran: "
          f"{sum(v['seconds'] for v in job.stages.values()) / 60:.1f} min wall, "
          f"{sum(v['cpu_seconds'] for v in job.stages.values()) / 60:.1f} min CPU (load from other jobs stretches "
          "wall time, not CPU time).", ""] + timings + ["", "## Summary", ""] + [f"- {line}" for line in lines]
    md += ["", "## Training", "",
           f"Frozen backbone, low-rank gates (rank 32), {s.train_steps} steps of {s.train_batch} x {s.train_seq_len} tokens "
           f"from the first {s.train_tokens} tokens of the bundled text, gate lr {s.gate_lr:g}, skip ratio ramped to "
           f"{s.target_skip:g} (masked), first token never skipped. Metrics: `train/metrics.jsonl`; "
           f"gates: `gates/{GATE_FILE}` (with thresholds).", "",
           "## Accuracy vs compute", "",
           f"lm-eval on the bundled tasks, first {s.limit} items each; `random` skips as many tokens per module, "
           "chosen at random (no gate cost charged); net saving subtracts the gates' own FLOPs.", "",
           (job.out / "sweep" / TABLE).read_text(), f"![accuracy vs compute](sweep/{FIGURE})", "",
           "## Speed (wall clock, side by side, interleaved rounds)", "",
           "| prefill budget | tokens/s | speedup | skipped (paper) | net FLOP saving | ideal speedup |", "|---|---|---|---|---|---|"]
    for r in bench["prefill"]["rows"]:
        md.append(f"| {'ungated' if r['budget'] is None else r['budget']} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x "
                  f"| {_pct(r.get('skip_fraction'))} | {_pct(r.get('net_saving'))} | "
                  f"{'-' if r['budget'] is None else format(r['ideal_speedup'], '.2f') + 'x'} |")
    md += ["", f"Decoding: {bench['decode']['new_tokens']} greedy tokens after {bench['decode']['prompt']!r} "
               "(budgets are calibrated thresholds).", "",
           "| decode budget | tokens/s | speedup | skipped (paper) | net FLOP saving | same tokens as ungated | text |",
           "|---|---|---|---|---|---|---|"]
    for r in bench["decode"]["rows"]:
        text = r["text"].replace("\n", " ").replace("|", "/")[:80]
        md.append(f"| {'ungated' if r['budget'] is None else r['budget']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x "
                  f"| {_pct(r.get('skip_fraction'))} | {_pct(r.get('net_saving'))} "
                  f"| {_pct(r.get('same_tokens_as_ungated'))} | {text} |")
    md += ["", "## Gate analysis", "", f"See [analysis/{ANALYSIS_SUMMARY}](analysis/{ANALYSIS_SUMMARY}).", "",
           "![importance heatmap](analysis/importance_heatmap.png)", "",
           "![importance by token class](analysis/importance_by_token_class.png)", "",
           "![skip pattern](analysis/skip_pattern.png)", ""]
    path = job.out / "report.md"
    path.write_text("\n".join(md))
    job.write_json("summary.json", {"model": job.model, "wall_seconds": round(wall, 1), "stages": job.stages,
                                    "training": trained, "findings": lines, "sweep_summary": summarize(records),
                                    "benchmarks": bench, "anchor": stats["anchor"]})
    return path


def run_job(model_spec: str, out: Path, sizes: JobSizes, console: Console | None = None) -> dict:
    """Run (or continue) the main job; returns summary.json's content."""
    from .loading import load_model

    console = console or Console()
    start = time.perf_counter()
    job = Job(model_spec, out, sizes, console)
    trained_gates = stage_train(job)
    model, tokenizer = load_model(model_spec)
    model.eval()
    gates = stage_calibrate(job, model, tokenizer, trained_gates)
    load_gates(model, gates)
    records = stage_sweep(job, model, tokenizer, gates)
    bench = stage_benchmarks(job, model, tokenizer)
    stats = stage_analysis(job, model, tokenizer, gates)
    trained = training_summary(job.out / "train")
    lines = findings(job, trained, records, bench, stats)
    report = write_report(job, trained, records, bench, stats, lines, time.perf_counter() - start)
    console.rule("[bold]summary[/]")
    table = Table(show_header=False, box=None)
    for line in lines:
        table.add_row("•", line)
    console.print(table)
    console.print(f"report: {report} (plots in {job.out}/sweep and {job.out}/analysis); "
                  f"wall time {(time.perf_counter() - start) / 60:.1f} min")
    return json.loads((job.out / "summary.json").read_text())


# ---------------------------------------------------------------- command line


def register(subparsers) -> None:
    """Add `gateskip demo` (what `make demo` runs)."""
    p = subparsers.add_parser("demo", help="the main job: train gates, calibrate, sweep, benchmark, analyse, report",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled name, local folder or hub id")
    p.add_argument("--out", type=Path, help="report folder (default reports/demo, reports/demo-quick with --quick); "
                   "rerun with the same folder to continue")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every stage in a minute or two (a smoke test)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is faster on a "
                   "machine that other jobs keep busy)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise GateSkipError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = args.out or Path("reports/demo-quick" if args.quick else "reports/demo")
    run_job(args.model, out, QUICK if args.quick else FULL)
    return 0
