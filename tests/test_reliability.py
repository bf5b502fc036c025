"""Issue 26, reliability round 2, through the real entry points: every output checked before the work,
writes that are atomic, keep the file's mode and never lose a second writer's result, batched decoding
that equals each row alone whatever the padding, and Python API misuse as GateSkipError naming the
argument. docs/errors.md lists the classes and how each is handled."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

from gateskip import GateConfig, GateSkipError, SkipPlan, SkipStats, add_gates, remove_gates, save_gates
from gateskip.core.budget import AllocationBudget, ThresholdBudget
from gateskip.inference.calibrate import sample_tokens
from gateskip.cli import main
from gateskip.inference.decoding import decode
from gateskip.core.model import read_gate_file
from conftest import tiny_model
from test_generation import VOCAB, calibrated
from test_textdata import char_tokenizer
from test_validate import assets  # noqa: F401 - the tiny model folder, its gates and text (a fixture)

torch.set_num_threads(1)


def run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, err: str, says: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error:"), err
    assert says in err, err


def gate_copy(assets, tmp_path: Path, mode: int | None = None) -> Path:
    gates = tmp_path / "gates"
    gates.mkdir()
    shutil.copy(assets["gates"] / "gateskip.safetensors", gates / "gateskip.safetensors")
    if mode is not None:
        os.chmod(gates / "gateskip.safetensors", mode)
    return gates


def calibrate_args(assets, gates: Path, *ratios) -> list:
    return ["calibrate", assets["model"], "--gates", gates, "--ratios", *ratios, "--text", assets["text"],
            "--length", "16", "--sequences", "2"]


def allocate_args(assets, gates: Path, *targets) -> list:
    return ["allocate", assets["model"], "--gates", gates, "--targets", *targets, "--text", assets["text"],
            "--length", "16", "--sequences", "2", "--levels", "0.5", "1"]


def leftovers(folder: Path) -> list[str]:
    """Temporary files a write left behind (the lock file is meant to stay)."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.endswith(".tmp"))


@contextlib.contextmanager
def immutable(path: Path):
    """chattr +i (refuses writes even to root); skips the test where the file system has no such flag."""
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i not available here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


# ---------------------------------------------------------------- outputs checked before the work


@pytest.mark.parametrize("what", ["file", "folder"])
@pytest.mark.parametrize("command", ["calibrate", "allocate"])
def test_an_unwritable_gate_file_is_refused_before_any_work(command, what, assets, tmp_path, capsys):
    gates = gate_copy(assets, tmp_path)
    before = (gates / "gateskip.safetensors").read_bytes()
    args = calibrate_args(assets, gates, "0.5") if command == "calibrate" else allocate_args(assets, gates, "0.1")
    with immutable(gates / "gateskip.safetensors" if what == "file" else gates):
        start = time.perf_counter()
        code, out, err = run(args, capsys)
    one_error(code, err, "not writable")
    assert out == "" and time.perf_counter() - start < 5  # refused before the model and the text were read
    assert (gates / "gateskip.safetensors").read_bytes() == before and leftovers(gates) == []


def test_allocate_refuses_a_plot_format_matplotlib_cannot_write_before_saving(assets, tmp_path, capsys):
    gates = gate_copy(assets, tmp_path)
    before = (gates / "gateskip.safetensors").read_bytes()
    code, _, err = run([*allocate_args(assets, gates, "0.1"), "--plot", tmp_path / "x.xyz"], capsys)
    one_error(code, err, "cannot write a plot as .xyz")
    assert (gates / "gateskip.safetensors").read_bytes() == before  # nothing saved, nothing changed


def test_a_plot_name_without_suffix_is_written_as_png_reported_and_not_overwritten(assets, tmp_path, capsys):
    gates = gate_copy(assets, tmp_path)
    code, out, err = run([*allocate_args(assets, gates, "0.1"), "--plot", tmp_path / "alloc"], capsys)
    assert code == 0, err
    assert f"plot: {tmp_path / 'alloc.png'}" in out and (tmp_path / "alloc.png").is_file()
    assert not (tmp_path / "alloc").exists()
    png = (tmp_path / "alloc.png").read_bytes()
    code, _, err = run(["allocate", assets["model"], "--gates", gates, "--show", "--plot", tmp_path / "alloc"], capsys)
    one_error(code, err, "alloc.png exists; pass --overwrite")
    assert (tmp_path / "alloc.png").read_bytes() == png


@pytest.mark.parametrize("target", ["existing", "folder", "impossible"])
def test_bench_json_is_checked_before_the_benchmark(target, assets, tmp_path, capsys):
    path = {"existing": tmp_path / "bench.json", "folder": tmp_path, "impossible": tmp_path / "a_file" / "b.json"}[target]
    (tmp_path / "bench.json").write_text('{"earlier": 1}')
    (tmp_path / "a_file").write_text("x")
    start = time.perf_counter()
    code, out, err = run(["bench", assets["model"], "--json", path, "--threads", "1"], capsys)
    one_error(code, err, {"existing": "exists; pass --overwrite", "folder": "is a folder",
                          "impossible": "is not writable"}[target])
    assert "prefill" not in out and time.perf_counter() - start < 5
    assert (tmp_path / "bench.json").read_text() == '{"earlier": 1}'


def test_tasks_out_does_not_replace_a_file_that_differs_without_overwrite(tmp_path, capsys):
    out = tmp_path / "tasks"
    assert run(["tasks", "--tasks", "piqa", "--out", out], capsys)[0] == 0
    assert run(["tasks", "--tasks", "piqa", "--out", out], capsys)[0] == 0  # the same YAML again: fine
    (out / "piqa.yaml").write_text("task: piqa  # my own edit\n")
    code, _, err = run(["tasks", "--tasks", "piqa", "--out", out], capsys)
    one_error(code, err, "holds something else")
    assert (out / "piqa.yaml").read_text() == "task: piqa  # my own edit\n"
    assert run(["tasks", "--tasks", "piqa", "--out", out, "--overwrite"], capsys)[0] == 0
    assert "my own edit" not in (out / "piqa.yaml").read_text()


# ---------------------------------------------------------------- modes, two writers, partial outputs


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_calibrate_and_allocate_keep_the_gate_files_mode(mode, assets, tmp_path, capsys):
    gates = gate_copy(assets, tmp_path, mode)
    assert run(calibrate_args(assets, gates, "0.5"), capsys)[0] == 0
    assert stat.S_IMODE((gates / "gateskip.safetensors").stat().st_mode) == mode
    assert run(allocate_args(assets, gates, "0.1"), capsys)[0] == 0
    assert stat.S_IMODE((gates / "gateskip.safetensors").stat().st_mode) == mode
    assert leftovers(gates) == []


def test_a_new_gate_file_gets_the_umask_mode_not_0600(tmp_path):
    path = save_gates(add_gates(tiny_model(), GateConfig(kind="scalar")), tmp_path / "g")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("command", ["calibrate", "allocate"])
def test_a_second_writer_while_the_first_works_loses_nothing(command, assets, tmp_path, capsys, monkeypatch):
    """The first run loads the gates; while it computes, a second run on the same gate file finishes
    and saves; the first then saves too: the file holds both results."""
    import gateskip.search.allocation as allocation
    import gateskip.inference.calibrate as calibrate

    gates = gate_copy(assets, tmp_path)
    module, name = (calibrate, "calibrate") if command == "calibrate" else (allocation, "search")
    work = getattr(module, name)
    second = calibrate_args(assets, gates, "0.25") if command == "calibrate" else allocate_args(assets, gates, "0.2")
    calls = []

    def first_work(*args, **kwargs):
        if not calls:
            calls.append(1)
            assert main([str(a) for a in second]) == 0  # the other writer, start to end
        return work(*args, **kwargs)

    monkeypatch.setattr(module, name, first_work)
    first = calibrate_args(assets, gates, "0.5") if command == "calibrate" else allocate_args(assets, gates, "0.1")
    code, _, err = run(first, capsys)
    assert code == 0, err
    meta, _ = read_gate_file(gates)
    field, keys = ("thresholds", {"0.25", "0.5"}) if command == "calibrate" else ("allocations", {"0.1", "0.2"})
    assert set(meta[field]) == keys


def test_two_writers_of_the_same_entry_keep_the_first_result(assets, tmp_path, capsys):
    from gateskip.loading import load_model
    from gateskip.core.model import load_gates, update_gate_file

    gates = gate_copy(assets, tmp_path)
    model, _ = load_model(str(assets["model"]))
    load_gates(model, gates)
    before = {k: dict(v) for k, v in model.gate_bank.thresholds.items()}
    assert run(calibrate_args(assets, gates, "0.5"), capsys)[0] == 0  # the other run stores 0.5 first
    stored = read_gate_file(gates)[0]["thresholds"]["0.5"]
    with pytest.raises(GateSkipError, match="another run stored thresholds for 0.5"):
        update_gate_file(model, gates, "thresholds", {"0.5": {"attn.0": 0.1}}, before)
    assert read_gate_file(gates)[0]["thresholds"]["0.5"] == stored


def test_analyze_on_a_full_disk_leaves_no_truncated_plot(assets, tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    real = Figure.savefig
    count = []

    def full_disk(self, fname, *args, **kwargs):
        count.append(fname)
        if len(count) % 4 == 2:  # the second plot of a run: half written, then the disk is full
            Path(fname).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", full_disk)
    out = tmp_path / "analysis"
    code, _, err = run(["analyze", assets["model"], "--gates", assets["gates"], "--text", assets["text"], "--out", out,
                        "--length", "16", "--sequences", "2"], capsys)
    one_error(code, err, "No space left on device")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # no partial analysis, no temporary
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # into an existing folder: its own files stay, nothing half-written joins
    code, _, err = run(["analyze", assets["model"], "--gates", assets["gates"], "--text", assets["text"], "--out", out,
                        "--length", "16", "--sequences", "2"], capsys)
    one_error(code, err, "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and leftovers(tmp_path) == []


def test_prune_on_a_full_disk_leaves_no_config_without_weights_and_a_rerun_works(assets, tmp_path, capsys,
                                                                                  monkeypatch):
    from transformers import PreTrainedTokenizerBase

    real = PreTrainedTokenizerBase.save_pretrained

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    out = tmp_path / "pruned"
    args = ["prune", assets["model"], "--ratio", "0.5", "--out", out, "--sample-text", assets["text"]]
    code, _, err = run(args, capsys)
    one_error(code, err, "No space left on device")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", real)
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "gateskip-pruned.json"} <= {p.name for p in out.iterdir()}


# ---------------------------------------------------------------- decoding: any padding, each row as alone


@functools.lru_cache(maxsize=1)
def decode_model():
    return calibrated("llama")


def alone(model, row: torch.Tensor, new: int) -> list[int]:
    return decode(model, row[None], None, budget=0.5, max_new_tokens=new).sequences[0, row.numel():].tolist()


def test_a_right_padded_batch_decodes_each_row_as_alone():
    model = decode_model()
    g = torch.Generator().manual_seed(5)
    lengths = [9, 4, 7]
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    out = decode(model, ids, mask, budget=0.5, max_new_tokens=6)
    assert out.prompt_length == 9 and torch.equal(out.sequences[:, :9], ids)
    for i, n in enumerate(lengths):
        assert out.sequences[i, 9:].tolist() == alone(model, ids[i, :n], 6), i


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_each_rows_greedy_tokens_equal_its_tokens_decoded_alone(data):
    """Random lengths, padding side (left, right, or holes anywhere) and masks."""
    model = decode_model()
    rows = data.draw(st.integers(1, 4), label="rows")
    width = data.draw(st.integers(1, 10), label="width")
    side = data.draw(st.sampled_from(["left", "right", "anywhere", "no mask"]), label="side")
    masks = []
    for _ in range(rows):
        n = data.draw(st.integers(1, width)) if side != "no mask" else width
        if side in ("left", "no mask"):
            masks.append([0] * (width - n) + [1] * n)
        elif side == "right":
            masks.append([1] * n + [0] * (width - n))
        else:
            bits = data.draw(st.lists(st.booleans(), min_size=width, max_size=width))
            masks.append([int(b) for b in bits] if any(bits) else [1] + [0] * (width - 1))
    seed = data.draw(st.integers(0, 2**16), label="seed")
    ids = torch.randint(3, VOCAB, (rows, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.tensor(masks)
    ids = ids.masked_fill(mask == 0, 0)
    out = decode(model, ids, None if side == "no mask" else mask, budget=0.5, max_new_tokens=4)
    for i in range(rows):
        assert out.sequences[i, width:].tolist() == alone(model, ids[i][mask[i].bool()], 4), (i, masks)


def test_padding_decode_cannot_see_is_refused():
    model = decode_model()
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    model.generation_config.pad_token_id = 0
    try:
        with pytest.raises(GateSkipError, match="row 0 of input_ids begins or ends with the pad token"):
            decode(model, ids, None, budget=0.5, max_new_tokens=2)  # left-padded, no mask
    finally:
        model.generation_config.pad_token_id = None
    with pytest.raises(GateSkipError, match="row 1 of attention_mask is all padding"):
        decode(model, ids, torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]), budget=0.5, max_new_tokens=2)
    with pytest.raises(GateSkipError, match="input_ids must be a 2-D tensor"):
        decode(model, torch.tensor([5, 6, 7]), budget=0.5, max_new_tokens=2)
    with pytest.raises(GateSkipError, match="attention_mask has shape"):
        decode(model, ids, torch.ones(2, 3), budget=0.5, max_new_tokens=2)


@pytest.mark.parametrize("setting,says", [
    (dict(temperature=math.inf), "temperature must be a finite number"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(top_p=math.nan), "top_p must be None or a number in (0, 1]"),
    (dict(top_p=1.5), "top_p must be None or a number in (0, 1]"),
    (dict(top_k=-2), "top_k must be None or a whole number"),
])
def test_sampling_settings_that_mean_nothing_are_refused(setting, says):
    with pytest.raises(GateSkipError, match=says.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        decode(decode_model(), torch.tensor([[5, 6, 7]]), budget=0.5, max_new_tokens=2, do_sample=True, **setting)


# ---------------------------------------------------------------- Python API misuse: GateSkipError naming the argument


def test_api_misuse_is_a_gateskip_error_naming_the_argument(tmp_path):
    model = add_gates(tiny_model(), GateConfig(kind="scalar"))
    ids = torch.randint(1, 101, (1, 6))
    with pytest.raises(GateSkipError, match="SkipPlan stats must be a gateskip.SkipStats"):
        model(ids, skip_plan=SkipPlan(budget=0.5, stats={}))
    with pytest.raises(GateSkipError, match="GateConfig rank must be a positive integer, got '8'"):
        GateConfig(kind="lowrank", rank="8")
    with pytest.raises(GateSkipError, match="GateConfig init_bias must be a finite number, got inf"):
        GateConfig(init_bias=math.inf)
    with pytest.raises(GateSkipError, match="threshold of attn.0 must be a number \\(not NaN\\)"):
        ThresholdBudget({"attn.0": math.nan}, 0.5)
    with pytest.raises(GateSkipError, match="AllocationBudget thresholds"):
        AllocationBudget({"attn.0": 0.5}, 0.1, {"attn.0": math.nan})
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(GateSkipError, match="save_gates: path .*a_file is an existing file"):
        save_gates(model, tmp_path / "a_file")
    assert isinstance(SkipPlan(stats=SkipStats()).stats, SkipStats)


def test_a_skip_plan_on_a_model_whose_gates_were_removed_is_refused():
    model = add_gates(tiny_model(), GateConfig(kind="scalar"))
    remove_gates(model)
    ids = torch.randint(1, 101, (1, 6))
    with pytest.raises(GateSkipError, match="this model has no gates"):
        model(ids, skip_plan=SkipPlan(budget=0.5))
    model(ids)  # without a plan: the plain model, as before
    add_gates(model, GateConfig(kind="scalar"))
    model(ids, skip_plan=SkipPlan(budget=0.5))  # gated again: plans work


# ---------------------------------------------------------------- gate metadata refused at load


def edited_gates(assets, tmp_path: Path, change) -> Path:
    meta, tensors = read_gate_file(assets["gates"])
    change(meta)
    folder = tmp_path / "edited"
    folder.mkdir()
    save_file(tensors, str(folder / "gateskip.safetensors"), metadata={"gateskip": json.dumps(meta)})
    return folder


ALLOCATION = {"ratios": {"attn.0": 0.5}, "saving": 0.1, "kl": 0.01}


@pytest.mark.parametrize("change,says", [
    (lambda m: m.update(thresholds={"0.5": {"attn.9": 0.1}}), "names module attn.9, which these gates do not have"),
    (lambda m: m.update(thresholds={"half": {"attn.0": 0.1}}), "thresholds key 'half' is not a number"),
    (lambda m: m.update(thresholds={"nan": {"attn.0": 0.1}}), "thresholds key 'nan' is not a skip ratio in [0, 1]"),
    (lambda m: m.update(thresholds={"inf": {"attn.0": 0.1}}), "thresholds key 'inf' is not a skip ratio in [0, 1]"),
    (lambda m: m.update(allocations={"ten": ALLOCATION}), "allocations key 'ten' is not a number"),
    (lambda m: m.update(allocations={"0.1": {**ALLOCATION, "kl": "small"}}), "allocation 0.1's 'kl' must be a finite"),
    (lambda m: m.update(allocations={"0.1": {**ALLOCATION, "ratios": {"mlp.7": 1.0}}}), "names module mlp.7"),
])
def test_gate_metadata_with_unknown_modules_or_keys_that_are_not_ratios_is_refused(change, says, assets, tmp_path,
                                                                                  capsys):
    gates = edited_gates(assets, tmp_path, change)
    with pytest.raises(GateSkipError, match=says.replace("[", r"\[").replace("]", r"\]")):
        read_gate_file(gates)
    code, _, err = run(["allocate", assets["model"], "--gates", gates, "--show"], capsys)
    one_error(code, err, says)


# ---------------------------------------------------------------- tracebacks for user mistakes


def test_user_mistakes_are_one_error_line(assets, tmp_path, capsys):
    truncated = tmp_path / "truncated"
    shutil.copytree(assets["model"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_error(*run(["generate", truncated, "--gates", assets["gates"], "--prompt", "hi"], capsys)[::2],
              f"cannot load model from folder {truncated}")
    one_error(*run(["generate", assets["model"], "--gates", assets["gates"], "--prompt", os.fsdecode(b"hi \xff there")],
                   capsys)[::2], "--prompt: is not UTF-8 text (byte 0xff at offset 3)")
    one_error(*run(["generate", assets["model"], "--gates", assets["gates"], "--prompt", "hi", "--seed", str(2**64 + 1)],
                   capsys)[::2], "--seed: must be at most")


def test_analyze_at_budget_1_shows_every_module_skipped(assets, tmp_path, capsys):
    out = tmp_path / "analysis"
    code, _, err = run(["analyze", assets["model"], "--gates", assets["gates"], "--text", assets["text"], "--out", out,
                        "--length", "16", "--sequences", "2", "--budget", "1"], capsys)
    assert code == 0, err
    rates = json.loads((out / "analysis.json").read_text())["keep_rates"]
    assert all(r in (None, 0.0) for r in rates.values())


def test_eval_include_path_mistakes_are_found_before_the_model_loads(assets, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(f"task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                     f"    test: {tmp_path / 'missing.jsonl'}\ntest_split: test\n")
    out = tmp_path / "out"
    args = ["eval", assets["model"], "--gates", assets["gates"], "--tasks", "mine", "--include-path", tasks, "--out", out]
    one_error(*run(args, capsys)[::2], f"names data that does not exist: {tmp_path / 'missing.jsonl'}")
    assert not out.exists()
    (tasks / "mine.yaml").write_text("task: mine\ndataset_path: json\n  bad: [indent\n")
    one_error(*run(args, capsys)[::2], "mine.yaml is not valid YAML")
    assert not out.exists()


def test_only_the_needed_prefix_of_a_long_single_line_text_is_tokenized(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("to be or not to be " * 500_000)  # ~10 MB on one line
    tokenizer = char_tokenizer()
    seen = []
    real = type(tokenizer).__call__

    class Counting(type(tokenizer)):
        def __call__(self, text, *args, **kwargs):
            seen.append(len(text))
            return real(self, text, *args, **kwargs)

    tokenizer.__class__ = Counting
    start = time.perf_counter()
    ids, mask = sample_tokens(tokenizer, str(path), sequences=2, length=16)
    assert ids.shape == (2, 16) and time.perf_counter() - start < 5
    assert max(seen) < 10_000  # a prefix, not the 10 MB line
    assert ids.flatten().tolist() == tokenizer("to be or not to be " * 2, add_special_tokens=False)["input_ids"][:32]


def test_sample_text_paragraphs_are_tokenized_only_as_far_as_the_cut(tmp_path):
    from gateskip.inference.calibrate import tokenize_samples
    from gateskip.data.samples import sample_batch

    path = tmp_path / "sample.txt"
    path.write_text("one short paragraph.\n\n" + "a very long paragraph " * 400_000)
    tokenizer = char_tokenizer()
    seen = []
    real = type(tokenizer).__call__

    class Counting(type(tokenizer)):
        def __call__(self, text, *args, **kwargs):
            seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
            return real(self, text, *args, **kwargs)

    tokenizer.__class__ = Counting
    ids, mask = sample_batch(tokenizer, path, "cpu")
    assert ids.shape[1] == 256 and max(seen) < 100_000
    reference = real(tokenizer, ["one short paragraph.", "a very long paragraph " * 20], return_tensors="pt",
                     padding=True, truncation=True, max_length=256)
    assert torch.equal(ids, reference["input_ids"]) and torch.equal(mask, reference["attention_mask"])
    assert torch.equal(tokenize_samples(tokenizer, ["a very long paragraph " * 400_000], 16)[0],
                       reference["input_ids"][1:, :16])


def test_a_task_including_a_missing_yaml_is_named_and_a_good_folder_passes(tmp_path):
    from gateskip.evaluation.tasks import check_task_folder

    (tmp_path / "items.jsonl").write_text('{"q": 1}\n')
    (tmp_path / "base.yaml").write_text("output_type: multiple_choice\n")
    (tmp_path / "good.yaml").write_text(f"include: base.yaml\ntask: good\ndataset_path: json\n"
                                        f"dataset_kwargs:\n  data_files: {tmp_path / 'items.jsonl'}\n"
                                        "doc_to_text: !function utils.doc_to_text\n")
    with pytest.raises(GateSkipError, match="names !function utils.doc_to_text, but .*utils.py does not exist"):
        check_task_folder(tmp_path)
    (tmp_path / "utils.py").write_text("def doc_to_text(doc):\n    return doc['q']\n")
    check_task_folder(tmp_path)
    (tmp_path / "bad.yaml").write_text("include: nowhere.yaml\ntask: bad\n")
    with pytest.raises(GateSkipError, match="bad.yaml includes nowhere.yaml, which does not exist"):
        check_task_folder(tmp_path)


def test_resuming_into_files_that_cannot_be_replaced_is_refused_before_work(tmp_path):
    from gateskip.validate import check_output_folder

    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "results.md").write_text("table")
    check_output_folder(tmp_path, writes=("results.json", "results.md"), resumes="results.json")
    with immutable(tmp_path / "results.md"):
        with pytest.raises(GateSkipError, match="results.md is not writable"):
            check_output_folder(tmp_path, writes=("results.json", "results.md"), resumes="results.json")


def test_a_budget_naming_modules_the_gates_do_not_have_is_refused():
    model = add_gates(tiny_model(), GateConfig(kind="scalar"))  # 3 layers: attn.0 .. mlp.2
    ids = torch.randint(1, 101, (1, 6))
    with pytest.raises(GateSkipError, match="the budget names module attn.9"):
        model(ids, skip_plan=SkipPlan(budget=AllocationBudget({"attn.9": 1.0, "mlp.0": 0.5}, 0.1)))
    thresholds = {f"{b}.{i}": 0.5 for i in range(4) for b in ("attn", "mlp")}  # made for a 4-layer model
    with pytest.raises(GateSkipError, match="the budget names module attn.3"):
        model(ids, skip_plan=SkipPlan(budget=ThresholdBudget(thresholds, 0.5)))


def test_calibrate_on_a_full_disk_keeps_the_gate_file_and_leaves_no_temporary_file(assets, tmp_path, capsys,
                                                                                    monkeypatch):
    gates = gate_copy(assets, tmp_path, 0o644)
    before = (gates / "gateskip.safetensors").read_bytes()
    real = Path.write_bytes

    def full_disk(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    code, _, err = run(calibrate_args(assets, gates, "0.5"), capsys)
    one_error(code, err, "could not write")
    assert "No space left on device" in err
    assert (gates / "gateskip.safetensors").read_bytes() == before and sorted(p.name for p in gates.iterdir()) == [
        "gateskip.safetensors"]


def test_more_api_misuse_names_the_argument():
    from gateskip.core.flops import ModelDims, flop_report
    from gateskip.loading import load_model

    model = decode_model()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(GateSkipError, match="eos_token_id must be a token id"):
        decode(model, ids, budget=0.5, max_new_tokens=2, eos_token_id="</s>")
    with pytest.raises(GateSkipError, match="pad_token_id must be a token id"):
        decode(model, ids, budget=0.5, max_new_tokens=2, pad_token_id="0")
    with pytest.raises(GateSkipError, match="input_ids holds token id"):
        decode(model, ids + 10_000, budget=0.5, max_new_tokens=2)
    with pytest.raises(GateSkipError, match="flop_report: stats must be"):
        flop_report({}, ModelDims.from_config(model.config), model.gate_bank.config)
    with pytest.raises(GateSkipError, match="no module 'attn.0' was recorded"):
        SkipStats().skip_fraction("attn.0")
    with pytest.raises(GateSkipError, match="load_model: dtype must be"):
        load_model("smollm2-135m", dtype="float32")
    with pytest.raises(GateSkipError, match="a model spec is a bundled name"):
        load_model(None)
    with pytest.raises(GateSkipError, match="add_gates: config must be a GateConfig"):
        add_gates(tiny_model(), {"kind": "scalar"})
    with pytest.raises(GateSkipError, match="path must be a gate file"):
        from gateskip import load_gates

        load_gates(tiny_model(), 123)


WRONG = [None, "x", "0.5", {}, [], [1], math.nan, math.inf, -math.inf, -1, 0, 1.5, 10**30, True, object(),
         torch.tensor(1.0)]


def only_gateskip_errors(call) -> None:
    try:
        call()
    except GateSkipError:
        pass


def test_the_python_api_given_wrong_values_raises_only_gateskip_errors():
    """Every argument of the user-facing constructors and decoders, in turn given values of the wrong type,
    non-finite or out of range: accepted, or a GateSkipError, never another exception from deep inside."""
    from gateskip import QuantileBudget
    from gateskip.inference.calibrate import allocation_budget
    from gateskip.inference.calibrate import calibrate, threshold_budget
    from gateskip.inference.speculative import speculative_generate

    model, ids = decode_model(), torch.tensor([[5, 6, 7]])
    calls = []
    for value in WRONG:
        for field in ("kind", "rank", "branches", "shared", "detach_input", "init_std", "init_bias", "skip_bos",
                      "application"):
            calls.append(lambda f=field, v=value: GateConfig(**{f: v}))
        for field in ("budget", "execution", "apply_gates", "skip_bos", "stats", "trace", "attention"):
            calls.append(lambda f=field, v=value: SkipPlan(**{f: v}))
        calls += [lambda v=value: QuantileBudget(v), lambda v=value: QuantileBudget(0.5, scope=v),
                  lambda v=value: ThresholdBudget(v), lambda v=value: ThresholdBudget({}, v),
                  lambda v=value: AllocationBudget(v, 0.1), lambda v=value: AllocationBudget({}, v),
                  lambda v=value: AllocationBudget({}, 0.1, v), lambda v=value: threshold_budget(model, v),
                  lambda v=value: allocation_budget(model, v), lambda v=value: calibrate(model, ids, v),
                  lambda v=value: calibrate(model, v, [0.5]), lambda v=value: decode(model, v, max_new_tokens=2)]
        for field in ("attention_mask", "budget", "max_new_tokens", "eos_token_id", "pad_token_id", "do_sample",
                      "temperature", "top_k", "top_p"):
            sampling = {"do_sample": True} if field in ("temperature", "top_k", "top_p") else {}
            calls.append(lambda f=field, v=value, s=sampling: decode(model, ids, **{"budget": 0.5, "max_new_tokens": 2,
                                                                                     **s, f: v}))
        for field in ("budget", "k", "max_new_tokens", "eos_token_id", "temperature", "top_p"):
            sampling = {"do_sample": True} if field in ("temperature", "top_p") else {}
            calls.append(lambda f=field, v=value, s=sampling: speculative_generate(
                model, ids, **{"budget": 0.5, "max_new_tokens": 2, **s, f: v}))
    for call in calls:
        only_gateskip_errors(call)


def test_more_of_the_python_api_given_wrong_values_raises_only_gateskip_errors(assets, tmp_path, monkeypatch):
    from gateskip import load_gates
    from gateskip.search.allocation import search
    from gateskip.evaluation.analysis import collect
    from gateskip.inference.calibrate import tokenize_samples
    from gateskip.core.flops import ModelDims, flop_report
    from gateskip.inference.generation import generate
    from gateskip.loading import load_model

    monkeypatch.chdir(tmp_path)  # save_gates(model, "x") writes x/gateskip.safetensors: here, not in the checkout
    model, ids = decode_model(), torch.tensor([[5, 6, 7]])
    for name in ("x" * 300, f"{'x' * 300}/gates"):  # too long for the file system
        only_gateskip_errors(lambda: save_gates(model, name))
        only_gateskip_errors(lambda: load_gates(tiny_model(), name))
    dims, samples = ModelDims.from_config(model.config), (torch.randint(3, 60, (2, 16)), torch.ones(2, 16))
    for value in WRONG:
        for call in (lambda: save_gates(model, value), lambda: save_gates(value, tmp_path / "g"),
                     lambda: load_gates(tiny_model(), value), lambda: add_gates(tiny_model(), value),
                     lambda: load_model(value), lambda: load_model(str(assets["model"]), dtype=value),
                     lambda: load_model(str(assets["model"]), device=value),
                     lambda: flop_report(value, dims, None), lambda: flop_report(SkipStats(), value, None),
                     lambda: flop_report(SkipStats(), dims, value), lambda: ModelDims.from_config(value),
                     lambda: generate(model, value, budget=0.5, max_new_tokens=2),
                     lambda: generate(model, ids, attention_mask=value, budget=0.5, max_new_tokens=2),
                     lambda: collect(model, value), lambda: collect(model, ids, value),
                     lambda: collect(model, ids, None, value), lambda: search(model, value, [0.1]),
                     lambda: search(model, samples, value), lambda: search(model, samples, [0.1], value),
                     lambda: tokenize_samples(char_tokenizer(), value)):
            only_gateskip_errors(call)


def test_hf_generate_refuses_padding_it_cannot_handle():
    from gateskip.inference.generation import generate

    model = decode_model()
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    with pytest.raises(GateSkipError, match="must be left-padded"):
        generate(model, ids, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), budget=0.5, max_new_tokens=2)
    model.generation_config.pad_token_id = 0
    try:
        with pytest.raises(GateSkipError, match="row 0 of input_ids begins or ends with the pad token"):
            generate(model, ids, None, budget=0.5, max_new_tokens=2)
    finally:
        model.generation_config.pad_token_id = None


@pytest.mark.parametrize("argv", [
    "analyze {model} --gates {gates} --out", "prune {model} --ratio 0.5 --out", "bench {model} --json",
    "tasks --tasks piqa --out", "allocate {model} --gates {gates} --show --plot", "train {model} --data {text} --out",
    "calibrate {model} --ratios 0.5 --gates", "analyze {model} --out {out} --text",
])
def test_an_empty_path_is_refused_not_taken_as_the_current_folder(argv, assets, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were it taken as ".", the outputs would land here
    args = [part.format(**assets, out=tmp_path / "out") for part in argv.split(" ")] + [""]
    code, _, err = run(args, capsys)
    one_error(code, err, "is empty (an unset variable?)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", ["x" * 300, "~no_such_user_here/x"])
def test_a_path_the_file_system_cannot_take_is_one_error_line(path, assets, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["analyze", assets["model"], "--out", path], ["calibrate", assets["model"], "--gates", path,
                                                               "--ratios", "0.5"],
                 ["prune", path, "--ratio", "0.5", "--out", tmp_path / "out"], ["generate", path, "--gates",
                                                                                   assets["gates"], "--prompt", "hi"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("error:"), err
    assert list(tmp_path.iterdir()) == []


def test_prune_overwrite_leaves_no_weights_of_the_model_it_replaces(assets, tmp_path, capsys):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier, sharded model
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"):
        (out / name).write_text("old")
    (out / "notes.txt").write_text("mine")
    args = ["prune", assets["model"], "--ratio", "0.5", "--out", out, "--sample-text", assets["text"], "--overwrite"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "notes.txt" in names and not any(n.startswith("model-0") for n in names)
    assert "model.safetensors.index.json" not in names
    from gateskip.loading import load_model

    model, _ = load_model(str(out))
    assert model.config.num_hidden_layers == 1
