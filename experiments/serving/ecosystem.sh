#!/usr/bin/env bash
# The commands of docs/ecosystem.md, in order, offline on the bundled model: lm-eval's own CLI with
# --model gateskip, a gated model folder (transformers, lm-eval's hf model), a LoRA adapter beside gates (PEFT).
# Each lm-eval run writes its results JSON under runs/ecosystem/; the whole output is docs/results/serving/ecosystem-cpu.log.
# Machine: the project's 2-core AMD EPYC VM (no GPU), one thread, shared with other jobs.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
BIN=.venv/bin
OUT=runs/ecosystem
GATES=gates/smollm2-135m-unit
TASKS=$($BIN/gateskip tasks)  # the bundled offline task copies, rendered for lm-eval's --include_path
echo "bundled tasks rendered into $TASKS"

evaluate() {  # NAME MODEL_TYPE MODEL_ARGS: the first 100 ARC-Easy items through lm-eval's own CLI
  echo "== lm_eval --model $2 --model_args $3"
  $BIN/lm_eval --model "$2" --model_args "$3" --tasks arc_easy --include_path "$TASKS" --limit 100 \
    --device cpu --batch_size 8 --output_path "$OUT/$1" 2>&1 | grep -v "^\s*$" | grep -iv "warn\|deprecat" || true
  $BIN/python - "$OUT/$1" <<'EOF'
import json, pathlib, sys
r = json.loads(max(pathlib.Path(sys.argv[1]).rglob("results_*.json")).read_text())
a, g = r["results"]["arc_easy"], r["config"].get("gateskip")
line = f"{sys.argv[1]}: acc {a['acc,none']:.3f} +- {a['acc_stderr,none']:.3f}, acc_norm {a['acc_norm,none']:.3f}"
if g:
    line += (f"; {g['method']} at budget {g['budget']:g}: skipped {g['skip_fraction']:.3f} of token x module "
             f"evaluations, net FLOP saving {g['net_saving']:.3f} ({g['net_saving_with_head']:.3f} with the LM head)")
print(line)
EOF
}

# 1. The shipped unit gates under their allocations (budget = net-saving target), and two baselines.
evaluate base gateskip pretrained=smollm2-135m,gates=$GATES,budget=0
evaluate gateskip-0.25 gateskip pretrained=smollm2-135m,gates=$GATES,budget=0.25
evaluate shortgpt-0.25 gateskip pretrained=smollm2-135m,gates=$GATES,budget=0.25,method=shortgpt
evaluate random-0.25 gateskip pretrained=smollm2-135m,gates=$GATES,budget=0.25,method=random

# 2. A gated model folder: save_pretrained writes the gates beside the HF weights.
$BIN/python - "$OUT/gated-smollm2" "$GATES" <<'EOF'
import logging, sys
from pathlib import Path
from transformers import AutoModelForCausalLM
import gateskip

folder, gates = Path(sys.argv[1]), sys.argv[2]
model, tokenizer = gateskip.load_model("smollm2-135m")
gateskip.load_gates(model, gates)
model.save_pretrained(folder)
tokenizer.save_pretrained(folder)
for f in sorted(folder.iterdir()):
    print(f"{f.name}: {f.stat().st_size / 1e6:.2f} MB")
warnings = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("transformers").addHandler(handler)
base = AutoModelForCausalLM.from_pretrained(folder)
print(f"from_pretrained: {type(base).__name__}, gated: {gateskip.is_gated(base)}, warnings: {len(warnings)}")
again, _ = gateskip.load_model(str(folder))
print(f"gateskip.load_model: gated: {gateskip.is_gated(again)}, allocations: {sorted(again.gate_bank.allocations)}")
EOF
evaluate folder-0.25 gateskip pretrained=$OUT/gated-smollm2,budget=0.25
evaluate folder-hf hf pretrained=$OUT/gated-smollm2,dtype=float32

# 3. LoRA: a short run exports a PEFT adapter beside its gates; gateskip merges it, lm-eval's hf model reads it as PEFT.
$BIN/gateskip train smollm2-135m --mode lora --lora-rank 8 --steps 10 --seq-len 128 --batch-size 2 \
  --out $OUT/lora --overwrite 2>&1 | tail -n 3
ls $OUT/lora/final
evaluate lora-0.25 gateskip pretrained=smollm2-135m,gates=$OUT/lora/final,budget=0.25
BASE=$($BIN/python -c "from gateskip.loading import resolve_spec; print(resolve_spec('smollm2-135m'))")
evaluate lora-hf hf pretrained=$BASE,peft=$OUT/lora/final,dtype=float32
