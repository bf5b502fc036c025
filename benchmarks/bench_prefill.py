"""Prefill speed of physical skipping vs the ungated model, side by side in one run.

    python benchmarks/bench_prefill.py [--model smollm2-135m] [--batch 4] [--length 512]

Prints tokens/s, speedup over the ungated HF model, the net FLOP fraction saved
(gate cost included) and speedup / ideal, where ideal = 1 / (1 - net FLOP fraction saved).
As in generation, prefill computes logits for the last token only, so the LM head is a
negligible, unskippable cost and the decoder-layer FLOP saving sets the ideal; with
--all-logits (as in log-likelihood evaluation) the head runs for every token and the
saving including the head sets it. Random token ids: speed does not depend on
the text, and fresh gates rank tokens arbitrarily anyway. No assertions: a benchmark
prints, a person reads.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from gateskip import GateConfig, ModelDims, SkipPlan, SkipStats, add_gates, flop_report, remove_gates
from gateskip.loading import load_model
from gateskip.inference.timing import time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--kinds", nargs="+", default=["vector", "lowrank"])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--all-logits", action="store_true", help="LM head on every token, as in evaluation")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    model, _ = load_model(args.model, dtype=dtype, device=args.device)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length), device=args.device)
    tokens = ids.numel()
    dims = ModelDims.from_config(model.config)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"model {args.model}, batch {args.batch} x {args.length} tokens, {args.dtype}, device {device_name}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, "
          f"LM head on {'every token' if args.all_logits else 'the last token (prefill)'}")
    keep = 0 if args.all_logits else 1

    rows = []
    with torch.inference_mode():
        ungated = time_interleaved({"ungated": lambda: model(ids, logits_to_keep=keep)}, rounds=args.rounds)["ungated"]
        for kind in args.kinds:
            config = GateConfig(kind=kind, rank=args.rank)
            add_gates(model, config)
            model.to(device=args.device, dtype=dtype)  # gates in the model's precision, as for inference
            runs = {"ungated": lambda: model(ids, logits_to_keep=keep)}
            saving = {}
            for b in args.budgets:
                stats = SkipStats()
                model(ids, skip_plan=SkipPlan(budget=b, stats=stats), logits_to_keep=keep)
                report = flop_report(stats, dims, config)
                saving[b] = report.net_saving_with_head if args.all_logits else report.net_saving
                runs[b] = lambda b=b: model(ids, skip_plan=SkipPlan(budget=b), logits_to_keep=keep)
            times = time_interleaved(runs, rounds=args.rounds)
            for b in args.budgets:
                speedup = times["ungated"] / times[b]
                ideal = 1 / (1 - saving[b])
                rows.append((kind, b, tokens / times[b], speedup, saving[b], ideal, speedup / ideal))
            remove_gates(model)

    print(f"ungated HF model: {tokens / ungated:.0f} tokens/s")
    print(f"{'gate':8} {'budget':>6} {'tokens/s':>9} {'speedup':>8} {'net FLOP saved':>15} {'ideal':>6} {'speedup/ideal':>14}")
    for kind, b, tps, speedup, saved, ideal, ratio in rows:
        print(f"{kind:8} {b:6.2f} {tps:9.0f} {speedup:7.2f}x {100 * saved:14.1f}% {ideal:5.2f}x {ratio:14.2f}")
    for kind, b, _, speedup, *_ in rows:
        if b == 0:
            print(f"gate overhead at budget 0 ({kind}): gated / ungated wall clock = {1 / speedup:.3f}")


if __name__ == "__main__":
    main()
