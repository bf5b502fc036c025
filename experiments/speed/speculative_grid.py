"""Does any draft pay? Self-speculative decoding with a fixed draft length k at each draft target,
against our decoder at budget 0, timed in interleaved rounds (gateskip.inference.timing), on two prompts.
For each (target, k): tokens/s relative to budget 0, acceptance, tokens per verify pass; and the
draft step's cost relative to a full step (decoding at the target alone).
    OMP_NUM_THREADS=1 .venv/bin/python experiments/speed/speculative_grid.py runs/r9/speed/gateskip.safetensors
An instruct model's prompts go through its chat template with --chat (the first two of bench's
prompts, or --prompts 1 2 to pick others: 2 is a code stub):
    OMP_NUM_THREADS=1 .venv/bin/python experiments/speed/speculative_grid.py GATES --model qwen2.5-coder-0.5b --chat --prompts 2 1"""
import argparse

import torch

from gateskip.inference.bench import PROMPTS
from gateskip.inference.decoding import decode
from gateskip.inference.generation import encode_prompt
from gateskip.inference.contract import decode_budget
from gateskip.loading import load_model
from gateskip.core.model import load_gates
from gateskip.inference.speculative import speculative_generate
from gateskip.inference.timing import time_interleaved

torch.set_num_threads(1)
TARGETS, KS, NEW = (0.05, 0.1, 0.2, 0.3, 0.5), (1, 2, 4), 48
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("gates", nargs="?", default="gates/smollm2-135m-unit")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--chat", action="store_true", help="frame each prompt as a user turn of the chat template")
p.add_argument("--prompts", type=int, nargs="+", default=[0, 1], help="indices into bench's PROMPTS")
args = p.parse_args()
model, tok = load_model(args.model)
load_gates(model, args.gates)
have = {float(t) for t in model.gate_bank.allocations}
targets = [t for t in TARGETS if t in have]
with torch.inference_mode():
    for prompt in (PROMPTS[i] for i in args.prompts):
        ids = encode_prompt(tok, prompt, args.chat)
        budgets = {t: decode_budget(model, t) for t in (0.0, *targets)}
        runs = {f"decode {t:g}": (lambda b=b: decode(model, ids, budget=b, max_new_tokens=NEW)) for t, b in budgets.items()}
        for t in targets:
            for k in KS:
                runs[f"spec {t:g} k={k}"] = lambda b=budgets[t], k=k: speculative_generate(model, ids, budget=b, k=k,
                                                                                         max_new_tokens=NEW)
        times = time_interleaved(runs, rounds=3)
        full = times["decode 0"]
        print(f"\nprompt {prompt!r}, {NEW} greedy tokens, 1 thread, 3 interleaved rounds; budget 0: {NEW / full:.2f} tok/s")
        print(f"{'draft target':>12} {'draft step / full step':>23} {'k':>2} {'vs budget 0':>12} {'accepted':>9} {'tokens/pass':>12}")
        for t in targets:
            cost = times[f"decode {t:g}"] / full
            for k in KS:
                r = speculative_generate(model, ids, budget=budgets[t], k=k, max_new_tokens=NEW)
                print(f"{t:>12g} {cost:>23.2f} {k:>2} {full / times[f'spec {t:g} k={k}']:>11.2f}x "
                      f"{100 * r.acceptance_rate:>8.0f}% {r.tokens_per_pass:>12.2f}")
