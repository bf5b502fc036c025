"""`gateskip bench`: prefill and decoding speed on your own machine, side by side.

Every candidate (the ungated model, the gated model at budget 0, a few budgets,
self-speculative decoding) runs on the same input in interleaved rounds and the median
is kept (gateskip.inference.timing), so load from elsewhere hits them alike. Figures are wall
clock, with ratios against the ungated model (prefill) and against HF `generate` on the
ungated model (decoding); outputs are compared too, so a speedup that changes the text
shows up beside its number.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from ..core.budget import QuantileBudget
from ..core.flops import ModelDims, flop_report
from ..core.plan import SkipPlan
from ..core.stats import SkipStats
from ..files import write_json
from ..validate import check_output_file, existing_path, fits_context, integer, output_path, ratio, real
from .calibrate import allocation_budget
from .calibrate import ratio_key
from .contract import decode_budget, reports, stop_tokens
from .timing import time_interleaved

PROMPTS = [
    "The history of the printing press begins",
    "Question: What do plants need to make food?\nAnswer:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
    "Once upon a time, in a small village by the sea,",
    "Three tips for staying healthy are",
    "The capital of France is",
    "In 1969, the first humans landed on",
    "A recipe for bread needs flour, water,",
]


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """Torch threads for timing, and why: the cores this process may use minus the load already
    on them (threads that wait for a busy core make every figure noisier), at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested:
        return requested, f"{requested} threads as asked ({cores} cores)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = max(1, min(cores, round(cores - load)))
    return threads, f"{threads} threads ({cores} cores, load average {load:.1f} before the run)"


def prefill_budget(model, target: float):
    """The prefill form of a budget: the stored allocation's per-module quantiles when the gates
    have allocations (target = net saving), else a per-sequence quantile at that ratio."""
    if target and model.gate_bank.allocations:
        return allocation_budget(model, target)
    return QuantileBudget(target)


def prefill_speed(model, ids: torch.Tensor, targets, rounds: int = 3) -> dict:
    """Prefill (one forward, LM head on the last token, no cache filled: a skip plan fills none
    unless given one) of `ids` at each target vs the ungated model."""
    dims, config = ModelDims.from_config(model.config), model.gate_bank.config
    runs, saving = {"ungated": lambda: model(ids, logits_to_keep=1, use_cache=False)}, {}
    for t in targets:
        budget, stats = prefill_budget(model, t), SkipStats()
        model(ids, skip_plan=SkipPlan(budget=budget, stats=stats), logits_to_keep=1)
        saving[t] = flop_report(stats, dims, config).net_saving
        runs[f"{t:g}"] = lambda b=budget: model(ids, skip_plan=SkipPlan(budget=b), logits_to_keep=1)
    times = time_interleaved(runs, rounds=rounds)
    ungated = times["ungated"]
    rows = [{"target": None, "seconds": ungated, "tokens_per_s": ids.numel() / ungated, "speedup": 1.0}]
    for t in targets:
        sec, ideal = times[f"{t:g}"], 1 / (1 - saving[t])
        rows.append({"target": t, "seconds": sec, "tokens_per_s": ids.numel() / sec, "speedup": ungated / sec,
                     "net_saving": saving[t], "ideal_speedup": ideal, "of_ideal": ungated / sec / ideal})
    return {"batch": list(ids.shape), "rows": rows}


def _greedy(new_tokens: int, pad: int) -> dict:
    """HF generate's arguments for exactly new_tokens greedy tokens per row: min_new_tokens keeps the
    work equal to our decoder's (which is given no stop token) by banning stop tokens until then."""
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                top_k=None, pad_token_id=pad)


def same_text(sequences: torch.Tensor, reference: torch.Tensor, prompt: int, stops: set[int]) -> bool:
    """Whether each row's new tokens equal the reference's up to the row's first stop token.

    The reference (HF generate under min_new_tokens) may not stop, so where the row emits a stop
    token the reference continues with its runner-up; what follows a stop is not text."""
    for row, ref in zip(sequences[:, prompt:].tolist(), reference[:, prompt:].tolist()):
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        if row[:end] != ref[:end]:
            return False
    return True


def decode_speed(model, ids: torch.Tensor, mask: torch.Tensor | None, targets, new_tokens: int, rounds: int = 3,
                 speculative: float | None = None, pad: int = 0, compile: bool = False) -> dict:
    """Greedy decoding of `new_tokens` per row at each target vs HF generate on the ungated model.

    speculative: also time lossless self-speculative decoding (adaptive draft length) drafting
    at this target (batch 1 only). compile: also time each target with the compiled decode step
    (decode(compile=True)), and how long its first call took (compiling included). Each row says
    whether its tokens equal full-compute greedy."""
    from .decoding import decode
    from .speculative import speculative_generate

    kw = _greedy(new_tokens, pad)
    budgets = {t: decode_budget(model, t) for t in targets}
    modes = (False, True) if compile else (False,)
    runs = {"HF generate": lambda: model.generate(ids, attention_mask=mask, **kw)}
    first_compiled = None
    if compile:
        start = time.perf_counter()
        decode(model, ids, mask, budget=budgets[targets[0]], max_new_tokens=new_tokens, compile=True)
        first_compiled = time.perf_counter() - start
    for c in modes:
        for t, b in budgets.items():
            runs[_label(t, c)] = lambda b=b, c=c: decode(model, ids, mask, budget=b, max_new_tokens=new_tokens, compile=c)
    if speculative is not None:
        spec_budget = decode_budget(model, speculative)
        runs["speculative"] = lambda: speculative_generate(model, ids, budget=spec_budget, k=4, adaptive=True,
                                                           max_new_tokens=new_tokens)
    times = time_interleaved(runs, rounds=rounds)
    hf, tokens = times["HF generate"], new_tokens * ids.shape[0]
    reference = model.generate(ids, attention_mask=mask, **kw)
    stops, n = stop_tokens(model.generation_config.eos_token_id), ids.shape[1]
    rows = [{"target": None, "tokens_per_s": tokens / hf, "speedup": 1.0}]
    for c in modes:
        for t, b in budgets.items():
            gen, sec = decode(model, ids, mask, budget=b, max_new_tokens=new_tokens, compile=c), times[_label(t, c)]
            rows.append({"target": t, "compiled": c, "tokens_per_s": tokens / sec, "speedup": hf / sec,
                         "net_saving": reports(model, gen.prefill, gen.decode)["decoding"].net_saving,
                         "same_as_hf": same_text(gen.sequences, reference, n, stops)})
    out = {"batch": ids.shape[0], "new_tokens": new_tokens, "rows": rows}
    if compile:
        out["first_compiled_call_s"] = first_compiled
    if speculative is not None:
        res, sec = speculative_generate(model, ids, budget=spec_budget, k=4, adaptive=True, max_new_tokens=new_tokens), \
            times["speculative"]
        out["speculative"] = {"draft_target": speculative, "tokens_per_s": tokens / sec, "speedup": hf / sec,
                              "acceptance": res.acceptance_rate, "tokens_per_pass": res.tokens_per_pass,
                              "same_as_hf": same_text(res.sequences, reference, n, stops)}
    return out


def _label(target: float, compiled: bool) -> str:
    return f"{target:g} compiled" if compiled else f"{target:g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_prefill(result: dict) -> None:
    print(f"\nprefill, batch {' x '.join(map(str, result['batch']))} tokens (LM head on the last token)")
    print(f"{'budget':>8} {'tokens/s':>9} {'vs ungated':>11} {'net saved':>10} {'ideal':>6} {'of ideal':>9}")
    for r in result["rows"]:
        label = "ungated" if r["target"] is None else f"{r['target']:g}"
        ideal = f"{r['ideal_speedup']:.2f}x" if "ideal_speedup" in r else "-"
        of_ideal = f"{r['of_ideal']:.2f}" if "of_ideal" in r else "-"
        print(f"{label:>8} {r['tokens_per_s']:9.0f} {r['speedup']:10.2f}x {_pct(r.get('net_saving')):>10} "
              f"{ideal:>6} {of_ideal:>9}")


def print_decode(result: dict) -> None:
    print(f"\ndecoding, batch {result['batch']}, {result['new_tokens']} greedy tokens per row")
    if "first_compiled_call_s" in result:
        print(f"first compiled call (compiling included): {result['first_compiled_call_s']:.1f} s")
    print(f"{'budget':>13} {'tokens/s':>9} {'vs HF':>7} {'net saved':>10}  same tokens as HF")
    for r in result["rows"]:
        label = "HF generate" if r["target"] is None else _label(r["target"], r["compiled"])
        same = "" if r["target"] is None else "yes" if r["same_as_hf"] else "no"
        print(f"{label:>13} {r['tokens_per_s']:9.2f} {r['speedup']:6.2f}x {_pct(r.get('net_saving')):>10}  {same}")
    s = result.get("speculative")
    if s:
        print(f"{'speculative':>13} {s['tokens_per_s']:9.2f} {s['speedup']:6.2f}x {'-':>10}  "
              f"{'yes' if s['same_as_hf'] else 'no'} (drafts at {s['draft_target']:g}, adaptive k: "
              f"{100 * s['acceptance']:.0f}% accepted, {s['tokens_per_pass']:.2f} tokens per verify pass)")


# CLI ---------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="prefill and decoding speed on this machine: ungated, budget 0, budgets, speculative")
    p.add_argument("model", help="bundled model name, local folder or hub id")
    p.add_argument("--gates", type=existing_path, help="gate file or folder; default: fresh low-rank gates (speed only, the text is meaningless)")
    p.add_argument("--budgets", type=ratio, nargs="+", default=None,
                   help="skip budgets (net saving targets when the gates store allocations); default 0.1 0.2 0.3 "
                        "with allocations, else 0.25 0.5")
    p.add_argument("--speculative", type=real(-1.0, 1.0), default=None, metavar="BUDGET",
                   help="draft budget for self-speculative decoding (default: the smallest budget; -1 leaves it out)")
    p.add_argument("--prefill", type=integer(1), nargs=2, default=[4, 512], metavar=("BATCH", "LENGTH"))
    p.add_argument("--new-tokens", type=integer(1), default=64, help="greedy tokens per row when decoding")
    p.add_argument("--batch", type=integer(0), default=8, help="batch size of the batched decoding run (0 leaves it out)")
    p.add_argument("--rounds", type=integer(1), default=3, help="interleaved timing rounds (the median is kept)")
    p.add_argument("--threads", type=integer(1), default=None, help="torch threads (default: the free cores)")
    p.add_argument("--compile", action="store_true",
                   help="also time each budget with the compiled decode step (torch.compile; its first call, "
                        "compiling included, is reported)")
    p.add_argument("--json", type=output_path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=run)


def bench(model, tokenizer, budgets, speculative: float | None, prefill: tuple[int, int], new_tokens: int,
          batch: int, rounds: int, compile: bool = False) -> dict:
    """Every figure `gateskip bench` prints, as a dict (gates on the model, thresholds calibrated)."""
    from ..data.samples import sample_sequences

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    targets = (0.0, *budgets)
    result = {}
    with torch.inference_mode():
        ids, _ = sample_sequences(tokenizer, "bundled", *prefill)
        result["prefill"] = prefill_speed(model, ids, targets, rounds)
        print_prefill(result["prefill"])
        one = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        result["decode"] = decode_speed(model, one, None, targets, new_tokens, rounds, speculative, pad, compile)
        print_decode(result["decode"])
        if batch:
            side = tokenizer.padding_side
            tokenizer.padding_side = "left"
            enc = tokenizer((PROMPTS * batch)[:batch], return_tensors="pt", padding=True)
            tokenizer.padding_side = side
            result["decode_batched"] = decode_speed(model, enc["input_ids"], enc["attention_mask"], targets,
                                                    new_tokens, rounds, None, pad, compile)
            print_decode(result["decode_batched"])
    return result


def run(args: argparse.Namespace) -> int:
    from .calibrate import calibrate, sample_tokens
    from ..core.config import GateConfig
    from ..loading import load_model
    from ..core.model import add_gates, load_gates

    if args.json:  # checked before the benchmark runs, not after
        check_output_file(args.json, overwrite=args.overwrite)
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    model, tokenizer = load_model(args.model)
    fits_context(model, args.prefill[1], "--prefill LENGTH")
    if args.gates:
        load_gates(model, args.gates)
        what = f"gates {args.gates}"
    else:
        torch.manual_seed(0)
        add_gates(model, GateConfig(kind="lowrank", rank=16))
        what = "fresh untrained low-rank gates (speed only)"
    allocations = bool(model.gate_bank.allocations)
    budgets = args.budgets or ([0.1, 0.2, 0.3] if allocations else [0.25, 0.5])
    speculative = None if args.speculative is not None and args.speculative < 0 else args.speculative or min(budgets)
    if not allocations:
        missing = [b for b in {*budgets, speculative} - {None} if ratio_key(b) not in model.gate_bank.thresholds]
        if missing:
            calibrate(model, sample_tokens(tokenizer, "bundled", sequences=8, length=128), sorted(missing))
            what += f", thresholds for {sorted(missing)} calibrated on 1024 tokens of the bundled text"
    print(f"model {args.model}, {what}; {platform.machine()} {platform.processor() or ''}, {why}, "
          f"torch {torch.__version__}, {next(model.parameters()).dtype}")
    print("budgets: " + ("net FLOP saving targets (stored allocations)" if allocations else "calibrated skip ratios"))
    result = bench(model, tokenizer, budgets, speculative, tuple(args.prefill), args.new_tokens, args.batch, args.rounds,
                   args.compile)
    result["threads"] = threads
    if args.json:
        write_json(args.json, result, indent=1)
        print(f"wrote {args.json}")
    return 0
