#!/usr/bin/env bash
# Round 8 (docs/experiment.md): the shipped gates trained further under the shipped allocations
# (all six targets in turn, 64-token sequences like the task prompts, bf16 autocast), then the
# proxy and, where the proxy says so, the five tasks.
# Stages, in the order they ran:
#   bash experiments/training_recipes/longer_bf16.sh train    # both threads; stopped at step 295 of 600 (21 min): the loss was NaN
#   bash experiments/training_recipes/longer_bf16.sh export   # so the gates of its last checkpoint (step 250) are the ones used
#   bash experiments/training_recipes/longer_bf16.sh nan-check   # after the unit_factor fix: steps 251-300 again from that checkpoint
#   bash experiments/training_recipes/longer_bf16.sh proxy    # shipped vs round 8's gates (same allocations), ShortGPT, random
#   BUDGETS=... bash experiments/training_recipes/longer_bf16.sh tasks-1 & BUDGETS=... bash experiments/training_recipes/longer_bf16.sh tasks-2
#   bash experiments/training_recipes/longer_bf16.sh speed-alloc   # allocations at 40 and 50 % for the speed run
#   bash experiments/training_recipes/longer_bf16.sh speed    # issue 12: the shipped gates' speed, alone on the machine
# Machine: a 2-core Intel Xeon VM with avx512_bf16 and AMX (MACHINE), no GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
R=${R:-runs/r8}  # overridable: experiments/speed/shipped_gates.sh reruns speed-alloc into its own folders
D=${D:-docs/results/training_recipes/longer_bf16}
P6=docs/results/allocation_search/refine_from_removal
TRAIN=runs/data/gate_train.jsonl.gz
HELDOUT=runs/data/gate_heldout.jsonl.gz
mkdir -p $R $D
test -f $TRAIN || .venv/bin/python -m gateskip.data.corpus $TRAIN --heldout $HELDOUT
# train_run OUT STEPS SAVE_EVERY FLAG: round 8's training run (both threads, bf16) in OUT
train_run() {
  OMP_NUM_THREADS=2 $G train smollm2-135m --data $TRAIN --out $1 --mode frozen \
    --init-gates gates/smollm2-135m-unit --allocation 0.05 0.1 0.15 0.2 0.25 0.3 --seq-len 64 \
    --batch-size 8 --steps $2 --sparsity-weight 0 --distill-weight 1.0 --gate-lr 1e-3 \
    --eval-blocks 16 --eval-every 100 --save-every $3 --max-minutes 40 --mixed-precision bf16 $4
}
case "${1:-}" in
  train)
    # End to end (LM loss + KL to the base), gates only, every step skipping tokens exactly as the
    # shipped allocation for one target does, the six targets in turn; 8 x 64 tokens a step.
    # Resumable: run it again and it continues from the last checkpoint.
    RESUME=--overwrite; test -d $R/train/checkpoints && RESUME=--resume
    train_run $R/train 600 50 $RESUME 2>&1 | tee -a $D/train.log ;;
  export)
    # A resume with --steps at the checkpoint's step runs no step and exports its gates
    # (thresholds recalibrated for them) to $R/train/final.
    train_run $R/train 250 50 --resume ;;
  nan-check)
    # The same run resumed from step 250 in a copy (its config's out renamed), with plan.unit_factor fixed.
    mkdir -p $R/nan-check/checkpoints && cp -r $R/train/checkpoints/step-00000250 $R/nan-check/checkpoints/
    .venv/bin/python -c "import json; p = '$R/nan-check/train_config.json'; d = json.load(open('$R/train/train_config.json'));
d['out'] = '$R/nan-check'; json.dump(d, open(p, 'w'), indent=2)"
    head -250 $R/train/metrics.jsonl > $R/nan-check/metrics.jsonl
    train_run $R/nan-check 300 0 --resume ;;
  proxy)
    # Held-out text (never trained, searched or chosen on), as round 6's proxy: 32 x 64 tokens
    # with agreement on 20 prompts, and 8 x 256 tokens.
    export OMP_NUM_THREADS=1
    $G proxy smollm2-135m --gates gates/smollm2-135m-unit --gates $R/train/final \
      --methods gateskip,shortgpt,random --text $HELDOUT --search-text $TRAIN --blocks 32 --length 64 \
      --agreement 20 --out $D/proxy-short &
    $G proxy smollm2-135m --gates gates/smollm2-135m-unit --gates $R/train/final \
      --methods gateskip,shortgpt,random --text $HELDOUT --search-text $TRAIN --blocks 8 --length 256 \
      --out $D/proxy-long
    wait ;;
  tasks-1|tasks-2)
    # Round 8's gates at BUDGETS on the five tasks (500 items), in two jobs of about equal work:
    # 1 is ARC-Easy and ARC-Challenge, 2 HellaSwag, then PIQA and WinoGrande. Base rows are round
    # 6's records of the same items (only those copied in, so the sweep resumes them).
    export OMP_NUM_THREADS=1
    [ $1 = tasks-1 ] && PARTS="arc_easy,arc_challenge=b" || PARTS="hellaswag=a piqa,winogrande=b"
    for PART in $PARTS; do
      T=${PART%=*}; F=$R/table-${T//,/-}
      mkdir -p $F && .venv/bin/python experiments/task_tables/base_rows.py $P6/sg-${PART#*=}/results.json $F/results.json $T --gates $R/train/final
      $G eval smollm2-135m --gates $R/train/final --tasks $T --limit 500 --batch-size 16 --method gateskip \
        --budgets ${BUDGETS:-0.25,0.3} --out $F 2>&1 | tee -a $F.log
    done ;;
  speed-alloc)
    # For speed only: greedy allocations at 40 and 50 % added to a copy of the shipped gate file
    # (bf16 search on 4 x 64 tokens of training text; not shipped: their quality is poor).
    mkdir -p $R/speed && cp gates/smollm2-135m-unit/gateskip.safetensors $R/speed/
    OMP_NUM_THREADS=1 $G allocate smollm2-135m --gates $R/speed/gateskip.safetensors --targets 0.4 0.5 --bf16 \
      --text $TRAIN --sequences 4 --length 64 --levels 0.5 1.0 --overwrite 2>&1 | tee $D/allocate-speed.log ;;
  speed)
    # Issue 12 (threads: the free cores, bench's default): the shipped gates' allocations at
    # 10-30 % and those at 40 and 50 %; prefill 4 x 512, batch 1 and batch 8 decoding of 64 greedy
    # tokens, speculative at 10 %.
    $G bench smollm2-135m --gates $R/speed/gateskip.safetensors --budgets 0.1 0.2 0.3 0.4 0.5 --speculative 0.1 \
      --prefill 4 512 --new-tokens 64 --batch 8 --rounds 3 --json $D/bench.json 2>&1 | tee $D/bench.log ;;
  *) echo "usage: bash experiments/training_recipes/longer_bf16.sh STAGE (see the header)" >&2; exit 2 ;;
esac
