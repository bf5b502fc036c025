#!/usr/bin/env bash
# Round 3 (docs/experiment.md): unit gates trained on this CPU, allocations, proxy, tasks.
# Every command of the round, in order; each writes under runs/ (logs in runs/logs/).
# Machine: the project's 2-core AMD EPYC VM (no GPU), one thread per job, shared with other jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
mkdir -p runs/logs

# 1. Training text with no evaluation items, and a held-out split for the proxy.
.venv/bin/python -m gateskip.corpus runs/data/gate_train.jsonl.gz --heldout runs/data/gate_heldout.jsonl.gz

# 2a. Unit gates, influence objective (forward only), 30 minutes.
$G train smollm2-135m --data runs/data/gate_train.jsonl.gz --out runs/infl-r16 --mode frozen --objective influence \
  --gate-kind lowrank --rank 16 --protect-first-token --seq-len 256 --batch-size 4 --steps 300 --gate-lr 3e-3 \
  --max-minutes 30 --eval-blocks 8 --save-every 25 2>&1 | tee runs/logs/infl-r16.log
# 2b. Unit gates, end to end (LM + distillation to the base, straight-through), the same 30 minutes.
$G train smollm2-135m --data runs/data/gate_train.jsonl.gz --out runs/e2e-r16 --mode frozen --objective lm \
  --gate-application unit --gate-kind lowrank --rank 16 --protect-first-token --seq-len 256 --batch-size 4 \
  --steps 200 --ramp-steps 30 --target-skip 0.25 --sparsity-weight 0 --distill-weight 1.0 --gate-lr 3e-3 \
  --max-minutes 30 --eval-blocks 8 --save-every 20 2>&1 | tee runs/logs/e2e-r16.log

# 3. Allocations at net savings 5-30 %, searched on training text (never the held-out or task text).
for run in infl-r16 e2e-r16; do
  $G allocate smollm2-135m --gates runs/$run/final --targets 0.05 0.1 0.15 0.2 0.25 0.3 \
    --text runs/data/gate_train.jsonl.gz --sequences 2 --length 256 --plot runs/$run/allocation.png \
    2>&1 | tee runs/logs/allocate-$run.log
done

# 4. Proxy on held-out text: both variants, the round-2 soft gates (equal share), ShortGPT, random.
$G proxy smollm2-135m --gates runs/infl-r16/final --gates runs/e2e-r16/final --gates gates/smollm2-135m-lowrank-qa \
  --text runs/data/gate_heldout.jsonl.gz --search-text runs/data/gate_train.jsonl.gz --blocks 8 --length 256 \
  --out docs/results/experiment-r3/proxy 2>&1 | tee runs/logs/proxy.log
