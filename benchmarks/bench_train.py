"""Training throughput and peak memory: gated fine-tuning vs plain HF fine-tuning of the same model.

    python benchmarks/bench_train.py [--model smollm2-135m] [--batch-size 2] [--seq-len 128] [--steps 4]

Both variants do full fine-tuning with AdamW on the same batches of the bundled text. "gated"
adds gates and trains through gateskip's own training step (masked skipping at --skip,
LM + L2 sparsity loss); "plain" is `model(ids, labels=ids).loss.backward()`. Each variant
runs in its own fresh process, so peak memory (CUDA: max allocated; CPU: peak RSS) is its
own; variants alternate for --rounds rounds; the best round of each and the median of the
per-round ratios are reported, which damps noise from other work on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def run_variant(args: argparse.Namespace) -> dict:
    """Time `args.steps` optimizer steps (after one warm-up step) of one variant in this process."""
    from gateskip import GateConfig, add_gates
    from gateskip.loading import load_model
    from gateskip.data.textdata import BUNDLED, Blocks, build_blocks
    from gateskip.training import TrainConfig
    from gateskip.training.loop import loss_terms, param_groups

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device=device)
    blocks, _ = build_blocks([BUNDLED], tokenizer, args.seq_len, val_fraction=0.0,
                             max_tokens=args.seq_len * args.batch_size * (args.steps + 1) + 1)
    cfg = TrainConfig(model=args.model, mode="full", gate_kind=args.gate_kind, rank=args.rank, target_skip=args.skip,
                      ramp_steps=0, sparsity_weight=0.1, lr=1e-5, gate_lr=1e-3)
    if args.variant == "gated":
        add_gates(model, GateConfig(kind=args.gate_kind, rank=args.rank))
        optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.95), weight_decay=1e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-3)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> None:
        batch = blocks.select(torch.arange(i * args.batch_size, (i + 1) * args.batch_size))
        ids, mask, labels = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.labels))
        if args.variant == "gated":
            loss = loss_terms(model, Blocks(ids, mask, labels), cfg, cfg.target_skip, None).total
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(0)  # warm-up: allocator, optimizer state, kernels
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        step(i)
    seconds = time.perf_counter() - start
    tokens = args.steps * args.batch_size * args.seq_len
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": args.variant, "tokens_per_s": tokens / seconds, "peak_gib": peak / 2**30,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{args.threads} threads"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gate-kind", default="lowrank")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--skip", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variant", choices=("plain", "gated"), help=argparse.SUPPRESS)  # set in the worker process
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    best: dict[str, dict] = {}
    ratios = []
    for r in range(args.rounds):
        pair = {}
        for variant in ("plain", "gated"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"round {r + 1} {variant:5s}: {result['tokens_per_s']:8.1f} tokens/s, peak {result['peak_gib']:.2f} GiB")
            pair[variant] = result["tokens_per_s"]
            if variant not in best or result["tokens_per_s"] > best[variant]["tokens_per_s"]:
                best[variant] = result
        ratios.append(pair["gated"] / pair["plain"])
    plain, gated = best["plain"], best["gated"]
    print(f"\n{args.model}, batch {args.batch_size} x {args.seq_len} tokens, {plain['device']}, "
          f"full fine-tune, AdamW; gated = {args.gate_kind} gates"
          + (f" rank {args.rank}" if args.gate_kind == "lowrank" else "") + f", masked skip {args.skip}")
    print(f"{'':6s} {'tokens/s':>10s} {'peak GiB':>9s}")
    for name, r in (("plain", plain), ("gated", gated)):
        print(f"{name:6s} {r['tokens_per_s']:10.1f} {r['peak_gib']:9.2f}")
    print(f"gated / plain throughput: {gated['tokens_per_s'] / plain['tokens_per_s']:.3f}x best vs best, "
          f"{statistics.median(ratios):.3f}x median of rounds (target >= 0.85x); "
          f"peak memory: {gated['peak_gib'] / plain['peak_gib']:.3f}x")


if __name__ == "__main__":
    main()
