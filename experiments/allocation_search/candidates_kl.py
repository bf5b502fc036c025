"""KL to the base of every stored allocation of several gate files, on held-back training
text (round 5's "Choosing" table in docs/experiment.md; round 5's `gateskip allocate --choose`
printed only the winners, as it did then):

    OMP_NUM_THREADS=1 python experiments/allocation_search/candidates_kl.py 16 8 gates/smollm2-135m-unit/gateskip.safetensors \
        runs/alloc-e2e-rs/gateskip.safetensors runs/alloc-e2e-s4/gateskip.safetensors

arguments: blocks of 256 tokens to pass over, blocks to measure on, gate files. (Round 5 ran it
on the shipped file as it was before the choice: `git show 27430c7:gates/smollm2-135m-unit/gateskip.safetensors`.)
"""
import sys

import torch
import torch.nn.functional as F

from gateskip.inference.calibrate import allocation_budget
from gateskip.search.allocation import kl_to_base
from gateskip.inference.calibrate import sample_tokens
from gateskip.loading import load_model
from gateskip.core.model import load_gates
from gateskip.core.plan import SkipPlan

torch.set_num_threads(1)
model, tokenizer = load_model("smollm2-135m")
skip, count = int(sys.argv[1]), int(sys.argv[2])
ids, mask = sample_tokens(tokenizer, "runs/data/gate_train.jsonl.gz", sequences=count, length=256, skip=skip)
print("blocks", tuple(ids.shape))
for path in sys.argv[3:]:
    load_gates(model, path)
    with torch.no_grad():
        base = F.log_softmax(model(ids, attention_mask=mask, skip_plan=SkipPlan(apply_gates=False)).logits.float(), -1)
    row = [(t, kl_to_base(model, ids, mask, base, allocation_budget(model, float(t))))
           for t in sorted(model.gate_bank.allocations, key=float)]
    print(path, " ".join(f"{t}:{kl:.3f}" for t, kl in row), flush=True)
