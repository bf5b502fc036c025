"""Gated vLLM beside stock vLLM, HF generate and gateskip's own decoder, in one run.

    python benchmarks/bench_vllm.py [--targets 0.05,0.1,...] [--rounds 2] [--out FILE.json]

Workloads: greedy generation of --new-tokens tokens per row at batch 1, 8 and 32 (every row
generates all of them: no stop token), and prefill of 8 x 512 tokens (one new token). Each
candidate runs in turn: its engine is built (eager, fp32, prefix caching off so that later
rounds recompute everything; one engine in memory at a time), it runs every workload once
untimed, then --rounds timed rounds, and the median is kept. Stock vLLM runs first and again
last: the gap between the two is the drift of the machine over the run. Prints tokens/s, the ratio to stock vLLM, and for gated rows the net
FLOP saving (of the decoder layers, and with the LM head of the tokens whose logits are computed)
and the ratio of the speedup to the ideal 1 / (1 - net saving) for each.

The net saving of a gated vLLM row is what the engine computes (serving.engine_skip.engine_flops:
partly skipped attention saves only o_proj there), from gateskip's decoder's counts on the same
prompts under the same thresholds: the engine makes the same decisions (tests/test_serving.py,
test_serve.py). A decoder row's is the decoder's own (q, o and scores saved).
Run it alone on the machine: every figure is wall clock.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

import torch

from gateskip import load_model
from gateskip.inference.decoding import decode
from gateskip.core.flops import ModelDims
from gateskip.inference.contract import combine, reports
from gateskip.loading import resolve_spec
from gateskip.core.model import load_gates
from gateskip.serving import gated_llm
from gateskip.serving.engine_skip import engine_flops, kv_less
from gateskip.serving.spec import engine_budget

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
    from vllm import LLM, SamplingParams

    def stock_engine():
        os.environ["VLLM_PLUGINS"] = "none"  # the stock engine's processes load no gateskip code at all
        try:
            return LLM(resolve_spec(args.model), enforce_eager=True, **engine)
        finally:
            del os.environ["VLLM_PLUGINS"]

    def on_engine(make):
        """A candidate that builds its engine when its turn comes (one engine in memory at a time)."""
        def run(llm, ids, new):
            sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, detokenize=False)
            return llm.generate([{"prompt_token_ids": r} for r in ids.tolist()], sp, use_tqdm=False)
        return make, run

    candidates = {"stock vLLM": on_engine(stock_engine)}
    for t in [0.0] + targets:
        candidates[f"vLLM gated {t:g}"] = on_engine(lambda t=t: gated_llm(args.model, args.gates, t, **engine))
    pad = tok.pad_token_id
    candidates["HF generate"] = (lambda: model, lambda m, ids, new: m.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
        temperature=None, top_p=None, top_k=None, pad_token_id=pad))
    for t in [0.0] + targets:
        candidates[f"gateskip decoder {t:g}"] = (lambda: model, lambda m, ids, new, t=t: decode(m, ids, budget=t,
                                                                                              max_new_tokens=new))
    candidates["stock vLLM (again)"] = on_engine(stock_engine)  # drift over the run shows as its gap to the first

    # The engine's net saving (what it computes: serving.engine_skip.engine_flops) from gateskip's decoder's
    # counts on the same prompts (its timed runs), which equal the engine's (tests/test_serving.py, test_serve.py).
    dims, saving = ModelDims.from_config(model.config), {}

    def record_saving(w: str, t: float, g) -> None:
        removed = kv_less(model.gate_bank, engine_budget(model.gate_bank, t))
        engine_parts = [engine_flops(s, dims, model.gate_bank.config, removed) for s in (g.prefill, g.decode)]
        saving[(w, t)] = (combine(*engine_parts), reports(model, g.prefill, g.decode)["generation"])

    times: dict[tuple[str, str], list[float]] = {}
    for name, (make, fn) in candidates.items():
        target = make()
        for ids, new in work.values():  # warm-up, not timed: first calls allocate and load kernels
            with torch.inference_mode():
                fn(target, ids, min(new, 2))
        for r in range(args.rounds):
            for w, (ids, new) in work.items():
                start = time.perf_counter()
                with torch.inference_mode():
                    out = fn(target, ids, new)
                times.setdefault((w, name), []).append(time.perf_counter() - start)
                if name.startswith("gateskip decoder") and (w, float(name.rsplit(" ", 1)[1])) not in saving:
                    t = float(name.rsplit(" ", 1)[1])
                    if t:
                        record_saving(w, t, out)
                print(f"{name:<22} {w:>16} round {r + 1}: {times[(w, name)][-1]:7.2f} s", flush=True)
        if target is not model:
            del target
            gc.collect()

    rows = []
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}, "
          f"median of {args.rounds} rounds")
    print("net saving: of the decoder layers (gate cost included); +head: with the LM head of the tokens whose logits "
          "are computed; ideal = 1 / (1 - saving); of ideal = (speedup over stock vLLM) / ideal")
    for w, (ids, new) in work.items():
        n_tokens = ids.numel() if new == 1 else ids.shape[0] * new
        head = ids.shape[0] * new * dims.head_per_token  # logits: one per prompt in prefill, then one per step
        stock = statistics.median(times[(w, "stock vLLM")] + times[(w, "stock vLLM (again)")])
        print(f"\n{w}: {n_tokens} tokens ({'prompt' if new == 1 else 'generated'})")
        print(f"{'candidate':<22} {'tok/s':>8} {'vs stock':>9} {'saving':>7} {'of ideal':>9} {'+head':>6} {'of ideal':>9}")
        for name in candidates:
            sec = statistics.median(times[(w, name)])
            t = float(name.rsplit(" ", 1)[1]) if "gated" in name or "decoder" in name else None
            flops = saving.get((w, t), (None, None))[0 if "vLLM" in name else 1]
            row = {"workload": w, "candidate": name, "seconds": sec, "tokens_per_s": n_tokens / sec,
                   "vs_stock": stock / sec}
            line = f"{name:<22} {n_tokens / sec:8.1f} {stock / sec:8.2f}x"
            if flops is not None:
                layers = flops.net_saving
                with_head = (flops.skipped_flops - flops.gate_flops) / (flops.dense_flops + head)
                row |= {"net_saving": layers, "net_saving_with_head": with_head}
                line += f" {100 * layers:6.1f}%"
                if "vLLM" in name:  # the engine's speedup over stock vLLM against its ideals
                    row |= {"of_ideal": stock / sec * (1 - layers), "of_ideal_with_head": stock / sec * (1 - with_head)}
                    line += f" {stock / sec * (1 - layers):9.2f} {100 * with_head:5.1f}% {stock / sec * (1 - with_head):9.2f}"
                else:
                    line += f" {'':9} {100 * with_head:5.1f}%"
            rows.append(row)
            print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
