"""Self-speculative decoding with round 6's allocations (gates/smollm2-135m-unit after round 6):
bench.decode_speed on the two prompts of speculative_check.py, 3 interleaved rounds, drafting
at a 10 % and at a 20 % net saving.
    OMP_NUM_THREADS=1 .venv/bin/python docs/results/speed/speculative_r6.py"""
import torch

from gateskip.bench import PROMPTS, choose_threads, decode_speed, print_decode
from gateskip.loading import load_model
from gateskip.model import load_gates

threads, why = choose_threads()
torch.set_num_threads(threads)
print(why)
model, tok = load_model("smollm2-135m")
load_gates(model, "gates/smollm2-135m-unit")
with torch.inference_mode():
    for draft in (0.1, 0.2):
        for prompt in PROMPTS[1:3]:
            print(f"\ndraft at {draft:g}, prompt {prompt!r}")
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            print_decode(decode_speed(model, ids, None, (0.0,), 48, rounds=3, speculative=draft, pad=tok.eos_token_id))
