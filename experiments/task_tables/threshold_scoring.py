"""Probe (round 5, docs/experiment.md): score tasks with each allocation's calibrated decoding
thresholds instead of per-sequence quantiles. With thresholds a token's decision depends only
on its prefix, so every answer choice of a question sees its context processed the same way;
with quantiles the choices of one question skip different context tokens. Same arguments as
`gateskip eval`:

    OMP_NUM_THREADS=1 python experiments/task_tables/threshold_scoring.py eval smollm2-135m \
        --gates gates/smollm2-135m-unit --tasks arc_easy,piqa --budgets 0.2 --method gateskip \
        --limit 200 --batch-size 16 --out runs/r5/causal-20
"""
import sys

import gateskip.search.baselines as baselines
from gateskip.cli import main

quantile_plans = baselines.Method.plans


def threshold_plans(self, budget, stats):
    score, decode, note = quantile_plans(self, budget, stats)
    if self.name == "gateskip" and budget > 0:
        return decode, decode, "calibrated thresholds in scoring"
    return score, decode, note


baselines.Method.plans = threshold_plans
sys.exit(main(sys.argv[1:]))
