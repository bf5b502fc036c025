"""Physical prefill on a GPU: kept-query attention through SDPA (explicit mask) and through
FlexAttention (compiled, block mask from the kept positions), against the dense model.

    python benchmarks/bench_gpu_prefill.py            # one short call: about 2-4 minutes on an H200

Random weights in the shapes of Llama-3.2-1B and of the bundled SmolLM2-135M (nothing to
download), bf16, batch 8 x 2048 tokens, low-rank gates (rank 16, random: the budget alone
decides how much is skipped), per-sequence quantile budgets 0 / 0.25 / 0.5, LM head on the
last token. Every candidate of a shape is timed in interleaved rounds (median, CUDA
synchronised); "of ideal" is speedup / (1 / (1 - net FLOP saving)). Prints, never asserts.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gateskip import GateConfig, SkipPlan, SkipStats, add_gates
from gateskip.core.flops import ModelDims, flop_report
from gateskip.inference.timing import time_interleaved

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0),
}


def build(shape: str, device: str, dtype: torch.dtype, rank: int):
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
        add_gates(model, GateConfig(kind="lowrank", rank=rank))
        for p in model.gate_bank.parameters():  # spread-out gates, as trained ones are
            torch.nn.init.normal_(p, 0.0, 0.3)
    return model.to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--kernels", nargs="+", default=["sdpa", "flex"], choices=["sdpa", "flex"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{name}, {args.dtype}, batch {args.batch} x {args.length}, torch {torch.__version__}, "
          f"{args.rounds} interleaved rounds (median)")
    start = time.perf_counter()
    for shape in args.shapes:
        model = build(shape, args.device, dtype, args.rank)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length), device=args.device)
        dims, config = ModelDims.from_config(model.config), model.gate_bank.config
        runs, saving = {"dense": lambda: model(ids, logits_to_keep=1)}, {}
        with torch.inference_mode():
            for b in args.budgets:
                stats = SkipStats()
                model(ids, skip_plan=SkipPlan(budget=b, stats=stats), logits_to_keep=1)
                saving[b] = flop_report(stats, dims, config).net_saving
                for kernel in args.kernels:
                    plan = SkipPlan(budget=b, attention=kernel)
                    runs[(b, kernel)] = lambda plan=plan: model(ids, skip_plan=plan, logits_to_keep=1)
            times = time_interleaved(runs, rounds=args.rounds, warmup=2)  # warm-up compiles FlexAttention
        dense = times["dense"]
        print(f"\n{shape}: dense {args.batch * args.length / dense:,.0f} tokens/s ({1000 * dense:.1f} ms)")
        print(f"{'budget':>6} {'kernel':>6} {'ms':>8} {'speedup':>8} {'net saved':>10} {'ideal':>6} {'of ideal':>9}")
        for b in args.budgets:
            ideal = 1 / (1 - saving[b])
            for kernel in args.kernels:
                sec = times[(b, kernel)]
                print(f"{b:6.2f} {kernel:>6} {1000 * sec:8.1f} {dense / sec:7.2f}x {100 * saving[b]:9.1f}% "
                      f"{ideal:5.2f}x {dense / sec / ideal:9.2f}")
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
