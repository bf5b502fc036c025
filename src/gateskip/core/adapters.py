"""LoRA adapters that travel with gates: a PEFT adapter folder beside gateskip.safetensors.

`gateskip train --mode lora` exports the adapter in PEFT's own format (megabytes, not a
merged copy of the model); `load_gates` finds it beside the gate file and merges it into
the backbone before putting the gates on, so every command that takes `--gates` applies
both. A model remembers which adapter it holds, so gates made with another adapter (or
with none) are refused instead of running on the wrong backbone.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import GateSkipError

ADAPTER_CONFIG = "adapter_config.json"
MERGED = "gateskip_adapter"  # attribute on the model: the adapter folder merged into it


def adapter_folder(gate_file: Path) -> Path | None:
    """The folder of a gate file when it also holds a PEFT adapter."""
    folder = Path(gate_file).parent
    return folder.resolve() if (folder / ADAPTER_CONFIG).is_file() else None


def check_adapter(model, gate_file: Path) -> Path | None:
    """The adapter still to merge for this gate file (None if none, or merged already); a clear
    error when the model holds another adapter than the gates were trained with."""
    wanted, held = adapter_folder(gate_file), getattr(model, MERGED, None)
    if held is not None and held != wanted:
        raise GateSkipError(f"this model has the LoRA adapter of {held} merged into it; load the base model "
                            f"again to use the gates in {Path(gate_file).parent}")
    return None if wanted is None or held == wanted else wanted


def merge_adapter(model, folder: os.PathLike):
    """Merge the PEFT adapter in `folder` into an ungated model's weights, in place."""
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (OSError, ValueError, KeyError) as e:
        raise GateSkipError(f"cannot apply the LoRA adapter in {folder}: {str(e).splitlines()[0]}") from None
    setattr(merged, MERGED, Path(folder).resolve())
    return merged
