"""`gateskip demo`: a short end-to-end showcase on the bundled model.

Loads the model, adds fresh (untrained) gates, runs a batch of prompts at several
budgets with physical skipping, and prints what was skipped, the net FLOP saving and
wall-clock timings next to the ungated model. Untrained gates rank tokens almost
arbitrarily, so this shows the machinery and its speed, not quality.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from .budget import check_ratio
from .config import GATE_KINDS, GateConfig
from .flops import ModelDims, flop_report
from .loading import load_model
from .model import add_gates
from .plan import SkipPlan
from .stats import SkipStats
from .timing import time_interleaved

PROMPTS = [
    "The water cycle describes how water evaporates from the surface of the earth, rises into the atmosphere,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Question: If a train travels 60 miles in 1.5 hours, what is its average speed? Answer:",
    "Paris is the capital of France. Berlin is the capital of",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="short showcase: gates, budgets, skip statistics and timings on the bundled model")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, local folder or hub id")
    p.add_argument("--gate-kind", default="lowrank", choices=GATE_KINDS)
    p.add_argument("--rank", type=int, default=32, help="rank of low-rank gates")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="skip ratios to run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    budgets = [check_ratio(b) for b in args.budgets]
    gate_config = GateConfig(kind=args.gate_kind, rank=args.rank)

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    console.print(f"loaded [bold]{args.model}[/] ({type(model).__name__}, {model.config.num_hidden_layers} layers) "
                  f"in {time.perf_counter() - start:.1f} s")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    with torch.no_grad():
        ungated = lambda: model(ids, attention_mask=mask)  # noqa: E731
        reference = ungated().logits
        add_gates(model, gate_config)
        dims = ModelDims.from_config(model.config)
        runs = {"ungated": ungated}
        for b in budgets:
            runs[f"{b:g}"] = lambda b=b: model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=b))
        times = time_interleaved(runs, rounds=3)

        table = Table(title=f"{len(PROMPTS)} prompts, {int(mask.sum())} tokens, fresh {args.gate_kind} gates, physical skipping")
        for col in ("budget", "skipped (paper)", "net FLOP saving", "prefill ms", "speedup", "masked vs physical", "next token of prompt 4"):
            table.add_column(col, justify="right")
        last = mask.sum(1) - 1 if tokenizer.padding_side == "right" else torch.full((len(PROMPTS),), ids.shape[1] - 1)
        table.add_row("ungated", "-", "-", f"{1000 * times['ungated']:.0f}", "1.00x", "-",
                      repr(tokenizer.decode(reference[3, last[3]].argmax())))
        for b in budgets:
            stats = SkipStats()
            physical = model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=b, stats=stats)).logits
            masked = model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=b, execution="masked")).logits
            report = flop_report(stats, dims, gate_config)
            diff = (physical - masked)[mask.bool()].abs().max().item()
            table.add_row(f"{b:g}", f"{100 * report.paper_fraction:.1f}%", f"{100 * report.net_saving:.1f}%",
                          f"{1000 * times[f'{b:g}']:.0f}", f"{times['ungated'] / times[f'{b:g}']:.2f}x", f"{diff:.1e}",
                          repr(tokenizer.decode(physical[3, last[3]].argmax())))
    console.print(table)
    console.print("net FLOP saving counts the gates' own cost against the ungated model (decoder layers, "
                  "LM head excluded); the gates are untrained, so next-token quality at high budgets is not meaningful.")
    return 0
