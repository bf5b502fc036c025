"""Allocation: one net-saving target for the whole model, split into a skip ratio per module.

A user asks for one figure, the net FLOP saving of the decoder layers with the gates' own
cost included (design.md section 6). Which modules should pay for it is found from data:
a greedy search that, step by step, raises the one module's skip ratio (to its next level,
or straight to 1, removing it) that costs the least KL divergence to the base model per
FLOP saved, measured on sample text under everything chosen so far. Steps are evaluated
lazily (a candidate's last measurement ranks it until it is re-measured at the top), so a
step costs a few forwards instead of one per module; the first look measures only the
removal of each module. ShortGPT's layer removal and attention-only removal are points of
this search space.

The search path is nested: the allocation for 10 % is a prefix of the one for 25 %, so a
step that was cheap early stays when removing whole layers would now cost less. `refine`
searches each target on its own by exchanges, from ShortGPT's layer removal (or any seed):
give back the costliest skip step, take the FLOPs again where they cost least, keep it if
the KL falls. Each target's allocation is stored in the gate file with per-module thresholds calibrated for
decoding; `allocation_budget` turns a stored target into an AllocationBudget.

A greedy path measured on a few hundred tokens is noisy, and no single search wins at every
target, so `choose` keeps, per target, the best of several searches' allocations by KL on
text none of them searched on.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.budget import AllocationBudget
from ..core.flops import ModelDims, flop_report, gate_flops_per_token
from ..core.gates import GateBank
from ..core.model import check_allocation_modules, decoder_layers, is_gated, read_gate_file
from ..core.plan import SkipPlan
from ..core.stats import SkipStats
from ..errors import GateSkipError
from ..files import save_figure
from ..inference.calibrate import calibrate_allocation, ratio_key, sample_tokens
from ..validate import (check_plot_file, existing_path, fits_context, integer, output_path, ratio, ratio_list,
                       text_source, token_batch)
from .saturation import least_influential

LEVELS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class ModuleCost:
    """FLOPs per token of one module at a reference context length: what skipping it saves
    (per unit of skip ratio), what removing it saves on top (keys and values), what its gate
    costs, and the share of tokens that run it even at ratio 1 (a protected first token)."""

    skip: float
    removal_extra: float
    gate: float
    protected: float = 0.0

    def saving(self, ratio: float) -> float:
        partial = 0.0 < ratio < 1.0
        if ratio == 1.0:
            return (1.0 - self.protected) * self.skip + self.removal_extra
        return ratio * self.skip - partial * self.gate


def module_costs(bank: GateBank, dims: ModelDims, context: float, length: float) -> tuple[dict[str, ModuleCost], float]:
    """Per-module costs and the ungated model's decoder-layer FLOPs per token, for sequences of
    `length` tokens whose queries see `context` keys on average (attention scores grow with
    context; gateskip.core.flops). With the first token protected it still runs a removed module,
    which then computes keys and values for every token too."""
    gate = gate_flops_per_token(bank.config, dims.hidden)
    protected = 0.0 if bank.config.skip_bos else 1.0 / length
    kv = dims.attn_kv_per_token if bank.config.skip_bos else 0.0
    attn = ModuleCost(dims.attn_skippable_per_token + context * dims.attn_per_context, kv, gate, protected)
    mlp = ModuleCost(dims.mlp_per_token, 0.0, gate, protected)
    dense = dims.layers * (dims.attn_skippable_per_token + dims.attn_kv_per_token + dims.mlp_per_token
                           + context * dims.attn_per_context)
    return {k: attn if k.startswith("attn.") else mlp for k in bank.module_keys()}, dense


def predicted_saving(ratios: dict[str, float], costs: dict[str, ModuleCost], dense: float) -> float:
    """Net FLOP saving of an allocation under the cost model (scoring and prefill accounting)."""
    return sum(costs[k].saving(r) for k, r in ratios.items()) / dense


def _fit(ratios: dict[str, float], key: str, before: float, costs: dict[str, ModuleCost], dense: float,
         target: float) -> dict[str, float]:
    """The allocation with `key` moved back from its new ratio towards `before` so that the
    predicted saving is the target exactly (the step that crossed it may overshoot)."""
    fitted = dict(ratios)
    base = predicted_saving({k: r for k, r in ratios.items() if k != key}, costs, dense) * dense
    cost = costs[key]
    # inside (0, 1) the module pays its gate: target * dense = base + r * skip - gate
    r = (target * dense - base + cost.gate) / cost.skip
    fitted[key] = min(max(r, before), ratios[key])
    return {k: v for k, v in fitted.items() if v > 0}


def mean_kl(base_logp: torch.Tensor, logp: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean KL(base || model) of next-token distributions (log-probabilities) over valid positions."""
    return float((base_logp.exp() * (base_logp - logp)).sum(-1)[valid].mean())


def kl_to_base(model, ids: torch.Tensor, mask: torch.Tensor, base_logp: torch.Tensor, budget,
               stats: SkipStats | None = None) -> float:
    """Mean KL(base || skipping model) of next-token distributions over real tokens (the skips
    counted into `stats` when given)."""
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=budget, stats=stats)).logits.float()
    return mean_kl(base_logp, F.log_softmax(logits, dim=-1), mask.bool())


def sample_costs(model, mask: torch.Tensor) -> tuple[dict[str, ModuleCost], float]:
    """module_costs at the mean context and length of a sample's real tokens."""
    context = float((mask.cumsum(1) * mask).sum() / mask.sum())
    length = float(mask.sum(1).float().mean())
    return module_costs(model.gate_bank, ModelDims.from_config(model.config), context, length)


class _Meter:
    """KL to the base and predicted net saving of allocations on one sample of search text
    (the base: nothing skipped, gates not applied); counts the forwards it runs."""

    def __init__(self, model, samples: tuple[torch.Tensor, torch.Tensor]):
        if not is_gated(model):
            raise GateSkipError("an allocation needs a model with gates (add_gates or load_gates first)")
        device = next(model.parameters()).device
        self.model = model
        self.ids, self.mask = (t.to(device) for t in token_batch(samples, "samples"))
        self.keys = model.gate_bank.module_keys()
        self.costs, self.dense = sample_costs(model, self.mask)
        self.most = self.saving(dict.fromkeys(self.keys, 1.0))
        base = model(self.ids, attention_mask=self.mask, skip_plan=SkipPlan(apply_gates=False)).logits.float()
        self.base_logp = F.log_softmax(base, -1)
        self.evaluations = 0

    def kl(self, ratios: dict[str, float], stats: SkipStats | None = None) -> float:
        self.evaluations += 1
        return kl_to_base(self.model, self.ids, self.mask, self.base_logp, AllocationBudget(ratios, 0.0), stats)

    def measured(self, ratios: dict[str, float]) -> tuple[float, float]:
        """(KL, net saving measured on the sample, gates included) of an allocation."""
        stats = SkipStats()
        kl = self.kl(ratios, stats)
        return kl, flop_report(stats, ModelDims.from_config(self.model.config), self.model.gate_bank.config).net_saving

    def saving(self, ratios: dict[str, float]) -> float:
        return predicted_saving(ratios, self.costs, self.dense)

    def gain(self, ratios: dict[str, float], key: str, ratio: float) -> float:
        """Net saving added by moving `key` from its ratio in `ratios` to `ratio`."""
        return (self.costs[key].saving(ratio) - self.costs[key].saving(ratios.get(key, 0.0))) / self.dense

    def check(self, targets: Sequence[float]) -> list[float]:
        targets = sorted(ratio_list(targets, "targets"))
        if targets and targets[-1] >= self.most:
            raise GateSkipError(f"target {targets[-1]:g} is beyond what this model allows: removing every gated module "
                                f"saves {self.most:.3f} of the decoder-layer FLOPs")
        return targets


Heap = list[tuple[float, int, str, float, float]]  # (KL per unit of saving, step measured, key, ratio, KL)


def _climb(meter: _Meter, ratios: dict[str, float], kl: float, targets: Sequence[float], levels: Sequence[float],
           heap: Heap, scores: dict[str, float] | None = None, progress: Callable[[str], None] | None = None,
           bar: tqdm | None = None) -> tuple[dict[str, dict], dict[str, float], float]:
    """Lazy greedy from `ratios` (at `kl`): take the move with the least KL per FLOP saved until
    every target is passed; returns ({target key: entry}, last ratios, last KL). `scores`,
    when given, is updated with each module's latest KL per FLOP.

    heap entries measured at step 0 are fresh for the start, others (step -1) are ranked by an
    older measurement until they reach the top and are measured again under what is chosen."""
    ratios, heap, step = dict(ratios), list(heap), 0
    heapq.heapify(heap)
    found: dict[str, dict] = {}
    pending = [t for t in targets if t > 0]

    def moves(key: str) -> list[float]:
        now = ratios.get(key, 0.0)
        higher = [lv for lv in levels if lv > now]
        return sorted({higher[0], 1.0}) if higher else []

    def measure(key: str, ratio: float) -> tuple[float, float] | None:
        gain = meter.gain(ratios, key, ratio)
        if gain <= 0:
            return None
        trial = meter.kl({**ratios, key: ratio})
        if scores is not None:
            scores[key] = (trial - kl) / gain
        return (trial - kl) / gain, trial

    while pending and heap:
        score, measured, key, r, new_kl = heapq.heappop(heap)
        if ratios.get(key, 0.0) >= r:
            continue  # this module already moved past that level
        if measured != step:  # stale: re-measure under what is chosen now, then rank again
            m = measure(key, r)
            if m is not None:
                heapq.heappush(heap, (m[0], step, key, r, m[1]))
            continue
        before = ratios.get(key, 0.0)
        ratios[key] = r
        saving = meter.saving(ratios)
        while pending and saving >= pending[0] - 1e-12:
            fitted = _fit(ratios, key, before, meter.costs, meter.dense, pending[0])
            fitted_kl = new_kl if fitted == ratios else meter.kl(fitted)
            found[ratio_key(pending[0])] = {"ratios": fitted, "saving": meter.saving(fitted), "kl": fitted_kl}
            if progress:
                progress(f"target {pending[0]:g}: KL {fitted_kl:.4f} after {meter.evaluations} forwards")
            pending.pop(0)
        if bar is not None:
            bar.update(round(100 * saving) - bar.n)
        kl, step = new_kl, step + 1
        for nr in moves(key):
            heapq.heappush(heap, (score, -1, key, nr, math.nan))  # ranked by the step just taken until measured
    if pending:
        raise GateSkipError(f"the search ran out of modules to skip at {meter.saving(ratios):.3f} net saving")
    return found, ratios, kl


def _first_look(meter: _Meter, ratios: dict[str, float], kl: float, levels: Sequence[float]) -> Heap:
    """What removing each module not yet removed costs, from `ratios`: fresh entries for removal,
    and its partial steps ranked the same until they are measured."""
    heap: Heap = []
    for key in tqdm([k for k in meter.keys if ratios.get(k, 0.0) < 1.0], desc="allocation: removing each module",
                    unit="module", leave=False):
        gain = meter.gain(ratios, key, 1.0)
        if gain <= 0:
            continue
        trial = meter.kl({**ratios, key: 1.0})
        score = (trial - kl) / gain
        heap.append((score, 0, key, 1.0, trial))
        heap.extend((score, -1, key, lv, math.nan) for lv in levels if ratios.get(key, 0.0) < lv < 1.0)
    return heap


@torch.no_grad()
def search(
    model,
    samples: tuple[torch.Tensor, torch.Tensor],
    targets: Sequence[float],
    levels: Sequence[float] = LEVELS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """Lazy greedy allocation search; returns {target key: {"ratios", "saving", "kl"}}.

    samples: (ids, mask) of text no evaluation uses. KL is measured against the model with
    nothing skipped and the gates not applied (the base)."""
    meter = _Meter(model, samples)
    targets = meter.check(targets)
    if not targets:
        raise GateSkipError("targets must hold at least one net saving, e.g. [0.1, 0.25]")
    levels = ratio_list(levels, "levels")
    if 1.0 not in levels or 0.0 in levels:
        raise GateSkipError(f"levels must include 1 (removal) and not 0, got {levels}")
    kl = meter.kl({})
    found = {ratio_key(t): {"ratios": {}, "saving": 0.0, "kl": kl} for t in targets if t == 0}
    bar = tqdm(total=round(100 * targets[-1]), desc="allocation", unit="% saved")
    climbed, _, _ = _climb(meter, {}, kl, targets, levels, _first_look(meter, {}, kl, levels),
                             progress=progress, bar=bar)
    bar.close()
    return {**found, **climbed}


def layer_removal(model, samples: tuple[torch.Tensor, torch.Tensor], target: float) -> dict[str, float]:
    """ShortGPT's point of the search space below a target: the least influential layers (Block
    Influence on `samples`) removed, attention and MLP, as many as stay within `target`."""
    costs, dense = sample_costs(model, samples[1])
    ratios: dict[str, float] = {}
    for layer in least_influential(model, samples, len(decoder_layers(model))):
        trial = {**ratios, **{k: 1.0 for k in costs if int(k.split(".")[1]) == layer}}
        if predicted_saving(trial, costs, dense) > target + 1e-9:
            break
        ratios = trial
    return ratios


def _stale(scores: dict[str, float], ratios: dict[str, float], levels: Sequence[float]) -> Heap:
    """Every move up from `ratios`, ranked by each module's last KL per FLOP until re-measured."""
    return [(scores[k], -1, k, lv, math.nan) for k in scores for lv in levels if lv > ratios.get(k, 0.0)]


@torch.no_grad()
def refine(
    model,
    samples: tuple[torch.Tensor, torch.Tensor],
    seeds: dict[str, dict[str, float]],
    levels: Sequence[float] = LEVELS,
    rounds: int = 8,
    tries: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """Exchange search per target; seeds: {target key: ratios}; returns {target key: entry}.

    From the seed (topped up greedily to the target if it saves less), an exchange gives back
    the skip step whose KL per FLOP is highest and takes the FLOPs again greedily where they
    cost least; it is kept if the KL falls. It stops after `rounds` exchanges or when none of
    the `tries` costliest give-backs helps. The greedy path is nested across targets (a step
    that helps at 10 % stays at 30 %); an exchange can undo it. Seeded by layer removal the
    result is no further from the base on `samples` than layer removal topped up to the target.
    Every give-back measured updates its module's KL per FLOP, which ranks raising it again."""
    meter = _Meter(model, samples)
    found: dict[str, dict] = {}
    for key, seed in sorted(seeds.items(), key=lambda item: float(item[0])):
        target = meter.check([float(key)])[0]
        spent = meter.evaluations
        ratios, kl = dict(seed), meter.kl(seed)
        first = _first_look(meter, ratios, kl, levels)
        scores = {k: score for score, _, k, _, _ in first}
        if meter.saving(ratios) < target - 1e-9:
            top_up, _, _ = _climb(meter, ratios, kl, [target], levels, first, scores)
            ratios, kl = top_up[key]["ratios"], top_up[key]["kl"]
        start, exchanges = kl, 0
        for _ in tqdm(range(rounds), desc=f"refining {key}", unit="exchange", leave=False):
            offers = []
            for k, r in ratios.items():
                lower = max([lv for lv in levels if lv < r], default=0.0)
                back = -meter.gain(ratios, k, lower)
                if back > 0:
                    trial = {m: v for m, v in {**ratios, k: lower}.items() if v > 0}
                    lowered = meter.kl(trial)
                    scores[k] = (kl - lowered) / back  # so a module the seed removed can be raised again
                    offers.append((scores[k], trial, lowered))
            for _, trial, lowered in sorted(offers, key=lambda o: -o[0])[:tries]:
                climbed, _, _ = _climb(meter, trial, lowered, [target], levels, _stale(scores, trial, levels), scores)
                if climbed[key]["kl"] < kl - 1e-6:
                    ratios, kl, exchanges = climbed[key]["ratios"], climbed[key]["kl"], exchanges + 1
                    break
            else:
                break
        found[key] = {"ratios": ratios, "saving": meter.saving(ratios), "kl": kl}
        if progress:
            progress(f"target {key}: KL {start:.4f} -> {kl:.4f} in {exchanges} exchanges, "
                     f"{meter.evaluations - spent} forwards")
    return found


@torch.no_grad()
def choose(model, candidates: dict[str, dict[str, dict]], samples: tuple[torch.Tensor, torch.Tensor],
           targets: Sequence[str], tolerance: float = 0.005,
           progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Per target key, the candidate allocation with the lowest KL to the base on `samples`
    among those whose net saving measured there (gates included) reaches the target within
    `tolerance`; returns {target key: entry}, each a copy of the winner's with "kl" and
    "measured_saving" from `samples` and "chosen_from" naming it.

    Savings are measured, not taken from the candidates: a search predicts them at its own
    text's length, and on shorter text attention is a smaller share, so an allocation searched
    on long blocks saves less on short ones (and would win on KL by skipping less). If no
    candidate reaches a target, the one that saves most is kept.

    candidates: {name: {target key: allocation entry}}, e.g. the allocations stored by several
    searches. `samples` should be text none of those searches used (a held-back choice).
    `progress` is called with one line per candidate measured."""
    meter = _Meter(model, samples)
    chosen: dict[str, dict] = {}
    for key in targets:
        offers = [(name, allocations[key]) for name, allocations in candidates.items() if key in allocations]
        if not offers:
            raise GateSkipError(f"no candidate holds an allocation for {key}")
        scored = [(*meter.measured(entry["ratios"]), name, entry) for name, entry in tqdm(offers, desc=f"choosing {key}", leave=False)]
        floor = float(key) - tolerance  # the saving a candidate must measure to be eligible
        eligible = [o for o in scored if o[1] >= floor]
        if progress:
            for kl, saving, name, _ in scored:
                short = "" if saving >= floor else ", short of the target"
                progress(f"target {key}: {name}: KL {kl:.4f}, saving {saving:.3f} measured{short}")
        kl, saving, name, entry = min(eligible, key=lambda o: o[0]) if eligible else max(scored, key=lambda o: o[1])
        chosen[key] = {**entry, "kl": kl, "measured_saving": saving, "chosen_from": name}
    return chosen


def store(bank: GateBank, found: dict[str, dict]) -> None:
    """Keep allocations in the gate bank (saved with the gates)."""
    bank.allocations.update(found)


def plot(allocations: dict, module_keys: list[str], path: Path) -> Path:
    """Skip ratio per module (rows: attention and MLP per layer) for each stored target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted(allocations, key=float)
    layers = sorted({int(k.split(".")[1]) for k in module_keys})
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.25 * len(layers) + 2), sharey=True)
    for ax, branch in zip(axes, ("attn", "mlp")):
        grid = [[allocations[t]["ratios"].get(f"{branch}.{i}", 0.0) for t in targets] for i in layers]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(targets)), [f"{100 * float(t):g}%" for t in targets])
        ax.set_title(f"{branch}: skip ratio per layer")
        ax.set_xlabel("net saving target")
    axes[0].set_yticks(range(len(layers)), layers)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.6, label="share of tokens that skip (1 = removed)")
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def describe(allocations: dict) -> str:
    """One line per stored target: predicted saving, KL on the search text, modules removed / partial."""
    lines = []
    for t in sorted(allocations, key=float):
        entry = allocations[t]
        r = entry["ratios"]
        removed = sorted((k for k, v in r.items() if v == 1.0), key=lambda k: (k[:4], int(k.split(".")[1])))
        partial = sum(0 < v < 1 for v in r.values())
        measured = f", saving {entry['measured_saving']:.3f} measured there" if "measured_saving" in entry else ""
        source = f" (chosen from {entry['chosen_from']}{measured})" if "chosen_from" in entry else ""
        saving, kl = (f"{entry[k]:{form}}" if k in entry else "-" for k, form in (("saving", ".3f"), ("kl", ".4f")))
        lines.append(f"target {t}: saving {saving}, KL {kl}{source}, "
                     f"{partial} modules partly skipped, removed: {', '.join(removed) or 'none'}")
    return "\n".join(lines)


# CLI ---------------------------------------------------------------------------------


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (else autocast emulates them:
    about 4x slower than fp32 on an AVX2-only EPYC, 3.5x faster with avx512_bf16)."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def register(subparsers) -> None:
    p = subparsers.add_parser("allocate", help="split net-saving targets into per-module skip ratios (saved with the gates)")
    p.add_argument("model", help="bundled model name, local folder or hub id")
    p.add_argument("--gates", required=True, type=existing_path,
                   help="gate file or folder (allocations are saved back into it)")
    p.add_argument("--targets", type=ratio, nargs="+", help="net FLOP savings, e.g. 0.1 0.15 0.25")
    p.add_argument("--text", default="bundled", type=text_source,
                   help="search text no evaluation uses: 'bundled', .txt/.jsonl file or dataset folder")
    p.add_argument("--sequences", type=integer(1), default=2, help="search blocks")
    p.add_argument("--skip-sequences", type=integer(0), default=0,
                   help="blocks of --text to pass over first (e.g. the ones a search used, when choosing)")
    p.add_argument("--length", type=integer(2), default=256, help="tokens per search block")
    p.add_argument("--levels", type=ratio, nargs="+", default=list(LEVELS),
                   help="skip ratios a module steps through (1 = removed); fewer levels, fewer forwards")
    p.add_argument("--choose", type=existing_path, nargs="+", metavar="GATES",
                   help="instead of searching, keep per target the lowest-KL allocation on --text among these gate "
                        "files' and --gates' own (text none of their searches used)")
    p.add_argument("--refine", choices=("removal", "stored"),
                   help="instead of the greedy path, an exchange search per target starting from ShortGPT's layer "
                        "removal or from the allocation stored for it")
    p.add_argument("--rounds", type=integer(1), default=8, help="most exchanges per target with --refine")
    p.add_argument("--bf16", action="store_true",
                   help="measure under bf16 autocast (about 3.5x faster on CPUs with avx512_bf16 or AMX, far slower without; thresholds stay fp32)")
    p.add_argument("--show", action="store_true", help="print the stored allocations instead of searching")
    p.add_argument("--plot", type=output_path, help="write a plot of the allocations per module to this PNG")
    p.add_argument("--overwrite", action="store_true",
                   help="replace allocations the gate file already holds for these targets, and an existing --plot")
    p.set_defaults(func=run)


def candidate_allocations(bank: GateBank, own: Path, others: Sequence[Path]) -> dict[str, dict[str, dict]]:
    """{gate file: its stored allocations} for --choose, the gate file's own first; each
    file's allocations must name only these gates' modules (made for this model)."""
    found = {str(own): bank.allocations}
    for path in others:
        allocations = read_gate_file(path)[0].get("allocations", {})
        if not allocations:
            raise GateSkipError(f"{path} holds no allocations to choose from")
        check_allocation_modules(allocations, bank.module_keys(), str(path))
        found[str(path)] = allocations
    return found


def run(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from ..core.model import load_gates, update_gate_file, writable_gate_file

    if not args.show and not args.targets and not args.choose:
        raise GateSkipError("give --targets to search, --choose to choose, or --show to print the stored allocations")
    if args.show and (args.choose or args.refine):
        raise GateSkipError(f"--show prints the stored allocations; it does not go with {'--choose' if args.choose else '--refine'}")
    if args.choose and args.refine:
        raise GateSkipError("--choose compares stored allocations; --refine searches: give one of them")
    if 1.0 not in args.levels or 0.0 in args.levels:
        raise GateSkipError("--levels must include 1 (removal) and not 0")
    plot_path = check_plot_file(args.plot, overwrite=args.overwrite) if args.plot else None
    if not args.show:
        writable_gate_file(args.gates)  # the allocations are saved back into it: found writable first
    model, tokenizer = load_model(args.model)
    if not args.show:
        fits_context(model, args.length, "--length")
    load_gates(model, args.gates)
    bank = model.gate_bank
    before = {k: dict(v) for k, v in bank.allocations.items()}
    candidates = candidate_allocations(bank, args.gates, args.choose) if args.choose else {}
    targets = [ratio_key(t) for t in args.targets] if args.targets else sorted(
        {k for allocations in candidates.values() for k in allocations}, key=float)
    if args.refine == "stored" and (missing := [k for k in targets if k not in bank.allocations]):
        raise GateSkipError(f"--refine stored: {args.gates} holds no allocation for {missing[0]} to start from")
    stored = [key for key in targets if key in bank.allocations]
    if not args.show and stored and not args.overwrite:
        raise GateSkipError(f"{args.gates} already holds an allocation for {stored[0]}; pass --overwrite to replace it")
    if not args.show:
        samples = sample_tokens(tokenizer, args.text, args.sequences, args.length, skip=args.skip_sequences)
        if args.bf16 and samples[0].device.type == "cpu" and not cpu_has_bf16():
            print("note: this CPU has no bf16 instructions (avx512_bf16 or AMX); --bf16 emulates them and runs "
                  "slower than fp32 here", file=sys.stderr)
        say = lambda line: tqdm.write(line)  # noqa: E731
        with torch.autocast(samples[0].device.type, dtype=torch.bfloat16, enabled=args.bf16):
            if args.choose:
                found = choose(model, candidates, samples, targets, progress=say)
            elif args.refine:
                seeds = {k: bank.allocations[k]["ratios"] if args.refine == "stored" else
                         layer_removal(model, samples, float(k)) for k in targets}
                found = refine(model, samples, seeds, sorted(args.levels), rounds=args.rounds, progress=say)
            else:
                found = search(model, samples, args.targets, sorted(args.levels), progress=say)
        fresh = {k: e for k, e in found.items() if e.get("chosen_from") != str(args.gates)}
        calibrate_allocation(model, samples, fresh)
        path = update_gate_file(model, args.gates, "allocations", found, before)
        how = "chosen" if args.choose else "refined" if args.refine else "found"
        print(f"allocations for {', '.join(found)} {how} on {int(samples[1].sum())} tokens of {args.text}; saved to {path}")
    if not bank.allocations:
        raise GateSkipError(f"{args.gates} holds no allocations; run `gateskip allocate MODEL --gates PATH --targets ...`")
    print(describe(bank.allocations))
    if plot_path:
        print(f"plot: {plot(bank.allocations, bank.module_keys(), plot_path)}")
    return 0
