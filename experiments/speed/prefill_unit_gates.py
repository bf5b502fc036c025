"""Prefill alone of `gateskip bench` (bench.prefill_speed), shipped unit gates, 4 x 512 held-out tokens:
    OMP_NUM_THREADS=1 .venv/bin/python experiments/speed/prefill_unit_gates.py"""
import torch

from gateskip.data.samples import sample_sequences
from gateskip.inference.bench import choose_threads, prefill_speed, print_prefill
from gateskip.loading import load_model
from gateskip.core.model import load_gates

threads, why = choose_threads()
torch.set_num_threads(threads)
print(why)
model, tok = load_model("smollm2-135m")
load_gates(model, "gates/smollm2-135m-unit")
with torch.inference_mode():
    print_prefill(prefill_speed(model, sample_sequences(tok, "bundled", 4, 512)[0], (0.0, 0.1, 0.2, 0.3), rounds=3))
