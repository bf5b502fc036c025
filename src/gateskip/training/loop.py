"""Fine-tune a gated model: `gateskip train MODEL ...` or `train(TrainConfig(...))`.

One loop on accelerate runs unchanged on one CPU, one GPU, or several processes
(`accelerate launch --num_processes N -m gateskip.training ...`, DDP or FSDP). Each step:

    skip ratio  = target * min(1, step / ramp_steps)          (masked execution)
    loss        = CE + sparsity_weight * gate penalty + distill_weight * KL(base || model)

With --init-gates and --allocation, training continues gates that already have allocations
and trains them under those allocations (one target per step, in turn), so the gates learn to
rank tokens in the modules the allocation skips partly, at the ratios they will run at.

The batch order is a function of the step, so a resumed run sees the batches the
uninterrupted run would have seen. The run folder holds train_config.json,
metrics.jsonl, checkpoints/ and, at the end, final/ (what gateskip loads).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from . import checkpoint
from ..core.budget import AllocationBudget
from ..core.config import GateConfig
from ..core.model import add_gates, is_gated, load_gates, remove_gates, save_gates
from ..core.plan import GateTrace, SkipPlan
from ..data.textdata import Blocks, build_blocks
from ..errors import GateSkipError
from ..files import atomic_folder, write_json, write_text
from ..inference.calibrate import allocation_budget
from ..inference.calibrate import calibrate, calibrate_allocation, ratio_key
from ..loading import load_model
from ..validate import check_output_folder, read_json
from .config import LOCAL_OBJECTIVES, LORA_TARGETS, RESUMABLE_CHANGES, RUN_FILES, TrainConfig
from .influence import influence_loss
from .losses import LossTerms, combine, lm_loss


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    """Check the run folder before anything slow happens, creating nothing (a failed start leaves no
    folder behind): a folder holding a run, a model or gates is only started over with overwrite."""
    out = Path(cfg.out).expanduser()
    if cfg.resume:
        checkpoint.latest_checkpoint(out)  # fails early when there is nothing to resume
        saved = out / "train_config.json"
        if saved.is_file():
            before = read_json(saved, "training configuration")
            now = dataclasses.asdict(cfg)
            changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k])
            if changed:
                raise GateSkipError(f"cannot resume {out}: options changed since it started: {', '.join(changed)}")
        return out
    if checkpoint.checkpoints(out) and not cfg.overwrite:
        raise GateSkipError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start over, "
                            "or choose another --out")
    return check_output_folder(out, writes=RUN_FILES, overwrite=cfg.overwrite)


def _create_run_dir(cfg: TrainConfig, out: Path) -> None:
    """Make the run folder once the model and data are ready; starting over removes the earlier
    run's checkpoints and export, so a later resume cannot pick up the old run."""
    if cfg.overwrite and PartialState().is_main_process:
        for name in RUN_FILES:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):  # one per process: several may check at once
            pass
    except OSError as e:
        raise GateSkipError(f"output folder {out} is not writable: {e.strerror or e}") from None


def _step(line: str) -> float:
    """The step of a metrics.jsonl record; inf for a line a kill cut short (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl in the run folder (plus TensorBoard through accelerate when installed)."""

    def __init__(self, accelerator: Accelerator, path: Path, resume_step: int):
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process:
            kept = []
            if resume_step > 0 and path.is_file():  # drop what the interrupted run logged after its checkpoint
                kept = [line for line in path.read_text().splitlines() if _step(line) <= resume_step]
            write_text(path, "".join(line + "\n" for line in kept))  # whole: a kill here keeps the old log

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


# ---------------------------------------------------------------- model


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def build_model(cfg: TrainConfig):
    """(model to train, tokenizer, frozen copy of the base or None).

    Full fine-tuning moves the backbone, so distillation needs a frozen copy of the base;
    frozen and LoRA modes reach the unchanged base through the model itself.
    """
    model, tokenizer = load_model(cfg.model)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and cfg.seq_len > context:
        raise GateSkipError(f"seq len {cfg.seq_len} exceeds the model's context of {context} tokens")
    base_copy = None
    if cfg.mode == "full" and cfg.distill_weight > 0:
        base_copy = copy.deepcopy(model).requires_grad_(False).eval()
    # Influence targets are percentiles in [0, 1]: gates start in the middle, where the sigmoid
    # has a gradient, not almost open (a unit gate's start changes no output either way).
    bias = 0.0 if cfg.objective in LOCAL_OBJECTIVES else GateConfig.init_bias
    if cfg.init_gates:
        load_gates(model, cfg.init_gates)
        missing = [t for t in cfg.allocation if ratio_key(t) not in model.gate_bank.allocations]
        if missing:
            raise GateSkipError(f"{cfg.init_gates} has no allocation for {ratio_key(missing[0])}; "
                                f"run `gateskip allocate` first")
    else:
        if is_gated(model):  # a gated model folder: train fresh gates (--init-gates continues its own)
            remove_gates(model)
        add_gates(model, GateConfig(kind=cfg.gate_kind, rank=cfg.rank, skip_bos=not cfg.protect_first_token,
                                    application=cfg.gate_application, init_bias=bias))
    if cfg.mode == "frozen":
        model.requires_grad_(False)
    elif cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
        model = get_peft_model(model, lora)  # freezes everything but the adapters
    for p in _gate_bank(model).parameters():
        p.requires_grad_(True)
    model.train()
    return model, tokenizer, base_copy


def _gate_bank(model) -> torch.nn.Module:
    return model.get_base_model().gate_bank if hasattr(model, "get_base_model") else model.gate_bank


def run_record(cfg: TrainConfig, model) -> dict:
    """What train_config.json holds: the command's options, and under "gates" the options of the
    gates it trained, which --init-gates takes from its file whatever --gate-kind/--rank say."""
    return {**dataclasses.asdict(cfg), "gates": dataclasses.asdict(_gate_bank(model).config)}


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """Gates and backbone (or LoRA adapters) train with their own learning rates."""
    gates = [p for n, p in model.named_parameters() if p.requires_grad and "gate_bank." in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "gate_bank." not in n]
    groups = [{"params": gates, "lr": cfg.gate_lr, "name": "gates"}]
    if rest:
        groups.append({"params": rest, "lr": cfg.backbone_lr, "name": "backbone"})
    return groups


def make_teacher(accelerator: Accelerator, cfg: TrainConfig, model, base_copy) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """Logits of the ungated base model for the distillation term, computed without grad."""
    if cfg.distill_weight <= 0:
        return None

    def teacher(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), accelerator.autocast():
            if base_copy is not None:
                return base_copy(input_ids=ids, attention_mask=mask, use_cache=False).logits
            with model.disable_adapter() if cfg.mode == "lora" else nullcontext():  # adapters off: the base
                return model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # no plan: no gates

    return teacher


def budget_schedule(cfg: TrainConfig, bank) -> tuple[Callable[[int], float | AllocationBudget], float | AllocationBudget]:
    """(budget of each step, budget validation uses). Without an allocation: the ramped
    per-module ratio. With one: the stored allocations in turn, whole from the first step
    (the gates start trained), validated at the middle target."""
    if not cfg.allocation:
        return cfg.skip_ratio, cfg.target_skip
    budgets = [allocation_budget(bank, t) for t in cfg.allocation]
    return (lambda step: budgets[step % len(budgets)]), budgets[len(budgets) // 2]


def _label(budget: float | AllocationBudget) -> float:
    return budget.target if isinstance(budget, AllocationBudget) else budget


# ---------------------------------------------------------------- data order


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(cfg: TrainConfig, n: int, step: int, micro: int, rank: int, world: int) -> torch.Tensor:
    """Which training blocks a process reads at (step, micro-batch): a pure function of the step,
    which makes the data position of a checkpoint its step number."""
    first = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
    samples = range(first, first + cfg.batch_size)
    return torch.stack([_epoch_order(n, cfg.seed, j // n)[j % n] for j in samples])


def _to_device(blocks: Blocks, device: torch.device) -> Blocks:
    return Blocks(*(t.to(device) for t in (blocks.input_ids, blocks.attention_mask, blocks.labels)))


# ---------------------------------------------------------------- one step


def loss_terms(model, batch: Blocks, cfg: TrainConfig, skip: float | AllocationBudget, teacher) -> LossTerms:
    """Forward with masked skipping under `skip` (a ratio or an allocation) and every loss term
    (or the influence regression)."""
    if cfg.objective in LOCAL_OBJECTIVES:
        loss = influence_loss(model, batch.input_ids, batch.attention_mask, cfg.objective)
        zero = loss.new_zeros(())
        return LossTerms(loss, zero, zero, zero, zero)
    trace = GateTrace()
    plan = SkipPlan(budget=skip, execution="masked", trace=trace)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, skip_plan=plan, use_cache=False)
    teacher_logits = teacher(batch.input_ids, batch.attention_mask) if teacher is not None else None
    return combine(
        out.logits, batch.labels, trace,
        sparsity_weight=cfg.sparsity_weight, sparsity_kind=cfg.sparsity_loss, sparsity_target=cfg.sparsity_target,
        teacher_logits=teacher_logits, distill_weight=cfg.distill_weight,
    )


def train_step(accelerator: Accelerator, model, optimizer, scheduler, blocks: Blocks, cfg: TrainConfig,
               step: int, teacher, schedule: Callable[[int], float | AllocationBudget] | None = None) -> dict[str, float]:
    """One optimizer step over grad_accum micro-batches; returns the step's metrics, averaged over processes."""
    skip = (schedule or cfg.skip_ratio)(step)
    sums = torch.zeros(6, device=accelerator.device)  # total, lm, sparsity, distill, mean gate, tokens
    for micro in range(cfg.grad_accum):
        idx = batch_indices(cfg, len(blocks), step, micro, accelerator.process_index, accelerator.num_processes)
        batch = _to_device(blocks.select(idx), accelerator.device)
        last = micro == cfg.grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            terms = loss_terms(model, batch, cfg, skip, teacher)
            accelerator.backward(terms.total / cfg.grad_accum)
        parts = (terms.total, terms.lm, terms.sparsity, terms.distill, terms.mean_gate)
        sums[:5] += torch.stack([t.detach().float() for t in parts]) / cfg.grad_accum
        sums[5] += batch.attention_mask.sum()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums = accelerator.reduce(sums, "sum")
    world = accelerator.num_processes
    names = ("loss", "lm", "sparsity", "distill", "mean_gate")
    metrics = {k: float(v) / world for k, v in zip(names, sums[:5])}
    metrics.update(tokens=float(sums[5]), skip_ratio=_label(skip), grad_norm=float(grad_norm))
    metrics.update({f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
    return metrics


def _stop_if_not_finite(accelerator: Accelerator, model, loss: float, step: int) -> None:
    """Stop before a NaN or inf loss or parameter reaches a checkpoint or the export; every process
    stops at the same step (the flag is reduced), so none waits on a collective the others left."""
    params = [p for p in model.parameters() if p.requires_grad]
    finite = torch.stack([torch.isfinite(p).all() for p in params]).all() & math.isfinite(loss)
    if accelerator.reduce((~finite).float(), "max").item():
        raise GateSkipError(f"training stopped at step {step}: the loss ({loss:g}) or a trained parameter is not "
                            "finite; nothing was exported. Lower --lr or --gate-lr, or train with --mixed-precision no")


@torch.no_grad()
def validate(accelerator: Accelerator, model, blocks: Blocks, cfg: TrainConfig,
             budget: float | AllocationBudget | None = None) -> dict[str, float]:
    """Validation LM loss and perplexity at the target skip ratio, or `budget` (masked execution, as in training)."""
    budget = cfg.target_skip if budget is None else budget
    model.eval()
    mine = torch.arange(min(len(blocks), cfg.eval_blocks))[accelerator.process_index :: accelerator.num_processes]
    sums = torch.zeros(2, device=accelerator.device)  # loss x tokens, tokens
    for chunk in mine.split(cfg.batch_size):
        batch = _to_device(blocks.select(chunk), accelerator.device)
        plan = SkipPlan(budget=budget, execution="masked")
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, skip_plan=plan, use_cache=False).logits
        n = (batch.labels[:, 1:] != -100).sum()
        if n > 0:
            sums += torch.stack([lm_loss(logits, batch.labels) * n, n.float()])
    model.train()
    loss_sum, n = accelerator.reduce(sums, "sum").tolist()
    loss = loss_sum / max(n, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_skip_ratio": _label(budget)}


# ---------------------------------------------------------------- export


def export(accelerator: Accelerator, model, tokenizer, cfg: TrainConfig, folder: Path, base_copy=None,
           samples: Blocks | None = None) -> Path:
    """Write what gateskip loads: gateskip.safetensors, plus the backbone as an HF folder when it
    was fine-tuned in full, or the LoRA adapter in PEFT's format. Frozen and LoRA exports load
    onto the original model (`load_gates` merges an adapter it finds beside the gates).
    Thresholds and allocations inherited from --init-gates are recalibrated on `samples` for
    the trained gates."""
    state = accelerator.get_state_dict(model)  # gathers FSDP shards; every process must call it
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        if accelerator.distributed_type == DistributedType.FSDP:  # the live module holds shards only
            trained, _, _ = build_model(dataclasses.replace(cfg, distill_weight=0.0))
            trained.load_state_dict(state)
        if samples is not None:
            _recalibrate(trained.get_base_model() if cfg.mode == "lora" else trained, samples)
        with atomic_folder(folder) as written:  # complete beside `folder`, then moved in (config.json last)
            if cfg.mode == "lora":  # the adapter in PEFT's format beside the gates; load_gates merges it
                trained.save_pretrained(written)
                trained = trained.get_base_model()
            save_gates(trained, written)
            if cfg.mode == "full":
                backbone = {k: v for k, v in trained.state_dict().items() if not k.startswith("gate_bank.")}
                trained.save_pretrained(written, state_dict=backbone)
                tokenizer.save_pretrained(written)
            (written / "train_config.json").write_text(json.dumps(run_record(cfg, trained), indent=2))
    accelerator.wait_for_everyone()
    return folder


def _recalibrate(model, samples: Blocks) -> None:
    """Calibrate the stored ratios and allocations again: their thresholds belong to the old gates."""
    bank = model.gate_bank
    was_training = model.training
    model.eval()
    pair = (samples.input_ids.to(model.device), samples.attention_mask.to(model.device))
    if bank.thresholds:
        calibrate(model, pair, [float(k) for k in bank.thresholds])
    if bank.allocations:
        calibrate_allocation(model, pair, bank.allocations)
    model.train(was_training)


# ---------------------------------------------------------------- entry point


def _past(accelerator: Accelerator, deadline: float) -> bool:
    """Whether any process is past the deadline (all processes stop at the same step)."""
    late = torch.tensor(float(time.monotonic() > deadline), device=accelerator.device)
    return bool(accelerator.reduce(late, "max").item())


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the folder of the final export."""
    out = _prepare_run_dir(cfg)
    trackers = ["tensorboard"] if _has_tensorboard() else []
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(cfg.mixed_precision), step_scheduler_with_optimizer=False,
        log_with=trackers or None, project_dir=str(out),
    )
    set_seed(cfg.seed)
    model, tokenizer, base_copy = build_model(cfg)
    train_blocks, val_blocks = build_blocks(
        cfg.data, tokenizer, cfg.seq_len, packed=cfg.pack, val_fraction=cfg.val_fraction, seed=cfg.seed,
        max_tokens=cfg.max_tokens,
    )
    _create_run_dir(cfg, out)
    from transformers import get_cosine_schedule_with_warmup  # loads transformers' modelling stack: not at import

    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if base_copy is not None:  # frozen: not prepared, so checkpoints leave it out
        base_copy.to(accelerator.device)
    teacher = make_teacher(accelerator, cfg, accelerator.unwrap_model(model) if cfg.mode == "lora" else model, base_copy)
    schedule, val_budget = budget_schedule(cfg, _gate_bank(accelerator.unwrap_model(model)))

    start = checkpoint.load_checkpoint(accelerator, checkpoint.latest_checkpoint(out)) if cfg.resume else 0
    if accelerator.is_main_process:
        write_json(out / "train_config.json", run_record(cfg, accelerator.unwrap_model(model)), indent=2)
    if trackers:
        accelerator.init_trackers("gateskip")
    log = MetricsLog(accelerator, out / "metrics.jsonl", start)

    step = start
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not accelerator.is_local_main_process)
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            metrics = train_step(accelerator, model, optimizer, scheduler, train_blocks, cfg, step, teacher, schedule)
            step += 1
            metrics["tokens_per_s"] = metrics.pop("tokens") / (time.perf_counter() - t0)
            log.write({"step": step, **metrics})
            _stop_if_not_finite(accelerator, model, metrics["loss"], step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss' if cfg.objective in LOCAL_OBJECTIVES else 'lm']:.3f}", sparsity=f"{metrics['sparsity']:.3f}",
                            gate=f"{metrics['mean_gate']:.3f}", skip=f"{metrics['skip_ratio']:.2f}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}")
            out_of_time = bool(cfg.max_minutes) and step < cfg.steps and _past(accelerator, deadline)
            if out_of_time:
                accelerator.print(f"time limit of {cfg.max_minutes} min reached at step {step} of {cfg.steps}")
            if len(val_blocks) and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps or out_of_time):
                val = validate(accelerator, model, val_blocks, cfg, val_budget)
                log.write({"step": step, **val})
                accelerator.print(f"step {step}: val loss {val['val_loss']:.4f}, ppl {val['val_ppl']:.2f} "
                                  f"at {'net saving' if cfg.allocation else 'skip'} {val['val_skip_ratio']:.2f}")
            if (cfg.save_every and step % cfg.save_every == 0) or out_of_time:
                checkpoint.save_checkpoint(accelerator, out, step, cfg.keep_checkpoints)
            if out_of_time:
                break
    except KeyboardInterrupt:
        # One process can save alone; with several, a collective save could hang on a dead peer.
        if accelerator.num_processes == 1 and step > start:
            accelerator.print(f"interrupted: saving step {step} to resume from")
            checkpoint.save_checkpoint(accelerator, out, step, cfg.keep_checkpoints)
        raise
    finally:
        bar.close()
    recalibration = train_blocks.select(torch.arange(min(len(train_blocks), 16))) if cfg.init_gates else None
    final = export(accelerator, model, tokenizer, cfg, out / "final", base_copy, recalibration)
    accelerator.end_training()
    return final


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
