"""How many skip decisions change between fp32 and bf16 (docs/scaling.md).

    python experiments/precision/bf16_skips.py [--gates gates/smollm2-135m-lowrank-qa]

On the bundled SmolLM2 and 2 x 128 tokens of the bundled text: for every module, the 25 % of
tokens with the lowest importance in one forward without skipping (gateskip.evaluation.analysis.collect),
in fp32 and in bf16; prints the share of those tokens that differ. Without --gates: fresh,
untrained low-rank gates (seed 0), whose importances are nearly tied.
"""

from __future__ import annotations

import argparse

import torch

from gateskip import GateConfig, add_gates, load_gates, load_model
from gateskip.data.samples import sample_sequences
from gateskip.evaluation.analysis import collect


def lowest(importance: torch.Tensor, share: float) -> torch.Tensor:
    """(modules, B, T) -> bool mask of each module's lowest `share` of tokens per sequence."""
    k = int(share * importance.shape[-1])
    order = importance.float().argsort(dim=-1, stable=True)[..., :k]
    return torch.zeros_like(importance, dtype=torch.bool).scatter_(-1, order, True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gates")
    args = p.parse_args()
    torch.set_num_threads(1)
    picked = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = load_model("smollm2-135m", dtype=dtype)
        if args.gates:
            load_gates(model, args.gates)
        else:
            torch.manual_seed(0)
            add_gates(model, GateConfig(kind="lowrank", rank=32))
        ids, mask = sample_sequences(tok, "bundled", sequences=2, length=128)
        picked[dtype] = lowest(collect(model, ids, mask).importance, 0.25)
    a, b = picked[torch.float32], picked[torch.bfloat16]
    print(f"gates: {args.gates or 'fresh low-rank (seed 0)'}; lowest 25 % per module: "
          f"{100 * (a & ~b).sum().item() / a.sum().item():.1f} % of the fp32 choices differ in bf16")


if __name__ == "__main__":
    main()
