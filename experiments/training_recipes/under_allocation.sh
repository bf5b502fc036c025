#!/usr/bin/env bash
# Round 4 (docs/experiment.md): the round-3 unit gates trained further under their own
# allocations (end to end, distillation to the base, straight-through unit gates), then
# searched again and compared on the held-out proxy with ShortGPT and random in one run.
# Machine: the project's 2-core AMD EPYC VM (no GPU), one thread per job, shared with 3-4 other jobs.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
G=.venv/bin/gateskip
mkdir -p runs/logs docs/results/training_recipes/under_allocation
test -f runs/data/gate_train.jsonl.gz || \
  .venv/bin/python -m gateskip.data.corpus runs/data/gate_train.jsonl.gz --heldout runs/data/gate_heldout.jsonl.gz

# 1. Train under the allocations for 10, 20 and 30 % (one per step in turn), 40 minutes.
$G train smollm2-135m --data runs/data/gate_train.jsonl.gz --out runs/alloc-e2e --mode frozen \
  --init-gates gates/smollm2-135m-unit --allocation 0.1 0.2 0.3 --seq-len 256 --batch-size 2 --steps 150 \
  --sparsity-weight 0 --distill-weight 1.0 --gate-lr 1e-3 --eval-blocks 8 --save-every 20 --max-minutes 40 \
  2>&1 | tee runs/logs/alloc-e2e.log
# 1b. The same gates trained further on the attribution target (first-order LM-loss change of
#     removing each branch output; one forward and backward of the frozen base), 30 minutes.
$G train smollm2-135m --data runs/data/gate_train.jsonl.gz --out runs/attr --mode frozen \
  --init-gates gates/smollm2-135m-unit --objective attribution --seq-len 256 --batch-size 2 --steps 100 \
  --gate-lr 3e-3 --eval-blocks 4 --save-every 20 --max-minutes 30 2>&1 | tee runs/logs/attr.log

# 2. Proxy A: the gates trained under the allocation against the shipped ones (the same
#    allocation ratios), equal shares, ShortGPT and random, on 8 held-out blocks.
$G proxy smollm2-135m --gates runs/alloc-e2e/final --gates gates/smollm2-135m-unit \
  --methods gateskip,equal,shortgpt,random --text runs/data/gate_heldout.jsonl.gz \
  --search-text runs/data/gate_train.jsonl.gz --blocks 8 --length 256 --out docs/results/training_recipes/under_allocation/proxy-a \
  2>&1 | tee runs/logs/proxy-a.log

# 3. Proxy B: the attribution-trained gates under the same allocation (same 8 held-out blocks;
#    the baselines are in proxy A).
$G proxy smollm2-135m --gates runs/attr/final --methods gateskip --text runs/data/gate_heldout.jsonl.gz \
  --search-text runs/data/gate_train.jsonl.gz --blocks 8 --length 256 --out docs/results/training_recipes/under_allocation/proxy-b \
  2>&1 | tee runs/logs/proxy-b.log

# 4. Ship the gates trained under the allocation (round 3's file stays as gates/smollm2-135m-unit-r3).
cp runs/alloc-e2e/final/gateskip.safetensors runs/alloc-e2e/final/train_config.json gates/smollm2-135m-unit/
cp runs/alloc-e2e/metrics.jsonl gates/smollm2-135m-unit/

# 5. Tasks: ARC-Easy and PIQA, 200 items each, at 20 % against ShortGPT (the sweep resumes its folder).
$G eval smollm2-135m --gates runs/alloc-e2e/final --tasks arc_easy,piqa --budgets 0.2 \
  --method gateskip,shortgpt --limit 200 --batch-size 8 --out runs/r4-eval 2>&1 | tee runs/logs/r4-eval.log

# 6. The allocation searched again with the trained gates (same search text and levels as round 3).
mkdir -p runs/alloc-e2e-rs && cp runs/alloc-e2e/final/gateskip.safetensors runs/alloc-e2e-rs/
$G allocate smollm2-135m --gates runs/alloc-e2e-rs/gateskip.safetensors --targets 0.05 0.1 0.15 0.2 0.25 0.3 \
  --text runs/data/gate_train.jsonl.gz --sequences 2 --length 256 --levels 0.5 1.0 --overwrite \
  --plot runs/alloc-e2e-rs/allocation.png 2>&1 | tee runs/logs/allocate-rs.log
# 7. Proxy C: the searched-again allocation on the same held-out blocks (baselines in proxy A).
$G proxy smollm2-135m --gates runs/alloc-e2e-rs/gateskip.safetensors --methods gateskip \
  --text runs/data/gate_heldout.jsonl.gz --search-text runs/data/gate_train.jsonl.gz --blocks 8 --length 256 \
  --out docs/results/training_recipes/under_allocation/proxy-c 2>&1 | tee runs/logs/proxy-c.log

# 8. The same search on twice the text (4 blocks), two threads on the then quiet machine, and its proxy.
mkdir -p runs/alloc-e2e-s4 && cp runs/alloc-e2e/final/gateskip.safetensors runs/alloc-e2e-s4/
OMP_NUM_THREADS=2 $G allocate smollm2-135m --gates runs/alloc-e2e-s4/gateskip.safetensors \
  --targets 0.05 0.1 0.15 0.2 0.25 0.3 --text runs/data/gate_train.jsonl.gz --sequences 4 --length 256 \
  --levels 0.5 1.0 --overwrite --plot runs/alloc-e2e-s4/allocation.png 2>&1 | tee runs/logs/allocate-s4.log
OMP_NUM_THREADS=2 $G proxy smollm2-135m --gates runs/alloc-e2e-s4/gateskip.safetensors --methods gateskip \
  --text runs/data/gate_heldout.jsonl.gz --search-text runs/data/gate_train.jsonl.gz --blocks 8 --length 256 \
  --out docs/results/training_recipes/under_allocation/proxy-d 2>&1 | tee runs/logs/proxy-d.log
