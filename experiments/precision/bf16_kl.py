"""Round 6: is KL to the base under bf16 autocast close enough to fp32 to search allocations with?

KL of the shipped allocations and of ShortGPT's layer removal (3 / 6 / 9 layers) on 16 x 64
tokens of training text (64-token blocks 64-79), each computed in fp32 and under bf16
autocast (base in the same precision), and the time of one forward in each.
Run: OMP_NUM_THREADS=1 .venv/bin/python experiments/precision/bf16_kl.py
"""

import time

import torch
import torch.nn.functional as F

from gateskip.search.allocation import mean_kl
from gateskip.search.saturation import least_influential
from gateskip.core.budget import AllocationBudget
from gateskip.inference.calibrate import sample_tokens
from gateskip.loading import load_model
from gateskip.core.model import load_gates
from gateskip.core.plan import SkipPlan

model, tokenizer = load_model("smollm2-135m")
load_gates(model, "gates/smollm2-135m-unit")
ids, mask = sample_tokens(tokenizer, "runs/data/gate_train.jsonl.gz", 16, 64, skip=64)
order = least_influential(model, (ids, mask), 30)
candidates = {f"shipped {k}": e["ratios"] for k, e in model.gate_bank.allocations.items()}
for n in (3, 6, 9):
    candidates[f"layers removed: {n}"] = {f"{b}.{i}": 1.0 for i in order[:n] for b in ("attn", "mlp")}

kls: dict[str, list[float]] = {}
for name, bf16 in (("fp32", False), ("bf16", True)):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        base = F.log_softmax(model(ids, attention_mask=mask, skip_plan=SkipPlan(apply_gates=False)).logits.float(), -1)
        for label, ratios in candidates.items():
            start = time.perf_counter()
            logits = model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=AllocationBudget(ratios, 0.0))).logits
            seconds = time.perf_counter() - start
            kls.setdefault(label, []).append(mean_kl(base, F.log_softmax(logits.float(), -1), mask.bool()))
        print(f"{name}: last forward of 16 x 64 tokens {seconds:.2f} s")
print(f"{'allocation':<22} {'fp32 KL':>8} {'bf16 KL':>8} {'diff':>7}")
for label, (fp32, bf16) in kls.items():
    print(f"{label:<22} {fp32:8.4f} {bf16:8.4f} {bf16 - fp32:+7.4f}")
