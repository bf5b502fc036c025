"""Log-likelihood scoring speed of GatedLM at batch size 1 vs larger batches, side by side in one run.

    OMP_NUM_THREADS=2 python benchmarks/bench_scoring.py [--limit 100] [--batch-sizes 1 8 16 32]

Scores the first --limit ARC-Easy documents (bundled data) through lm-eval's
simple_evaluate, as `gateskip eval` does, for the ungated base model and for the shipped
gates at a physical skip budget. Prints, per batch size, the time spent scoring (inside
lm.loglikelihood) and the whole simple_evaluate call, the speedup over batch size 1, the
accuracy, the largest log-likelihood difference from batch size 1 and whether the skip
statistics' token counts are identical. Runs are interleaved over --rounds; the fastest
round counts. No assertions: a benchmark prints, a person reads.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402

from gateskip import SkipPlan, SkipStats, load_gates  # noqa: E402
from gateskip.evaluation.harness import GatedLM  # noqa: E402
from gateskip.evaluation.tasks import task_manager  # noqa: E402
from gateskip.loading import load_model  # noqa: E402

GATES = Path(__file__).resolve().parents[1] / "gates" / "smollm2-135m-lowrank-qa"


def run_once(lm: GatedLM, plan: SkipPlan | None, manager, limit: int) -> dict:
    """One simple_evaluate of arc_easy: times, accuracy, per-request log-likelihoods."""
    scoring = 0.0
    loglikelihood = GatedLM.loglikelihood.__get__(lm)

    def timed(requests, disable_tqdm: bool = False):
        nonlocal scoring
        start = time.perf_counter()
        out = loglikelihood(requests, disable_tqdm=True)
        scoring += time.perf_counter() - start
        return out

    lm.loglikelihood = timed
    lm.use(plan)
    start = time.perf_counter()
    result = simple_evaluate(model=lm, tasks=["arc_easy"], task_manager=manager, limit=limit, log_samples=True,
                             random_seed=0, bootstrap_iters=0, verbosity="ERROR")
    total = time.perf_counter() - start
    samples = sorted(result["samples"]["arc_easy"], key=lambda s: s["doc_id"])
    lls = torch.tensor([ll for s in samples for ll, _ in (r[0] for r in s["resps"])], dtype=torch.float64)
    return {"scoring": scoring, "total": total, "acc": result["results"]["arc_easy"]["acc,none"],
            "choices": [s["acc"] for s in samples], "lls": lls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # HFLM warns once per instance about in-memory models
    model, tokenizer = load_model(args.model)
    load_gates(model, GATES)
    manager = task_manager(["arc_easy"], "bundled", tempfile.mkdtemp(prefix="bench-scoring-"))
    print(f"model {args.model} + {GATES.name}, arc_easy --limit {args.limit}, float32, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; best of {args.rounds} interleaved rounds")
    plans = {"base": lambda stats: SkipPlan(budget=None, apply_gates=False, stats=stats),
             f"gateskip {args.budget}": lambda stats: SkipPlan(budget=args.budget, execution="physical", stats=stats)}
    lms = {bs: GatedLM(model, tokenizer, batch_size=bs) for bs in args.batch_sizes}
    best: dict[tuple[str, int], dict] = {}
    for _ in range(args.rounds):
        for name, plan in plans.items():
            for bs, lm in lms.items():
                stats = SkipStats()
                run = {**run_once(lm, plan(stats), manager, args.limit), "tokens": stats.tokens,
                       "counts": {k: (c.seen, c.skipped) for k, c in stats.modules().items()}}
                if (name, bs) not in best or run["scoring"] < best[name, bs]["scoring"]:
                    best[name, bs] = run

    print(f"{'plan':14} {'batch':>5} {'scoring s':>9} {'speedup':>8} {'total s':>8} {'speedup':>8} {'acc':>6} "
          f"{'same choices':>12} {'max |dll|':>10} {'same counts':>11}")
    for name in plans:
        one = best[name, args.batch_sizes[0]]
        for bs in args.batch_sizes:
            r = best[name, bs]
            same_counts = r["tokens"] == one["tokens"] and r["counts"] == one["counts"]
            print(f"{name:14} {bs:5d} {r['scoring']:9.2f} {one['scoring'] / r['scoring']:7.2f}x {r['total']:8.2f} "
                  f"{one['total'] / r['total']:7.2f}x {r['acc']:6.3f} {str(r['choices'] == one['choices']):>12} "
                  f"{(r['lls'] - one['lls']).abs().max().item():10.2e} {str(same_counts):>11}")
    print(f"scored tokens per run: {one['tokens']} (gateskip, counted by SkipStats)")


if __name__ == "__main__":
    main()
