"""Validation loss of the GPU round's held-out blocks under each way of skipping, side by side.

    python experiments/allocation_search/val_loss.py gates/smollm2-135m-lowrank-qa [--blocks 16]

Rebuilds the training run's validation split (QA text from experiments/training_recipes/build_qa_text.py,
512-token blocks, 5 %, seed 0: the same blocks `gateskip train` held out) and prints the LM
loss of the ungated model, the gated model at budget 0, and at skip ratios 0.1 / 0.25 the
gates, random token skipping and ShortGPT layer removal (net FLOP saving alongside).
"""

from __future__ import annotations

import argparse

import torch

from gateskip import ModelDims, SkipStats, flop_report, load_gates, load_model
from gateskip.search.baselines import make_method
from gateskip.inference.calibrate import sample_tokens
from gateskip.data.textdata import build_blocks


def held_out(description: str):
    """Parse the common options; load the model with the gates and the run's validation blocks.

    Returns (model, tokenizer, validation blocks, the first --blocks of them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("gates")
    p.add_argument("--data", default="runs/data/qa_mix.jsonl.gz")
    p.add_argument("--blocks", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    load_gates(model, args.gates)
    _, val = build_blocks([args.data], tok, 512, val_fraction=0.05, seed=0)
    return model, tok, val, val.select(torch.arange(min(args.blocks, len(val))))


def main() -> None:
    model, tok, _, blocks = held_out(__doc__.splitlines()[0])
    ids, labels = blocks.input_ids, blocks.labels
    dims = ModelDims.from_config(model.config)
    sample = sample_tokens(tok, "bundled", sequences=8, length=256)
    print(f"{len(ids)} validation blocks x 512 tokens")
    print(f"{'method':10s} {'budget':>6s} {'LM loss':>8s} {'net FLOP saved':>15s}")
    for name in ("base", "gateskip", "random", "shortgpt"):
        method = make_method(name, model, sample=sample)
        for budget in ((0.0,) if name == "base" else (0.0, 0.1, 0.25) if name == "gateskip" else (0.1, 0.25)):
            stats = SkipStats()
            plan, _, _ = method.plans(budget, stats)
            with method.attached(model), torch.no_grad():
                loss = model(ids, labels=labels, skip_plan=plan).loss.item()
            report = flop_report(stats, dims, model.gate_bank.config if method.charge_gates else None)
            print(f"{name:10s} {budget:6.2f} {loss:8.3f} {100 * report.net_saving:14.1f}%", flush=True)


if __name__ == "__main__":
    main()
