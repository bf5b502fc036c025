"""The paper's budget policy as allocations the vLLM engine runs like any other: every module skips
the same share of tokens (the share whose predicted net saving, gate cost included, is the
target), the tokens chosen by the gates. With --random the gates get seeded random weights, so
which tokens skip is unrelated to what they need (the random row); without it the trained gates
choose (the gates under the paper's equal share instead of a searched allocation). Decoding
thresholds are calibrated on the calibration text like the searched allocations', so the engine
skips the same shares. Written to a copy of a gate file.

    .venv/bin/python experiments/long_form/equal_share_allocations.py runs/qwen-coder-self/final runs/qwen-coder-random \
        --random --text docs/results/long_form/self_answers/train.jsonl.gz
    .venv/bin/python experiments/long_form/equal_share_allocations.py gates/qwen2.5-coder-0.5b-unit runs/qwen-coder-equal \
        --text docs/results/long_form/self_answers/train.jsonl.gz
"""

import argparse
from pathlib import Path

import torch

from gateskip import load_gates, load_model
from gateskip.core.model import save_gates
from gateskip.inference.calibrate import calibrate_allocation, sample_tokens
from gateskip.search.allocation import predicted_saving, sample_costs

TARGETS = (0.05, 0.1, 0.15, 0.2, 0.25)


def equal_share(costs: dict, dense: float, target: float) -> float:
    """The one ratio every module skips for a predicted net saving of `target` (bisection)."""
    lo, hi = 0.0, 0.999
    for _ in range(50):
        mid = (lo + hi) / 2
        if predicted_saving({k: mid for k in costs}, costs, dense) < target:
            lo = mid
        else:
            hi = mid
    return hi


p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("source", type=Path)
p.add_argument("out", type=Path)
p.add_argument("--text", required=True)
p.add_argument("--random", action="store_true", help="seeded random gate weights (the random row)")
p.add_argument("--sequences", type=int, default=4)
p.add_argument("--length", type=int, default=256)
args = p.parse_args()
if (args.out / "gateskip.safetensors").exists():
    raise SystemExit(f"error: {args.out / 'gateskip.safetensors'} exists; choose another output folder")

model, tok = load_model("qwen2.5-coder-0.5b")
load_gates(model, args.source)
if args.random:
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.gate_bank.parameters():  # random scores: a seeded random projection of each token
            param.normal_(0.0, 0.02)
samples = sample_tokens(tok, args.text, args.sequences, args.length)
costs, dense = sample_costs(model, samples[1])
allocations = {}
for target in TARGETS:
    share = equal_share(costs, dense, target)
    ratios = {k: share for k in costs}
    allocations[f"{target:g}"] = {"ratios": ratios, "saving": predicted_saving(ratios, costs, dense)}
    print(f"target {target:g}: every module skips {share:.4f} of tokens, predicted net saving "
          f"{allocations[f'{target:g}']['saving']:.4f}")
with torch.no_grad():
    calibrate_allocation(model, samples, allocations)
model.gate_bank.allocations = allocations
args.out.mkdir(parents=True, exist_ok=True)
print(f"wrote {save_gates(model, args.out)}")
