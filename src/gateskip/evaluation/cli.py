"""`gateskip eval`: load a model once, attach gates, run a compute-accuracy sweep."""

from __future__ import annotations

import argparse
import os

import torch

from ..core.config import GATE_KINDS, GateConfig
from ..core.model import add_gates, load_gates, remove_gates
from ..core.stats import SkipStats
from ..data.samples import sample_batch
from ..errors import GateSkipError
from ..inference.calibrate import calibrate
from ..inference.generation import has_chat_template
from ..search.baselines import IDENTITY_GATES, METHODS, make_method
from ..validate import (check_dtype, check_output_folder, device, existing_file, existing_folder, existing_path, integer,
                         output_path)
from ..validate import parse_list
from ..validate import seed as seed_type
from .batch import DEFAULT_BATCH_SIZE
from .sweep import FIGURE, RESULTS, TABLE, Sweep, SweepSettings, parse_budgets, run_sweep
from .tasks import check_task_folder

DEFAULT_BUDGETS = "0,0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5"


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy vs compute sweep through lm-evaluation-harness")
    p.add_argument("model", help="bundled model name (smollm2-135m), local folder or hub id")
    gates = p.add_mutually_exclusive_group()
    gates.add_argument("--gates", type=existing_path, help="gate file or folder saved by gateskip (method gateskip)")
    gates.add_argument("--fresh-gates", choices=GATE_KINDS, help="untrained gates of this kind (a control)")
    p.add_argument("--router", type=existing_path, help="gate file of a MoD-style router (method mod), on the same backbone")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. arc_easy,piqa")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"comma-separated skip ratios (default {DEFAULT_BUDGETS})")
    p.add_argument("--method", default="gateskip", help=f"comma-separated methods from {', '.join(METHODS)}")
    p.add_argument("--limit", type=integer(1), help="evaluate only the first N documents of each task")
    p.add_argument("--out", type=output_path, required=True, help="output folder (rerun with the same folder to resume)")
    p.add_argument("--data", choices=("bundled", "hub"), default="bundled",
                   help="bundled: offline copies of the standard tasks; hub: lm-eval's own definitions")
    p.add_argument("--include-path", type=existing_folder, help="folder of your own lm-eval task YAMLs")
    p.add_argument("--batch-size", type=integer(1), default=DEFAULT_BATCH_SIZE,
                   help=f"lm-eval batch size (default {DEFAULT_BATCH_SIZE}); padding is masked, so scores and "
                        f"skip counts equal batch size 1's")
    p.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantisation of the backbone (torchao)")
    p.add_argument("--num-fewshot", type=integer(0), help="override the tasks' number of few-shot examples")
    p.add_argument("--sample-text", type=existing_file,
                   help="paragraphs (blank-line separated) for ShortGPT's layer ranking and --calibrate "
                        "(default: bundled SQuAD passages)")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate importance thresholds at the swept budgets on the sample text first, so that "
                        "generative tasks skip in decode steps too (kept in memory, not written to the gate file)")
    p.add_argument("--chat-template", action="store_true",
                   help="frame each prompt with the model's chat template (instruct models; lm-eval's "
                        "--apply_chat_template)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or mps (checked to exist here)")
    p.add_argument("--seed", type=seed_type, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.data == "bundled":  # the bundled tasks read local files; never wait on the hub for them
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from ..loading import load_model

    methods = parse_list(args.method, "method", METHODS)
    tasks = parse_list(args.tasks, "task")
    budgets = parse_budgets(args.budgets)
    if "gateskip" in methods and not (args.gates or args.fresh_gates):
        raise GateSkipError("method gateskip needs gates: pass --gates PATH or --fresh-gates KIND")
    if ("mod" in methods) != bool(args.router):
        raise GateSkipError("method mod and --router go together")
    if args.calibrate and "gateskip" not in methods:
        raise GateSkipError("--calibrate sets thresholds for the gateskip method; add it to --method")
    gates = args.gates or (f"fresh:{args.fresh_gates}:seed{args.seed}" if args.fresh_gates else None)
    settings = SweepSettings(model=args.model, gates=gates, router=args.router, limit=args.limit, data=args.data,
                             quantize=args.quantize, num_fewshot=args.num_fewshot, seed=args.seed, calibrated=args.calibrate, dtype=args.dtype,
                             batch_size=args.batch_size, sample_text=str(args.sample_text) if args.sample_text else None,
                             chat_template=args.chat_template)

    check_dtype(getattr(torch, args.dtype), args.device)
    check_output_folder(args.out, writes=(RESULTS, TABLE, FIGURE), resumes=RESULTS)
    if args.include_path:
        check_task_folder(args.include_path)
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if args.chat_template and not has_chat_template(tokenizer):
        raise GateSkipError(f"--chat-template: {args.model}'s tokenizer has no chat template (a base model: drop the flag)")
    router = None
    if args.router:  # loaded first, then set aside: the model carries the gateskip gates
        router = load_gates(model, args.router).gate_bank
        remove_gates(model)
    if args.gates:
        load_gates(model, args.gates)
    else:
        remove_gates(model)  # a gated model folder's own gates give way to fresh or identity ones
        torch.manual_seed(args.seed)
        add_gates(model, GateConfig(kind=args.fresh_gates) if args.fresh_gates else IDENTITY_GATES)
    if args.quantize:
        from .quantize import quantize_weights

        quantize_weights(model, args.quantize)
    device = next(model.parameters()).device
    needs_sample = args.calibrate or any(m in methods for m in ("shortgpt", "calm"))
    sample = sample_batch(tokenizer, args.sample_text, device) if needs_sample else None
    if args.calibrate:
        calibrate(model, sample, [b for b in budgets if b > 0])
    built = {name: make_method(name, model, sample, seed=args.seed, router=router)
             for name in dict.fromkeys(["base", *methods])}
    if "gateskip" in built:  # a target with no stored allocation fails now, not after the points before it
        for b in budgets:
            built["gateskip"].plans(b, SkipStats())

    sweep = Sweep(settings, tasks, budgets, methods, args.out, include=args.include_path)
    run_sweep(sweep, model, tokenizer, built)
    print((args.out / TABLE).read_text())
    print(f"wrote {args.out / RESULTS}, {args.out / TABLE}, {args.out / FIGURE}")
    return 0
