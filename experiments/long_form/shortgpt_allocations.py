"""ShortGPT's layer removal as allocations, so the vLLM engine runs it like any other: for each
target, round(target x layers) layers with the lowest Block Influence on the code training text
removed whole (attention and MLP at ratio 1, every other module at 0: no gate is evaluated, so
the gates in the file cost nothing). Written to a copy of the trained gate file.

    .venv/bin/python experiments/long_form/shortgpt_allocations.py runs/qwen-coder-infl/final runs/qwen-coder-shortgpt
"""

import shutil
import sys
from pathlib import Path

import torch

from gateskip import load_gates, load_model
from gateskip.core.model import save_gates
from gateskip.inference.calibrate import sample_tokens
from gateskip.search.allocation import predicted_saving, sample_costs
from gateskip.search.saturation import least_influential

TARGETS = (0.05, 0.1, 0.15, 0.2, 0.25)
TEXT, SEQUENCES, LENGTH = "runs/data/code_train.jsonl.gz", 4, 128  # as the gates' allocation search

source, out = Path(sys.argv[1]), Path(sys.argv[2])
model, tok = load_model("qwen2.5-coder-0.5b")
load_gates(model, source)
samples = sample_tokens(tok, TEXT, SEQUENCES, LENGTH)
layers = model.config.num_hidden_layers
with torch.no_grad():
    order = least_influential(model, samples, layers)
costs, dense = sample_costs(model, samples[1])
allocations = {}
for target in TARGETS:
    removed = order[: round(target * layers)]
    ratios = {k: 1.0 for k in costs if int(k.split(".")[1]) in removed}
    allocations[f"{target:g}"] = {"ratios": ratios, "saving": predicted_saving(ratios, costs, dense), "thresholds": {}}
    print(f"target {target:g}: layers {sorted(removed)} removed, predicted net saving {allocations[f'{target:g}']['saving']:.4f}")
print(f"Block Influence order (least first): {order}")
model.gate_bank.allocations = allocations
out.mkdir(parents=True, exist_ok=True)
print(f"wrote {save_gates(model, out)}")
