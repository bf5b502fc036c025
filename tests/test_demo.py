"""The main job (`gateskip demo --quick`) end to end on a tiny local model with the bundled tokenizer."""

import json
import shutil

import pytest
import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from gateskip import GateSkipError
from gateskip.cli import main
from gateskip.demo import QUICK, Job, JobSizes


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 2-layer random Llama saved with the bundled SmolLM2 tokenizer, as a user's local folder."""
    from gateskip.loading import load_model

    torch.set_num_threads(1)
    tokenizer = load_model("smollm2-135m")[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow  # a training loop and lm-eval: about a minute on 2 busy cores
def test_quick_job_writes_the_report_and_reuses_it(tiny_folder, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--model", str(tiny_folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "summary" in printed and "prefill speedup" in printed and "anchor" in printed

    for name in ("report.md", "summary.json", "benchmarks.json", "job.json", "gates/gateskip.safetensors",
                 "sweep/results.json", "sweep/accuracy_vs_compute.png", "analysis/analysis.md",
                 "analysis/importance_heatmap.png", "analysis/skip_pattern.png", "analysis/thresholds.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"]["steps"] == QUICK.train_steps
    assert not any(stage["reused"] for stage in summary["stages"].values())
    records = json.loads((out / "sweep/results.json").read_text())["records"]
    points = {(r["method"], r["budget"]) for r in records}
    assert points == {("base", 0.0)} | {(m, b) for m in ("gateskip", "random") for b in QUICK.budgets}
    prefill = {r["budget"]: r for r in summary["benchmarks"]["prefill"]["rows"]}
    assert prefill[0.5]["skip_fraction"] == pytest.approx(0.5, abs=0.05)
    report = (out / "report.md").read_text()
    assert "## Accuracy vs compute" in report and "## Speed" in report and "## Gate analysis" in report

    # A rerun in the same folder reuses every stage instead of recomputing it.
    assert main(["demo", "--quick", "--model", str(tiny_folder), "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert all(stage["reused"] for stage in again["stages"].values())
    for name, stage in again["stages"].items():  # a reused stage reports what it cost when it ran
        assert stage["seconds"] == summary["stages"][name]["seconds"]

    # Gates made anew (here: training resumed from its last checkpoint) make every later result stale.
    shutil.rmtree(out / "train" / "final")
    assert main(["demo", "--quick", "--model", str(tiny_folder), "--out", str(out)]) == 0
    third = json.loads((out / "summary.json").read_text())
    assert not any(stage["reused"] for stage in third["stages"].values())
    assert third["training"] == summary["training"]  # resumed at the last step: nothing retrained
    assert again["benchmarks"] == summary["benchmarks"]


def test_a_folder_of_another_size_is_refused(tmp_path):
    Job("some-model", tmp_path, QUICK, Console())
    Job("some-model", tmp_path, QUICK, Console())  # the same job may continue
    with pytest.raises(GateSkipError, match="another --out"):
        Job("some-model", tmp_path, JobSizes(), Console())
    with pytest.raises(GateSkipError, match="another --out"):
        Job("other-model", tmp_path, QUICK, Console())


def test_threads_must_be_positive(tmp_path, capsys):
    assert main(["demo", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
