"""The trainer on a tiny model: it learns, the sparsity term closes gates, modes train what they
say, an interrupted run resumes to the same parameters, DDP runs, bad inputs fail clearly."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import gateskip.training.loop as train_module
from gateskip import GateConfig, SkipPlan, add_gates, load_gates, save_gates
from gateskip.search.allocation import store
from gateskip.inference.calibrate import calibrate_allocation
from gateskip.errors import GateSkipError
from gateskip.loading import load_model
from gateskip.data.textdata import bundled_documents
from gateskip.training import TrainConfig, train
from gateskip.training.command import main
from gateskip.training.loop import batch_indices

from test_textdata import char_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama with a character tokenizer saved as an HF folder, and a page of Shakespeare."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=128, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    text = next(doc[0][0] for doc in bundled_documents() if "Prospero" in doc[0][0])
    (root / "text.txt").write_text(text[:20_000])
    return {"model": str(root / "model"), "text": str(root / "text.txt")}


def config(assets, run_dir, **overrides) -> TrainConfig:
    base = dict(model=assets["model"], data=[assets["text"]], out=str(run_dir), steps=30, seq_len=32, batch_size=4,
                lr=1e-3, gate_lr=1e-2, sparsity_weight=1.0, ramp_steps=10, eval_blocks=4)
    return TrainConfig(**{**base, **overrides})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(out) -> dict[str, torch.Tensor]:
    [ckpt] = sorted((Path(out) / "checkpoints").glob("step-*"))[-1:]
    return load_file(ckpt / "model.safetensors")


def test_loss_falls_and_the_sparsity_weight_closes_gates(assets, tmp_path):
    train(config(assets, tmp_path / "sparse", sparsity_weight=1.0))
    train(config(assets, tmp_path / "dense", sparsity_weight=0.0))
    sparse, dense = (([m for m in metrics(tmp_path / r) if "lm" in m]) for r in ("sparse", "dense"))
    first = sum(m["lm"] for m in sparse[:5]) / 5
    last = sum(m["lm"] for m in sparse[-5:]) / 5
    assert last < first - 0.3
    assert sparse[-1]["mean_gate"] < sparse[0]["mean_gate"] - 0.3
    assert dense[-1]["mean_gate"] > sparse[-1]["mean_gate"] + 0.3
    assert sparse[-1]["skip_ratio"] == pytest.approx(0.2)
    val = [m for m in metrics(tmp_path / "sparse") if "val_loss" in m]
    assert val and val[-1]["val_skip_ratio"] == 0.2 and val[-1]["val_ppl"] > 1


def test_skip_ratio_ramps_linearly_then_holds():
    cfg = TrainConfig(steps=100, ramp_steps=10, target_skip=0.3)
    assert [cfg.skip_ratio(s) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.15, 0.3, 0.3])
    assert TrainConfig(steps=100).skip_ratio(25) == pytest.approx(0.1)  # the default ramp: half the steps


def test_processes_read_disjoint_batches_and_the_order_depends_only_on_the_step():
    cfg = TrainConfig(batch_size=3, grad_accum=2, seed=1)
    a = batch_indices(cfg, 50, step=4, micro=1, rank=0, world=2)
    b = batch_indices(cfg, 50, step=4, micro=1, rank=1, world=2)
    assert not set(a.tolist()) & set(b.tolist())
    assert torch.equal(a, batch_indices(cfg, 50, step=4, micro=1, rank=0, world=2))


def test_frozen_mode_changes_only_gates(assets, tmp_path):
    final = train(config(assets, tmp_path, mode="frozen", steps=5, save_every=5))
    assert sorted(p.name for p in final.iterdir()) == ["gateskip.safetensors", "train_config.json"]
    original = load_file(Path(assets["model"]) / "model.safetensors")
    trained = checkpoint_tensors(tmp_path)
    for name, tensor in original.items():
        assert torch.equal(trained[name], tensor), name
    biases = [t for n, t in trained.items() if n.startswith("gate_bank.") and n.endswith("up.bias")]
    assert biases and all(not torch.allclose(b, torch.full_like(b, 5.0)) for b in biases)


def test_the_influence_objective_trains_unit_gates_that_leave_the_base_intact(assets, tmp_path):
    final = train(config(assets, tmp_path, mode="frozen", objective="influence", steps=40, gate_lr=3e-2))
    losses = [m["loss"] for m in metrics(tmp_path) if "loss" in m]
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5])  # gates start at 0.5 (MSE about 1/12) and learn the order
    model, _ = load_model(assets["model"])
    ids = torch.randint(0, 100, (2, 16))
    reference = model(ids).logits
    load_gates(model, final)
    assert model.gate_bank.config.application == "unit"
    with torch.no_grad():
        assert torch.equal(model(ids, skip_plan=SkipPlan(budget=0.0)).logits, reference)
        assert not torch.equal(model(ids, skip_plan=SkipPlan(budget=0.5)).logits, reference)


def test_training_under_an_allocation_leaves_removed_modules_alone_and_recalibrates(assets, tmp_path):
    # Gates with one allocation: attention of layer 0 removed, the MLP of layer 1 half skipped.
    model, _ = load_model(assets["model"])
    add_gates(model, GateConfig(application="unit", init_bias=0.0))
    ids = torch.randint(0, 100, (4, 32))
    store(model.gate_bank, {"0.1": {"ratios": {"attn.0": 1.0, "mlp.1": 0.5}, "saving": 0.1, "kl": 0.0}})
    calibrate_allocation(model, (ids, torch.ones_like(ids)), model.gate_bank.allocations)
    stale = dict(model.gate_bank.allocations["0.1"]["thresholds"])
    save_gates(model, tmp_path / "init")
    before = load_file(tmp_path / "init" / "gateskip.safetensors")

    final = train(config(assets, tmp_path / "run", mode="frozen", steps=6, init_gates=str(tmp_path / "init"),
                         allocation=[0.1], sparsity_weight=0.0, distill_weight=1.0))
    after = load_file(final / "gateskip.safetensors")
    moved = {".".join(name.split(".")[1:3]) for name in before if not torch.equal(before[name], after[name])}
    assert "mlp.1" in moved and "attn.0" not in moved  # a removed module evaluates no gate: nothing to learn
    assert all(m["skip_ratio"] == 0.1 for m in metrics(tmp_path / "run") if "lm" in m)
    load_gates(model, final)
    entry = model.gate_bank.allocations["0.1"]
    assert entry["ratios"] == {"attn.0": 1.0, "mlp.1": 0.5} and entry["thresholds"].keys() == stale.keys()
    assert entry["thresholds"] != stale  # calibrated again for the trained gates
    # the record names the gates it trained (the initial file's), not the command's gate defaults
    for record in (final / "train_config.json", tmp_path / "run" / "train_config.json"):
        saved = json.loads(record.read_text())
        assert saved["gates"]["application"] == "unit" and saved["gates"]["init_bias"] == 0.0  # a fresh start: 5.0


def test_a_gated_model_folder_trains_fresh_gates(assets, tmp_path):
    model, tokenizer = load_model(assets["model"])
    add_gates(model, GateConfig(kind="scalar", application="unit")).save_pretrained(tmp_path / "gated")
    tokenizer.save_pretrained(tmp_path / "gated")
    final = train(config(assets, tmp_path / "run", model=str(tmp_path / "gated"), mode="frozen", steps=1))
    load_gates(model, final)
    assert model.gate_bank.config.kind == "lowrank"  # the run's own gate options, not the folder's


def test_an_allocation_needs_gates_that_store_it(assets, tmp_path):
    with pytest.raises(GateSkipError, match="--init-gates"):
        config(assets, tmp_path, allocation=[0.1])
    for bad in (-1.0, 1.0, float("nan")):
        with pytest.raises(GateSkipError, match="net saving in"):
            config(assets, tmp_path, allocation=[bad], init_gates="x")
    model, _ = load_model(assets["model"])
    save_gates(add_gates(model, GateConfig(application="unit")), tmp_path / "bare")
    with pytest.raises(GateSkipError, match="no allocation for 0.1"):
        train(config(assets, tmp_path / "run", mode="frozen", init_gates=str(tmp_path / "bare"), allocation=[0.1]))


def test_lora_mode_changes_only_gates_and_adapters(assets, tmp_path):
    final = train(config(assets, tmp_path, mode="lora", steps=5, save_every=5, lora_rank=4))
    original = load_file(Path(assets["model"]) / "model.safetensors")
    trained = checkpoint_tensors(tmp_path)
    adapters = {n: t for n, t in trained.items() if "lora_" in n}
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in adapters.items())  # B starts at zero
    backbone = {n.replace("base_model.model.", "").replace(".base_layer", ""): t
                for n, t in trained.items() if "lora_" not in n and "gate_bank." not in n}
    assert backbone.keys() == original.keys()
    assert all(torch.equal(backbone[n], t) for n, t in original.items())
    gate_biases = [t for n, t in trained.items() if "gate_bank." in n and n.endswith("up.bias")]
    assert gate_biases and all(not torch.allclose(b, torch.full_like(b, 5.0)) for b in gate_biases)
    # The export is the adapter in PEFT's format beside the gates (no copy of the model);
    # load_gates on the base merges it, and the result computes what the trained model did.
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "gateskip.safetensors"} <= names
    assert not any(n.startswith("model") for n in names)  # no copy of the backbone
    model, _ = load_model(assets["model"])
    load_gates(model, final)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, original["model.layers.0.self_attn.q_proj.weight"])
    merged = {n: t for n, t in model.state_dict().items() if "gate_bank." not in n}
    for name, tensor in merged.items():
        a = trained[f"base_model.model.{name.replace('.weight', '.base_layer.weight')}"] if "proj" in name else None
        if a is not None and f"base_model.model.{name.replace('.weight', '.lora_A.default.weight')}" in trained:
            lora_a = trained[f"base_model.model.{name.replace('.weight', '.lora_A.default.weight')}"]
            lora_b = trained[f"base_model.model.{name.replace('.weight', '.lora_B.default.weight')}"]
            assert torch.allclose(tensor, a + 2.0 * lora_b @ lora_a, atol=1e-6), name  # alpha / r = 2
    load_gates(model, final)  # the same adapter again: not merged twice
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, merged["model.layers.0.self_attn.q_proj.weight"])
    other = train(config(assets, tmp_path / "frozen", mode="frozen", steps=1))
    with pytest.raises(GateSkipError, match="load the base model again"):
        load_gates(model, other)


def _fail_at(monkeypatch, at_step: int, error: type[BaseException]):
    real = train_module.train_step

    def step(accelerator, model, optimizer, scheduler, blocks, cfg, step, *rest):
        if step == at_step:
            raise error("simulated interruption")
        return real(accelerator, model, optimizer, scheduler, blocks, cfg, step, *rest)

    monkeypatch.setattr(train_module, "train_step", step)


@pytest.mark.parametrize("error, save_every", [(RuntimeError, 3), (KeyboardInterrupt, 0)])
def test_interrupted_and_resumed_run_ends_with_the_same_parameters(assets, tmp_path, monkeypatch, error, save_every):
    """A crash after a periodic checkpoint, or Ctrl-C (which saves the last finished step)."""
    common = dict(steps=7, grad_accum=2, save_every=save_every, distill_weight=0.5, ramp_steps=4, warmup_steps=2)
    whole = train(config(assets, tmp_path / "whole", **common))
    with monkeypatch.context() as m:
        _fail_at(m, at_step=5, error=error)
        with pytest.raises(error):
            train(config(assets, tmp_path / "cut", **common))
    (tmp_path / "cut" / "checkpoints" / ".tmp-step-00000006").mkdir()  # a save killed half-way is ignored
    resumed = train(config(assets, tmp_path / "cut", resume=True, **common))
    for name in ("model.safetensors", "gateskip.safetensors"):
        a, b = load_file(whole / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps_logged = [m["step"] for m in metrics(tmp_path / "cut") if "lm" in m]
    assert steps_logged == list(range(1, 8))  # nothing logged twice after the resume


def test_a_time_limit_stops_validates_checkpoints_and_exports(assets, tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 50))  # each reading 50 s later: 4 steps pass the 3-minute limit
    monkeypatch.setattr(train_module.time, "monotonic", lambda: float(next(clock)))
    final = train(config(assets, tmp_path / "run", steps=30, max_minutes=3))
    logged = metrics(tmp_path / "run")
    trained = [m["step"] for m in logged if "lm" in m]
    assert 1 <= len(trained) < 30 and trained == list(range(1, len(trained) + 1))
    assert "val_loss" in logged[-1] and logged[-1]["step"] == trained[-1]
    assert (final / "gateskip.safetensors").exists()
    resumed = train(config(assets, tmp_path / "run", steps=30, resume=True, max_minutes=10_000))
    assert [m["step"] for m in metrics(tmp_path / "run") if "lm" in m] == list(range(1, 31))
    assert (resumed / "gateskip.safetensors").exists()


def test_accelerate_launch_with_two_cpu_processes_trains_and_saves_a_loadable_model(assets, tmp_path):
    out = tmp_path / "ddp"
    # accelerate 1.15 starts one process for `--cpu --num_processes 2` (several only through mpirun);
    # its torchrun launcher with ACCELERATE_USE_CPU=1 starts two that talk over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "gateskip.training", assets["model"],
           "--data", assets["text"], "--out", str(out), "--steps", "4", "--seq-len", "32", "--batch-size", "2",
           "--eval-blocks", "4", "--save-every", "2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # accelerate's save_state writes one RNG state per process: two files, or it was one process
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 2
    for ckpt in checkpoints:
        assert sorted(p.name for p in ckpt.glob("random_states*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    # only the main process writes final/, so only it says so
    assert [line for line in done.stdout.splitlines() if line.startswith("saved ")] == [f"saved {out / 'final'}"]
    model, tok = load_model(str(out / "final"))
    load_gates(model, out / "final")
    ids = torch.tensor([tok("To be, or not to be")["input_ids"]])
    assert torch.isfinite(model(ids, skip_plan=SkipPlan(budget=0.2)).logits).all()
    tokens = [m["tokens_per_s"] for m in metrics(out) if "lm" in m]
    assert len(tokens) == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (lambda p: dict(data=[str(p / "missing.txt")]), "training data not found"),
        (lambda p: dict(data=[str(p / "empty.txt")]), "holds no text"),
        (lambda p: dict(seq_len=512), "exceeds the model's context of 128"),
        (lambda p: dict(out=str(p / "file" / "run")), "not writable"),
        (lambda p: dict(resume=True), "nothing to resume"),
        (lambda p: dict(max_minutes=0), "max minutes must be positive"),
        (lambda p: dict(objective="influence"), "use --mode frozen --gate-application unit"),
    ],
)
def test_bad_inputs_give_clear_errors(assets, tmp_path, overrides, message):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(GateSkipError, match=message):
        train(config(assets, tmp_path / "run", **overrides(tmp_path)))


def test_unknown_loss_kind_and_mode_are_refused_before_any_work():
    with pytest.raises(GateSkipError, match="unknown sparsity loss 'l3'"):
        TrainConfig(sparsity_loss="l3")
    with pytest.raises(GateSkipError, match="unknown mode 'half'"):
        TrainConfig(mode="half")


def test_command_line_prints_one_line_errors(assets, tmp_path, capsys):
    code = main([assets["model"], "--data", assets["text"], "--out", str(tmp_path), "--resume"])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: nothing to resume")


def test_a_second_run_into_the_same_folder_is_refused(assets, tmp_path):
    train(config(assets, tmp_path, steps=2, save_every=2))
    with pytest.raises(GateSkipError, match="--resume"):
        train(config(assets, tmp_path, steps=2))
    with pytest.raises(GateSkipError, match="options changed since it started: seq_len"):
        train(config(assets, tmp_path, steps=4, seq_len=16, resume=True))


def test_the_gate_trace_survives_the_argument_copies_of_ddp_and_fsdp():
    """DDP on GPUs and FSDP pass forward's kwargs through _apply_to_tensors, which rebuilds dataclasses."""
    from torch.distributed.utils import _apply_to_tensors

    from conftest import tiny_model
    from gateskip import GateConfig, add_gates
    from gateskip.data.textdata import Blocks

    model = add_gates(tiny_model(), GateConfig(kind="lowrank", rank=4))
    real_forward = model.forward

    def forward_as_wrappers_see_it(**kwargs):
        return real_forward(**_apply_to_tensors(lambda t: t, kwargs))

    model.forward = forward_as_wrappers_see_it
    ids = torch.randint(0, 100, (2, 8))
    batch = Blocks(ids, torch.ones_like(ids), ids)
    terms = train_module.loss_terms(model, batch, TrainConfig(), skip=0.2, teacher=None)
    assert terms.sparsity > 0.5


@pytest.mark.slow
def test_bundled_model_trains_gates_on_the_bundled_text(tmp_path):
    """The offline default end to end: smollm2-135m, Shakespeare, frozen backbone, a few steps."""
    final = train(TrainConfig(model="smollm2-135m", out=str(tmp_path), mode="frozen", steps=3, seq_len=64,
                              batch_size=1, max_tokens=5_000, eval_blocks=2, ramp_steps=100))
    model, _ = load_model("smollm2-135m")
    load_gates(model, final)
    records = [m for m in metrics(tmp_path) if "lm" in m]
    assert len(records) == 3 and all(math.isfinite(m["lm"]) and m["lm"] < 6 for m in records)  # uniform: 10.8
