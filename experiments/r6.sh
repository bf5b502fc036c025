#!/usr/bin/env bash
# Round 6 (docs/experiment.md): the paper's configuration as a row of the five-task table, and
# allocations refined from layer removal.
# Stages, in the order they ran:
#   bash experiments/r6.sh paper    # round-2 soft gates (the paper's h + g * o), equal share per module
#   bash experiments/r6.sh refine   # (beside it) exchange search from ShortGPT's layer removal, per target
# Machine: the project's 2-core AMD EPYC VM (no GPU), one thread per job, two jobs at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
R=runs/r6
D=docs/results/experiment-r6
TRAIN=runs/data/gate_train.jsonl.gz
HELDOUT=runs/data/gate_heldout.jsonl.gz
TASKS=arc_easy,arc_challenge,piqa,hellaswag,winogrande
mkdir -p $R $D
test -f $TRAIN || .venv/bin/python -m gateskip.corpus $TRAIN --heldout $HELDOUT
case "${1:-}" in
  paper)
    # Soft gates trained on round 2's text, which holds HellaSwag and WinoGrande validation
    # items: those two tasks are contaminated for this row (docs/experiment.md, round 2).
    # No allocation is stored in this file, so --budget is the skip fraction of every module.
    $G eval smollm2-135m --gates gates/smollm2-135m-lowrank-qa --tasks $TASKS --limit 500 --batch-size 16 \
      --method gateskip --budgets 0.1,0.2,0.3 --out $R/paper 2>&1 | tee -a $R/paper.log ;;
  refine)
    # Per target, from the least influential layers removed (Block Influence), exchanges on
    # 16 x 64 tokens of training text no earlier search used (64-token blocks 128-143), bf16.
    mkdir -p $R/refine && cp gates/smollm2-135m-unit/gateskip.safetensors $R/refine/
    $G allocate smollm2-135m --gates $R/refine/gateskip.safetensors --targets 0.05 0.1 0.15 0.2 0.25 0.3 \
      --refine removal --rounds 6 --bf16 --text $TRAIN --sequences 16 --length 64 --skip-sequences 128 \
      --levels 0.5 1.0 --overwrite --plot $R/refine/allocation.png 2>&1 | tee $D/refine.log ;;
  *) echo "usage: bash experiments/r6.sh STAGE (see the header)" >&2; exit 2 ;;
esac
