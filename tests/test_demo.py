"""The main job (`gateskip demo --quick`) end to end on a tiny local model with the bundled tokenizer."""

import json
import shutil

import pytest
import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from gateskip import GateSkipError
from gateskip.cli import main
from gateskip.demo.job import QUICK, Job, JobSizes, check_allocations, choose_gates


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


@pytest.mark.slow  # training, an allocation search and lm-eval: a few minutes on 2 busy cores
def test_quick_job_writes_the_report_and_reuses_it(tiny_folder, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--model", str(tiny_folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "summary" in printed and "budget 0 == base" in printed and "ShortGPT" in printed
    assert "free generation" in printed and "prefill speedup" in printed and "anchor" in printed

    for name in ("report.md", "summary.json", "speed.json", "samples.json", "job.json", "gates.json",
                 "data/heldout.jsonl.gz", "data/train.jsonl.gz", "gates/gateskip.safetensors",
                 "proxy/proxy.json", "proxy/proxy.png", "proxy/allocations.png", "tasks/results.json",
                 "tasks/accuracy_vs_compute.png", "analysis/analysis.md", "analysis/importance_heatmap.png",
                 "analysis/skip_pattern.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"]["steps"] == QUICK.train_steps
    assert not any(stage["reused"] for stage in summary["stages"].values())

    # The job's own gates carry an allocation per target; at 0 the unit gates are the base, bit for bit.
    proxy = summary["proxy"]
    assert proxy["budget_zero"] == {**proxy["budget_zero"], "identical": True, "max_abs_diff": 0.0, "application": "unit"}
    gate_curve = {round(p["net_saving"], 6): p for p in proxy["curves"]["gateskip"]}
    assert gate_curve[0.0]["kl"] == 0.0 and gate_curve[0.0]["loss"] == proxy["curves"]["base"][0]["loss"]
    assert gate_curve[0.0]["agreement"] == 1.0  # decoding thresholds at 0: the base's greedy tokens
    assert {"base", "shortgpt", "random", "gateskip", "gateskip (equal share)"} <= set(proxy["curves"])
    for t in QUICK.targets:  # the allocation meets its target on the held-out text (prediction: search text)
        assert min(abs(s - t) for s in gate_curve) < 0.05

    records = summary["tasks"]
    points = {(r["method"], r["budget"]) for r in records}
    assert points == ({("base", 0.0)} | {(m, t) for m in ("gateskip", "shortgpt") for t in QUICK.targets}
                      | {("random", t) for t in QUICK.random_targets})
    assert all(r["stderr"] is not None for r in records if r["metric"] == "acc")
    verdict = summary["verdict"]
    assert verdict[0].startswith("budget 0 == base") and "bit for bit" in verdict[0]
    assert all(any(line.startswith(f"{100 * t:.1f}% net saving") for line in verdict) for t in QUICK.targets)
    assert any("combined standard error" in line for line in verdict)

    samples = summary["samples"]
    assert {(s["method"], s["target"]) for s in samples} == (
        {("base", 0.0)} | {(m, t) for m in ("gateskip", "shortgpt") for t in QUICK.sample_targets})
    prefill = {r["target"]: r for r in summary["speed"]["prefill"]["rows"]}
    assert prefill[0.0]["net_saving"] == 0.0 and prefill[0.3]["net_saving"] == pytest.approx(0.3, abs=0.05)
    report = (out / "report.md").read_text()
    for section in ("## Verdict", "## Proxy", "## Tasks", "## Free generation", "## Speed", "## Gate analysis"):
        assert section in report, section

    # A rerun in the same folder reuses every stage instead of recomputing it.
    assert main(["demo", "--quick", "--model", str(tiny_folder), "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert all(stage["reused"] for stage in again["stages"].values())
    for name, stage in again["stages"].items():  # a reused stage reports what it cost when it ran
        assert stage["seconds"] == summary["stages"][name]["seconds"]

    # Training resumed from its last checkpoint (nothing retrained) makes the same gates: the
    # allocation is searched again, and finds the same, so the later results stay.
    shutil.rmtree(out / "train" / "final")
    assert main(["demo", "--quick", "--model", str(tiny_folder), "--out", str(out)]) == 0
    third = json.loads((out / "summary.json").read_text())
    assert not third["stages"]["train gates"]["reused"] and not third["stages"]["allocate"]["reused"]
    assert third["stages"]["proxy"]["reused"] and third["training"] == summary["training"]


def _gate_file(folder, allocations, out):
    """A gate file for the tiny model with the given allocations (no training), in `out`."""
    from gateskip import GateConfig, add_gates, save_gates
    from gateskip.loading import load_model

    model = load_model(str(folder))[0]
    add_gates(model, GateConfig(kind="scalar", application="unit"))
    model.gate_bank.allocations.update(allocations)
    return save_gates(model, out / "gates")


def test_gates_that_cannot_be_evaluated_are_refused_in_one_line(tiny_folder, tmp_path):
    with pytest.raises(GateSkipError, match="no gate file there"):
        choose_gates("smollm2-135m", tmp_path / "missing", train_here=False)
    assert choose_gates(str(tiny_folder), None, train_here=False) is None  # another model: trained here
    file = _gate_file(tiny_folder, {}, tmp_path)
    with pytest.raises(GateSkipError, match="holds no allocations; run `gateskip allocate"):
        check_allocations(file, "m", QUICK.targets)
    file = _gate_file(tiny_folder, {"0.1": {"ratios": {}, "saving": 0.1, "kl": 0.0, "thresholds": {}}}, tmp_path)
    with pytest.raises(GateSkipError, match="needs allocations for net savings 0.2, 0.3 .* --targets 0.2 0.3`"):
        check_allocations(file, "m", QUICK.targets)


def test_changed_gates_make_later_results_stale(tiny_folder, tmp_path):
    file = _gate_file(tiny_folder, {}, tmp_path)
    job = Job("m", tmp_path, QUICK, Console())
    job.check_gates({"evaluated": file})
    (tmp_path / "speed.json").write_text("{}")
    job = Job("m", tmp_path, QUICK, Console())
    job.check_gates({"evaluated": file})  # the same gates: results stay
    assert job.reusable(tmp_path / "speed.json")
    _gate_file(tiny_folder, {"0.1": {"ratios": {}, "saving": 0.1, "kl": 0.0}}, tmp_path)  # regenerated in place
    job = Job("m", tmp_path, QUICK, Console())
    job.check_gates({"evaluated": file})
    assert not job.reusable(tmp_path / "speed.json") and not (tmp_path / "speed.json").exists()


def test_a_folder_of_another_size_is_refused(tmp_path):
    Job("some-model", tmp_path, QUICK, Console())
    Job("some-model", tmp_path, QUICK, Console())  # the same job may continue
    with pytest.raises(GateSkipError, match="another --out"):
        Job("some-model", tmp_path, JobSizes(), Console())
    with pytest.raises(GateSkipError, match="another --out"):
        Job("other-model", tmp_path, QUICK, Console())
    with pytest.raises(GateSkipError, match="another --out"):
        Job("some-model", tmp_path, QUICK, Console(), gates="gates/other.safetensors")


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["demo", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads: must be at least 1" in capsys.readouterr().err
    assert main(["demo", "--items", "0", "--out", str(tmp_path)]) == 2
    assert "--items: must be at least 1" in capsys.readouterr().err
    assert main(["demo", "--gates", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "no gate file there" in capsys.readouterr().err
