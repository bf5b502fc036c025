"""Second look at self-speculative decoding with the shipped unit gates (bench.decode_speed on two prompts,
5 interleaved rounds): HF generate, our decoder at budget 0, speculative drafting at a 10 % net saving.
    OMP_NUM_THREADS=1 .venv/bin/python experiments/speed/speculative_check.py"""
import torch

from gateskip.inference.bench import PROMPTS, choose_threads, decode_speed, print_decode
from gateskip.loading import load_model
from gateskip.core.model import load_gates

threads, why = choose_threads()
torch.set_num_threads(threads)
print(why)
model, tok = load_model("smollm2-135m")
load_gates(model, "gates/smollm2-135m-unit")
with torch.inference_mode():
    for prompt in PROMPTS[1:3]:
        print(f"\nprompt {prompt!r}")
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        print_decode(decode_speed(model, ids, None, (0.0,), 48, rounds=5, speculative=0.1, pad=tok.eos_token_id))
