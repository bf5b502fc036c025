"""pass@1 of a tiny model on a tiny code task through the real entry points: `gateskip eval`,
`lm_eval --model gateskip`, and `lm_eval --model vllm` on a gated folder.

The model's output layer is zero, so every logit ties and greedy decoding picks id 0, which this
tokenizer makes its end of text: every answer is empty. The task is MBPP's own YAML with two
problems of its own, scored by the real filter in the sandbox: one whose assert holds without
any code (passes) and one that calls the function the answer should have defined (fails). So
pass@1 is 0.5 only when generation stops, the code is extracted, the programs run in the sandbox
and the metric is aggregated as it should be."""

from __future__ import annotations

import argparse
import json
import shutil
from importlib import resources
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager

from conftest import tiny_model
from gateskip import GateConfig, add_gates, save_gates
from gateskip.errors import GateSkipError
from gateskip.evaluation import cli
from gateskip.evaluation.sweep import RESULTS, TABLE
from gateskip.inference.calibrate import calibrate_allocation
from test_eval_harness import char_tokenizer

TEMPLATES = Path(str(resources.files("gateskip") / "tasks"))
TASK = "tiny_code"
PROBLEMS = [
    {"task_id": 1, "text": "Write a function that returns True.", "test_list": ["assert 1 + 1 == 2"],
     "test_setup_code": "", "code": "def yes():\n    return True\n"},
    {"task_id": 2, "text": "Write a function add(a, b) that adds two numbers.", "test_list": ["assert add(1, 2) == 3"],
     "test_setup_code": "", "code": "def add(a, b):\n    return a + b\n"},
]
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?:+-=()[]_'`\n"


def silent_model(**overrides):
    """A tiny Llama (head size 32, as vLLM's CPU attention needs) whose every next token is id 0."""
    model = tiny_model("llama", hidden_size=128, intermediate_size=192, tie_word_embeddings=False,
                       max_position_embeddings=2048, **overrides)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id, config.bos_token_id = 0, 0, None
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """The model plain (base/), with unit gates and an allocation (gated/), its gates alone (gates/),
    and the task folder: MBPP's YAML over two problems, code_tasks.py beside it."""
    root = tmp_path_factory.mktemp("code_entry")
    tok = char_tokenizer(CHARS, eos_first=True)  # the end of text is id 0, what a zero output layer picks
    model = silent_model()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    add_gates(model, GateConfig(kind="lowrank", rank=8, application="unit", skip_bos=False, init_std=0.3))
    allocations = {"0.3": {"ratios": {"attn.0": 0.5, "mlp.0": 0.4, "attn.1": 1.0, "mlp.1": 0.0}, "saving": 0.3}}
    ids = torch.randint(2, len(CHARS) + 2, (2, 32), generator=torch.Generator().manual_seed(0))
    calibrate_allocation(model, (ids, torch.ones_like(ids)), allocations)
    model.gate_bank.allocations = allocations
    save_gates(model, root / "gates")
    model.save_pretrained(root / "gated")
    tok.save_pretrained(root / "gated")

    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "problems.jsonl").write_text("".join(json.dumps({"doc": p}) + "\n" for p in PROBLEMS))
    yaml = (TEMPLATES / "mbpp.yaml").read_text().replace("task: mbpp", f"task: {TASK}")
    yaml = yaml.replace("unsafe_code: true\n", "")  # a user's own task: no lm-eval confirmation asked
    data_line = next(line for line in yaml.splitlines() if "test: " in line and "requests.jsonl.gz" in line)
    yaml = yaml.replace(data_line, f"    test: {tasks / 'problems.jsonl'}")
    (tasks / f"{TASK}.yaml").write_text(yaml)
    shutil.copy(TEMPLATES / "code_tasks.py", tasks)
    return {"base": root / "base", "gated": root / "gated", "gates": root / "gates", "tasks": tasks}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(["eval", *argv])


def test_gateskip_eval(assets, tmp_path):
    out = tmp_path / "sweep"
    args = eval_args(str(assets["base"]), "--tasks", TASK, "--include-path", str(assets["tasks"]), "--out", str(out),
                     "--gates", str(assets["gates"]), "--method", "gateskip", "--budgets", "0,0.3")
    assert cli.run(args) == 0
    records = json.loads((out / RESULTS).read_text())["records"]
    assert {(r["method"], r["budget"]) for r in records} >= {("gateskip", 0.0), ("gateskip", 0.3)}
    assert {(r["metric"], r["filter"], r["value"]) for r in records} == {("pass@1", "sandbox", 0.5)}
    assert "pass@1" in (out / TABLE).read_text()


def test_gateskip_eval_runs_the_bundled_mbpp_without_asking(assets, tmp_path):
    """The bundled code tasks run in gateskip's sandbox, so `gateskip eval` confirms lm-eval's
    unsafe-code question for them; the silent model's empty answers pass none."""
    out = tmp_path / "sweep"
    args = eval_args(str(assets["base"]), "--tasks", "mbpp", "--limit", "2", "--method", "base", "--budgets", "0",
                     "--out", str(out))
    assert cli.run(args) == 0
    records = json.loads((out / RESULTS).read_text())["records"]
    assert [(r["metric"], r["value"]) for r in records] == [("pass@1", 0.0)]


def test_a_target_without_a_stored_allocation_fails_before_the_first_point(assets, tmp_path):
    out = tmp_path / "sweep"
    args = eval_args(str(assets["base"]), "--tasks", TASK, "--include-path", str(assets["tasks"]), "--out", str(out),
                     "--gates", str(assets["gates"]), "--method", "gateskip", "--budgets", "0.3,0.5")
    with pytest.raises(GateSkipError, match="no allocation stored for a net saving of 0.5"):
        cli.run(args)
    assert not (out / RESULTS).exists()


def test_chat_template_needs_a_tokenizer_that_has_one(assets, tmp_path):
    args = eval_args(str(assets["base"]), "--tasks", TASK, "--include-path", str(assets["tasks"]),
                     "--out", str(tmp_path / "sweep"), "--method", "base", "--chat-template")
    with pytest.raises(GateSkipError, match="has no chat template"):
        cli.run(args)


def test_lm_eval_model_gateskip(assets):
    result = lm_eval.simple_evaluate(
        model="gateskip", model_args={"pretrained": str(assets["base"]), "gates": str(assets["gates"]), "budget": 0.3},
        tasks=[TASK], task_manager=TaskManager(include_path=str(assets["tasks"]), include_defaults=False),
        verbosity="WARNING")
    assert result["results"][TASK]["pass@1,sandbox"] == 0.5
    assert result["config"]["gateskip"]["tokens"] > 0


def test_lm_eval_model_vllm_on_a_gated_folder(assets, monkeypatch):
    from lm_eval.models.vllm_causallms import VLLM

    from gateskip.serving import skip_report

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("GATESKIP_TARGET", "0.3")
    lm = VLLM(pretrained=str(assets["gated"]), enforce_eager=True, dtype="float32", max_model_len=1024,
              worker_extension_cls="gateskip.serving.worker.GateSkipWorker")
    result = lm_eval.simple_evaluate(
        model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(assets["tasks"]), include_defaults=False),
        verbosity="WARNING")
    assert result["results"][TASK]["pass@1,sandbox"] == 0.5
    assert skip_report(lm.model)["target"] == 0.3
