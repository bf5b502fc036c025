#!/usr/bin/env bash
# Round 6 (docs/experiment.md): the paper's configuration as a row of the five-task table, and
# allocations refined from layer removal.
# Stages, in the order they ran:
#   bash experiments/allocation_search/refine_from_removal.sh paper    # round-2 soft gates (the paper's h + g * o), equal share per module
#   bash experiments/allocation_search/refine_from_removal.sh refine   # (beside it) exchange search from ShortGPT's layer removal, per target
#   bash experiments/allocation_search/refine_from_removal.sh choose   # per target, round 5's allocation or the refined one, on held-back text
#   bash experiments/allocation_search/refine_from_removal.sh proxy    # round 5's and round 6's allocations vs ShortGPT and random, held-out text
#   bash experiments/allocation_search/refine_from_removal.sh gs-a & bash experiments/allocation_search/refine_from_removal.sh gs-b   # round 6's allocations on the five tasks
#   BUDGETS=0.15,0.25 bash experiments/allocation_search/refine_from_removal.sh gs-a; BUDGETS=0.15,0.25 bash experiments/allocation_search/refine_from_removal.sh gs-b  # then these
#   bash experiments/allocation_search/refine_from_removal.sh sg-a & bash experiments/allocation_search/refine_from_removal.sh sg-b   # ShortGPT at 4 and 8 layers (budgets 0.15 / 0.25)
#   bash experiments/allocation_search/refine_from_removal.sh table
# Machine: the project's 2-core AMD EPYC VM (no GPU), one thread per job, two or three jobs at a
# time (the paper row beside refine and choose, then beside gs-a and gs-b).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
R=runs/r6
D=docs/results/allocation_search/refine_from_removal
TRAIN=runs/data/gate_train.jsonl.gz
HELDOUT=runs/data/gate_heldout.jsonl.gz
TASKS=arc_easy,arc_challenge,piqa,hellaswag,winogrande
mkdir -p $R $D
test -f $TRAIN || .venv/bin/python -m gateskip.data.corpus $TRAIN --heldout $HELDOUT
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
  choose)
    # Per target, the lower KL of round 5's shipped allocation and the refined one on 32 x 64
    # tokens of training text that no search or choice used (64-token blocks 160-191), fp32.
    mkdir -p $R/ship && cp gates/smollm2-135m-unit/gateskip.safetensors $R/ship/
    $G allocate smollm2-135m --gates $R/ship/gateskip.safetensors --choose $R/refine/gateskip.safetensors \
      --text $TRAIN --sequences 32 --length 64 --skip-sequences 160 --overwrite --plot $R/ship/allocation.png \
      2>&1 | tee $D/choose.log ;;
  proxy)
    # Held-out text (never trained, searched or chosen on): 32 x 64 tokens with agreement on 20
    # prompts, and 8 x 256 tokens; round 5's allocations (the first --gates) beside round 6's.
    $G proxy smollm2-135m --gates gates/smollm2-135m-unit --gates $R/ship/gateskip.safetensors \
      --methods gateskip,shortgpt,random --text $HELDOUT --search-text $TRAIN --blocks 32 --length 64 \
      --agreement 20 --out $D/proxy-short
    $G proxy smollm2-135m --gates gates/smollm2-135m-unit --gates $R/ship/gateskip.safetensors \
      --methods gateskip,shortgpt,random --text $HELDOUT --search-text $TRAIN --blocks 8 --length 256 \
      --out $D/proxy-long ;;
  gs-a|gs-b)
    # Half a is HellaSwag, half b the other four (as round 5); base, ShortGPT and random are
    # round 5's records (docs/results/allocation_search/choose_searches/table-*), the same items.
    H=${1#gs-}
    T=hellaswag; [ $H = b ] && T=arc_easy,arc_challenge,piqa,winogrande
    $G eval smollm2-135m --gates $R/ship --tasks $T --limit 500 --batch-size 16 --method gateskip \
      --budgets ${BUDGETS:-0.1,0.2,0.3} --out $R/table-$H 2>&1 | tee -a $R/table-$H.log ;;
  sg-a|sg-b)
    # ShortGPT's base and 10-30 % records are round 5's (copied in, so the sweep resumes them);
    # budgets 0.15 and 0.25 remove round(4.5) = 4 and round(7.5) = 8 layers.
    H=${1#sg-}
    T=hellaswag; [ $H = b ] && T=arc_easy,arc_challenge,piqa,winogrande
    mkdir -p $R/sg-$H && cp docs/results/allocation_search/choose_searches/table-$H/results.json $R/sg-$H/
    $G eval smollm2-135m --gates gates/smollm2-135m-unit --tasks $T --limit 500 --batch-size 16 --method shortgpt \
      --budgets 0.15,0.25 --out $R/sg-$H 2>&1 | tee -a $R/sg-$H.log ;;
  table)
    P=docs/results/allocation_search/choose_searches
    .venv/bin/python experiments/task_tables/five_task_table.py $P/table-a $P/table-b $P/table-c $R/paper $R/table-a $R/table-b $R/sg-a $R/sg-b \
      --label $P/table-a="gateskip r5" --label $P/table-b="gateskip r5" --label $P/table-c="gateskip r5" \
      --label $R/sg-a="gateskip r5" --label $R/sg-b="gateskip r5" \
      --label $R/paper="paper (soft, equal share)" --out $D ;;
  *) echo "usage: bash experiments/allocation_search/refine_from_removal.sh STAGE (see the header)" >&2; exit 2 ;;
esac
