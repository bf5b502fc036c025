#!/usr/bin/env bash
# The base model's pass@1: Qwen2.5-Coder-0.5B-Instruct (the bundled Q4_K_M GGUF, dequantized) on
# the whole of HumanEval (164) and MBPP (500), greedy, through its chat template, in an eager vLLM
# engine on this CPU (lm_eval --model vllm, every request handed to the engine at once).
# One lm_eval run per task: lm-eval writes nothing until a run ends, so a task that finished is
# kept and a rerun does only what is missing.
#
#   bash experiments/long_form/base_pass_at_1.sh [humaneval] [mbpp]
#   DTYPE=float32 OUT=docs/results/long_form/base-fp32 bash experiments/long_form/base_pass_at_1.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-docs/results/long_form/base}
DTYPE=${DTYPE:-bfloat16}
MODEL=$(.venv/bin/python -c "from gateskip.loading import resolve_spec; print(resolve_spec('qwen2.5-coder-0.5b'))")
TASKS=$(.venv/bin/gateskip tasks --tasks humaneval,mbpp)
mkdir -p "$OUT"
[ -f "$OUT/MACHINE" ] || { date -u; lscpu | grep -E "^(Model name|CPU\(s\))"; .venv/bin/python -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)"; } > "$OUT/MACHINE"
tasks=("$@"); [ ${#tasks[@]} -gt 0 ] || tasks=(humaneval mbpp)
for t in "${tasks[@]}"; do
  if [ -f "$OUT/$t.log" ]; then echo "$t: done ($OUT/$t.log)"; continue; fi
  cmd=(.venv/bin/lm_eval --model vllm
       --model_args "pretrained=$MODEL,enforce_eager=True,dtype=$DTYPE,max_model_len=2048,seed=0"
       --tasks "$t" --include_path "$TASKS" --apply_chat_template --confirm_run_unsafe_code
       --batch_size auto --output_path "$OUT/$t" --log_samples)
  echo "${cmd[*]}" > "$OUT/$t.command"
  start=$(date +%s)
  VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-6} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1} \
    "${cmd[@]}" > "$OUT/$t.log.part" 2>&1
  echo "wall seconds: $(( $(date +%s) - start ))" >> "$OUT/$t.log.part"
  mv "$OUT/$t.log.part" "$OUT/$t.log"
  grep -E "pass@1|wall seconds" "$OUT/$t.log"
done
