#!/usr/bin/env bash
# Does the gated engine at target 0 write the base model's tokens exactly, on this model? The
# gates are loaded and evaluated by nothing (target 0 skips no module); the answers to all 164
# HumanEval problems are compared, text for text, with base_pass_at_1.sh's stock-vLLM answers
# (same settings: bf16, eager, greedy, chat template).
#
#   bash experiments/long_form/target_zero.sh [GATES]   (default runs/qwen-coder-infl/final)
#   bash experiments/long_form/target_zero.sh stock     stock vLLM once more, through sweep.py's own
#       path (no gates), and all three answer sets compared: do answers differ between two stock
#       runs too, or only where our layer runs?
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=docs/results/long_form/target_zero
if [[ ${1:-} == stock ]]; then
  .venv/bin/python experiments/long_form/sweep.py --out $OUT --base-from docs/results/long_form/base \
    --row stock=- --targets 0 --tasks humaneval
else
  .venv/bin/python experiments/long_form/sweep.py --out $OUT --base-from docs/results/long_form/base \
    --row gated=${1:-runs/qwen-coder-infl/final} --targets 0 --tasks humaneval
fi
OUT=$OUT .venv/bin/python - <<'PY' | tee $OUT/compare.log
import glob, json, os
out = os.environ["OUT"]
runs = {"stock vLLM (lm_eval's command line)": {r["doc_id"]: r["resps"][0][0] for r in map(json.loads, open(sorted(glob.glob(
    "docs/results/long_form/base/humaneval/*/samples_humaneval_*.jsonl"))[-1]))}}
for name, label in (("gated", "gated engine at target 0"), ("stock", "stock vLLM again (sweep.py, no gates)")):
    path = f"{out}/samples/{name}-0-humaneval.jsonl"
    if os.path.exists(path):
        runs[label] = {r["doc_id"]: r["answer"] for r in map(json.loads, open(path))}
names = list(runs)
for i, a_name in enumerate(names):
    for b_name in names[i + 1:]:
        a, b = runs[a_name], runs[b_name]
        same = [d for d in a if b.get(d) == a[d]]
        print(f"{b_name} vs {a_name}: {len(same)} of {len(a)} HumanEval answers identical")
        for d in sorted(set(a) - set(same))[:5]:
            x, y = a[d], b.get(d, "")
            k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            print(f"  problem {d} differs from character {k}: {x[k:k+60]!r} / {y[k:k+60]!r}")
PY
