#!/usr/bin/env bash
# The held-out proxy beside the sweep: LM loss, KL to the base and next-token agreement against
# measured net FLOP saving, with ShortGPT and random in the same run, on held-out code twice: the
# model's own chat-format answers to held-out stubs (what the sweep decodes) and held-out
# standard-library source (what the first gates trained on). ShortGPT ranks layers on the code
# training text, as shortgpt_allocations.py does.
#
#   bash experiments/long_form/proxy.sh [variants|shipped]
#
# variants (default): three gate sets under their allocations (trained on the answers; the stdlib
#   gates with allocations searched on the answers; the stdlib gates as they were), 5-25 %.
# shipped: the shipped gates under their six allocations, and the same gates with the paper's
#   equal share per module, at 5/10/15/20/25 %; outputs in proxy/<text>-shipped/.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mode=${1:-variants}
case $mode in
  variants) gates="--gates runs/qwen-coder-self/final --gates runs/qwen-coder-self-start --gates runs/qwen-coder-infl/final"
            methods=gateskip,shortgpt,random; targets="0.05 0.1 0.15 0.25"; suffix= ;;
  shipped)  gates="--gates gates/qwen2.5-coder-0.5b-unit"
            methods=gateskip,equal,shortgpt,random; targets="0.05 0.1 0.15 0.2 0.25"; suffix=-shipped ;;
  *) echo "usage: proxy.sh [variants|shipped]" >&2; exit 2 ;;
esac
for held in ${TEXTS:-answers:docs/results/long_form/self_answers/heldout.jsonl.gz stdlib:runs/data/code_heldout.jsonl.gz}; do
  .venv/bin/gateskip proxy qwen2.5-coder-0.5b $gates \
    --methods $methods --text ${held#*:} --search-text runs/data/code_train.jsonl.gz \
    --blocks 8 --length 256 --targets $targets --agreement 8 \
    --out docs/results/long_form/proxy/${held%%:*}$suffix --overwrite
done
