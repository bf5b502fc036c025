"""Batched decoding alone of `gateskip bench` (bench.decode_speed), batch 8, fresh low-rank gates with
thresholds calibrated on the bundled text (as `gateskip bench smollm2-135m` makes them):
    OMP_NUM_THREADS=1 .venv/bin/python experiments/speed/decode_batch8.py"""
import torch

from gateskip import GateConfig, add_gates
from gateskip.inference.bench import PROMPTS, choose_threads, decode_speed, print_decode
from gateskip.inference.calibrate import calibrate, sample_tokens
from gateskip.loading import load_model

threads, why = choose_threads()
torch.set_num_threads(threads)
print(why)
model, tok = load_model("smollm2-135m")
torch.manual_seed(0)
add_gates(model, GateConfig(kind="lowrank", rank=16))
calibrate(model, sample_tokens(tok, "bundled", sequences=8, length=128), [0.5])
tok.padding_side = "left"
enc = tok(PROMPTS[:8], return_tensors="pt", padding=True)
with torch.inference_mode():
    print_decode(decode_speed(model, enc["input_ids"], enc["attention_mask"], (0.0, 0.5), 32, rounds=3,
                              pad=tok.eos_token_id))
