"""pass@1 of Qwen2.5-Coder-0.5B-Instruct on the whole of HumanEval and MBPP under skipping, in an
eager vLLM engine (bf16, greedy, chat template): the base, then each row's gate file at each
net-saving target (its stored allocation: the trained gates', or ShortGPT's layer removal written
as one by shortgpt_allocations.py). Each (row, target, task) runs in a fresh process with its own
engine; results.json keeps every finished point with its per-problem outcomes (so a rerun does
only what is missing and differences can be paired), and table.md / pass_at_1.png are rewritten
after each point.

    .venv/bin/python experiments/long_form/sweep.py --out docs/results/long_form/sweep \
        --row gateskip=runs/qwen-coder-infl/final --row shortgpt=runs/qwen-coder-shortgpt --targets 0.15 0.25 \
        --base-from docs/results/long_form/base
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "qwen2.5-coder-0.5b"
TASKS = ("humaneval", "mbpp")
WORKER = "gateskip.serving.worker.GateSkipWorker"


def point(row: str, gates: str | None, target: float, task: str, out: Path, limit: int | None = None) -> dict:
    """One engine, one task: pass@1 with its standard error, per-problem outcomes, what was skipped."""
    from lm_eval import simple_evaluate
    from lm_eval.models.vllm_causallms import VLLM
    from lm_eval.tasks import TaskManager

    from gateskip.evaluation.tasks import render_tasks
    from gateskip.loading import resolve_spec
    from gateskip.serving import skip_report
    from gateskip.serving.spec import overrides, resolve

    folder = resolve_spec(MODEL)
    spec = resolve(folder, gates, target)
    lm = VLLM(pretrained=folder, dtype="bfloat16", max_model_len=2048, seed=0, enforce_eager=True,
              hf_overrides=overrides(spec) or None, worker_extension_cls=WORKER)
    tasks = render_tasks([task], tempfile.mkdtemp(prefix="gateskip-tasks-"))  # this machine's paths: not kept
    start = time.perf_counter()
    result = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(tasks)),
                             apply_chat_template=True, confirm_run_unsafe_code=True, log_samples=True, limit=limit,
                             random_seed=0, verbosity="WARNING")
    seconds = time.perf_counter() - start
    scores = result["results"][task]
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    report = skip_report(lm.model) if spec else None
    kept = out / "samples" / f"{row}-{target:g}-{task}.jsonl"  # what the model wrote, and how its program ended
    kept.parent.mkdir(exist_ok=True)
    with open(kept, "w") as f:
        for s in samples:
            f.write(json.dumps({"doc_id": s["doc_id"], "answer": s["resps"][0][0], "outcome": s["filtered_resps"][0][0]}) + "\n")
    return {"row": row, "target": target, "task": task, "pass@1": scores["pass@1,sandbox"],
            "stderr": scores["pass@1_stderr,sandbox"], "problems": len(samples),
            "passed": [int(s["pass@1"]) for s in samples],
            "net_saving": report["net_saving"] if report else 0.0,
            "skip_fraction": report["skip_fraction"] if report else 0.0,
            "tokens": report["tokens"] if report else None, "seconds": round(seconds, 1),
            "gates": gates}


def base_records(folder: Path) -> list[dict]:
    """The base rows from base_pass_at_1.sh's lm-eval output (the same engine, settings and
    prompts, run through lm-eval's command line), instead of running them again."""
    records = []
    for task in TASKS:
        results = sorted(folder.glob(f"{task}/*/results_*.json"))
        samples = sorted(folder.glob(f"{task}/*/samples_{task}_*.jsonl"))
        if not results or not samples:
            continue
        scores = json.loads(results[-1].read_text())["results"][task]
        rows = sorted((json.loads(line) for line in samples[-1].open()), key=lambda r: r["doc_id"])
        log = (folder / f"{task}.log").read_text()
        seconds = float(log.rsplit("wall seconds: ", 1)[1].split()[0]) if "wall seconds: " in log else float("nan")
        records.append({"row": "base", "target": 0.0, "task": task, "pass@1": scores["pass@1,sandbox"],
                        "stderr": scores["pass@1_stderr,sandbox"], "problems": len(rows),
                        "passed": [int(r["pass@1"]) for r in rows], "net_saving": 0.0, "skip_fraction": 0.0,
                        "tokens": None, "seconds": seconds, "gates": None, "from": str(folder)})
    return records


def table(records: list[dict]) -> str:
    base = {r["task"]: r["pass@1"] for r in records if r["row"] == "base"}
    lines = ["| row | target | task | pass@1 | ± stderr | of base | net saving (measured, gate cost in) | paper skip fraction | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["task"], r["row"] != "base", r["row"], r["target"])):
        ratio = f"{r['pass@1'] / base[r['task']]:.2f}" if base.get(r["task"]) else ""
        lines.append(f"| {r['row']} | {r['target']:g} | {r['task']} | {r['pass@1']:.4f} | {r['stderr']:.4f} | {ratio} | "
                     f"{r['net_saving']:.4f} | {r['skip_fraction']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 4), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        rows = sorted({r["row"] for r in records if r["task"] == task and r["row"] != "base"})
        base = [r for r in records if r["task"] == task and r["row"] == "base"]
        for row in rows:
            pts = sorted((r["net_saving"], r["pass@1"], r["stderr"]) for r in records if r["task"] == task and r["row"] == row)
            ax.errorbar([p[0] * 100 for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=row, capsize=3)
        if base:
            ax.axhline(base[0]["pass@1"], color="k", ls="--", label="base")
            ax.axhline(0.9 * base[0]["pass@1"], color="gray", ls=":", label="90 % of base")
        ax.set(title=f"{task} ({MODEL})", xlabel="net FLOP saving, % (gate cost included)", ylabel="pass@1")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--row", action="append", default=[], help="NAME=GATE_FILE (its allocations give the targets)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.25])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--limit", type=int, help="problems per task (a quick look; not for the table)")
    p.add_argument("--base-from", type=Path, help="take the base rows from base_pass_at_1.sh's output folder")
    p.add_argument("--point", nargs=4, metavar=("ROW", "GATES", "TARGET", "TASK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.point:  # the child: one point, its record as the last line
        row, gates, target, task = args.point
        record = point(row, None if gates == "-" else gates, float(target), task, args.out, args.limit)
        print("RECORD " + json.dumps(record))
        return 0

    # the engine settings of base_pass_at_1.sh, whose base rows these are compared with
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "6")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    results = args.out / "results.json"
    records = json.loads(results.read_text()) if results.is_file() else []
    if args.base_from and not any(r["row"] == "base" for r in records):
        records += base_records(args.base_from)
    done = {(r["row"], r["target"], r["task"]) for r in records}
    rows = [tuple(r.split("=", 1)) for r in args.row]
    todo = [("base", "-", 0.0, t) for t in args.tasks]
    todo += [(name, gates, target, t) for target in args.targets for name, gates in rows for t in args.tasks]
    for row, gates, target, task in todo:
        if (row, target, task) in done:
            continue
        print(f"== {row} target {target:g} {task}", flush=True)
        log = args.out / "logs" / f"{row}-{target:g}-{task}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as f:
            limit = ["--limit", str(args.limit)] if args.limit else []
            proc = subprocess.run([sys.executable, __file__, "--out", str(args.out), *limit, "--point", row, gates,
                                   str(target), task],
                                  stdout=subprocess.PIPE, stderr=f, text=True, env=os.environ)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RECORD ")]
        if proc.returncode != 0 or not lines:
            print(f"   failed (exit {proc.returncode}); see {log}", flush=True)
            continue
        record = json.loads(lines[-1][len("RECORD "):])
        records.append(record)
        tmp = results.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(results)
        (args.out / "table.md").write_text(table(records))
        plot(records, args.out / "pass_at_1.png")
        print(f"   pass@1 {record['pass@1']:.4f} ± {record['stderr']:.4f}, net saving {record['net_saving']:.4f}, "
              f"{record['seconds']:.0f} s", flush=True)
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
