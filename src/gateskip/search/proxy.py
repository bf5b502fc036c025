"""The fast proxy: LM loss and KL to the base on held-out text against net FLOPs saved.

    gateskip proxy MODEL --gates A --gates B --text HELDOUT --out DIR

Every way of skipping runs on the same held-out blocks with physical execution and the
same accounting; each gives a curve of (net saving, loss, KL), and the table compares them
at the same net savings (linear interpolation between measured points), so gate variants
and baselines are ranked in minutes before any task is scored:

- gateskip: the gates under their stored allocations (the gate file's targets);
- equal: the same gates with the paper's equal share per module (per-sequence quantile);
- shortgpt: 1, 2, ... whole layers removed by Block Influence (on the search text);
- random: equal share per module, tokens chosen at random.

With `--agreement N` it also measures decoding quality: the base greedily continues N
held-out prompts, and each method reads prompt + continuation teacher-forced (gates under
their calibrated decoding thresholds, causal token by token as in cached decoding); the
figure is the share of continuation positions whose argmax is the base's (read the same
way, so the base scores exactly 1).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.flops import ModelDims, flop_report
from ..core.plan import SkipPlan
from ..core.stats import SkipStats
from ..errors import GateSkipError
from ..files import atomic_folder, save_figure, write_json, write_text
from ..inference.calibrate import allocation_budget
from ..inference.calibrate import sample_tokens
from ..validate import check_output_folder, existing_path, fits_context, integer, output_path, ratio, text_source
from .allocation import mean_kl
from .baselines import make_method

EQUAL_RATIOS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
TARGETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
PROMPT_TOKENS, CONTINUATION_TOKENS = 32, 32


class Scorer:
    """Loss and KL to the base of one set of held-out blocks under any skip plan."""

    def __init__(self, model, ids: torch.Tensor, mask: torch.Tensor, continuations: list[torch.Tensor] | None = None,
                 prompt_length: int = 0):
        self.model, self.ids, self.mask = model, ids, mask
        self.continuations, self.prompt_length = continuations, prompt_length
        # The base read teacher-forced, as every method is: numerics of cached generation aside,
        # these are its greedy tokens, and the base agrees with itself exactly.
        self.reference = next_tokens(model, continuations, prompt_length, SkipPlan(apply_gates=False)) if continuations else None
        self.valid = mask.bool()
        self.dims = ModelDims.from_config(model.config)
        self.base_logp = self._logp(SkipPlan(apply_gates=False))

    def _logp(self, plan: SkipPlan) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(self.ids, attention_mask=self.mask, skip_plan=plan).logits.float()
        return F.log_softmax(logits, dim=-1)

    def point(self, budget, skip_bos: bool | None = None, charge_gates: bool = True, decode=None) -> dict[str, float]:
        """Loss, KL and savings under `budget`; with continuations, also the agreement under
        `decode` (the method's decoding budget; `budget` itself when it has none)."""
        stats = SkipStats()
        logp = self._logp(SkipPlan(budget=budget, skip_bos=skip_bos, stats=stats))
        kl = mean_kl(self.base_logp, logp, self.valid)
        target = self.ids[:, 1:]
        nll = -logp[:, :-1].gather(-1, target[..., None])[..., 0][self.valid[:, 1:]].mean()
        report = flop_report(stats, self.dims, self.model.gate_bank.config if charge_gates else None)
        found = {"net_saving": report.net_saving, "skip_fraction": report.paper_fraction,
                 "loss": float(nll), "kl": float(kl)}
        if self.continuations:
            plan = SkipPlan(budget=budget if decode is None else decode, skip_bos=skip_bos)
            found["agreement"] = agreement(next_tokens(self.model, self.continuations, self.prompt_length, plan),
                                           self.reference)
        return found


@torch.no_grad()
def greedy_continuations(model, prompts: list[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
    """The base model's greedy continuation of each prompt (ids (T,)), prompt included."""
    out = []
    for ids in prompts:
        seq = model.generate(ids[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=0)
        out.append(seq[0])
    return out


@torch.no_grad()
def next_tokens(model, sequences: list[torch.Tensor], prompt_length: int, plan: SkipPlan) -> list[torch.Tensor]:
    """Teacher-forced argmax at every continuation position of each sequence, under a plan."""
    return [model(seq[None], skip_plan=plan).logits[0, prompt_length - 1:-1].argmax(-1) for seq in sequences]


def agreement(predicted: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Share of continuation positions where the skipping model's argmax is the base's."""
    hits = sum(int((p == r).sum()) for p, r in zip(predicted, reference))
    return hits / sum(len(r) for r in reference)


def interpolate(points: list[dict], saving: float, field: str) -> float | None:
    """A curve's value at a net saving, linear between the measured points around it (None outside them)."""
    pts = sorted(points, key=lambda p: p["net_saving"])
    for a, b in zip(pts, pts[1:]):
        if a["net_saving"] - 1e-3 <= saving <= b["net_saving"] + 1e-3:  # measured savings land within round-off of a target
            span = b["net_saving"] - a["net_saving"]
            w = 0.0 if span <= 0 else min(max((saving - a["net_saving"]) / span, 0.0), 1.0)
            return a[field] + w * (b[field] - a[field])
    return None


def run_proxy(model, gate_files: Sequence[Path], blocks: tuple[torch.Tensor, torch.Tensor],
              search: tuple[torch.Tensor, torch.Tensor], methods: Sequence[str], load: Callable,
              continuations: list[torch.Tensor] | None = None, prompt_length: int = 0) -> dict[str, list[dict]]:
    """{curve name: measured points}; `load(path)` puts a gate file's gates on the model."""
    curves: dict[str, list[dict]] = {}
    layers = model.config.num_hidden_layers
    load(gate_files[0])
    scorer = Scorer(model, *blocks, continuations, prompt_length)
    curves["base"] = [dict(scorer.point(None, charge_gates=False), net_saving=0.0)]
    for name in (m for m in methods if m in ("shortgpt", "random")):
        method = make_method(name, model, sample=search)
        grid = [n / layers for n in range(1, math.ceil(0.35 * layers) + 1)] if name == "shortgpt" else EQUAL_RATIOS
        points = [curves["base"][0]]
        for ratio in tqdm(grid, desc=name, leave=False):
            plan, _, _ = method.plans(ratio, None)
            with method.attached(model):
                points.append(scorer.point(plan.budget, skip_bos=plan.skip_bos, charge_gates=False))
        curves[name] = points
    for path in gate_files:
        load(path)
        label = str(Path(path).parent if Path(path).suffix == ".safetensors" else Path(path))  # the path: names repeat
        stored = sorted(model.gate_bank.allocations, key=float)
        if "gateskip" in methods and stored:
            curves[f"{label}"] = [scorer.point(allocation_budget(model, float(t)),
                                               decode=allocation_budget(model, float(t), decoding=True))
                                  for t in tqdm(["0", *stored], desc=label, leave=False)]
        if "equal" in methods or ("gateskip" in methods and not stored):
            curves[f"{label} (equal share)"] = [scorer.point(r) for r in tqdm((0.0, *EQUAL_RATIOS), desc=label, leave=False)]
    return curves


def table(curves: dict[str, list[dict]], targets: Sequence[float], field: str) -> str:
    """Markdown table: each curve's `field` at each net saving."""
    head = "| method | " + " | ".join(f"{100 * t:g} %" for t in targets) + " |"
    rows = [head, "|---|" + "---|" * len(targets)]
    base = curves["base"][0][field]
    rows.append(f"| base (nothing skipped) | " + " | ".join(f"{base:.3f}" if i == 0 else "" for i, _ in enumerate(targets)) + " |")
    for name, points in curves.items():
        if name == "base":
            continue
        cells = [interpolate(points, t, field) for t in targets]
        rows.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(rows)


def plot(curves: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, field in zip(axes, ("loss", "kl")):
        for name, points in curves.items():
            pts = sorted(points, key=lambda p: p["net_saving"])
            ax.plot([100 * p["net_saving"] for p in pts], [p[field] for p in pts], marker="o", label=name)
        ax.set_xlabel("net FLOP saving, decoder layers, gates included (%)")
        ax.set_ylabel("LM loss (nats)" if field == "loss" else "KL to the base (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


# CLI ---------------------------------------------------------------------------------

METHODS = ("gateskip", "equal", "shortgpt", "random")
OUTPUTS = ("proxy.json", "proxy.md", "proxy.png")  # what --out receives


def register(subparsers) -> None:
    p = subparsers.add_parser("proxy", help="LM loss and KL on held-out text against net FLOPs saved, gates vs baselines")
    p.add_argument("model", help="bundled model name, local folder or hub id")
    p.add_argument("--gates", action="append", required=True, type=existing_path,
                   help="gate file or folder (repeat to compare variants)")
    p.add_argument("--text", required=True, type=text_source,
                   help="held-out text no gate trained or searched on (.txt/.jsonl/dataset folder)")
    p.add_argument("--search-text", default="bundled", type=text_source,
                   help="text ShortGPT ranks layers on (as `gateskip allocate --text`)")
    p.add_argument("--blocks", type=integer(1), default=8, help="held-out blocks")
    p.add_argument("--length", type=integer(2), default=256, help="tokens per block")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--targets", type=ratio, nargs="+", default=list(TARGETS), help="net savings the table compares at")
    p.add_argument("--agreement", type=integer(0), default=0, metavar="N",
                   help="also measure next-token agreement with the base on its greedy continuations of N held-out prompts")
    p.add_argument("--out", type=output_path, help="folder for proxy.json, proxy.md and proxy.png")
    p.add_argument("--overwrite", action="store_true", help="replace the proxy.* files an earlier run left in --out")
    p.set_defaults(func=run)


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from ..core.model import load_gates

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise GateSkipError(f"unknown method {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(METHODS)}")
    if args.out:
        check_output_folder(args.out, writes=OUTPUTS, overwrite=args.overwrite)
    model, tokenizer = load_model(args.model)
    fits_context(model, args.length, "--length")
    blocks = sample_tokens(tokenizer, args.text, args.blocks, args.length)
    search = sample_tokens(tokenizer, args.search_text, 4, args.length)
    continuations = None
    if args.agreement:
        after = args.blocks * args.length // PROMPT_TOKENS  # prompts come from the text after the proxy's blocks
        prompts = sample_tokens(tokenizer, args.text, after + args.agreement, PROMPT_TOKENS)[0][after:]
        continuations = greedy_continuations(model, list(prompts), CONTINUATION_TOKENS)
    curves = run_proxy(model, args.gates, blocks, search, methods, lambda p: load_gates(model, p), continuations,
                       PROMPT_TOKENS)
    text = (f"{len(blocks[0])} held-out blocks x {args.length} tokens of {args.text}; physical execution; "
            f"net FLOP saving of the decoder layers, gates included\n\n"
            f"LM loss (nats)\n\n{table(curves, args.targets, 'loss')}\n\n"
            f"KL to the base (nats)\n\n{table(curves, args.targets, 'kl')}\n")
    if args.agreement:
        text += (f"\nNext-token agreement with the base on its greedy continuations ({args.agreement} held-out prompts "
                 f"of {PROMPT_TOKENS} tokens, {CONTINUATION_TOKENS} new tokens each; gates under their decoding "
                 f"thresholds)\n\n{table(curves, args.targets, 'agreement')}\n")
    print(text)
    if args.out:
        with atomic_folder(args.out) as folder:  # the three files or none
            write_json(folder / "proxy.json", curves, indent=1)
            write_text(folder / "proxy.md", text)
            plot(curves, folder / "proxy.png")
        print(f"plot: {args.out / 'proxy.png'}")
    return 0
