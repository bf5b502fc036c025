#!/usr/bin/env bash
# Session 9 (docs/speed.md "Round 9"): speed with the shipped gates after the decode-step changes
# (no K/V and no input norm for removed modules in the lean decoder), and the main job rerun.
# Stages:
#   bash experiments/speed/shipped_gates.sh speed-alloc   # allocations at 40 and 50 % added to a copy of the shipped file
#   bash experiments/speed/shipped_gates.sh speed         # gateskip bench: prefill, batch 1 and batch 8 decoding, speculative
#   bash experiments/speed/shipped_gates.sh demo          # make demo (the main job), its wall time and report
# Machine: see docs/results/speed/shipped_gates/MACHINE.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
R=runs/r9
D=docs/results/speed/shipped_gates
TRAIN=runs/data/gate_train.jsonl.gz
HELDOUT=runs/data/gate_heldout.jsonl.gz
mkdir -p $R $D
test -f $TRAIN || .venv/bin/python -m gateskip.data.corpus $TRAIN --heldout $HELDOUT
case "${1:-}" in
  speed-alloc)
    # For speed only, round 8's search (experiments/training_recipes/longer_bf16.sh speed-alloc) into this round's folders:
    # greedy allocations at 40 and 50 % on 4 x 64 tokens, bf16; not shipped, their text is poor.
    R=$R D=$D bash experiments/training_recipes/longer_bf16.sh speed-alloc ;;
  speed)
    # Threads: the free cores (bench's default). 5 interleaved rounds.
    $G bench smollm2-135m --gates $R/speed/gateskip.safetensors --budgets 0.1 0.2 0.3 0.4 0.5 --speculative 0.1 \
      --prefill 4 512 --new-tokens 64 --batch 8 --rounds ${ROUNDS:-5} --json $D/bench.json 2>&1 | tee $D/bench.log ;;
  demo)
    # A fresh run: an earlier report folder is moved aside (the main job would reuse its stages).
    if [ -d reports/demo ]; then rm -rf reports/demo.prev && mv reports/demo reports/demo.prev; fi
    /usr/bin/time -v make demo 2>&1 | tee $R/demo.log | grep -v -a "it/s\]" > $D/demo.log || true
    cp reports/demo/report.md $D/demo-report.md ;;
  *) echo "usage: bash experiments/speed/shipped_gates.sh STAGE (see the header)" >&2; exit 2 ;;
esac
