"""Where to spend a skip budget, judged by validation loss (docs/experiment.md, round 2).

    python experiments/allocation_search/allocation_proxy.py gates/smollm2-135m-lowrank-qa

On the training run's held-out QA blocks (as experiments/allocation_search/val_loss.py), at total budgets 0.1
and 0.25, compares the paper's equal share per module (quantile, and calibrated
thresholds) with two other allocations of the same gates:
- one global importance threshold for every module (modules whose gates are low skip more);
- ShortGPT's layer ranking allocates: a share of the tokens (picked by the gates) is skipped
  in the least influential layers only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gateskip import ModelDims, QuantileBudget, SkipPlan, SkipStats, ThresholdBudget, flop_report
from gateskip.search.baselines import make_method
from gateskip.inference.calibrate import calibrate, sample_tokens, threshold_budget
from val_loss import held_out  # experiments/allocation_search/ is on the path when this script runs


@dataclass(frozen=True)
class PerModuleQuantile(QuantileBudget):
    """A quantile budget with its own ratio per module (0 where a module is not named)."""

    ratios: dict | None = None

    def keep(self, imp, valid, protect, key):
        return QuantileBudget((self.ratios or {}).get(key, 0.0)).keep(imp, valid, protect, key)


def main() -> None:
    model, tok, val, blocks = held_out(__doc__.splitlines()[0])
    ids, labels = blocks.input_ids, blocks.labels
    dims = ModelDims.from_config(model.config)
    keys = model.gate_bank.module_keys()
    layers = make_method("shortgpt", model, sample=sample_tokens(tok, "bundled", sequences=8, length=256)).layer_order
    print(f"{len(ids)} validation blocks x 512 tokens; ShortGPT's least influential layers first: {layers[:15]}")

    def run(budget, label: str) -> None:
        stats = SkipStats()
        with torch.no_grad():
            loss = model(ids, labels=labels, skip_plan=SkipPlan(budget=budget, stats=stats)).loss.item()
        report = flop_report(stats, dims, model.gate_bank.config)
        print(f"{label:55s} loss {loss:6.3f}   net FLOP saved {100 * report.net_saving:5.1f} %", flush=True)

    for total, thresholds in ((0.1, (0.5, 0.6)), (0.25, (0.6, 0.7))):
        run(QuantileBudget(total), f"equal share per module, quantile {total}")
        other = slice(len(ids), len(ids) + 4)  # calibrate on other validation blocks
        calibrate(model, (val.input_ids[other], val.attention_mask[other]), [total])
        run(threshold_budget(model, total), f"equal share per module, calibrated thresholds {total}")
        for t in thresholds:
            run(ThresholdBudget(dict.fromkeys(keys, t), total), f"one global threshold {t}")
        for share in (0.5, 0.75, 1.0):
            n = round(total * len(layers) / share)
            ratios = {f"{b}.{layer}": share for layer in layers[:n] for b in ("attn", "mlp")}
            run(PerModuleQuantile(total, ratios=ratios), f"{share:.0%} of tokens in the {n} least influential layers")


if __name__ == "__main__":
    main()
