"""Sweeps end to end on a tiny model and a tiny local task: files, schema, budgets, resume, errors."""

import argparse
import json

import lm_eval
import pytest
import torch
from datasets import Dataset

from conftest import tiny_model
from gateskip import GateConfig, GateSkipError, add_gates, save_gates
from gateskip.evaluation import cli
from gateskip.search.baselines import make_method
from gateskip.evaluation.sweep import FIGURE, RECORD_KEYS, RESULTS, TABLE, Sweep, SweepSettings, parse_budgets, run_sweep
from test_eval_harness import char_tokenizer

TASK_YAML = """task: tiny_mc
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: {arrow}
output_type: multiple_choice
validation_split: validation
doc_to_text: "question: {{{{q}}}} answer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


GEN_YAML = """task: tiny_gen
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: {arrow}
output_type: generate_until
validation_split: validation
doc_to_text: "question: {{{{q}}}} answer:"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["#"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def tiny_task(tmp_path):
    """A 6-question multiple-choice task in a local Arrow file, and the folder of its YAML."""
    questions = ["what is one plus one", "what color is the sky", "what do cats say",
                 "how many legs has a dog", "what is two times three", "is ice cold"]
    choices = [["two", "three"], ["blue", "red"], ["meow", "moo"], ["four", "six"], ["six", "five"], ["yes", "no"]]
    data = tmp_path / "data"
    Dataset.from_dict({"q": questions, "choices": choices, "label": [0] * 6}).save_to_disk(str(data))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    arrow = next(data.glob("*.arrow"))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(arrow=arrow))
    (tasks / "tiny_gen.yaml").write_text(GEN_YAML.format(arrow=arrow))
    return tasks


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny-model"
    tiny_model().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def eval_args(model_dir, tasks, out, *extra):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(["eval", str(model_dir), "--tasks", "tiny_mc", "--include-path", str(tasks),
                              "--out", str(out), "--limit", "6", *extra])


@pytest.fixture
def sample_text(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text("the sky is blue and the sea is green.\n\none plus one is two, two plus two is four.\n")
    return path


def test_sweep_writes_results_table_and_plot(model_dir, tiny_task, tmp_path, sample_text):
    out = tmp_path / "sweep"
    args = eval_args(model_dir, tiny_task, out, "--fresh-gates", "vector", "--budgets", "0,0.25,0.5",
                     "--method", "gateskip,random,shortgpt,calm", "--sample-text", str(sample_text))
    assert cli.run(args) == 0

    saved = json.loads((out / RESULTS).read_text())
    records = saved["records"]
    assert saved["settings"]["limit"] == 6
    for r in records:
        assert set(r) == set(RECORD_KEYS)
        assert isinstance(r["value"], float) and 0.0 <= r["value"] <= 1.0
        assert 0.0 <= r["skip_fraction"] <= 1.0
    acc = [r for r in records if r["metric"] == "acc"]
    points = {(r["method"], r["budget"]) for r in acc}
    methods = ("gateskip", "random", "shortgpt", "calm")
    assert points == {("base", 0.0)} | {(m, b) for m in methods for b in (0.0, 0.25, 0.5)}
    for r in acc:
        if r["method"] in ("gateskip", "random"):  # per-sequence quantile: floor(budget * tokens) per sequence
            assert r["skip_fraction"] == pytest.approx(r["budget"], abs=0.06)
        if r["method"] == "shortgpt":  # whole layers out of 3
            assert r["skip_fraction"] == pytest.approx(round(r["budget"] * 3) / 3)
        if r["budget"] > 0:
            assert r["net_saving"] > 0 or r["method"] == "gateskip"  # vector gates cost 2d^2 per token
    calm = [r["skip_fraction"] for r in sorted(acc, key=lambda r: r["budget"]) if r["method"] == "calm"]
    assert calm[0] == 0 < calm[1] <= calm[2]  # thresholds set on other text: the measured share is what counts
    table = (out / TABLE).read_text()
    assert "| tiny_mc | shortgpt | 0.5 |" in table and "saved at 90% of base" in table
    assert (out / FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generative_task_skips_in_decoding_only_when_calibrated(model_dir, tiny_task, tmp_path, sample_text):
    points = {}
    for calibrate in (True, False):
        out = tmp_path / f"calibrated-{calibrate}"
        args = eval_args(model_dir, tiny_task, out, "--fresh-gates", "vector", "--method", "gateskip", "--budgets", "0.5",
                         "--sample-text", str(sample_text), *(["--calibrate"] if calibrate else []))
        args.tasks = "tiny_gen"
        assert cli.run(args) == 0
        records = json.loads((out / RESULTS).read_text())["records"]
        (points[calibrate],) = [r for r in records if r["method"] == "gateskip" and r["metric"] == "exact_match"]
    assert points[True]["decode"] == "calibrated thresholds in decoding"
    assert "single-token steps skip nothing" in points[False]["decode"]
    # 6 generated tokens (the stop string never occurs): uncalibrated, only the prompt's tokens skip
    assert 0.2 < points[True]["skip_fraction"] < 0.8  # thresholds from other text: near the target, not at it
    assert points[False]["skip_fraction"] < 0.5 * 0.9
    assert points[True]["skip_fraction"] > points[False]["skip_fraction"] + 0.03


def test_mod_router_runs_beside_the_gates(model_dir, tiny_task, tmp_path):
    """A MoD-style router (scalar gates from their own file) and GateSkip gates, one sweep, one backbone."""
    router = add_gates(tiny_model(), GateConfig(kind="scalar"))
    with torch.no_grad():
        for p in router.gate_bank.parameters():
            p.normal_(0.0, 0.3)
    router_file = save_gates(router, tmp_path / "router")
    out = tmp_path / "sweep"
    args = eval_args(model_dir, tiny_task, out, "--fresh-gates", "vector", "--router", str(router_file),
                     "--method", "gateskip,mod", "--budgets", "0,0.5")
    assert cli.run(args) == 0
    acc = {(r["method"], r["budget"]): r for r in json.loads((out / RESULTS).read_text())["records"]}
    assert acc[("mod", 0.5)]["skip_fraction"] == pytest.approx(0.5, abs=0.06)
    # both charged for their gates: a scalar router costs 2d per token, a vector gate 2d^2
    assert acc[("gateskip", 0.0)]["net_saving"] < acc[("mod", 0.0)]["net_saving"] < 0


def test_a_gated_model_folder_runs_a_baseline_without_gates(tiny_task, tmp_path):
    """The folder's own gates give way to identity ones (adding gates to a gated model is refused)."""
    folder = tmp_path / "gated-model"
    add_gates(tiny_model(), GateConfig(kind="vector")).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    out = tmp_path / "sweep"
    assert cli.run(eval_args(folder, tiny_task, out, "--method", "random", "--budgets", "0.5")) == 0
    acc = {r["method"]: r for r in json.loads((out / RESULTS).read_text())["records"] if r["metric"] == "acc"}
    assert acc["random"]["skip_fraction"] == pytest.approx(0.5, abs=0.06)
    assert acc["random"]["net_saving"] > 0.3  # identity gates: nothing charged


def test_interrupted_sweep_resumes_without_recomputing(model_dir, tiny_task, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    real = lm_eval.simple_evaluate
    calls = []

    def interrupt_on_third(*a, **k):
        calls.append(k["tasks"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lm_eval, "simple_evaluate", interrupt_on_third)
    args = eval_args(model_dir, tiny_task, out, "--method", "random", "--budgets", "0,0.3,0.6")
    with pytest.raises(KeyboardInterrupt):
        cli.run(args)
    first = json.loads((out / RESULTS).read_text())["records"]
    assert {(r["method"], r["budget"]) for r in first} == {("base", 0.0), ("random", 0.0)}

    calls.clear()
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cli.run(args) == 0
    assert len(calls) == 2  # only random at 0.3 and 0.6
    final = json.loads((out / RESULTS).read_text())["records"]
    assert {(r["method"], r["budget"]) for r in final} == {("base", 0.0)} | {("random", b) for b in (0.0, 0.3, 0.6)}
    assert final[: len(first)] == first


def test_resume_refuses_a_sweep_with_other_settings(model_dir, tiny_task, tmp_path):
    out = tmp_path / "sweep"
    assert cli.run(eval_args(model_dir, tiny_task, out, "--method", "base", "--budgets", "0")) == 0
    args = eval_args(model_dir, tiny_task, out, "--method", "base", "--budgets", "0")
    args.limit = 3
    with pytest.raises(GateSkipError, match="other settings"):
        cli.run(args)


@pytest.mark.parametrize("extra, message", [
    (["--method", "early_exit"], "unknown method 'early_exit'"),
    (["--budgets", ""], "budget list is empty"),
    (["--budgets", "0,1.5"], r"budget must be a skip ratio in \[0, 1\]"),
    (["--budgets", "0,lots"], "not a number"),
    (["--method", "gateskip"], "needs gates"),
    (["--method", "mod"], "method mod and --router go together"),
])
def test_bad_inputs_give_one_line_errors(model_dir, tiny_task, tmp_path, extra, message):
    with pytest.raises(GateSkipError, match=message):
        cli.run(eval_args(model_dir, tiny_task, tmp_path / "out", *extra))


def test_unknown_task_is_named(model_dir, tiny_task, tmp_path):
    args = eval_args(model_dir, tiny_task, tmp_path / "out", "--method", "base")
    args.tasks = "tiny_mc,no_such_task"
    with pytest.raises(GateSkipError, match="unknown task 'no_such_task'"):
        cli.run(args)


def test_an_unknown_task_leaves_no_rendered_task_files(model_dir, tiny_task, tmp_path):
    args = eval_args(model_dir, tiny_task, tmp_path / "out", "--method", "base")
    args.tasks = "arc_easy,no_such_task"
    with pytest.raises(GateSkipError, match="unknown task 'no_such_task'"):
        cli.run(args)
    assert not (tmp_path / "out" / "tasks").exists()


@pytest.mark.parametrize("given, missing", [(["gateskip"], "'base'"), (["base"], "'gateskip'")])
def test_run_sweep_names_a_method_it_was_not_given(tiny_task, tmp_path, given, missing):
    model = add_gates(tiny_model())
    sweep = Sweep(SweepSettings(model="tiny", gates=None, limit=2, data="bundled"), ["tiny_mc"], [0.25],
                  ["gateskip"], tmp_path / "out", include=tiny_task)
    methods = {name: make_method(name, model) for name in given}
    with pytest.raises(GateSkipError, match=f"no method object for {missing}"):
        run_sweep(sweep, model, char_tokenizer(), methods)


def test_parse_budgets_sorts_and_deduplicates():
    assert parse_budgets("0.5, 0,0.25,0.5") == [0.0, 0.25, 0.5]


@pytest.mark.slow
def test_bundled_model_on_a_bundled_task(tmp_path):
    """The offline path end to end: SmolLM2-135M, fresh low-rank gates, 8 ARC-Easy questions."""
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    out = tmp_path / "sweep"
    args = parser.parse_args(["eval", "smollm2-135m", "--fresh-gates", "lowrank", "--tasks", "arc_easy",
                              "--budgets", "0,0.5", "--limit", "8", "--out", str(out)])
    assert cli.run(args) == 0
    acc = {(r["method"], r["budget"]): r for r in json.loads((out / RESULTS).read_text())["records"] if r["metric"] == "acc"}
    assert set(acc) == {("base", 0.0), ("gateskip", 0.0), ("gateskip", 0.5)}
    assert acc[("gateskip", 0.5)]["skip_fraction"] == pytest.approx(0.5, abs=0.05)
    assert acc[("gateskip", 0.0)]["net_saving"] < 0 < acc[("gateskip", 0.5)]["net_saving"]  # gates cost, skips save
    assert all(0 <= r["value"] <= 1 for r in acc.values())
