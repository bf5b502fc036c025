"""One process: decode 64 greedy tokens at each target with the speed gates, 3 times; print median tok/s.
A/B of the decode-step change against the commit before it, run alternately 3 times each:
    git worktree add /tmp/oldtree b385d15
    for i in 1 2 3; do PYTHONPATH=/tmp/oldtree/src .venv/bin/python experiments/speed/ab_decode.py 0 0.3 0.5
                       .venv/bin/python experiments/speed/ab_decode.py 0 0.3 0.5; done"""
import sys, time, statistics, torch
torch.set_num_threads(1)
import gateskip
from gateskip import load_model, load_gates
try:
    from gateskip.inference.decoding import decode
    from gateskip.inference.contract import decode_budget
except ImportError:  # the A/B's old side (b385d15) predates the subpackages
    from gateskip.decoding import decode
    from gateskip.generation import decode_budget
model, tok = load_model("smollm2-135m")
load_gates(model, "runs/r9/speed/gateskip.safetensors")
ids = tok("The history of the printing press begins", return_tensors="pt").input_ids
out = []
for t in map(float, sys.argv[1:]):
    b = decode_budget(model, t)
    decode(model, ids, budget=b, max_new_tokens=8)
    s = []
    for _ in range(3):
        a = time.perf_counter(); decode(model, ids, budget=b, max_new_tokens=64); s.append(64 / (time.perf_counter() - a))
    out.append(f"{t}:{statistics.median(s):.2f}")
print(gateskip.__file__.split("/src/")[0], *out)
