#!/usr/bin/env bash
# Round 5 (docs/experiment.md): the issue's task table. Five tasks (ARC-Easy, ARC-Challenge,
# PIQA, HellaSwag, WinoGrande; 500 items each, ARC-Challenge's whole bundled set of 299),
# the shipped gates under their allocations against ShortGPT, random token skipping and the
# base, plus the paper's configuration (round-2 soft gates, equal share per module).
# The tasks are split into two halves run side by side, one thread each:
#   bash experiments/r5.sh a    # HellaSwag, PIQA
#   bash experiments/r5.sh b    # ARC-Easy, ARC-Challenge, WinoGrande
#   bash experiments/r5.sh table
# Every eval resumes its folder, so a half can be stopped and rerun.
# Machine: the project's 2-core AMD EPYC VM (no GPU), one thread per job, the two halves
# sharing it with a third job part of the time.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
R=runs/r5
mkdir -p $R
case "${1:-}" in
  a) TASKS=hellaswag,piqa ;;
  b) TASKS=arc_easy,arc_challenge,winogrande ;;
  table)
    .venv/bin/python experiments/r5_table.py $R/table-a $R/table-b --paper $R/paper-a $R/paper-b \
      --out docs/results/experiment-r5
    exit 0 ;;
  *) echo "usage: bash experiments/r5.sh a|b|table" >&2; exit 2 ;;
esac
H=$1
EVAL="$G eval smollm2-135m --tasks $TASKS --limit 500 --batch-size 16"
# The base and ShortGPT at 10 / 20 / 30 % (3 / 6 / 9 of 30 layers removed: the savings where
# layer removal lands exactly).
$EVAL --gates gates/smollm2-135m-unit --method shortgpt --budgets 0.1,0.2,0.3 --out $R/table-$H 2>&1 | tee -a $R/table-$H.log
# The shipped gates at the same net savings (the budget is the net-saving target of the allocation).
$EVAL --gates gates/smollm2-135m-unit --method gateskip --budgets 0.1,0.2,0.3 --out $R/table-$H 2>&1 | tee -a $R/table-$H.log
# Random token skipping (equal share) at 20 %, and the shipped gates at the issue's 15 / 25 % points.
$EVAL --gates gates/smollm2-135m-unit --method random --budgets 0.2 --out $R/table-$H 2>&1 | tee -a $R/table-$H.log
$EVAL --gates gates/smollm2-135m-unit --method gateskip --budgets 0.15,0.25 --out $R/table-$H 2>&1 | tee -a $R/table-$H.log
# The paper's configuration: round-2 soft gates (h + g * o), equal share, at budgets 0 and 0.2.
# Its folder starts with the base records of the table above (the base runs without gates, so
# they are the same run; copying saves recomputing them).
.venv/bin/python experiments/r5_table.py --seed-base $R/table-$H --gates gates/smollm2-135m-lowrank-qa --into $R/paper-$H
$EVAL --gates gates/smollm2-135m-lowrank-qa --method gateskip --budgets 0,0.2 --out $R/paper-$H 2>&1 | tee -a $R/paper-$H.log
