"""User mistakes end as one `error:` line and exit status 2, before any work and without leaving a
folder behind; damaged files reach the readers as GateSkipError only; nothing finished is
overwritten without --overwrite; non-finite gates and training are refused. docs/errors.md lists
the cases of MISTAKES."""

import dataclasses
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import gateskip.training.loop as train_module
from gateskip import GateSkipError, add_gates, load_gates
from gateskip.search.allocation import cpu_has_bf16
from gateskip.inference.calibrate import sample_tokens
from gateskip.cli import main
from gateskip.core.config import GateConfig
from gateskip.data.samples import sample_texts
from gateskip.evaluation.sweep import RESULTS
from gateskip.loading import load_model
from gateskip.core.model import read_gate_file, save_gates
from gateskip.data.textdata import read_documents
from gateskip.training import TrainConfig
from gateskip.validate import check_output_folder

from test_textdata import char_tokenizer

torch.set_num_threads(1)
CONTEXT = 64
TOKENIZER = char_tokenizer()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (context 64) with a character tokenizer, its gates, text, and damaged variants."""
    root = tmp_path_factory.mktemp("validate")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=100, max_position_embeddings=CONTEXT)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    save_gates(add_gates(model, GateConfig(kind="scalar")), root / "gates")
    (root / "text.txt").write_text("To be, or not to be, that is the question. " * 40)
    (root / "binary.dat").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait. ".encode("latin-1") * 50)
    (root / "truncated.jsonl.gz").write_bytes(gzip.compress(b'{"text": "hello world"}\n' * 200)[:40])
    (root / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (root / "rows.jsonl").write_text('["a list, not an object"]\n')
    (root / "a_file").write_text("not a folder")
    (root / "damaged_dataset").mkdir()
    (root / "damaged_dataset" / "dataset_info.json").write_text("{cut sh")
    (root / "finished" / "final").mkdir(parents=True)
    (root / "finished" / "metrics.jsonl").write_text('{"step": 1}\n')
    meta, tensors = read_gate_file(root / "gates")

    def variant(name, meta_change=None, tensor_change=None):
        m, t = json.loads(json.dumps(meta)), {k: v.clone() for k, v in tensors.items()}
        (meta_change or (lambda _: None))(m)
        (tensor_change or (lambda _: None))(t)
        (root / name).mkdir()
        save_file(t, str(root / name / "gateskip.safetensors"), metadata={"gateskip": json.dumps(m)})

    variant("nan_weights", tensor_change=lambda t: next(iter(t.values())).fill_(math.nan))
    variant("inf_weights", tensor_change=lambda t: next(iter(t.values())).fill_(math.inf))
    variant("nan_threshold", meta_change=lambda m: m.update(thresholds={"0.5": {"attn.0": math.nan}}))
    variant("layers_as_text", meta_change=lambda m: m.update(num_layers="two"))
    variant("config_as_text", meta_change=lambda m: m.update(gate_config="vector"))
    variant("thresholds_as_list", meta_change=lambda m: m.update(thresholds=[0.1]))
    variant("future_version", meta_change=lambda m: m.update(version=99))
    variant("ratio_above_one", meta_change=lambda m: m.update(allocations={"0.1": {"ratios": {"attn.0": 2.0}}}))
    (root / "truncated_gates").mkdir()
    (root / "truncated_gates" / "gateskip.safetensors").write_bytes((root / "gates" / "gateskip.safetensors").read_bytes()[:100])
    files = {"binary": "binary.dat", "latin1": "latin1.txt", "truncated_gz": "truncated.jsonl.gz",
             "broken_jsonl": "broken.jsonl", "rows_jsonl": "rows.jsonl", "text": "text.txt"}
    return {**{p.name: p for p in root.iterdir() if p.is_dir() or p.name == "a_file"},
            **{key: root / name for key, name in files.items()}}


# (name, argv with {out} and asset names as placeholders, what the error says). The out folder never exists.
MISTAKES = [
    # numbers: ranges, counts, NaN and inf
    ("calibrate --length 0", "calibrate {model} --gates {gates} --ratios 0.5 --length 0",
     "--length: must be at least 1"),
    ("calibrate --sequences 0", "calibrate {model} --gates {gates} --ratios 0.5 --sequences 0",
     "--sequences: must be at least 1"),
    ("calibrate --ratios nan", "calibrate {model} --gates {gates} --ratios nan",
     "--ratios: must be a finite number"),
    ("calibrate --ratios 2", "calibrate {model} --gates {gates} --ratios 2",
     "--ratios: must be at least 0 and at most 1"),
    ("eval --batch-size 0", "eval {model} --gates {gates} --tasks arc_easy --out {out} --batch-size 0",
     "--batch-size: must be at least 1"),
    ("eval --num-fewshot -1", "eval {model} --gates {gates} --tasks arc_easy --out {out} --num-fewshot -1",
     "--num-fewshot: must be at least 0"),
    ("eval --limit 0", "eval {model} --gates {gates} --tasks arc_easy --out {out} --limit 0",
     "--limit: must be at least 1"),
    ("eval --budgets nan", "eval {model} --gates {gates} --tasks arc_easy --out {out} --budgets 0,nan",
     "got nan"),
    ("train --lr nan", "train {model} --data {text} --out {out} --lr nan",
     "lr must be positive and finite"),
    ("train --gate-lr inf", "train {model} --data {text} --out {out} --gate-lr inf",
     "gate lr must be positive and finite"),
    ("train --lr -1", "train {model} --data {text} --out {out} --lr -1",
     "lr must be positive"),
    ("train --sparsity-weight nan", "train {model} --data {text} --out {out} --sparsity-weight nan",
     "sparsity weight must be at least 0"),
    ("train --grad-clip 0", "train {model} --data {text} --out {out} --grad-clip 0",
     "grad clip must be positive"),
    ("train --eval-every -1", "train {model} --data {text} --out {out} --eval-every -1",
     "eval every must be at least 0"),
    ("train --max-tokens 0", "train {model} --data {text} --out {out} --max-tokens 0",
     "max tokens must be at least 1"),
    ("train --steps 0", "train {model} --data {text} --out {out} --steps 0",
     "steps must be at least 1"),
    ("train --resume --overwrite", "train {model} --data {text} --out {out} --resume --overwrite",
     "give one of them"),
    ("prune --ratio nan", "prune {model} --ratio nan --out {out}",
     "--ratio must be in [0, 1)"),
    ("prune --ratio 1", "prune {model} --ratio 1 --out {out}",
     "--ratio must be in [0, 1)"),
    ("allocate --targets inf", "allocate {model} --gates {gates} --targets inf",
     "--targets: must be a finite number"),
    ("allocate --levels without 1", "allocate {model} --gates {gates} --targets 0.1 --levels 0.5",
     "--levels must include 1"),
    ("allocate --show --choose", "allocate {model} --gates {gates} --show --choose {gates}",
     "does not go with --choose"),
    ("allocate --show --refine", "allocate {model} --gates {gates} --show --refine removal",
     "does not go with --refine"),
    ("allocate --refine --choose", "allocate {model} --gates {gates} --targets 0.1 --refine removal --choose {gates}",
     "give one of them"),
    ("allocate --choose a file without allocations", "allocate {model} --gates {gates} --choose {gates} --length 16",
     "holds no allocations to choose from"),
    ("allocate --skip-sequences past the text",
     "allocate {model} --gates {gates} --targets 0.1 --text {text} --length 16 --skip-sequences 1000", "no block left"),
    ("proxy --blocks 0", "proxy {model} --gates {gates} --text {text} --blocks 0 --out {out}",
     "--blocks: must be at least 1"),
    ("proxy --targets nan", "proxy {model} --gates {gates} --text {text} --targets nan --out {out}",
     "--targets: must be a finite number"),
    ("analyze --budget -0.5", "analyze {model} --gates {gates} --out {out} --budget -0.5",
     "--budget: must be at least 0"),
    ("analyze --sequences x", "analyze {model} --gates {gates} --out {out} --sequences x",
     "'x' is not a whole number"),
    ("demo --threads 0", "demo --threads 0 --out {out}",
     "--threads: must be at least 1"),
    ("demo --items -3", "demo --items -3 --out {out}",
     "--items: must be at least 1"),
    ("bench --rounds 0", "bench {model} --rounds 0", "--rounds: must be at least 1"),
    ("bench --budgets nan", "bench {model} --budgets nan", "--budgets: must be a finite number"),
    ("tasks --tasks unknown", "tasks --tasks nosuch --out {out}", "unknown task 'nosuch'"),
    # sampling
    ("generate --temperature 0", "generate {model} --gates {gates} --prompt hi --sample --temperature 0",
     "--temperature: must be above 0"),
    ("generate --temperature nan", "generate {model} --gates {gates} --prompt hi --sample --temperature nan",
     "--temperature: must be a finite number"),
    ("generate --top-p 0", "generate {model} --gates {gates} --prompt hi --sample --top-p 0",
     "--top-p: must be above 0 and at most 1"),
    ("generate --top-p 1.5", "generate {model} --gates {gates} --prompt hi --sample --top-p 1.5",
     "--top-p: must be above 0 and at most 1"),
    ("generate --top-k 0", "generate {model} --gates {gates} --prompt hi --sample --top-k 0",
     "--top-k: must be at least 1"),
    ("generate --speculative -1", "generate {model} --gates {gates} --prompt hi --speculative -1",
     "--speculative: must be at least 0"),
    ("generate --max-new-tokens 0", "generate {model} --gates {gates} --prompt hi --max-new-tokens 0",
     "--max-new-tokens: must be at least 1"),
    ("generate --compile --speculative", "generate {model} --gates {gates} --prompt hi --compile --speculative 2",
     "--compile applies to plain decoding, not to --speculative"),
    # devices
    ("eval --device banana", "eval {model} --gates {gates} --tasks arc_easy --out {out} --device banana",
     "unknown device 'banana'"),
    ("eval --device cuda:99", "eval {model} --gates {gates} --tasks arc_easy --out {out} --device cuda:99",
     "--device:"),
    # lengths against the model's context (64 tokens)
    ("calibrate --length 65", "calibrate {model} --gates {gates} --ratios 0.5 --text {text} --length 65",
     "--length of 65 tokens exceeds the model's context of 64"),
    ("analyze --length 100", "analyze {model} --gates {gates} --text {text} --out {out} --length 100",
     "--length of 100 tokens exceeds"),
    ("allocate --length 100", "allocate {model} --gates {gates} --targets 0.1 --text {text} --length 100",
     "--length of 100 tokens exceeds"),
    ("proxy --length 100", "proxy {model} --gates {gates} --text {text} --length 100 --out {out}",
     "--length of 100 tokens exceeds"),
    ("train --seq-len 100", "train {model} --data {text} --out {out} --seq-len 100",
     "seq len 100 exceeds the model's context of 64"),
    ("bench --prefill 1 100", "bench {model} --prefill 1 100 --threads 1", "--prefill LENGTH of 100 tokens exceeds"),
    ("generate past the context", "generate {model} --gates {gates} --prompt hi --max-new-tokens 100",
     "the prompt plus --max-new-tokens of 102 tokens exceeds the model's context of 64"),
    ("generate long prompt", "generate {model} --gates {gates} --prompt " + "a" * 80,
     "the prompt has 80 tokens"),
    # input paths
    ("train --data missing", "train {model} --data {out}.txt --out {out}",
     "--data:"),
    ("calibrate --gates missing", "calibrate {model} --gates {out} --ratios 0.5",
     "--gates:"),
    ("eval --sample-text missing", "eval {model} --gates {gates} --tasks arc_easy --method shortgpt --out {out} --sample-text {out}",
     "--sample-text:"),
    ("eval --sample-text is a folder", "eval {model} --gates {gates} --tasks arc_easy --out {out} --sample-text {gates}",
     "is not a file"),
    ("eval --include-path missing", "eval {model} --gates {gates} --tasks arc_easy --out {out} --include-path {out}",
     "--include-path:"),
    ("prune --sample-text missing", "prune {model} --ratio 0.5 --out {out} --sample-text {out}",
     "--sample-text:"),
    ("model folder missing", "calibrate {out} --gates {gates} --ratios 0.5",
     "unknown model"),
    ("model is a file", "analyze {a_file} --out {out}",
     "unknown model"),
    # output paths
    ("train --out is a file", "train {model} --data {text} --out {a_file}/run --seq-len 16",
     "is not writable"),
    ("eval --out is a file", "eval {model} --gates {gates} --tasks arc_easy --out {a_file}",
     "is a file"),
    ("analyze --out is a file", "analyze {model} --gates {gates} --text {text} --out {a_file} --length 16",
     "is a file"),
    ("proxy --out is a file", "proxy {model} --gates {gates} --text {text} --out {a_file} --length 16",
     "is a file"),
    ("demo --out is a file", "demo --quick --model {model} --out {a_file}",
     "is a file"),
    ("tasks --out is a file", "tasks --tasks arc_easy --out {a_file}", "is a file"),
    ("allocate --plot is a folder", "allocate {model} --gates {gates} --show --plot {gates}",
     "is a folder; give a file name"),
    ("allocate --plot unsupported format", "allocate {model} --gates {gates} --show --plot {out}.xyz",
     "cannot write a plot as .xyz files"),
    ("bench --json onto a folder", "bench {model} --json {gates}", "is a folder; give a file name"),
    ("generate --seed above 2^32", "generate {model} --gates {gates} --prompt hi --seed 18446744073709551617",
     "--seed: must be at most 4294967295"),
    # text encodings, compression, JSON lines
    ("train --data binary", "train {model} --data {binary} --out {out} --seq-len 16",
     "is not UTF-8 text"),
    ("train --data latin-1", "train {model} --data {latin1} --out {out} --seq-len 16",
     "is not UTF-8 text (byte 0xe9"),
    ("train --data truncated gzip", "train {model} --data {truncated_gz} --out {out} --seq-len 16",
     "is damaged or not gzip"),
    ("train --data broken JSON line", "train {model} --data {broken_jsonl} --out {out} --seq-len 16",
     "broken.jsonl:2: not valid JSON"),
    ("train --data damaged datasets folder", "train {model} --data {damaged_dataset} --out {out} --seq-len 16",
     "is not a readable datasets folder"),
    ("train --data rows not objects", "train {model} --data {rows_jsonl} --out {out} --seq-len 16",
     "must be a JSON object"),
    ("calibrate --text binary", "calibrate {model} --gates {gates} --ratios 0.5 --text {binary} --length 16",
     "is not UTF-8 text"),
    ("analyze --text truncated gzip", "analyze {model} --gates {gates} --text {truncated_gz} --out {out} --length 16",
     "is damaged or not gzip"),
    ("eval --sample-text binary", "eval {model} --gates {gates} --tasks arc_easy --method shortgpt --out {out} --sample-text {binary}",
     "is not UTF-8 text"),
    ("prune --sample-text latin-1", "prune {model} --ratio 0.5 --out {out} --sample-text {latin1}",
     "is not UTF-8 text"),
    # gate files
    ("gates with NaN weights", "calibrate {model} --gates {nan_weights} --ratios 0.5 --text {text} --length 16",
     "holds NaN or inf values"),
    ("gates with inf weights", "generate {model} --gates {inf_weights} --prompt hi",
     "holds NaN or inf values"),
    ("gates with a NaN threshold", "analyze {model} --gates {nan_threshold} --text {text} --out {out} --length 16",
     "thresholds for ratio 0.5 must map modules to numbers"),
    ("gate metadata: layers as text", "calibrate {model} --gates {layers_as_text} --ratios 0.5 --length 16",
     "'num_layers' should be a whole number"),
    ("gate metadata: config as text", "calibrate {model} --gates {config_as_text} --ratios 0.5 --length 16",
     "'gate_config' should be a JSON object"),
    ("gate metadata: thresholds as list", "calibrate {model} --gates {thresholds_as_list} --ratios 0.5 --length 16",
     "'thresholds' should be a JSON object"),
    ("gate file from a newer version", "calibrate {model} --gates {future_version} --ratios 0.5 --length 16",
     "format version 99"),
    ("allocation ratio above 1", "allocate {model} --gates {ratio_above_one} --show",
     "skip ratio outside [0, 1]"),
    ("truncated gate file", "calibrate {model} --gates {truncated_gates} --ratios 0.5 --length 16",
     "is not a gateskip gate file"),
    ("not a gate file", "calibrate {model} --gates {text} --ratios 0.5 --length 16",
     "is not a gate file"),
    ("eval --gates NaN", "eval {model} --gates {nan_weights} --tasks arc_easy --out {out} --limit 1",
     "holds NaN or inf values"),
    # finished work (see also the overwrite tests below)
    ("train into a finished run", "train {model} --data {text} --out {finished} --seq-len 16",
     "already holds final"),
    ("prune onto its source", "prune {model} --ratio 0.5 --out {model}",
     "is the source model's folder"),
    ("eval into a model folder", "eval {model} --gates {gates} --tasks arc_easy --out {model}",
     "holds a model or gates (config.json)"),
    ("analyze into a gate folder", "analyze {model} --gates {gates} --text {text} --out {gates} --length 16",
     "holds a model or gates (gateskip.safetensors)"),
]


def argv(template: str, assets: dict[str, Path], out: Path) -> list[str]:
    return [part.format(**assets, out=out) for part in template.split(" ")]


def test_the_docs_list_every_mistake():
    listed = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    assert len(MISTAKES) >= 40 and len({name for name, _, _ in MISTAKES}) == len(MISTAKES)
    missing = [name for name, _, _ in MISTAKES if f"`{name}`" not in listed]
    assert not missing, f"docs/errors.md does not list {missing}"


@pytest.mark.parametrize("name,template,says", MISTAKES, ids=[name for name, _, _ in MISTAKES])
def test_a_mistake_is_one_error_line_and_leaves_no_folder(name, template, says, assets, tmp_path, capsys):
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in assets["model"].iterdir()}
    code = main(argv(template, assets, out))
    err = capsys.readouterr().err
    assert code == 2, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]], err
    assert says in err and "Traceback" not in err
    assert not out.exists() and not Path(f"{out}.txt").exists() and not Path(f"{out}.xyz").exists()
    assert {p: p.stat().st_mtime_ns for p in assets["model"].iterdir()} == before  # the source model untouched


def test_the_real_entry_point_exits_2_without_a_traceback(assets, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "gateskip.cli", "train", str(assets["model"]), "--data",
                           str(assets["binary"]), "--out", str(out), "--seq-len", "16"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error:") and "not UTF-8 text" in done.stderr
    assert not out.exists()


def test_speculative_help_says_what_0_means(capsys):
    assert main(["generate", "--help"]) == 0
    assert "0, the default: no drafting" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------- readers get damaged files


def _valid_files(assets) -> dict[str, bytes]:
    rows = b"".join(json.dumps({"text": f"line {i} of the sample"}).encode() + b"\n" for i in range(20))
    return {"gates": (assets["gates"] / "gateskip.safetensors").read_bytes(), "txt": assets["text"].read_bytes(),
            "jsonl": rows, "gz": gzip.compress(rows)}


READERS = {
    "gate file": ("gateskip.safetensors", lambda path, _tok: read_gate_file(path)),
    "training data (txt)": ("data.txt", lambda path, _tok: read_documents(str(path))),
    "training data (jsonl)": ("data.jsonl", lambda path, _tok: read_documents(str(path))),
    "training data (jsonl.gz)": ("data.jsonl.gz", lambda path, _tok: read_documents(str(path))),
    "calibration text": ("calibration.jsonl.gz", lambda path, tok: sample_tokens(tok, str(path), 2, 8)),
    "sample text": ("sample.txt", lambda path, _tok: sample_texts(path)),
}
SOURCES = {"gate file": "gates", "training data (txt)": "txt", "training data (jsonl)": "jsonl",
           "training data (jsonl.gz)": "gz", "calibration text": "gz", "sample text": "txt"}


@pytest.mark.parametrize("reader", READERS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_readers_raise_only_gateskip_errors_on_damaged_files(reader, data, assets, tmp_path):
    name, read = READERS[reader]
    valid = _valid_files(assets)[SOURCES[reader]]
    content = data.draw(st.one_of(st.binary(max_size=600),
                                  st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),  # truncated
                                  st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=8))
                                  .map(lambda c: valid[:c[0]] + c[1] + valid[c[0] + len(c[1]):])))  # overwritten bytes
    path = tmp_path / name
    path.write_bytes(content)
    try:
        read(path, TOKENIZER)
    except GateSkipError:
        pass


# ---------------------------------------------------------------- overwrite protection


def run_ok(args: list) -> None:
    assert main([str(a) for a in args]) == 0


def run_refused(args: list, capsys, match: str) -> None:
    assert main([str(a) for a in args]) == 2
    assert match in capsys.readouterr().err


def test_the_api_refuses_a_device_this_machine_lacks(assets):
    with pytest.raises(GateSkipError, match="unknown device 'banana'"):
        load_model(str(assets["model"]), device="banana")
    with pytest.raises(GateSkipError, match="does not exist|no cuda device"):
        load_model(str(assets["model"]), device=f"cuda:{torch.cuda.device_count()}")


def test_train_refuses_a_finished_run_and_overwrite_starts_it_over(assets, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", assets["model"], "--data", assets["text"], "--out", out, "--steps", "2", "--seq-len", "16",
            "--batch-size", "2", "--save-every", "1"]
    run_ok(args)
    gates = (out / "final" / "gateskip.safetensors").read_bytes()
    run_refused(args, capsys, "already holds a run")
    (out / "checkpoints").rename(tmp_path / "moved")  # a finished run without checkpoints (--save-every 0)
    run_refused(args, capsys, "pass --overwrite")
    assert (out / "final" / "gateskip.safetensors").read_bytes() == gates
    (tmp_path / "moved").rename(out / "checkpoints")
    (out / "checkpoints" / "step-00000099").mkdir()  # an older run's checkpoint: --overwrite drops it
    (out / "checkpoints" / "step-00000099" / "trainer.json").write_text('{"step": 99}')
    run_ok([*args[:-2], "--save-every", "0", "--overwrite"])
    assert not (out / "checkpoints").exists() and (out / "final" / "gateskip.safetensors").is_file()


def test_a_resume_survives_a_metrics_line_cut_short_by_a_kill(assets, tmp_path):
    args = ["train", assets["model"], "--data", assets["text"], "--out", tmp_path, "--seq-len", "16",
            "--batch-size", "2", "--save-every", "1"]
    run_ok([*args, "--steps", "1"])
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')  # killed while writing the next step's record
    run_ok([*args, "--steps", "2", "--resume"])
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1] == 2


def test_prune_refuses_its_source_and_a_model_folder_without_overwrite(assets, tmp_path, capsys):
    out = tmp_path / "pruned"
    run_ok(["prune", assets["model"], "--ratio", "0.5", "--out", out, "--sample-text", assets["text"]])
    run_refused(["prune", out, "--ratio", "0.5", "--out", out], capsys, "is the source model's folder")
    run_refused(["prune", assets["model"], "--ratio", "0.5", "--out", out], capsys, "holds a model")
    run_ok(["prune", assets["model"], "--ratio", "0.5", "--out", out, "--sample-text", assets["text"],
            "--overwrite"])


def test_calibrate_keeps_stored_thresholds_without_overwrite(assets, tmp_path, capsys):
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "gateskip.safetensors").write_bytes((assets["gates"] / "gateskip.safetensors").read_bytes())
    args = ["calibrate", assets["model"], "--gates", gates, "--ratios", "0.5", "--text", assets["text"],
            "--length", "16", "--sequences", "2"]
    run_ok(args)
    first = read_gate_file(gates)[0]["thresholds"]
    run_refused([*args[:5], "0.25", "0.5", *args[6:]], capsys, "already holds thresholds for ratio 0.5")
    assert read_gate_file(gates)[0]["thresholds"] == first
    run_ok([*args, "--overwrite"])


def test_analyze_and_proxy_keep_an_earlier_result_without_overwrite(assets, tmp_path, capsys):
    out = tmp_path / "analysis"
    args = ["analyze", assets["model"], "--gates", assets["gates"], "--text", assets["text"], "--out", out,
            "--length", "16", "--sequences", "2"]
    run_ok(args)
    summary = (out / "analysis.md").read_text()
    run_refused(args, capsys, "already holds analysis.md")
    assert (out / "analysis.md").read_text() == summary
    run_ok([*args, "--overwrite"])
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "proxy.md").write_text("an earlier table")
    run_refused(["proxy", assets["model"], "--gates", assets["gates"], "--text", assets["text"], "--out",
                 tmp_path / "proxy"], capsys, "already holds proxy.md")


def test_eval_and_demo_resume_their_own_folders_and_refuse_others(assets, tmp_path, capsys):
    eval_args = ["eval", assets["model"], "--gates", assets["gates"], "--tasks", "arc_easy", "--limit", "1"]
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "results.md").write_text("someone's table")
    run_refused([*eval_args, "--out", tmp_path / "table"], capsys, "already holds results.md")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("someone's report")
    run_refused(["demo", "--quick", "--model", assets["model"], "--out", tmp_path / "report"], capsys,
                "already holds report.md")
    for folder, writes, record in ((tmp_path / "sweep", ("results.md",), RESULTS),
                                   (tmp_path / "report", ("report.md",), "job.json")):
        (folder / record).write_text("{}")
        (folder / writes[0]).write_text("its own earlier output")
        assert check_output_folder(folder, writes=writes, resumes=record) == folder  # resumed, not refused
    (tmp_path / "report" / "job.json").write_text("{damaged")
    run_refused(["demo", "--quick", "--model", assets["model"], "--out", tmp_path / "report"], capsys,
                "not a readable job record")


def test_allocate_keeps_stored_allocations_and_plots_without_overwrite(assets, tmp_path, capsys):
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "gateskip.safetensors").write_bytes((assets["gates"] / "gateskip.safetensors").read_bytes())
    args = ["allocate", assets["model"], "--gates", gates, "--targets", "0.1", "--text", assets["text"],
            "--length", "16", "--sequences", "1", "--levels", "1"]
    run_ok(args)
    run_refused(args, capsys, "already holds an allocation for 0.1")
    (tmp_path / "plot.png").write_bytes(b"an earlier plot")
    run_refused(["allocate", assets["model"], "--gates", gates, "--show", "--plot", tmp_path / "plot.png"], capsys,
                "pass --overwrite")
    assert (tmp_path / "plot.png").read_bytes() == b"an earlier plot"
    # --choose: per target, the gate file's own allocation or another file's, by KL on held-back text.
    other = tmp_path / "other"
    other.mkdir()
    (other / "gateskip.safetensors").write_bytes((gates / "gateskip.safetensors").read_bytes())
    choose = ["allocate", assets["model"], "--gates", gates, "--choose", other, "--text", assets["text"],
              "--length", "16", "--sequences", "1", "--skip-sequences", "2"]
    run_refused(choose, capsys, "already holds an allocation for 0.1")
    run_ok([*choose, "--overwrite"])
    assert "chosen_from" in read_gate_file(gates / "gateskip.safetensors")[0]["allocations"]["0.1"]
    run_refused(["allocate", assets["model"], "--gates", gates, "--choose", assets["gates"], "--length", "16"], capsys,
                "holds no allocations to choose from")
    # --refine: an exchange search per target, from layer removal or from the stored allocation.
    refine = ["allocate", assets["model"], "--gates", gates, "--text", assets["text"], "--length", "16",
              "--sequences", "1", "--levels", "0.5", "1", "--rounds", "1", "--overwrite", "--refine"]
    run_refused([*refine, "stored", "--targets", "0.2"], capsys, "holds no allocation for 0.2 to start from")
    run_ok([*refine, "stored", "--targets", "0.1"])
    capsys.readouterr()
    run_ok([*refine, "removal", "--targets", "0.1", "0.2", "--bf16"])
    assert ("no bf16 instructions" in capsys.readouterr().err) == (not cpu_has_bf16())
    stored = read_gate_file(gates / "gateskip.safetensors")[0]["allocations"]
    assert set(stored) == {"0.1", "0.2"} and "chosen_from" not in stored["0.1"]


# ---------------------------------------------------------------- non-finite values


def test_gates_with_non_finite_weights_are_refused_at_load(assets):
    model = LlamaForCausalLM.from_pretrained(assets["model"])
    for name in ("nan_weights", "inf_weights", "nan_threshold"):
        with pytest.raises(GateSkipError, match="NaN"):
            load_gates(model, assets[name])
    assert not hasattr(model, "gate_bank")  # the model is left as it was


def test_training_stops_on_a_non_finite_loss_and_exports_nothing(assets, tmp_path, monkeypatch):
    real = train_module.loss_terms

    def diverging(model, batch, cfg, *args, **kwargs):
        terms = real(model, batch, cfg, *args, **kwargs)
        return dataclasses.replace(terms, total=terms.total * math.nan)

    monkeypatch.setattr(train_module, "loss_terms", diverging)
    cfg = TrainConfig(model=str(assets["model"]), data=[str(assets["text"])], out=str(tmp_path / "run"),
                      steps=3, seq_len=16, batch_size=2)
    with pytest.raises(GateSkipError, match="training stopped at step 1: the loss .* not finite; nothing was exported"):
        train_module.train(cfg)
    assert not (tmp_path / "run" / "final").exists()
