"""Every gate folder shipped in gates/ loads for the model it names, and every allocation in it can
decode: the shipped files are what READMEs and docs tell users to run, so a broken one is a bug."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from gateskip.inference.calibrate import allocation_budget
from gateskip.serving.spec import load_bank

GATES = Path(__file__).resolve().parent.parent / "gates"
SHAPES = {"smollm2-135m": ("llama", 30, 576), "qwen2.5-coder-0.5b": ("qwen2", 24, 896)}  # type, layers, width


@pytest.mark.parametrize("folder", sorted(p.name for p in GATES.iterdir() if p.is_dir()))
def test_shipped_gates_load_and_every_allocation_decodes(folder):
    model = next(name for name in SHAPES if folder.startswith(name))
    model_type, layers, width = SHAPES[model]
    bank = load_bank(GATES / folder, SimpleNamespace(model_type=model_type, num_hidden_layers=layers, hidden_size=width))
    assert (GATES / folder / "README.md").is_file()
    for target, entry in bank.allocations.items():
        partial = {k for k, r in entry["ratios"].items() if 0.0 < r < 1.0}
        assert set(entry["thresholds"]) == partial, f"{folder}: allocation {target} lacks decoding thresholds"
        allocation_budget(bank, float(target), decoding=True)
