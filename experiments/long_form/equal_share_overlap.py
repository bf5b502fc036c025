"""Why are the trained gates no better than random tokens under the paper's equal share? Do they
skip the same tokens in every module? On held-out answer text, every module skips the same
share of each sequence (the per-sequence quantile the proxy's "equal share" uses); for the
shipped gates' ranking and for seeded random gates' (as equal_share_allocations.py --random),
how the skipped (token, module) pairs spread over tokens, and which tokens skip most; and, for
comparison, the same for the shipped gates under their stored allocations (per-module quantiles).

    .venv/bin/python experiments/long_form/equal_share_overlap.py | tee docs/results/long_form/equal_share_overlap.log
"""

import argparse

import torch

from gateskip import load_gates, load_model
from gateskip.evaluation.analysis import collect
from gateskip.inference.calibrate import allocation_budget, sample_tokens

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--gates", default="gates/qwen2.5-coder-0.5b-unit")
p.add_argument("--text", default="docs/results/long_form/self_answers/heldout.jsonl.gz")
p.add_argument("--share", type=float, default=0.0546, help="every module's skip share (the 5 %% target's)")
p.add_argument("--allocations", type=float, nargs="*", default=[0.1, 0.15], help="stored targets to compare")
p.add_argument("--sequences", type=int, default=4)
p.add_argument("--length", type=int, default=256)
args = p.parse_args()

model, tok = load_model("qwen2.5-coder-0.5b")
load_gates(model, args.gates)
ids, mask = sample_tokens(tok, args.text, args.sequences, args.length)
print(f"{args.sequences} x {args.length} tokens of {args.text}; equal share: every module skips {args.share:.4f} "
      "of each sequence")
runs = [(f"trained gates, allocation {t:g}", t) for t in args.allocations] + [("trained gates, equal share", None),
                                                                              ("random gates, equal share", None)]
for name, target in runs:
    if name.startswith("random"):
        torch.manual_seed(0)
        with torch.no_grad():
            for param in model.gate_bank.parameters():
                param.normal_(0.0, 0.02)
    budget = args.share if target is None else allocation_budget(model, target)
    record = collect(model, ids, mask, budget=budget)
    skips = ~record.keep & record.valid  # (modules, B, T)
    removed = set() if target is None else {k for k, r in budget.ratios.items() if r >= 1.0}
    whole = torch.tensor([k in removed for k in record.keys])  # modules the allocation removes (ratio 1)
    skipped = skips[~whole].sum(0)  # (B, T): partly skipped modules each token skips
    counts = skipped[record.valid].float()
    modules = int((~whole).sum())
    if whole.any():
        print(f"\n({name}: {int(whole.sum())} modules removed whole, left out below)")
    pairs = counts.sum()
    top = counts.sort(descending=True).values
    one_pct = max(1, round(0.01 * len(top)))
    print(f"\n{name}: {int(pairs)} skipped (token, module) pairs over {len(counts)} tokens x {modules} modules")
    print(f"  tokens that skip any module: {(counts > 0).float().mean():.1%}; at least 8: {(counts >= 8).float().mean():.1%}; "
          f"at least 24: {(counts >= 24).float().mean():.1%}; most: {int(top[0])} of {modules}")
    print(f"  share of all skipped pairs on the 1 % of tokens that skip most: {top[:one_pct].sum() / pairs:.1%}; "
          f"on the 5 %: {top[:5 * one_pct].sum() / pairs:.1%}")
    order = skipped.masked_fill(~record.valid, -1).flatten().argsort(descending=True)[:15].tolist()
    heavy = [(int(skipped.flatten()[k]), tok.decode(ids.flatten()[k])) for k in order]
    print(f"  the 15 tokens that skip most (modules skipped, token): {heavy}")
