"""Gated vLLM beside stock vLLM, HF generate and gateskip's own decoder, in one run.

    python benchmarks/bench_vllm.py [--targets 0.05,0.1,...] [--rounds 2] [--out FILE.json]

Workloads: greedy generation of --new-tokens tokens per row at batch 1, 8 and 32 (every row
generates all of them: no stop token), and prefill of 8 x 512 tokens (one new token). Every
engine is built first (eager, fp32, prefix caching off so that later rounds recompute
everything) and every candidate runs every workload once untimed; then each round times every workload on every candidate in turn, and the median
over rounds is kept. Prints tokens/s, the ratio to stock vLLM, and for gated rows the net
FLOP saving and the ratio of the speedup to the ideal 1 / (1 - net saving).

The net saving of a gated row is what gateskip's decoder measures on the same prompts under
the same thresholds: the engine makes the same decisions (tests/test_serving.py, test_serve.py).
Run it alone on the machine: every figure is wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from gateskip import load_model
from gateskip.decoding import decode
from gateskip.generation import reports
from gateskip.loading import resolve_spec
from gateskip.model import load_gates
from gateskip.serving import gated_llm

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden press adapted from those used for wine. ")


def prompts(tokenizer, batch: int, length: int) -> torch.Tensor:
    """`batch` prompts of exactly `length` tokens (no padding anywhere), each starting elsewhere in the text."""
    ids = tokenizer(TEXT * (length // 20 + batch + 2), add_special_tokens=False).input_ids
    return torch.tensor([ids[i * 7: i * 7 + length] for i in range(batch)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--gates", default="gates/smollm2-135m-unit")
    p.add_argument("--targets", default=None, help="comma-separated targets (default: every stored allocation)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prefill", default="8x512")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, tok = load_model(args.model)
    load_gates(model, args.gates)
    stored = sorted(float(t) for t in model.gate_bank.allocations)
    targets = [float(t) for t in args.targets.split(",")] if args.targets else stored
    pb, pn = (int(x) for x in args.prefill.split("x"))
    work = {f"generate b{b}": (prompts(tok, b, args.prompt_tokens), args.new_tokens) for b in map(int, args.batches.split(","))}
    work[f"prefill {pb}x{pn}"] = (prompts(tok, pb, pn), 1)

    engine = dict(dtype="float32", max_model_len=1024, enable_prefix_caching=False, seed=0, max_num_seqs=64)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engines = {}
    os.environ["VLLM_PLUGINS"] = "none"  # the stock engine's processes load no gateskip code at all
    from vllm import LLM, SamplingParams

    engines["stock vLLM"] = LLM(resolve_spec(args.model), enforce_eager=True, **engine)
    del os.environ["VLLM_PLUGINS"]
    for t in [0.0] + targets:
        engines[f"vLLM gated {t:g}"] = gated_llm(args.model, args.gates, t, **engine)

    def run_vllm(llm, ids, new):
        sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, detokenize=False)
        llm.generate([{"prompt_token_ids": r} for r in ids.tolist()], sp, use_tqdm=False)

    pad = tok.pad_token_id
    candidates = {name: (lambda ids, new, llm=llm: run_vllm(llm, ids, new)) for name, llm in engines.items()}
    candidates["HF generate"] = lambda ids, new: model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
        temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    for t in [0.0] + targets:
        candidates[f"gateskip decoder {t:g}"] = lambda ids, new, t=t: decode(model, ids, budget=t, max_new_tokens=new)

    saving = {}
    for w, (ids, new) in work.items():
        for t in targets:
            g = decode(model, ids, budget=t, max_new_tokens=new)
            r = reports(model, g.prefill, g.decode)
            saving[(w, t)] = r["generation"].net_saving  # prompt and generated tokens: the engine's work

    for name, fn in candidates.items():  # warm-up, not timed: first calls allocate and load kernels
        for ids, new in work.values():
            with torch.inference_mode():
                fn(ids, min(new, 2))
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for w, (ids, new) in work.items():
            for name, fn in candidates.items():
                start = time.perf_counter()
                with torch.inference_mode():
                    fn(ids, new)
                times.setdefault((w, name), []).append(time.perf_counter() - start)
                print(f"round {r + 1} {w:>16} {name:<22} {times[(w, name)][-1]:7.2f} s", flush=True)

    rows = []
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, median of {args.rounds} rounds")
    for w, (ids, new) in work.items():
        n_tokens = ids.numel() if new == 1 else ids.shape[0] * new
        stock = statistics.median(times[(w, "stock vLLM")])
        print(f"\n{w}: {n_tokens} tokens ({'prompt' if new == 1 else 'generated'})")
        print(f"{'candidate':<22} {'tok/s':>8} {'vs stock':>9} {'net saving':>11} {'ideal':>6} {'of ideal':>9}")
        for name in candidates:
            sec = statistics.median(times[(w, name)])
            t = float(name.rsplit(" ", 1)[1]) if "gated" in name or "decoder" in name else None
            s = saving.get((w, t)) if t else (0.0 if t == 0.0 else None)
            row = {"workload": w, "candidate": name, "seconds": sec, "tokens_per_s": n_tokens / sec,
                   "vs_stock": stock / sec, "net_saving": s}
            line = f"{name:<22} {n_tokens / sec:8.1f} {stock / sec:8.2f}x"
            if s is not None and t and "vLLM" in name:  # the engine's speedup over stock vLLM against its ideal
                ideal = 1 / (1 - s)
                row |= {"ideal": ideal, "of_ideal": stock / sec / ideal}
                line += f" {100 * s:10.1f}% {ideal:6.2f} {stock / sec / ideal:9.2f}"
            elif s:
                line += f" {100 * s:10.1f}%"
            rows.append(row)
            print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
