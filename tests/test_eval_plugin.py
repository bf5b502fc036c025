"""`lm_eval --model gateskip`: the plugin through lm-eval's own Python API and CLI, on a tiny model and task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_model
from gateskip import GateConfig, SkipPlan, add_gates, save_gates
from gateskip.errors import GateSkipError
from gateskip.evaluation.harness import GatedLM
from test_eval_harness import char_tokenizer, loglik_requests

ITEMS = [
    {"question": "the sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "one plus one is", "choices": [" two", " three"], "answer": 0},
    {"question": "a cat sat on the", "choices": [" mat", " sky", " sea"], "answer": 0},
    {"question": "ice is", "choices": [" cold", " hot"], "answer": 0},
]
TASK = "gateskip_tiny_choice"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny base model folder, gates for it, the same model saved as a gated folder, and a task folder."""
    root = tmp_path_factory.mktemp("plugin")
    model, tokenizer = tiny_model(), char_tokenizer()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    add_gates(model, GateConfig(kind="vector"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.gate_bank.parameters():
            p.normal_(0.0, 0.3)
    save_gates(model, root / "gates")
    model.save_pretrained(root / "gated")
    tokenizer.save_pretrained(root / "gated")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
        "metadata:\n  version: 1.0\n"
    )
    return {"base": root / "base", "gates": root / "gates", "gated": root / "gated", "tasks": tasks}


def evaluate(assets, **model_args) -> dict:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(assets["tasks"]), include_defaults=False)
    return lm_eval.simple_evaluate(model="gateskip", model_args={"pretrained": str(assets["base"]), **model_args},
                                   tasks=[TASK], task_manager=manager, log_samples=True, verbosity="WARNING")


def choice_logliks(result: dict) -> torch.Tensor:
    """The log-likelihood of every choice of every item, as lm-eval logged them."""
    return torch.tensor([float(ll) for s in result["samples"][TASK] for ll, _ in s["filtered_resps"]])


def test_python_api_runs_the_gates_and_a_budget_changes_the_logliks(assets, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dense = evaluate(assets, gates=str(assets["gates"]), budget=0.0)
    skipping = evaluate(assets, gates=str(assets["gates"]), budget=0.5, batch_size=2)
    assert dense["config"]["gateskip"]["skip_fraction"] == 0.0
    report = skipping["config"]["gateskip"]
    assert report["method"] == "gateskip" and report["execution"] == "physical"
    assert 0.3 < report["skip_fraction"] < 0.6 and report["net_saving"] > 0 and report["tokens"] > 0
    assert (choice_logliks(skipping) - choice_logliks(dense)).abs().max() > 1e-3
    assert "acc,none" in skipping["results"][TASK]


def test_random_and_shortgpt_skip_without_the_gates(assets, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    text = tmp_path / "sample.txt"
    text.write_text("the sky is blue.\n\none plus one is two.\n\na cat sat on the mat.")
    for method in ("random", "shortgpt"):
        report = evaluate(assets, method=method, budget=0.34, sample_text=str(text))["config"]["gateskip"]
        assert report["method"] == method and report["skip_fraction"] > 0.2
        assert report["net_saving"] == pytest.approx(report["skip_fraction"], abs=0.15)  # no gate cost charged


def test_a_gated_folder_needs_no_gates_argument(assets):
    from lm_eval.api.registry import get_model

    lm = get_model("gateskip")(pretrained=str(assets["gated"]), budget=0.5)
    reference = GatedLM(lm.model, lm.tokenizer, batch_size=1)
    reference.use(SkipPlan(budget=0.5))
    ours = torch.tensor([ll for ll, _ in lm.loglikelihood(loglik_requests(), disable_tqdm=True)])
    assert torch.equal(ours, torch.tensor([ll for ll, _ in reference.loglikelihood(loglik_requests(), disable_tqdm=True)]))
    with pytest.raises(GateSkipError, match="needs gates"):
        get_model("gateskip")(pretrained=str(assets["base"]))
    with pytest.raises(GateSkipError, match="method="):
        get_model("gateskip")(pretrained=str(assets["gated"]), method="magic")


def test_a_lora_adapter_beside_the_gates_round_trips_through_the_plugin(assets, tmp_path):
    from lm_eval.api.registry import get_model

    base = tiny_model()
    torch.manual_seed(2)  # init_lora_weights=False: B is random, so the adapter changes the model
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "lora")
    merged = add_gates(peft.merge_and_unload(), GateConfig(kind="vector"))
    save_gates(merged, tmp_path / "lora")
    lm = get_model("gateskip")(pretrained=str(assets["base"]), gates=str(tmp_path / "lora"), budget=0.5)
    ids = torch.randint(2, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    plan = SkipPlan(budget=0.5)
    with torch.no_grad():
        assert torch.equal(lm.model(ids, skip_plan=plan).logits, merged(ids, skip_plan=plan).logits)
    q_proj = lm.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_proj, tiny_model().model.layers[0].self_attn.q_proj.weight)  # the adapter was merged


def test_lm_evals_own_cli_finds_the_plugin(assets, tmp_path):
    """A fresh interpreter that imports nothing of ours: the installed .pth registers the model type."""
    out = tmp_path / "out"
    cli = Path(sys.executable).parent / "lm_eval"
    args = f"pretrained={assets['gated']},budget=0.5,execution=masked,dtype=float32"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(cli), "--model", "gateskip", "--model_args", args, "--tasks", TASK, "--include_path",
                           str(assets["tasks"]), "--device", "cpu", "--batch_size", "2", "--output_path", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert TASK in done.stdout and "net FLOP saving" in done.stderr
    (written,) = out.rglob("results_*.json")
    report = json.loads(written.read_text())["config"]["gateskip"]
    assert report["execution"] == "masked" and 0.3 < report["skip_fraction"] < 0.6 and report["net_saving"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without a GPU")
def test_cuda_asked_for_on_a_machine_without_one_runs_on_the_cpu_with_a_warning(assets):
    """lm-eval's CLI asks for cuda:0 unless given --device: the README's line must still run here."""
    from lm_eval.api.registry import get_model

    with pytest.warns(UserWarning, match="no CUDA device for device=cuda:0"):
        lm = get_model("gateskip")(pretrained=str(assets["base"]), gates=str(assets["gates"]), device="cuda:0")
    assert next(lm.model.parameters()).device.type == "cpu"
    with pytest.raises(GateSkipError, match="unknown device 'banana'"):
        get_model("gateskip")(pretrained=str(assets["base"]), gates=str(assets["gates"]), device="banana")
