"""The held-out-text proxy: curves of (net saving, loss, KL) per method, compared at equal savings."""

import pytest
import torch

from conftest import tiny_model
from gateskip import GateConfig, add_gates
from gateskip.search.allocation import search, store
from gateskip.inference.calibrate import calibrate_allocation
from gateskip.core.model import load_gates, save_gates
from gateskip.search.proxy import greedy_continuations, interpolate, run_proxy, table


def test_interpolate_reads_a_curve_between_its_points_only():
    pts = [{"net_saving": 0.0, "kl": 0.0}, {"net_saving": 0.2, "kl": 1.0}, {"net_saving": 0.1, "kl": 0.2}]
    assert interpolate(pts, 0.15, "kl") == pytest.approx(0.6)
    assert interpolate(pts, 0.1, "kl") == pytest.approx(0.2)
    assert interpolate(pts, 0.3, "kl") is None


def test_proxy_compares_gates_and_baselines_on_the_same_blocks(tmp_path):
    model = add_gates(tiny_model(), GateConfig(kind="lowrank", rank=8, application="unit"))
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 101, (2, 40), generator=g), torch.ones(2, 40, dtype=torch.long)
    held = torch.randint(1, 101, (2, 40), generator=g), torch.ones(2, 40, dtype=torch.long)
    store(model.gate_bank, search(model, text, [0.1, 0.2], levels=(0.5, 1.0)))
    save_gates(model, tmp_path / "unit")
    calibrate_allocation(model, text, model.gate_bank.allocations)
    save_gates(model, tmp_path / "unit")
    continuations = greedy_continuations(model, [held[0][0, :8], held[0][1, :8]], 6)
    curves = run_proxy(model, [tmp_path / "unit"], held, text, ["gateskip", "equal", "shortgpt", "random"],
                       lambda p: load_gates(model, p), continuations, 8)
    unit = str(tmp_path / "unit")
    assert set(curves) == {"base", "shortgpt", "random", unit, f"{unit} (equal share)"}
    assert curves["base"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert curves[unit][0]["kl"] == pytest.approx(0.0, abs=1e-6)  # unit gates at 0: the base
    assert [round(p["net_saving"], 2) for p in curves[unit][1:]] == pytest.approx([0.1, 0.2], abs=0.02)
    assert all(p["kl"] > 0 for p in curves["shortgpt"][1:])
    assert curves["base"][0]["agreement"] == curves[unit][0]["agreement"] == 1.0
    assert all(0 <= p["agreement"] <= 1 for c in curves.values() for p in c)
    md = table(curves, [0.1, 0.2], "kl")
    assert "| shortgpt |" in md and f"| {unit} |" in md
