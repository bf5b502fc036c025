"""`gateskip train` and `accelerate launch -m gateskip.training ...`: the command line of a
training run, turned into a TrainConfig and handed to train()."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from accelerate import PartialState

from . import loop
from ..core.config import APPLICATIONS, GATE_KINDS
from ..data.textdata import BUNDLED
from ..errors import GateSkipError
from ..validate import Parser, output_name, text_source
from ..validate import seed as seed_type
from .config import MODES, OBJECTIVES, PRECISIONS, TrainConfig


def register(subparsers) -> None:
    """Add `gateskip train`."""
    d = TrainConfig()
    p = subparsers.add_parser("train", help="fine-tune a gated model (accelerate; resumable)",
                              description=loop.__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=d.model, help=f"bundled name, HF folder or hub id (default {d.model})")
    p.add_argument("--data", action="append", type=text_source, help="text file/folder, .jsonl, datasets folder, hf:NAME[:SPLIT], "
                   "or 'bundled' (Shakespeare; default); repeatable")
    p.add_argument("--out", default=d.out, type=output_name, help="run folder (checkpoints, metrics.jsonl, final/)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--mode", choices=MODES, default=d.mode, help="train backbone+gates, gates only, or LoRA+gates")
    p.add_argument("--gate-kind", choices=GATE_KINDS, default=d.gate_kind)
    p.add_argument("--rank", type=int, default=d.rank, help="rank of low-rank gates")
    p.add_argument("--gate-application", choices=APPLICATIONS, default=d.gate_application,
                   help="unit: kept outputs enter unscaled, budget 0 is the base (default); soft: scaled by the gates (the paper)")
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="lm: LM loss + sparsity (+ distillation) end to end; influence: gates regress each branch's "
                        "measured influence ||o||/||h||, one forward per step; attribution: gates regress the first-order "
                        "LM-loss change of removing each branch output, -<dL/dh, o>, one forward and backward "
                        "(both need --mode frozen)")
    p.add_argument("--protect-first-token", action="store_true",
                   help="never skip the first token of a sequence (the attention sink); saved with the gates")
    p.add_argument("--init-gates", help="start from this gate file or folder: its gate options, thresholds and "
                   "allocations replace --gate-kind/--rank/--gate-application/--protect-first-token (recalibrated at the end)")
    p.add_argument("--allocation", type=float, nargs="+", default=[], metavar="TARGET",
                   help="train under the allocations --init-gates stores for these net savings, one per step in turn")
    p.add_argument("--sparsity-weight", type=float, default=d.sparsity_weight, help="lambda of the gate penalty")
    p.add_argument("--sparsity-loss", default=d.sparsity_loss, help="l2 | l1 | kl")
    p.add_argument("--sparsity-target", type=float, default=d.sparsity_target, help="gate value the kl loss pulls to")
    p.add_argument("--target-skip", type=float, default=d.target_skip, help="per-module skip ratio after the ramp")
    p.add_argument("--ramp-steps", type=int, default=None, help="steps to ramp the skip ratio from 0 (default steps/2)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=None, help="backbone / LoRA learning rate (default 1e-5 / 1e-4)")
    p.add_argument("--gate-lr", type=float, default=d.gate_lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--distill-weight", type=float, default=d.distill_weight, help="weight of KL to the ungated base")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--no-pack", dest="pack", action="store_false", help="one padded sequence per document")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the data")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N steps (0: at the end)")
    p.add_argument("--eval-blocks", type=int, default=d.eval_blocks, help="validation sequences per evaluation")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: only on Ctrl-C)")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="wall-clock limit: stop, validate, checkpoint and export when reached (resume continues)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run, a model or gates (its checkpoints and final/ are removed)")
    p.add_argument("--seed", type=seed_type, default=d.seed)
    p.add_argument("--mixed-precision", choices=PRECISIONS, default=d.mixed_precision)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["data"] = values["data"] or [BUNDLED]
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    final = loop.train(config_from_args(args))
    PartialState().print(f"saved {final}")  # every process returns the path; only the main one wrote it
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m gateskip.training ...`: `gateskip train` on its own, as `accelerate launch -m` runs it."""
    parser = Parser(prog="gateskip")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except GateSkipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
