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
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from ..core.model import load_gates
from ..inference.calibrate import sample_tokens
from ..validate import check_output_folder, integer, output_path
from .job import FULL, QUICK, Job, JobSizes, check_allocations, choose_gates
from .report import other_findings, print_summary, task_comparisons, training_note, verdict, write_report
from .stages import (stage_allocate, stage_analysis, stage_proxy, stage_samples, stage_speed, stage_tasks, stage_text,
                     stage_train, training_summary)


def run_job(model_spec: str, out: Path, sizes: JobSizes, console: Console | None = None,
            gates: Path | None = None, train_gates: bool = False) -> dict:
    """Run (or continue) the main job; returns summary.json's content. `gates`: the gate file to
    evaluate (default: the shipped one for the bundled model); `train_gates`: train them here."""
    from ..loading import load_model

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
