#!/usr/bin/env bash
# Does the gated engine at target 0 write the base model's tokens exactly, on this model? The
# gates are loaded and evaluated by nothing (target 0 skips no module); the answers to all 164
# HumanEval problems are compared, text for text, with base_pass_at_1.sh's stock-vLLM answers
# (same settings: bf16, eager, greedy, chat template).
#
#   bash experiments/long_form/target_zero.sh [GATES]   (default runs/qwen-coder-infl/final)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=docs/results/long_form/target_zero
.venv/bin/python experiments/long_form/sweep.py --out $OUT --base-from docs/results/long_form/base \
  --row gated=${1:-runs/qwen-coder-infl/final} --targets 0 --tasks humaneval
.venv/bin/python - <<'PY' | tee docs/results/long_form/target_zero/compare.log
import glob, json
base = {r["doc_id"]: r["resps"][0][0] for r in map(json.loads, open(sorted(glob.glob(
    "docs/results/long_form/base/humaneval/*/samples_humaneval_*.jsonl"))[-1]))}
gated = {r["doc_id"]: r["answer"] for r in map(json.loads, open("docs/results/long_form/target_zero/samples/gated-0-humaneval.jsonl"))}
same = [d for d in base if gated.get(d) == base[d]]
print(f"HumanEval answers identical to stock vLLM's: {len(same)} of {len(base)}")
for d in sorted(set(base) - set(same))[:5]:
    a, b = base[d], gated.get(d, "")
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"  problem {d} differs from character {k}: base {a[k:k+60]!r} / gated {b[k:k+60]!r}")
PY
