"""Decoding speed with physical skipping and lossless self-speculative decoding, side by side.

    python benchmarks/bench_generate.py [--model smollm2-135m] [--new-tokens 128]

Batch 1, greedy, every candidate on the same prompts in turn (so load from elsewhere
hits them alike): HF generate on the ungated model, our decoding at budget 0, at the
skip budgets (thresholds calibrated on sample text), and self-speculative decoding
at the best (budget, draft length) of a short search. Then batched throughput at
batch 8. By default the gates are fresh (untrained low-rank): skipped text is then
meaningless, so this measures speed and losslessness, not quality; `--gates PATH`
measures trained gates (self-speculative drafts then agree more often). No assertions:
it prints.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from gateskip import GateConfig, add_gates, load_gates
from gateskip.inference.calibrate import calibrate, sample_tokens
from gateskip.inference.contract import reports
from gateskip.inference.generation import generate
from gateskip.loading import load_model
from gateskip.inference.speculative import speculative_generate

PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
    "Three tips for staying healthy are",
    "Once upon a time, in a small village by the sea,",
]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--draft-budgets", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--draft-lengths", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3, help=f"how many of the {len(PROMPTS)} prompts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--gates", help="trained gates (file or folder); default: fresh low-rank gates")
    parser.add_argument("--text", default="bundled", help="calibration text (see gateskip calibrate --text)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    plain, _ = load_model(args.model)  # a second copy stays ungated: the HF reference
    gen_kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.eos_token_id,
                  eos_token_id=None, max_new_tokens=args.new_tokens)
    print(f"model {args.model}, fp32, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    prompts = [tok(p, return_tensors="pt")["input_ids"] for p in PROMPTS[: args.prompts]]
    n_new = args.new_tokens * len(prompts)

    if args.gates:
        load_gates(model, args.gates)
        what = f"trained gates {args.gates}"
    else:
        torch.manual_seed(0)  # the same fresh gates every run
        add_gates(model, GateConfig(kind="lowrank", rank=32))
        what = "fresh untrained low-rank gates (rank 32)"
    ratios = sorted(set(args.budgets) | set(args.draft_budgets))
    start = time.perf_counter()
    calibrate(model, sample_tokens(tok, args.text, sequences=8, length=128), ratios)
    print(f"{what}; thresholds for {ratios} calibrated on 1024 tokens of {args.text} "
          f"in {time.perf_counter() - start:.0f} s")

    with torch.inference_mode():
        # Short search for the best self-speculative setting (first prompt, 32 tokens).
        full_short = generate(model, prompts[0], budget=0.0, **{**gen_kw, "max_new_tokens": 32}).sequences
        best = None
        for b in args.draft_budgets:
            for k in args.draft_lengths:
                res, sec = timed(lambda: speculative_generate(model, prompts[0], budget=b, k=k, max_new_tokens=32))
                same = torch.equal(res.sequences, full_short)
                print(f"  search b={b:<5} k={k}: {32 / sec:5.1f} tok/s, {res.summary()}, identical: {same}")
                if best is None or sec < best[0]:
                    best = (sec, b, k)
        _, b_spec, k_spec = best

        candidates = {
            "HF generate, ungated model": None,
            "ours, budget 0 (gates applied)": 0.0,
            **{f"ours, budget {b}": b for b in args.budgets},
            f"self-speculative b={b_spec} k={k_spec}": "spec",
        }
        seconds = dict.fromkeys(candidates, 0.0)
        outputs = {name: [] for name in candidates}
        details = {name: [] for name in candidates}
        for ids in prompts:
            for name, what in candidates.items():
                if what is None:
                    out, sec = timed(lambda: plain.generate(ids, **gen_kw))
                    outputs[name].append(out)
                elif what == "spec":
                    res, sec = timed(lambda: speculative_generate(model, ids, budget=b_spec, k=k_spec,
                                                                  max_new_tokens=args.new_tokens))
                    outputs[name].append(res.sequences)
                    details[name].append(res)
                else:
                    g, sec = timed(lambda: generate(model, ids, budget=what, **gen_kw))
                    outputs[name].append(g.sequences)
                    details[name].append(g)
                seconds[name] += sec

    base = n_new / seconds["ours, budget 0 (gates applied)"]
    hf = n_new / seconds["HF generate, ungated model"]
    print(f"\nbatch 1, greedy, {len(prompts)} prompts x {args.new_tokens} new tokens")
    print(f"{'decoder':40s} {'tok/s':>7s} {'vs HF':>6s} {'vs b=0':>7s}  skipped (decode) / net FLOP saving")
    for name in candidates:
        rate = n_new / seconds[name]
        extra = ""
        if details[name] and hasattr(details[name][0], "decode"):
            parts = [reports(model, g.prefill, g.decode)["decoding"] for g in details[name]]
            extra = f"  {100 * mean(p.paper_fraction for p in parts):.1f}% / {100 * mean(p.net_saving for p in parts):.1f}%"
        elif details[name]:
            res = details[name]
            acc = sum(r.accepted for r in res) / max(1, sum(r.drafted for r in res))
            tpp = sum(r.new_tokens for r in res) / sum(r.passes for r in res)
            extra = f"  acceptance {100 * acc:.0f}%, {tpp:.2f} tokens/verify pass"
        print(f"{name:40s} {rate:7.2f} {rate / hf:6.2f} {rate / base:7.2f}{extra}")
    spec_name = f"self-speculative b={b_spec} k={k_spec}"
    same = all(torch.equal(a, b) for a, b in zip(outputs[spec_name], outputs["ours, budget 0 (gates applied)"]))
    print(f"self-speculative output identical to full-compute greedy (gated model, budget 0): {same}")
    same_hf = sum(torch.equal(a, b) for a, b in zip(outputs["ours, budget 0 (gates applied)"], outputs["HF generate, ungated model"]))
    print(f"gated budget-0 output identical to the ungated model on {same_hf}/{len(prompts)} prompts "
          f"(the gates scale every branch, so the gated model is not the ungated one)")

    # Batched throughput: the same prompts repeated to batch 8, left-padded.
    tok.padding_side = "left"
    texts = (PROMPTS * args.batch)[: args.batch]
    enc = tok(texts, return_tensors="pt", padding=True)
    bkw = {**gen_kw, "max_new_tokens": args.batch_new_tokens}
    batch_new = args.batch * args.batch_new_tokens
    rows = {}
    with torch.inference_mode():
        for name, what in [("HF generate, ungated model", None), ("ours, budget 0", 0.0)] + [
            (f"ours, budget {b}", b) for b in args.budgets
        ]:
            if what is None:
                _, sec = timed(lambda: plain.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **bkw))
            else:
                _, sec = timed(lambda: generate(model, enc["input_ids"], enc["attention_mask"], budget=what, **bkw))
            rows[name] = batch_new / sec
    print(f"\nbatch {args.batch} (left-padded), greedy, {args.batch_new_tokens} new tokens each")
    for name, rate in rows.items():
        print(f"{name:40s} {rate:7.2f} tok/s  {rate / rows['HF generate, ungated model']:5.2f}x HF  "
              f"{rate / rows['ours, budget 0']:5.2f}x b=0")


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


if __name__ == "__main__":
    main()
