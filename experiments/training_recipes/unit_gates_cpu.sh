#!/usr/bin/env bash
# Round 3 (docs/experiment.md): unit gates trained on this CPU, allocations, proxy, tasks.
# Every command of the round, in order; each writes under runs/ (logs in runs/logs/).
# Machine: the project's 2-core AMD EPYC VM (no GPU), one thread per job, shared with other jobs.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
mkdir -p runs/logs

# 1. Training text with no evaluation items, and a held-out split for the proxy.
.venv/bin/python -m gateskip.data.corpus runs/data/gate_train.jsonl.gz --heldout runs/data/gate_heldout.jsonl.gz

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
#    Only the shipped influence gates got one (11 minutes here); then they were copied to gates/.
$G allocate smollm2-135m --gates runs/infl-r16/final --targets 0.05 0.1 0.15 0.2 0.25 0.3 \
  --text runs/data/gate_train.jsonl.gz --sequences 2 --length 256 --levels 0.5 1.0 \
  --plot runs/infl-r16/allocation.png 2>&1 | tee runs/logs/allocate-infl-r16-v2.log
cp runs/infl-r16/final/gateskip.safetensors runs/infl-r16/allocation.png gates/smollm2-135m-unit-r3/

# 4. Proxy on held-out text: the allocated gates, equal shares of all three gate sets, ShortGPT, random.
$G proxy smollm2-135m --gates runs/infl-r16/final --gates runs/e2e-r16/final --gates gates/smollm2-135m-lowrank-qa \
  --text runs/data/gate_heldout.jsonl.gz --search-text runs/data/gate_train.jsonl.gz --blocks 4 --length 256 \
  --agreement 20 --out docs/results/training_recipes/unit_gates_cpu/proxy 2>&1 | tee runs/logs/proxy-v2.log

# 5. Tasks (100 items each; the sweep resumes its folder).
HF_DATASETS_OFFLINE=1 $G eval smollm2-135m --gates gates/smollm2-135m-unit-r3 --tasks arc_easy,piqa,winogrande \
  --budgets 0.1,0.2 --method gateskip,shortgpt,random --limit 100 --batch-size 8 --out runs/r3-eval \
  2>&1 | tee runs/logs/r3-eval.log
