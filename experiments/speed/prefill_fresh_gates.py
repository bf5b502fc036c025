"""Prefill alone of `gateskip bench` (bench.prefill_speed), fresh low-rank gates (rank 16, seed 0, as
`gateskip bench smollm2-135m` makes them), per-sequence quantiles 0 / 0.25 / 0.5, 4 x 512 held-out tokens:
    OMP_NUM_THREADS=1 .venv/bin/python experiments/speed/prefill_fresh_gates.py"""
import torch

from gateskip import GateConfig, add_gates
from gateskip.data.samples import sample_sequences
from gateskip.inference.bench import choose_threads, prefill_speed, print_prefill
from gateskip.loading import load_model

threads, why = choose_threads()
torch.set_num_threads(threads)
print(why)
model, tok = load_model("smollm2-135m")
torch.manual_seed(0)
add_gates(model, GateConfig(kind="lowrank", rank=16))
with torch.inference_mode():
    print_prefill(prefill_speed(model, sample_sequences(tok, "bundled", 4, 512)[0], (0.0, 0.25, 0.5), rounds=3))
