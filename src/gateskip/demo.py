"""The main job (`gateskip demo`, what `make demo` runs): the project's case, measured on one machine.

    held-out text -> gates -> proxy (held-out loss and KL) -> tasks (lm-eval) -> free generation
    -> prefill and decoding speed -> gate analysis -> verdict and report folder

Every comparison is at the same net FLOP saving (decoder layers, the gates' own cost
included): the gates under their stored allocations against ShortGPT's layer removal and
random skipping, with the base model as the reference. For the bundled SmolLM2-135M the
shipped gates (gates/smollm2-135m-unit) are evaluated and a short training run only
demonstrates training; for any other model (or with --train-gates) the job trains its own
gates with the influence objective and searches their allocations. Sized for about 20 min
on 2 idle CPU cores (`--quick`: a minute-scale version for tests). Every stage writes its
result into the report folder before the next one starts; a rerun with the same folder
reuses what is there, so an interrupted job continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .training import checkpoint
from .inference.calibrate import allocation_budget
from .search.allocation import describe, plot as plot_allocations, search, store
from .data.samples import sample_sequences
from .evaluation.analysis import SUMMARY as ANALYSIS_SUMMARY, analyze
from .inference.bench import decode_speed, prefill_speed
from .search.baselines import make_method
from .inference.calibrate import calibrate_allocation, ratio_key, sample_tokens
from .data.corpus import split_documents, write_jsonl
from .errors import GateSkipError
from .evaluation.batch import DEFAULT_BATCH_SIZE
from .evaluation.sweep import FIGURE, TABLE, Sweep, SweepSettings, load_records, points, run_sweep
from .core.flops import ModelDims, flop_report
from .inference.contract import reports
from .inference.generation import generate
from . import files as outputs
from .core.model import GATE_FILE, load_gates, read_gate_file, save_gates
from .core.plan import SkipPlan
from .search.proxy import CONTINUATION_TOKENS, PROMPT_TOKENS, TARGETS as PROXY_TARGETS, greedy_continuations, interpolate, plot as plot_proxy
from .search.proxy import run_proxy, table as proxy_table
from .core.stats import SkipStats
from .training import TrainConfig, train
from .validate import check_output_folder, integer, output_path, read_json

REPO = Path(__file__).resolve().parents[2]
SHIPPED_GATES = {"smollm2-135m": "gates/smollm2-135m-unit/gateskip.safetensors"}  # repo-relative
PROMPTS = (
    "Question: What do plants need to make food?\nAnswer:",
    "Question: Why does ice float on water?\nAnswer:",
    "Question: What is the largest planet in the solar system?\nAnswer:",
)
DECODE_PROMPT = PROMPTS[0]
PROXY_METHODS = ("gateskip", "equal", "shortgpt", "random")
PROXY_FIELDS = ("loss", "kl", "agreement")
ALLOCATION_LEVELS = (0.5, 1.0)  # skip ratios the search for gates trained here steps through: fewer forwards
TASK_BATCH = DEFAULT_BATCH_SIZE  # `gateskip eval`'s: GatedLM masks padding, so scores equal batch size 1's


@dataclass(frozen=True)
class JobSizes:
    """How much work each stage does. FULL is the main job; QUICK exercises every stage in seconds."""

    targets: tuple[float, ...] = (0.1, 0.2, 0.3)  # net savings compared; at 0 every method is the base
    train_steps: int = 24  # influence objective: one forward of the base per step
    train_batch: int = 4
    train_seq_len: int = 128
    train_tokens: int = 200_000
    gate_rank: int = 16
    gate_lr: float = 3e-3
    search_sequences: int = 2  # training-side text ShortGPT ranks layers on (as `gateskip allocate` reads)
    search_length: int = 256
    allocation_sequences: int = 1  # of those, what the search for gates trained here reads (a forward per step)
    proxy_blocks: int = 3
    proxy_length: int = 256
    agreement_prompts: int = 4  # held-out prompts the base continues greedily; the proxy scores agreement on them
    tasks: tuple[str, ...] = ("arc_easy", "piqa")
    items: int = 200  # per task; lm-eval's standard error is printed with every score
    random_targets: tuple[float, ...] = (0.2,)  # random skipping on tasks (the proxy has its whole curve)
    sample_targets: tuple[float, ...] = (0.1, 0.2)
    new_tokens: int = 40
    prefill_batch: int = 2
    prefill_length: int = 256
    decode_tokens: int = 32
    rounds: int = 2
    analysis_sequences: int = 8
    analysis_length: int = 128


FULL = JobSizes()
QUICK = JobSizes(train_steps=2, train_batch=1, train_seq_len=32, train_tokens=4_000, search_sequences=1,
                 search_length=32, proxy_blocks=2, proxy_length=32, agreement_prompts=1, tasks=("arc_easy",), items=2,
                 new_tokens=4, prefill_batch=1, prefill_length=32, decode_tokens=4, rounds=1, analysis_sequences=2,
                 analysis_length=24)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Job:
    """The report folder and the stages' bookkeeping: timings, which stages were reused, and
    whether the gates changed since the results in the folder were made."""

    def __init__(self, model: str, out: Path, sizes: JobSizes, console: Console, gates: str = "trained here"):
        self.model, self.out, self.sizes, self.console, self.gates = model, Path(out), sizes, console, gates
        self.out.mkdir(parents=True, exist_ok=True)
        self.stages: dict[str, dict] = {}
        self.gates_changed = False  # set by check_gates: later results in the folder are stale
        self.trained_now = False  # training ran in this invocation: the allocation must be searched again
        # Timings of earlier invocations: a reused stage reports what it cost when it ran.
        saved = self.out / "summary.json"
        self.earlier: dict[str, dict] = read_json(saved, "job summary").get("stages", {}) if saved.is_file() else {}
        self._check_same_job()

    def _check_same_job(self) -> None:
        """Reusing results is only right for the same model, gates and sizes."""
        path = self.out / "job.json"
        now = {"model": self.model, "gates": self.gates, "sizes": dataclasses.asdict(self.sizes)}
        now = json.loads(json.dumps(now))  # tuples as lists, as read back
        if path.is_file() and read_json(path, "job record") != now:
            raise GateSkipError(f"{self.out} holds a main job with another model, gates or size; "
                                "choose another --out or delete it")
        outputs.write_json(path, now, indent=1)

    def check_gates(self, files: dict[str, Path]) -> None:
        """Results made with other gates are stale: compare the gate files' hashes with the last run's
        (a shipped file regenerated in place, or gates retrained here, change them)."""
        path = self.out / "gates.json"
        now = {role: {"path": str(p), "sha256": _sha256(p)} for role, p in files.items()}
        if not path.is_file() or read_json(path, "gate record") != now:
            self.gates_changed = True
            self.write_json(path.name, now)

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
        outputs.write_json(self.out / name, data, indent=1)


# ---------------------------------------------------------------- gates: which ones, and where from


def shipped_gates(model_spec: str) -> Path | None:
    """The gate file shipped for a bundled model (None for any other model)."""
    rel = SHIPPED_GATES.get(model_spec.strip().lower())
    return None if rel is None else REPO / rel


def choose_gates(model_spec: str, gates: Path | None, train_here: bool) -> Path | None:
    """The gate file the job evaluates: --gates, else the shipped one; None: train them here."""
    if gates is not None:
        file = gates / GATE_FILE if gates.is_dir() else gates
        if not file.is_file():
            raise GateSkipError(f"--gates {gates}: no gate file there")
        return file
    shipped = None if train_here else shipped_gates(model_spec)
    if shipped is not None and not shipped.is_file():
        raise GateSkipError(f"the shipped gates for {model_spec} are missing ({shipped}); pass --gates PATH, "
                            "or --train-gates to train gates here")
    return shipped


def check_allocations(file: Path, model_spec: str, targets) -> None:
    """A gate file is only usable here with an allocation (and decoding thresholds) for every target."""
    stored = read_gate_file(file)[0].get("allocations") or {}
    missing = [k for k in map(ratio_key, sorted(targets)) if "thresholds" not in stored.get(k, {})]
    if missing:
        what = "holds no allocations"
        if stored:
            what = f"needs allocations for net savings {', '.join(missing)} (it holds {', '.join(sorted(stored, key=float))})"
        raise GateSkipError(f"{file} {what}; run `gateskip allocate {model_spec} --gates {file} "
                            f"--targets {' '.join(missing)}`")


# ---------------------------------------------------------------- stages


def stage_text(job: Job) -> tuple[Path, Path]:
    """The corpus split (gateskip.data.corpus, seed 0): the training side for gates, allocation search and
    ShortGPT's ranking; the held-out side, which nothing here trains or searches on, for the proxy,
    the speed benchmark and the analysis (the shipped gates were made from the same split)."""
    folder = job.out / "data"
    train_text, heldout = folder / "train.jsonl.gz", folder / "heldout.jsonl.gz"
    done = train_text.is_file() and heldout.is_file()
    with job.stage("corpus split", reused=done):
        if not done:
            train_rows, heldout_rows = split_documents()
            write_jsonl(heldout_rows, heldout)
            write_jsonl(train_rows, train_text)  # last: its presence marks the stage done
            job.console.print(f"{len(train_rows)} training and {len(heldout_rows)} held-out documents")
    return train_text, heldout


def stage_train(job: Job, train_text: Path, evaluated: bool) -> Path:
    """Train low-rank unit gates with the influence objective on the frozen backbone (resumes an
    interrupted run). `evaluated`: these are the gates the job evaluates, else a demonstration."""
    s = job.sizes
    run_dir = job.out / "train"
    final = run_dir / "final" / GATE_FILE
    name = "train gates" if evaluated else "training demonstration"
    with job.stage(name, reused=final.is_file()):
        if not final.is_file():
            cfg = TrainConfig(
                model=job.model, out=str(run_dir), data=[str(train_text)], steps=s.train_steps, mode="frozen",
                objective="influence", gate_application="unit", gate_kind="lowrank", rank=s.gate_rank,
                protect_first_token=True, batch_size=s.train_batch, seq_len=s.train_seq_len, gate_lr=s.gate_lr,
                max_tokens=s.train_tokens, target_skip=0.2, eval_blocks=4, save_every=max(1, s.train_steps // 4),
                resume=bool(checkpoint.checkpoints(run_dir)),
            )
            train(cfg)
            job.trained_now = True
    return final


def training_summary(run_dir: Path) -> dict:
    """The influence regression loss at the first step and over the last quarter of the steps, and
    the validation LM loss (masked, equal share 0.2 per module) at the end."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    tail = steps[-max(1, len(steps) // 4):]
    return {"steps": len(steps), "loss_first": steps[0]["loss"],
            "loss_last_quarter": sum(r["loss"] for r in tail) / len(tail),
            "val_loss": val[-1]["val_loss"] if val else None, "val_skip": val[-1]["val_skip_ratio"] if val else None,
            "tokens_per_s": sum(r["tokens_per_s"] for r in steps) / len(steps)}


def stage_allocate(job: Job, model, trained: Path, search_blocks) -> Path:
    """Allocations for every target on training-side text (allocation.search), with decoding thresholds."""
    gates = job.out / "gates" / GATE_FILE
    done = gates.is_file() and not job.trained_now
    with job.stage("allocate", reused=done):
        if not done:
            load_gates(model, trained)
            text = tuple(t[: job.sizes.allocation_sequences] for t in search_blocks)
            found = search(model, text, job.sizes.targets, ALLOCATION_LEVELS, progress=job.console.print)
            store(model.gate_bank, found)
            calibrate_allocation(model, text, model.gate_bank.allocations)
            save_gates(model, gates)
    return gates


@torch.no_grad()
def budget_zero(model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The gated model at target 0 against the original model (no plan) on the held-out blocks:
    with unit gates the logits must be the same bit for bit."""
    plain = model(ids, attention_mask=mask).logits
    zero = model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=allocation_budget(model, 0.0))).logits
    return {"identical": bool(torch.equal(plain, zero)), "max_abs_diff": float((plain - zero).abs().max()),
            "tokens": int(mask.sum()), "application": model.gate_bank.config.application}


EQUAL_SHARE = " (equal share)"


def _relabel(curves: dict[str, list[dict]], label: str) -> dict[str, list[dict]]:
    """run_proxy names the curves of its (here: one) gate file after the file; name them after their role."""
    baselines = ("base", "shortgpt", "random")
    return {name if name in baselines else label + (EQUAL_SHARE if name.endswith(EQUAL_SHARE) else ""): pts
            for name, pts in curves.items()}


def stage_proxy(job: Job, model, tokenizer, gates: Path, heldout: Path, search_blocks) -> dict:
    """Held-out LM loss, KL to the base and next-token agreement with the base's greedy continuations
    against net saving (gateskip.search.proxy): the gates under their allocations and at the paper's equal
    share, ShortGPT, random; plus the budget-0 check."""
    s = job.sizes
    folder = job.out / "proxy"
    path = folder / "proxy.json"
    with job.stage("proxy", reused=job.reusable(folder) and path.is_file()):
        if path.is_file():
            return read_json(path, "stage result")
        blocks = sample_tokens(tokenizer, str(heldout), s.proxy_blocks, s.proxy_length)
        after = len(blocks[0]) * s.proxy_length // PROMPT_TOKENS  # prompts from the held-out text after the blocks
        prompts = sample_tokens(tokenizer, str(heldout), after + s.agreement_prompts, PROMPT_TOKENS)[0][after:]
        job.console.print(f"{len(blocks[0])} held-out blocks x {s.proxy_length} tokens, {len(prompts)} prompts")
        continuations = greedy_continuations(model, list(prompts), CONTINUATION_TOKENS)
        curves = run_proxy(model, [gates], blocks, search_blocks, PROXY_METHODS, lambda p: load_gates(model, p),
                           continuations, PROMPT_TOKENS)
        curves = _relabel(curves, "gateskip")
        for target, point in zip([0.0, *sorted(map(float, model.gate_bank.allocations))], curves["gateskip"]):
            point["target"] = target  # run_proxy measures the stored targets in this order
        result = {"text": f"data/{heldout.name}", "blocks": len(blocks[0]), "length": s.proxy_length,
                  "prompts": len(prompts), "curves": curves, "budget_zero": budget_zero(model, *blocks)}
        folder.mkdir(parents=True, exist_ok=True)
        plot_proxy(curves, folder / "proxy.png")
        plot_allocations(model.gate_bank.allocations, model.gate_bank.module_keys(), folder / "allocations.png")
        outputs.write_json(path, result, indent=1)
    return result


def task_sweeps(job: Job, gates: Path) -> list[Sweep]:
    """Gates and ShortGPT at every target, random at a few, the base once; one results.json."""
    s = job.sizes
    settings = SweepSettings(model=job.model, gates=str(gates), limit=s.items, data="bundled", batch_size=TASK_BATCH,
                             sample_text=f"data/train.jsonl.gz, first {s.search_sequences} x {s.search_length} tokens")
    folder = job.out / "tasks"
    return [Sweep(settings, list(s.tasks), list(s.targets), ["gateskip", "shortgpt"], folder),
            Sweep(settings, list(s.tasks), list(s.random_targets), ["random"], folder)]


def stage_tasks(job: Job, model, tokenizer, gates: Path, search_blocks) -> list[dict]:
    """lm-eval accuracy with standard errors at every point (evaluation.sweep, resumable per point)."""
    sweeps = task_sweeps(job, gates)
    folder, settings = sweeps[0].out, sweeps[0].settings
    wanted = {(m, b, t) for sw in sweeps for m, b in points(sw) for t in sw.tasks}
    done = job.reusable(folder) and wanted <= {(r["method"], r["budget"], r["task"])
                                               for r in load_records(folder, settings)}
    with job.stage("tasks", reused=done):
        if done:
            return load_records(folder, settings)
        s = job.sizes
        job.console.print(f"{len(wanted)} lm-eval points: {', '.join(s.tasks)}, first {s.items} items each")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        methods = {name: make_method(name, model) for name in ("base", "gateskip", "random")}
        methods["shortgpt"] = make_method("shortgpt", model, sample=search_blocks)
        for sweep in sweeps:
            records = run_sweep(sweep, model, tokenizer, methods)
    return records


def _greedy(tokenizer, new_tokens: int) -> dict:
    return dict(max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=tokenizer.eos_token_id)


def _continuations(model, tokenizer, prompt: str, targets, shortgpt, new_tokens: int) -> list[dict]:
    """One prompt's greedy continuations: the base, the gates at each target, ShortGPT at each target."""
    kw = _greedy(tokenizer, new_tokens)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    dims = ModelDims.from_config(model.config)

    def row(method: str, target: float, saving: float, seq: torch.Tensor, **extra) -> dict:
        text = tokenizer.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)
        return {"prompt": prompt, "method": method, "target": target, "net_saving": saving, "text": text, **extra}

    rows = [row("base", 0.0, 0.0, model.generate(ids, **kw))]
    for t in targets:
        gen = generate(model, ids, budget=t, **kw)
        rows.append(row("gateskip", t, reports(model, gen.prefill, gen.decode)["generation"].net_saving, gen.sequences))
    for t in targets:
        stats = SkipStats()
        _, plan, note = shortgpt.plans(t, stats)
        with shortgpt.attached(model):
            seq = model.generate(ids, skip_plan=plan, **kw)
        rows.append(row("shortgpt", t, flop_report(stats, dims, None).net_saving, seq, note=note))
    return rows


def stage_samples(job: Job, model, tokenizer, search_blocks) -> list[dict]:
    """Greedy continuations of question prompts: base, the gates at a few targets (calibrated
    thresholds, gateskip.inference.generation), ShortGPT with as many layers removed."""
    path = job.out / "samples.json"
    with job.stage("samples", reused=job.reusable(path)):
        if path.is_file():
            return read_json(path, "stage result")
        shortgpt = make_method("shortgpt", model, sample=search_blocks)
        with torch.inference_mode():
            rows = [r for prompt in PROMPTS for r in _continuations(model, tokenizer, prompt, job.sizes.sample_targets,
                                                                   shortgpt, job.sizes.new_tokens)]
        job.write_json(path.name, rows)
    return rows


def stage_speed(job: Job, model, tokenizer, heldout: Path) -> dict:
    """Wall-clock prefill (physical skipping, allocation quantiles) and greedy decoding (calibrated
    thresholds, gateskip.inference.decoding; self-speculative drafting at the smallest target) against the
    ungated model and HF generate, interleaved rounds (gateskip.inference.bench)."""
    s = job.sizes
    path = job.out / "speed.json"
    with job.stage("speed", reused=job.reusable(path)):
        if path.is_file():
            return read_json(path, "stage result")
        ids, _ = sample_sequences(tokenizer, str(heldout), s.prefill_batch, s.prefill_length)
        targets = (0.0, *s.targets)
        with torch.inference_mode():
            job.console.print(f"prefill: batch {ids.shape[0]} x {ids.shape[1]} tokens, {s.rounds} interleaved rounds")
            result = {"threads": torch.get_num_threads(), "prefill": prefill_speed(model, ids, targets, s.rounds)}
            job.console.print(f"decoding: {s.decode_tokens} new tokens, batch 1, greedy (gateskip bench)")
            prompt = tokenizer(DECODE_PROMPT, return_tensors="pt")["input_ids"]
            result["decode"] = {"prompt": DECODE_PROMPT, **decode_speed(
                model, prompt, None, targets, s.decode_tokens, s.rounds, speculative=min(s.targets),
                pad=tokenizer.eos_token_id)}
        job.write_json(path.name, result)
    return result


def stage_analysis(job: Job, model, tokenizer, gates: Path, heldout: Path) -> dict:
    """What the gates rank (gateskip.evaluation.analysis) on held-out text, at an equal share of 0.25."""
    s = job.sizes
    folder = job.out / "analysis"
    with job.stage("analysis", reused=job.reusable(folder) and (folder / "analysis.json").is_file()):
        if (folder / "analysis.json").is_file():
            return read_json(folder / "analysis.json", "stage result")
        ids, mask = sample_sequences(tokenizer, str(heldout), s.analysis_sequences, s.analysis_length)
        return analyze(model, tokenizer, ids, mask, folder, budget=0.25, text="held-out text (data/heldout.jsonl.gz)",
                       gates=str(gates))


# ---------------------------------------------------------------- verdict and report


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
        md += [f"Prompt: `{prompt!r}`", "", "| method | target | net saving | continuation |", "|---|---|---|---|"]
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
    return (f"trained by `{path}`: objective {c.get('objective', 'lm')}, {c.get('gate_application', 'soft')} "
            f"{c.get('gate_kind')} gates, {c.get('steps')} steps on {', '.join(map(str, c.get('data', [])))}")


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


def run_job(model_spec: str, out: Path, sizes: JobSizes, console: Console | None = None,
            gates: Path | None = None, train_gates: bool = False) -> dict:
    """Run (or continue) the main job; returns summary.json's content. `gates`: the gate file to
    evaluate (default: the shipped one for the bundled model); `train_gates`: train them here."""
    from .loading import load_model

    console = console or Console()
    start = time.perf_counter()
    chosen = choose_gates(model_spec, gates, train_gates)
    if chosen is not None:
        check_allocations(chosen, model_spec, {*sizes.targets, *sizes.sample_targets})
    job = Job(model_spec, out, sizes, console, gates="trained here" if chosen is None else str(chosen))
    train_text, heldout = stage_text(job)
    trained = stage_train(job, train_text, evaluated=chosen is None)
    model, tokenizer = load_model(model_spec)
    model.eval()
    search_blocks = sample_tokens(tokenizer, str(train_text), sizes.search_sequences, sizes.search_length)
    gates = chosen if chosen is not None else stage_allocate(job, model, trained, search_blocks)
    job.check_gates({"evaluated": gates})
    load_gates(model, gates)
    info = {"gates": str(gates), "layers": model.config.num_hidden_layers, "allocations": model.gate_bank.allocations,
            "proxy": stage_proxy(job, model, tokenizer, gates, heldout, search_blocks),
            "records": stage_tasks(job, model, tokenizer, gates, search_blocks),
            "samples": stage_samples(job, model, tokenizer, search_blocks),
            "speed": stage_speed(job, model, tokenizer, heldout),
            "analysis": stage_analysis(job, model, tokenizer, gates, heldout),
            "training": training_summary(job.out / "train"), "training_note": training_note(sizes, chosen is not None)}
    info["comparisons"] = task_comparisons(job, info["records"])
    lines = (verdict(job, info["layers"], info["proxy"], info["comparisons"], info["records"])
             + other_findings(info["training"], chosen is not None, info["speed"], info["analysis"]))
    report = write_report(job, info, lines, time.perf_counter() - start)
    print_summary(console, lines, info["samples"], report, (time.perf_counter() - start) / 60)
    return json.loads((job.out / "summary.json").read_text())


# ---------------------------------------------------------------- command line


def register(subparsers) -> None:
    """Add `gateskip demo` (what `make demo` runs)."""
    p = subparsers.add_parser("demo", help="the main job: gates vs ShortGPT and random on held-out loss, tasks, "
                              "generation and speed, with a verdict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled name, local folder or hub id")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--gates", type=Path, help="gate file or folder to evaluate, with allocations "
                        "(gateskip allocate); "
                        "default: the shipped gates of the bundled model, for other models gates trained here")
    source.add_argument("--train-gates", action="store_true",
                        help="train and allocate gates here, also for the bundled model")
    p.add_argument("--items", type=integer(1), help=f"items per task (default {FULL.items}; {QUICK.items} with --quick)")
    p.add_argument("--out", type=output_path, help="report folder (default reports/demo, reports/demo-quick with --quick); "
                   "rerun with the same folder to continue")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every stage in a minute or two (a smoke test)")
    p.add_argument("--threads", type=integer(1), help="CPU threads for torch (default: torch's choice; 1 is faster on a "
                   "machine that other jobs keep busy)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.items is not None:
        sizes = dataclasses.replace(sizes, items=args.items)
    out = check_output_folder(args.out or Path("reports/demo-quick" if args.quick else "reports/demo"),
                              writes=("report.md", "summary.json"), resumes="job.json")
    run_job(args.model, out, sizes, gates=args.gates, train_gates=args.train_gates)
    return 0
