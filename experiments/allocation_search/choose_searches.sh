#!/usr/bin/env bash
# Round 5 (docs/experiment.md): allocations chosen per target on held-back text, a search on
# prompt-length text, and the issue's task table: five tasks (ARC-Easy, ARC-Challenge, PIQA,
# HellaSwag, WinoGrande; 500 items each, ARC-Challenge's whole bundled set of 299), the
# shipped gates under their allocations against ShortGPT at 10 / 20 / 30 % (3 / 6 / 9 of 30
# layers removed: the savings where layer removal lands exactly) and the base.
# Stages, in the order they ran (the two halves of the tasks side by side, one thread each):
#   bash experiments/allocation_search/choose_searches.sh proxy-short   # the shipped gates vs ShortGPT on 64-token held-out blocks
#   bash experiments/allocation_search/choose_searches.sh sg-a & bash experiments/allocation_search/choose_searches.sh sg-b     # base and ShortGPT
#   bash experiments/allocation_search/choose_searches.sh alloc         # (beside them) choose / search the shipped allocations
#   bash experiments/allocation_search/choose_searches.sh gs-a & bash experiments/allocation_search/choose_searches.sh gs-b     # the shipped gates
#   bash experiments/allocation_search/choose_searches.sh proxy-final   # (beside them) the shipped allocations on both proxies
#   bash experiments/allocation_search/choose_searches.sh table
# Half a is HellaSwag; half b ARC-Easy, ARC-Challenge, WinoGrande and PIQA. (PIQA's base and
# ShortGPT-10 % points ran in half a's folder before PIQA moved to half b to balance the
# halves; the table merges both folders.) Half a also ran random token skipping at 20 % on
# HellaSwag (the `random` stage). To finish in the session, half b's 30 % points ran on both
# cores: ARC-Challenge and WinoGrande in table-b, ARC-Easy and PIQA in table-c, a copy of
# table-b's results.json at the time (the `gs-b30` stage). Every eval resumes its folder.
# Machine: the project's 2-core AMD EPYC VM (no GPU), one thread per job, three jobs at a time.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
R=runs/r5
D=docs/results/allocation_search/choose_searches
TRAIN=runs/data/gate_train.jsonl.gz
HELDOUT=runs/data/gate_heldout.jsonl.gz
mkdir -p $R $D
test -f $TRAIN || .venv/bin/python -m gateskip.data.corpus $TRAIN --heldout $HELDOUT
half() { case "$1" in a) echo hellaswag ;; b) echo arc_easy,arc_challenge,winogrande,piqa ;; esac; }
EVAL="$G eval smollm2-135m --gates gates/smollm2-135m-unit --limit 500 --batch-size 16"
case "${1:-}" in
  proxy-short)
    $G proxy smollm2-135m --gates gates/smollm2-135m-unit --methods gateskip,shortgpt --text $HELDOUT \
      --search-text $TRAIN --blocks 32 --length 64 --agreement 20 --out $D/proxy-short ;;
  proxy-final)
    # The shipped allocations (after alloc) on the proxies: 8 x 256 held-out tokens against ShortGPT
    # and random in one run, and the 64-token blocks with agreement (ShortGPT's rows: proxy-short).
    $G proxy smollm2-135m --gates gates/smollm2-135m-unit --methods gateskip,shortgpt,random --text $HELDOUT \
      --search-text $TRAIN --blocks 8 --length 256 --out $D/proxy-final
    $G proxy smollm2-135m --gates gates/smollm2-135m-unit --methods gateskip --text $HELDOUT \
      --search-text $TRAIN --blocks 32 --length 64 --agreement 20 --out $D/proxy-final-short ;;
  sg-a|sg-b)
    H=${1#sg-}
    $EVAL --tasks "$(half $H)" --method shortgpt --budgets 0.1,0.2,0.3 --out $R/table-$H 2>&1 | tee -a $R/table-$H.log ;;
  gs-a|gs-b)
    H=${1#gs-}
    B=0.1,0.2,0.3; [ $H = b ] && B=0.1,0.2   # half b's 30 %: gs-b30
    $EVAL --tasks "$(half $H)" --method gateskip --budgets $B --out $R/table-$H 2>&1 | tee -a $R/table-$H.log ;;
  alloc)
    # 1. Per target, the best of round 4's three searches (round 3's ratios, searched again on
    #    512 and on 1024 tokens; experiments/training_recipes/under_allocation.sh steps 6 and 8) on 8 x 256 tokens of training
    #    text none of them searched on (blocks 16-23).
    $G allocate smollm2-135m --gates gates/smollm2-135m-unit --choose runs/alloc-e2e-rs/gateskip.safetensors \
      runs/alloc-e2e-s4/gateskip.safetensors --text $TRAIN --sequences 8 --length 256 --skip-sequences 16 \
      --overwrite --plot gates/smollm2-135m-unit/allocation.png 2>&1 | tee $D/choose.log
    # 2. A search on prompt-length text: 12 blocks of 64 tokens (task prompts are 30-150 tokens),
    #    the same gates (round 4's file before step 1).
    mkdir -p $R/short && git show 27430c7:gates/smollm2-135m-unit/gateskip.safetensors > $R/short/gateskip.safetensors
    $G allocate smollm2-135m --gates $R/short/gateskip.safetensors --targets 0.05 0.1 0.15 0.2 0.25 0.3 \
      --text $TRAIN --sequences 12 --length 64 --levels 0.5 1.0 --overwrite --plot $R/short/allocation.png \
      2>&1 | tee $D/allocate-short.log
    # 3. Per target, the best of all four on 32 x 64 tokens of training text no search used (blocks 64-95 of 64).
    $G allocate smollm2-135m --gates gates/smollm2-135m-unit --choose runs/alloc-e2e-rs/gateskip.safetensors \
      runs/alloc-e2e-s4/gateskip.safetensors $R/short/gateskip.safetensors --text $TRAIN --sequences 32 --length 64 \
      --skip-sequences 64 --overwrite --plot gates/smollm2-135m-unit/allocation.png 2>&1 | tee $D/choose-short.log ;;
  random)
    $EVAL --tasks hellaswag --method random --budgets 0.2 --out $R/table-a 2>&1 | tee -a $R/table-a.log ;;
  random-b)  # after gs-b30, on both cores
    $EVAL --tasks arc_easy,arc_challenge --method random --budgets 0.2 --out $R/table-b 2>&1 | tee -a $R/table-b.log &
    $EVAL --tasks winogrande,piqa --method random --budgets 0.2 --out $R/table-c 2>&1 | tee -a $R/table-c.log
    wait ;;
  gs-b30)
    mkdir -p $R/table-c && cp $R/table-b/results.json $R/table-c/
    $EVAL --tasks arc_easy,piqa --method gateskip --budgets 0.3 --out $R/table-c 2>&1 | tee -a $R/table-c.log &
    $EVAL --tasks arc_challenge,winogrande --method gateskip --budgets 0.3 --out $R/table-b 2>&1 | tee -a $R/table-b.log
    wait ;;
  table)
    .venv/bin/python experiments/task_tables/five_task_table.py $R/table-a $R/table-b $R/table-c --out $D ;;
  *) echo "usage: bash experiments/allocation_search/choose_searches.sh proxy-short|sg-a|sg-b|alloc|random|gs-a|gs-b|gs-b30|random-b|proxy-final|table" >&2; exit 2 ;;
esac
