#!/usr/bin/env bash
# GPU prefill speed (docs/experiment.md): physical skipping vs the ungated model on the lent
# H200, for SmolLM2-135M's shape and a Llama-3.2-1B-shaped model, random weights (speed does
# not depend on them). Needs .gpu/p from experiments/gpu_prepare.sh (tokenizer + wheels).
set -uo pipefail
PY=${PY:-python3}
P=${P:-.gpu/p}
BATCH=${BATCH:-8}; LENGTH=${LENGTH:-2048}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bfloat16}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
site=/tmp/site-p
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site $P/whl/*.whl || exit 1
export PYTHONPATH=$site:$PWD/src
$PY - "$P" <<'PYEOF' || exit 1
import shutil, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
shapes = {
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
for name, kw in shapes.items():
    torch.manual_seed(0)
    out = Path("/tmp/models") / name
    LlamaForCausalLM(LlamaConfig(max_position_embeddings=8192, **kw)).save_pretrained(out)
    for f in Path(sys.argv[1]).glob("tokenizer*"):
        shutil.copy(f, out)
    print("built", out)
PYEOF
for m in smollm2-135m-shape llama-1b-shape; do
    $PY benchmarks/bench_prefill.py --model /tmp/models/$m --batch $BATCH --length $LENGTH --device $DEVICE \
        --dtype $DTYPE --kinds lowrank --budgets 0 0.25 0.5 --rounds 5 2>&1 | grep -v -E "pytree|Loading weights"
done
