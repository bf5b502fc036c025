#!/usr/bin/env bash
# Round 5 (docs/experiment.md): allocations chosen per target on held-back text, a search on
# prompt-length text, and the issue's task table: five tasks (ARC-Easy, ARC-Challenge, PIQA,
# HellaSwag, WinoGrande; 500 items each, ARC-Challenge's whole bundled set of 299), the
# shipped gates under their allocations against ShortGPT at 10 / 20 / 30 % (3 / 6 / 9 of 30
# layers removed: the savings where layer removal lands exactly) and the base.
# Stages, in the order they ran (the two halves of the tasks side by side, one thread each):
#   bash experiments/r5.sh proxy-short   # the shipped gates vs ShortGPT on 64-token held-out blocks
#   bash experiments/r5.sh sg-a & bash experiments/r5.sh sg-b     # base and ShortGPT
#   bash experiments/r5.sh alloc         # (beside them) choose / search the shipped allocations
#   bash experiments/r5.sh gs-a & bash experiments/r5.sh gs-b     # the shipped gates
#   bash experiments/r5.sh table
# Half a is HellaSwag; half b ARC-Easy, ARC-Challenge, WinoGrande and PIQA. (PIQA's base and
# ShortGPT-10 % points ran in half a's folder before PIQA moved to half b to balance the
# halves; the table merges both folders.) Every eval resumes its folder.
# Machine: the project's 2-core AMD EPYC VM (no GPU), one thread per job, three jobs at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
R=runs/r5
D=docs/results/experiment-r5
TRAIN=runs/data/gate_train.jsonl.gz
HELDOUT=runs/data/gate_heldout.jsonl.gz
mkdir -p $R $D
test -f $TRAIN || .venv/bin/python -m gateskip.corpus $TRAIN --heldout $HELDOUT
half() { case "$1" in a) echo hellaswag ;; b) echo arc_easy,arc_challenge,winogrande,piqa ;; esac; }
EVAL="$G eval smollm2-135m --gates gates/smollm2-135m-unit --limit 500 --batch-size 16"
case "${1:-}" in
  proxy-short)
    $G proxy smollm2-135m --gates gates/smollm2-135m-unit --methods gateskip,shortgpt --text $HELDOUT \
      --search-text $TRAIN --blocks 32 --length 64 --agreement 20 --out $D/proxy-short ;;
  sg-a|sg-b)
    H=${1#sg-}
    $EVAL --tasks "$(half $H)" --method shortgpt --budgets 0.1,0.2,0.3 --out $R/table-$H 2>&1 | tee -a $R/table-$H.log ;;
  gs-a|gs-b)
    H=${1#gs-}
    $EVAL --tasks "$(half $H)" --method gateskip --budgets 0.1,0.2,0.3 --out $R/table-$H 2>&1 | tee -a $R/table-$H.log ;;
  table)
    .venv/bin/python experiments/r5_table.py $R/table-a $R/table-b --out $D ;;
  *) echo "usage: bash experiments/r5.sh proxy-short|sg-a|sg-b|alloc|gs-a|gs-b|table" >&2; exit 2 ;;
esac
