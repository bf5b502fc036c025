"""The main job's stages, each writing its result into the report folder before the next one
starts: held-out text, gates, allocations, proxy, tasks, samples, speed, analysis."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import files as outputs
from ..core.flops import ModelDims, flop_report
from ..core.model import GATE_FILE, load_gates, save_gates
from ..core.plan import SkipPlan
from ..core.stats import SkipStats
from ..data.corpus import split_documents, write_jsonl
from ..data.samples import sample_sequences
from ..evaluation.analysis import analyze
from ..evaluation.batch import DEFAULT_BATCH_SIZE
from ..evaluation.sweep import Sweep, SweepSettings, load_records, points, run_sweep
from ..inference.bench import decode_speed, prefill_speed
from ..inference.calibrate import allocation_budget
from ..inference.calibrate import calibrate_allocation, sample_tokens
from ..inference.contract import reports
from ..inference.generation import encode_prompt, generate, has_chat_template
from ..search.allocation import plot as plot_allocations, search, store
from ..search.baselines import make_method
from ..search.proxy import CONTINUATION_TOKENS, PROMPT_TOKENS, greedy_continuations, plot as plot_proxy
from ..search.proxy import run_proxy
from ..training import TrainConfig, train
from ..training import checkpoint
from ..validate import read_json
from .job import Job

QUESTIONS = (
    "What do plants need to make food?",
    "Why does ice float on water?",
    "What is the largest planet in the solar system?",
)
DECODE_PROMPT = f"Question: {QUESTIONS[0]}\nAnswer:"
PROXY_METHODS = ("gateskip", "equal", "shortgpt", "random")
PROXY_FIELDS = ("loss", "kl", "agreement")
ALLOCATION_LEVELS = (0.5, 1.0)  # skip ratios the search for gates trained here steps through: fewer forwards
TASK_BATCH = DEFAULT_BATCH_SIZE  # `gateskip eval`'s: GatedLM masks padding, so scores equal batch size 1's


def stage_text(job: Job) -> tuple[Path, Path]:
    """The corpus split (gateskip.data.corpus, seed 0): the training side for gates, allocation search and
    ShortGPT's ranking; the held-out side, which nothing here trains or searches on, for the proxy,
    the speed benchmark and the analysis (the shipped gates were made from the same split)."""
    folder = job.out / "data"
    train_text, heldout = folder / "train.jsonl.gz", folder / "heldout.jsonl.gz"
    done = train_text.is_file() and heldout.is_file()
    with job.stage("corpus split", reused=done):
        if not done:
            train_rows, heldout_rows = split_documents()
            write_jsonl(heldout_rows, heldout)
            write_jsonl(train_rows, train_text)  # last: its presence marks the stage done
            job.console.print(f"{len(train_rows)} training and {len(heldout_rows)} held-out documents")
    return train_text, heldout


def stage_train(job: Job, train_text: Path, evaluated: bool) -> Path:
    """Train low-rank unit gates with the influence objective on the frozen backbone (resumes an
    interrupted run). `evaluated`: these are the gates the job evaluates, else a demonstration."""
    s = job.sizes
    run_dir = job.out / "train"
    final = run_dir / "final" / GATE_FILE
    name = "train gates" if evaluated else "training demonstration"
    with job.stage(name, reused=final.is_file()):
        if not final.is_file():
            cfg = TrainConfig(
                model=job.model, out=str(run_dir), data=[str(train_text)], steps=s.train_steps, mode="frozen",
                objective="influence", gate_application="unit", gate_kind="lowrank", rank=s.gate_rank,
                protect_first_token=True, batch_size=s.train_batch, seq_len=s.train_seq_len, gate_lr=s.gate_lr,
                max_tokens=s.train_tokens, target_skip=0.2, eval_blocks=4, save_every=max(1, s.train_steps // 4),
                resume=bool(checkpoint.checkpoints(run_dir)),
            )
            train(cfg)
            job.trained_now = True
    return final


def training_summary(run_dir: Path) -> dict:
    """The influence regression loss at the first step and over the last quarter of the steps, and
    the validation LM loss (masked, equal share 0.2 per module) at the end."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    tail = steps[-max(1, len(steps) // 4):]
    return {"steps": len(steps), "loss_first": steps[0]["loss"],
            "loss_last_quarter": sum(r["loss"] for r in tail) / len(tail),
            "val_loss": val[-1]["val_loss"] if val else None, "val_skip": val[-1]["val_skip_ratio"] if val else None,
            "tokens_per_s": sum(r["tokens_per_s"] for r in steps) / len(steps)}


def stage_allocate(job: Job, model, trained: Path, search_blocks) -> Path:
    """Allocations for every target on training-side text (allocation.search), with decoding thresholds."""
    gates = job.out / "gates" / GATE_FILE
    done = gates.is_file() and not job.trained_now
    with job.stage("allocate", reused=done):
        if not done:
            load_gates(model, trained)
            text = tuple(t[: job.sizes.allocation_sequences] for t in search_blocks)
            found = search(model, text, job.sizes.targets, ALLOCATION_LEVELS, progress=job.console.print)
            store(model.gate_bank, found)
            calibrate_allocation(model, text, model.gate_bank.allocations)
            save_gates(model, gates)
    return gates


@torch.no_grad()
def budget_zero(model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The gated model at target 0 against the original model (no plan) on the held-out blocks:
    with unit gates the logits must be the same bit for bit."""
    plain = model(ids, attention_mask=mask).logits
    zero = model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=allocation_budget(model, 0.0))).logits
    return {"identical": bool(torch.equal(plain, zero)), "max_abs_diff": float((plain - zero).abs().max()),
            "tokens": int(mask.sum()), "application": model.gate_bank.config.application}


EQUAL_SHARE = " (equal share)"


def _relabel(curves: dict[str, list[dict]], label: str) -> dict[str, list[dict]]:
    """run_proxy names the curves of its (here: one) gate file after the file; name them after their role."""
    baselines = ("base", "shortgpt", "random")
    return {name if name in baselines else label + (EQUAL_SHARE if name.endswith(EQUAL_SHARE) else ""): pts
            for name, pts in curves.items()}


def stage_proxy(job: Job, model, tokenizer, gates: Path, heldout: Path, search_blocks) -> dict:
    """Held-out LM loss, KL to the base and next-token agreement with the base's greedy continuations
    against net saving (gateskip.search.proxy): the gates under their allocations and at the paper's equal
    share, ShortGPT, random; plus the budget-0 check."""
    s = job.sizes
    folder = job.out / "proxy"
    path = folder / "proxy.json"
    with job.stage("proxy", reused=job.reusable(folder) and path.is_file()):
        if path.is_file():
            return read_json(path, "stage result")
        blocks = sample_tokens(tokenizer, str(heldout), s.proxy_blocks, s.proxy_length)
        after = len(blocks[0]) * s.proxy_length // PROMPT_TOKENS  # prompts from the held-out text after the blocks
        prompts = sample_tokens(tokenizer, str(heldout), after + s.agreement_prompts, PROMPT_TOKENS)[0][after:]
        job.console.print(f"{len(blocks[0])} held-out blocks x {s.proxy_length} tokens, {len(prompts)} prompts")
        continuations = greedy_continuations(model, list(prompts), CONTINUATION_TOKENS)
        curves = run_proxy(model, [gates], blocks, search_blocks, PROXY_METHODS, lambda p: load_gates(model, p),
                           continuations, PROMPT_TOKENS)
        curves = _relabel(curves, "gateskip")
        for target, point in zip([0.0, *sorted(map(float, model.gate_bank.allocations))], curves["gateskip"]):
            point["target"] = target  # run_proxy measures the stored targets in this order
        result = {"text": f"data/{heldout.name}", "blocks": len(blocks[0]), "length": s.proxy_length,
                  "prompts": len(prompts), "curves": curves, "budget_zero": budget_zero(model, *blocks)}
        folder.mkdir(parents=True, exist_ok=True)
        plot_proxy(curves, folder / "proxy.png")
        plot_allocations(model.gate_bank.allocations, model.gate_bank.module_keys(), folder / "allocations.png")
        outputs.write_json(path, result, indent=1)
    return result


def task_sweeps(job: Job, gates: Path) -> list[Sweep]:
    """Gates and ShortGPT at every target, random at a few, the base once; one results.json."""
    s = job.sizes
    settings = SweepSettings(model=job.model, gates=str(gates), limit=s.items, data="bundled", batch_size=TASK_BATCH,
                             sample_text=f"data/train.jsonl.gz, first {s.search_sequences} x {s.search_length} tokens")
    folder = job.out / "tasks"
    return [Sweep(settings, list(s.tasks), list(s.targets), ["gateskip", "shortgpt"], folder),
            Sweep(settings, list(s.tasks), list(s.random_targets), ["random"], folder)]


def stage_tasks(job: Job, model, tokenizer, gates: Path, search_blocks) -> list[dict]:
    """lm-eval accuracy with standard errors at every point (evaluation.sweep, resumable per point)."""
    sweeps = task_sweeps(job, gates)
    folder, settings = sweeps[0].out, sweeps[0].settings
    wanted = {(m, b, t) for sw in sweeps for m, b in points(sw) for t in sw.tasks}
    done = job.reusable(folder) and wanted <= {(r["method"], r["budget"], r["task"])
                                               for r in load_records(folder, settings)}
    with job.stage("tasks", reused=done):
        if done:
            return load_records(folder, settings)
        s = job.sizes
        job.console.print(f"{len(wanted)} lm-eval points: {', '.join(s.tasks)}, first {s.items} items each")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        methods = {name: make_method(name, model) for name in ("base", "gateskip", "random")}
        methods["shortgpt"] = make_method("shortgpt", model, sample=search_blocks)
        for sweep in sweeps:
            records = run_sweep(sweep, model, tokenizer, methods)
    return records


def _greedy(tokenizer, new_tokens: int) -> dict:
    return dict(max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=tokenizer.eos_token_id)


def question_prompt(tokenizer, question: str) -> tuple[torch.Tensor, bool]:
    """(input ids, whether the chat template made them): an instruct model gets the question as
    its chat template frames a user turn, a base model (no template) "Question: ...\nAnswer:".
    Raw text is not what an instruct model is made for: SmolLM2-135M-Instruct itself answers
    one of the raw question prompts with nothing, and with the shipped gates its end-of-turn
    token wins on all three (docs/generation.md, "Raw prompts and the chat template")."""
    chat = has_chat_template(tokenizer)
    return encode_prompt(tokenizer, question if chat else f"Question: {question}\nAnswer:", chat), chat


def _continuations(model, tokenizer, question: str, targets, shortgpt, new_tokens: int) -> list[dict]:
    """One question's greedy answers: the base, the gates at each target, ShortGPT at each target."""
    kw = _greedy(tokenizer, new_tokens)
    ids, chat = question_prompt(tokenizer, question)
    dims = ModelDims.from_config(model.config)

    def row(method: str, target: float, saving: float, seq: torch.Tensor, **extra) -> dict:
        text = tokenizer.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)
        return {"prompt": question, "chat_template": chat, "method": method, "target": target, "net_saving": saving,
                "text": text, **extra}

    rows = [row("base", 0.0, 0.0, model.generate(ids, **kw))]
    for t in targets:
        gen = generate(model, ids, budget=t, **kw)
        rows.append(row("gateskip", t, reports(model, gen.prefill, gen.decode)["generation"].net_saving, gen.sequences))
    for t in targets:
        stats = SkipStats()
        _, plan, note = shortgpt.plans(t, stats)
        with shortgpt.attached(model):
            seq = model.generate(ids, skip_plan=plan, **kw)
        rows.append(row("shortgpt", t, flop_report(stats, dims, None).net_saving, seq, note=note))
    return rows


def stage_samples(job: Job, model, tokenizer, search_blocks) -> list[dict]:
    """Greedy answers to a few questions (through the chat template where the model has one): base,
    the gates at a few targets (calibrated thresholds, gateskip.inference.generation), ShortGPT
    with as many layers removed."""
    path = job.out / "samples.json"
    with job.stage("samples", reused=job.reusable(path)):
        if path.is_file():
            return read_json(path, "stage result")
        shortgpt = make_method("shortgpt", model, sample=search_blocks)
        with torch.inference_mode():
            rows = [r for q in QUESTIONS for r in _continuations(model, tokenizer, q, job.sizes.sample_targets,
                                                                   shortgpt, job.sizes.new_tokens)]
        job.write_json(path.name, rows)
    return rows


def stage_speed(job: Job, model, tokenizer, heldout: Path) -> dict:
    """Wall-clock prefill (physical skipping, allocation quantiles) and greedy decoding (calibrated
    thresholds, gateskip.inference.decoding; self-speculative drafting at the smallest target) against the
    ungated model and HF generate, interleaved rounds (gateskip.inference.bench)."""
    s = job.sizes
    path = job.out / "speed.json"
    with job.stage("speed", reused=job.reusable(path)):
        if path.is_file():
            return read_json(path, "stage result")
        ids, _ = sample_sequences(tokenizer, str(heldout), s.prefill_batch, s.prefill_length)
        targets = (0.0, *s.targets)
        with torch.inference_mode():
            job.console.print(f"prefill: batch {ids.shape[0]} x {ids.shape[1]} tokens, {s.rounds} interleaved rounds")
            result = {"threads": torch.get_num_threads(), "prefill": prefill_speed(model, ids, targets, s.rounds)}
            job.console.print(f"decoding: {s.decode_tokens} new tokens, batch 1, greedy (gateskip bench)")
            prompt = tokenizer(DECODE_PROMPT, return_tensors="pt")["input_ids"]
            result["decode"] = {"prompt": DECODE_PROMPT, **decode_speed(
                model, prompt, None, targets, s.decode_tokens, s.rounds, speculative=min(s.targets),
                pad=tokenizer.eos_token_id)}
        job.write_json(path.name, result)
    return result


def stage_analysis(job: Job, model, tokenizer, gates: Path, heldout: Path) -> dict:
    """What the gates rank (gateskip.evaluation.analysis) on held-out text, at an equal share of 0.25."""
    s = job.sizes
    folder = job.out / "analysis"
    with job.stage("analysis", reused=job.reusable(folder) and (folder / "analysis.json").is_file()):
        if (folder / "analysis.json").is_file():
            return read_json(folder / "analysis.json", "stage result")
        ids, mask = sample_sequences(tokenizer, str(heldout), s.analysis_sequences, s.analysis_length)
        return analyze(model, tokenizer, ids, mask, folder, budget=0.25, text="held-out text (data/heldout.jsonl.gz)",
                       gates=str(gates))
