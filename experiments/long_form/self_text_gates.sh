#!/usr/bin/env bash
# Gates for Qwen2.5-Coder-0.5B on the model's own chat-format code answers (self_answers.py):
# the stdlib-trained gates' allocations searched again on that text, then the gates trained end to
# end under the 10 and 15 % allocations (LM loss + KL to the base, one allocation per step in turn;
# the recipe of SmolLM2's shipped gates, docs/experiment.md round 4), their decoding thresholds
# recalibrated on that text at the end. Question: does text that looks like what the model decodes
# (its chat format, its own code) keep more of pass@1 than the standard library's raw source?
# Each step keeps what it finished; logs in runs/logs/, results in docs/results/long_form/.
#
#   bash experiments/long_form/self_text_gates.sh answers|allocate|train|all
#   bash experiments/long_form/self_text_gates.sh wide   # then 20 and 25 % searched the same way into a copy of
#                                                       # the trained gates (runs/qwen-coder-self-wide)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
TEXT=docs/results/long_form/self_answers/train.jsonl.gz
START=runs/qwen-coder-self-start   # the stdlib gates with allocations searched on the answers
RUN=runs/qwen-coder-self
mkdir -p runs/logs docs/results/long_form/self_text
step=${1:-all}

if [[ $step == answers || $step == all ]]; then
  [ -f $TEXT ] || .venv/bin/python experiments/long_form/self_answers.py docs/results/long_form/self_answers \
    2>&1 | tee runs/logs/self_answers.log
fi

if [[ $step == allocate || $step == all ]]; then
  # from ShortGPT's removal, up to 3 exchanges per target, on 4 x 128 tokens of the answers (bf16)
  mkdir -p $START && cp -n runs/qwen-coder-infl/final/* $START/
  $G allocate qwen2.5-coder-0.5b --gates $START --targets 0.05 0.1 0.15 --refine removal --rounds 3 \
    --bf16 --text $TEXT --sequences 4 --length 128 --levels 0.5 1.0 \
    --plot docs/results/long_form/self_text/allocation.png --overwrite 2>&1 | tee runs/logs/qwen-coder-self-allocate.log
  tr '\r' '\n' < runs/logs/qwen-coder-self-allocate.log | grep -v -E "(it/s|module|exchange)\]$|^\s*$" \
    > docs/results/long_form/self_text/allocate.log
fi

if [[ $step == train || $step == all ]]; then
  # end to end under the 10 and 15 % allocations, gates only, bf16, 25 minutes; --resume continues
  resume=$([ -d $RUN ] && echo --resume || true)
  $G train qwen2.5-coder-0.5b --data $TEXT --out $RUN --mode frozen --init-gates $START --allocation 0.1 0.15 \
    --sparsity-weight 0 --distill-weight 1.0 --gate-lr 1e-3 --seq-len 256 --batch-size 2 --steps 200 \
    --mixed-precision bf16 --max-minutes 25 --eval-blocks 4 --save-every 10 $resume 2>&1 | tee -a runs/logs/qwen-coder-self.log
  tr '\r' '\n' < runs/logs/qwen-coder-self.log | grep -v -E "^train: |it/s\]$|^\s*$" > docs/results/long_form/self_text/train.log
  cp $RUN/metrics.jsonl docs/results/long_form/self_text/
fi

if [[ $step == wide ]]; then
  # more targets (default 20 and 25 %; TARGETS="0.07" for one more) searched as stage 3 searched 5-15 %: from
  # ShortGPT's removal, up to 3 exchanges, on the same 4 x 128 tokens of the answers, into a copy of the trained
  # gates (whose 25 % allocation was the stdlib search's); thresholds calibrated on that search text
  WIDE=runs/qwen-coder-self-wide
  T=${TARGETS:-0.2 0.25}
  mkdir -p $WIDE && cp -n $RUN/final/gateskip.safetensors $WIDE/
  $G allocate qwen2.5-coder-0.5b --gates $WIDE --targets $T --refine removal --rounds 3 \
    --bf16 --text $TEXT --sequences 4 --length 128 --levels 0.5 1.0 \
    --plot docs/results/long_form/self_text/allocation-wide.png --overwrite 2>&1 | tee runs/logs/qwen-coder-wide-allocate.log
  tr '\r' '\n' < runs/logs/qwen-coder-wide-allocate.log | grep -v -E "(it/s|module|exchange)\]$|^\s*$" \
    > docs/results/long_form/self_text/allocate-${T// /-}.log
fi
