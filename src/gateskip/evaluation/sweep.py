"""A compute-accuracy sweep: every (method, budget, task) point through lm-eval, on one loaded model.

Each finished point is appended to `results.json` atomically (write a temporary file,
then rename), so an interrupted sweep loses at most the point it was computing and a
rerun with the same --out skips what is done. The table and the plot are rewritten
from the JSON after every point.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from tqdm import tqdm

from ..core.budget import check_ratio
from ..core.flops import ModelDims, flop_report
from ..core.stats import SkipStats
from ..errors import GateSkipError
from ..search.baselines import Method
from .report import markdown_table, plot
from .tasks import SANDBOXED, task_manager

RESULTS = "results.json"
TABLE = "results.md"
FIGURE = "accuracy_vs_compute.png"
SCHEMA_VERSION = 1
RECORD_KEYS = ("task", "method", "budget", "metric", "filter", "value", "stderr", "skip_fraction", "net_saving",
               "net_saving_with_head", "tokens", "decode", "seconds")


@dataclass(frozen=True)
class SweepSettings:
    """What makes two sweeps' points comparable; a resumed sweep must match these."""

    model: str
    gates: str | None
    limit: int | None
    data: str
    quantize: str | None = None
    num_fewshot: int | None = None
    seed: int = 0
    calibrated: bool = False  # thresholds calibrated on the sample text before the sweep
    dtype: str = "float32"
    batch_size: int = 1  # 1 in files written before this setting existed; scores equal batch 1's to round-off
    sample_text: str | None = None  # None: the bundled SQuAD passages
    router: str | None = None  # gate file of the MoD-style router (method mod)
    chat_template: bool = False  # prompts framed by the model's chat template (instruct models)


@dataclass
class Sweep:
    settings: SweepSettings
    tasks: list[str]
    budgets: list[float]
    methods: list[str]
    out: Path
    include: Path | None = None  # folder of the user's own lm-eval task YAMLs
    records: list[dict] = field(default_factory=list)


def parse_budgets(text: str | list) -> list[float]:
    """'0,0.1,0.25' -> sorted distinct ratios in [0, 1]; a clear error for an empty or bad list."""
    items = text if isinstance(text, list) else [t for t in str(text).replace(" ", "").split(",") if t]
    if not items:
        raise GateSkipError("the budget list is empty; give ratios like --budgets 0,0.1,0.25")
    budgets = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise GateSkipError(f"budget {item!r} is not a number; give ratios in [0, 1] like 0.25") from None
        budgets.append(check_ratio(value))
    return sorted(set(budgets))


def load_records(out: Path, settings: SweepSettings) -> list[dict]:
    """Finished points of an earlier run in `out`; refuses to mix sweeps with different settings."""
    path = out / RESULTS
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GateSkipError(f"{path} is not a readable sweep result ({e}); move it away to start over") from None
    # Settings added in later versions read as their defaults in older files.
    defaults = {f.name: f.default for f in fields(SweepSettings) if f.default is not MISSING}
    stored = {**defaults, **saved.get("settings", {})}
    differ = [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in asdict(settings).items() if stored.get(k) != v]
    if differ:
        raise GateSkipError(f"{out} holds a sweep with other settings ({'; '.join(differ)}); use another --out")
    return saved["records"]


def write_results(sweep: Sweep) -> None:
    """results.json (atomically), the markdown table and the plot."""
    from ..files import write_json, write_text

    payload = {"version": SCHEMA_VERSION, "settings": asdict(sweep.settings), "records": sweep.records}
    write_json(sweep.out / RESULTS, payload, indent=1)
    write_text(sweep.out / TABLE, markdown_table(sweep.records))
    plot(sweep.records, sweep.out / FIGURE)


def _task_results(result: dict, task: str) -> dict:
    """lm-eval's result block for a task or group."""
    block = result.get("groups", {}).get(task) or result["results"].get(task)
    if block is None:
        raise GateSkipError(f"lm-eval returned no results for task {task!r}")
    return block


def _metric_rows(block: dict) -> list[tuple[str, str, float, float | None]]:
    """(metric, filter, value, stderr) from lm-eval's 'acc,none' / 'acc_stderr,none' keys."""
    rows = []
    for key, value in block.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        stderr = block.get(f"{metric}_stderr,{filt}")
        stderr = float(stderr) if isinstance(stderr, (int, float)) and not math.isnan(stderr) else None
        rows.append((metric, filt, float(value), stderr))
    return rows


def points(sweep: Sweep) -> list[tuple[str, float]]:
    """(method, budget) in run order. The ungated base runs once, at budget 0: it is the reference."""
    out = [("base", 0.0)]
    for method in sweep.methods:
        if method != "base":
            out += [(method, b) for b in sweep.budgets]
    return out


def run_sweep(sweep: Sweep, model, tokenizer, methods: dict[str, Method]) -> list[dict]:
    """Evaluate every missing point, saving after each; returns all records (old and new).
    `methods` maps "base" and every method of the sweep to its Method (baselines.make_method)."""
    from lm_eval import simple_evaluate  # lm-eval takes seconds to import; only a sweep needs it

    from .harness import GatedLM

    missing = [name for name in dict.fromkeys(m for m, _ in points(sweep)) if name not in methods]
    if missing:
        raise GateSkipError(f"no method object for {', '.join(map(repr, missing))}: run_sweep needs one for 'base' "
                            f"and for every method of the sweep")
    sweep.records = load_records(sweep.out, sweep.settings)
    done = {(r["method"], r["budget"], r["task"]) for r in sweep.records}
    manager = task_manager(sweep.tasks, sweep.settings.data, sweep.out / "tasks", sweep.include)
    lm = GatedLM(model, tokenizer, batch_size=sweep.settings.batch_size)
    dims = ModelDims.from_config(model.config)
    todo = [(m, b, t) for m, b in points(sweep) for t in sweep.tasks if (m, b, t) not in done]
    for method_name, budget, task in tqdm(todo, desc="sweep", unit="point"):
        method = methods[method_name]
        stats = SkipStats()
        score_plan, generate_plan, note = method.plans(budget, stats)
        lm.use(score_plan, generate_plan)
        start = time.perf_counter()
        with method.attached(model):
            result = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=sweep.settings.limit,
                                     num_fewshot=sweep.settings.num_fewshot, log_samples=False,
                                     random_seed=sweep.settings.seed, bootstrap_iters=1000, verbosity="WARNING",
                                     apply_chat_template=sweep.settings.chat_template,
                                     confirm_run_unsafe_code=sweep.settings.data == "bundled" and task in SANDBOXED)
        seconds = time.perf_counter() - start
        generates = any(c.get("output_type") == "generate_until" for c in result.get("configs", {}).values())
        flops = flop_report(stats, dims, method.bank.config if method.charge_gates else None)
        for metric, filt, value, stderr in _metric_rows(_task_results(result, task)):
            sweep.records.append({
                "task": task, "method": method_name, "budget": budget, "metric": metric, "filter": filt,
                "value": value, "stderr": stderr, "skip_fraction": flops.paper_fraction,
                "net_saving": flops.net_saving, "net_saving_with_head": flops.net_saving_with_head,
                "tokens": flops.tokens, "decode": note if generates else "", "seconds": round(seconds, 2),
            })
        write_results(sweep)
    if not todo and sweep.records:
        write_results(sweep)
    return sweep.records
