#!/usr/bin/env bash
# Round 7 (docs/experiment.md): round 6's allocations at 25 and 30 % refined further (more exchanges;
# a module the seed removed may now be raised again), and the 5 % point on the five tasks.
# Stages, in the order they ran:
#   bash experiments/allocation_search/refine_more.sh refine-25 & bash experiments/allocation_search/refine_more.sh refine-30 & bash experiments/allocation_search/refine_more.sh five
#   bash experiments/allocation_search/refine_more.sh choose   # per target, round 6's allocation or round 7's, on fresh held-back text
#   bash experiments/allocation_search/refine_more.sh proxy    # round 6's and round 7's allocations vs ShortGPT and random, held-out text
#   bash experiments/allocation_search/refine_more.sh ship     # when round 7's allocations won a target
#   bash experiments/allocation_search/refine_more.sh tasks-1 & bash experiments/allocation_search/refine_more.sh tasks-2   # those targets on the five tasks
#   bash experiments/allocation_search/refine_more.sh table
# Machine: a 2-core AMD EPYC VM with AVX2 only (no avx512, no GPU), one thread per job, two or
# three jobs at a time.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
R=runs/r7
D=docs/results/allocation_search/refine_more
P6=docs/results/allocation_search/refine_from_removal
TRAIN=runs/data/gate_train.jsonl.gz
HELDOUT=runs/data/gate_heldout.jsonl.gz
mkdir -p $R $D
test -f $TRAIN || .venv/bin/python -m gateskip.data.corpus $TRAIN --heldout $HELDOUT
case "${1:-}" in
  refine-25|refine-30)
    # From the shipped (round 6) allocation at 25 or 30 %, on the same 16 x 64 tokens round 6
    # refined on (64-token blocks 128-143), up to 10 exchanges, fp32 (this session's VM has no
    # bf16 units: autocast ran about 4x slower than fp32). The two targets run as two jobs.
    T=${1#refine-}
    mkdir -p $R/refine-$T && cp gates/smollm2-135m-unit/gateskip.safetensors $R/refine-$T/
    $G allocate smollm2-135m --gates $R/refine-$T/gateskip.safetensors --targets 0.$T \
      --refine stored --rounds 10 --text $TRAIN --sequences 16 --length 64 --skip-sequences 128 \
      --levels 0.5 1.0 --overwrite 2>&1 | tee $D/refine-$T.log ;;
  five)
    # gateskip (shipped gates) and ShortGPT at 5 %, both halves of the tasks; the base rows are
    # round 6's records (only those copied in, so the sweep resumes them), the same items.
    for H in a b; do
      T=hellaswag; [ $H = b ] && T=arc_easy,arc_challenge,piqa,winogrande
      mkdir -p $R/five-$H && .venv/bin/python experiments/task_tables/base_rows.py $P6/sg-$H/results.json $R/five-$H/results.json $T
      $G eval smollm2-135m --gates gates/smollm2-135m-unit --tasks $T --limit 500 --batch-size 16 \
        --method gateskip,shortgpt --budgets 0.05 --out $R/five-$H 2>&1 | tee -a $R/five-$H.log
    done ;;
  choose)
    # Per target, the lower KL of round 6's allocation and round 7's on 32 x 64 tokens of
    # training text that no search or choice used (64-token blocks 192-223), fp32.
    mkdir -p $R/ship && cp gates/smollm2-135m-unit/gateskip.safetensors $R/ship/
    $G allocate smollm2-135m --gates $R/ship/gateskip.safetensors --choose $R/refine-25/gateskip.safetensors $R/refine-30/gateskip.safetensors \
      --text $TRAIN --sequences 32 --length 64 --skip-sequences 192 --overwrite --plot $R/ship/allocation.png \
      2>&1 | tee $D/choose.log ;;
  proxy)
    # Held-out text (never trained, searched or chosen on), as round 6's proxy.
    $G proxy smollm2-135m --gates gates/smollm2-135m-unit --gates $R/ship/gateskip.safetensors \
      --methods gateskip,shortgpt,random --text $HELDOUT --search-text $TRAIN --blocks 32 --length 64 \
      --agreement 20 --out $D/proxy-short
    $G proxy smollm2-135m --gates gates/smollm2-135m-unit --gates $R/ship/gateskip.safetensors \
      --methods gateskip,shortgpt,random --text $HELDOUT --search-text $TRAIN --blocks 8 --length 256 \
      --out $D/proxy-long ;;
  ship)
    # Round 7's choice replaces the shipped gate file (the gates are unchanged, round 4's).
    cp $R/ship/gateskip.safetensors gates/smollm2-135m-unit/gateskip.safetensors ;;
  tasks-1|tasks-2)
    # The shipped file's allocations at BUDGETS (the targets choose changed), in two jobs of
    # about equal work: 1 is ARC-Easy and ARC-Challenge, 2 HellaSwag, then PIQA and WinoGrande.
    # Base rows are round 6's records of the same items with the same --gates path (only those
    # copied in, so the sweep resumes them).
    [ $1 = tasks-1 ] && PARTS="arc_easy,arc_challenge=b" || PARTS="hellaswag=a piqa,winogrande=b"
    for PART in $PARTS; do
      T=${PART%=*}; F=$R/table-${T//,/-}
      mkdir -p $F && .venv/bin/python experiments/task_tables/base_rows.py $P6/sg-${PART#*=}/results.json $F/results.json $T
      $G eval smollm2-135m --gates gates/smollm2-135m-unit --tasks $T --limit 500 --batch-size 16 --method gateskip \
        --budgets ${BUDGETS:-0.25,0.3} --out $F 2>&1 | tee -a $F.log
    done ;;
  table)
    # Round 6's records with round 7's after them: a later folder's record for the same task,
    # method and budget replaces an earlier one's, so gateskip at 25 and 30 % is round 7's.
    P5=docs/results/allocation_search/choose_searches
    .venv/bin/python experiments/task_tables/five_task_table.py $P5/table-a $P5/table-b $P5/table-c $P6/paper $P6/table-a $P6/table-b \
      $P6/sg-a $P6/sg-b $D/five-a $D/five-b $D/table-hellaswag $D/table-arc_easy-arc_challenge $D/table-piqa-winogrande \
      --label $P5/table-a="gateskip r5" --label $P5/table-b="gateskip r5" --label $P5/table-c="gateskip r5" \
      --label $P6/sg-a="gateskip r5" --label $P6/sg-b="gateskip r5" --label $P6/paper="paper (soft, equal share)" \
      --out $D ;;
  *) echo "usage: bash experiments/allocation_search/refine_more.sh STAGE (see the header)" >&2; exit 2 ;;
esac
