"""Atomic, resumable training checkpoints on top of accelerate's save_state/load_state.

A checkpoint is written into a hidden temporary folder and renamed into place only when
complete, so a kill during a save leaves at worst an ignored `.tmp-*` folder: the last
complete checkpoint stays the one `--resume` finds. accelerate saves the model, optimizer,
scheduler and every process's RNG state (sharded under FSDP); `trainer.json` adds the step,
which is also the data position (the batch order is a function of the step).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from ..errors import GateSkipError

FOLDER = "checkpoints"
STATE_FILE = "trainer.json"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / FOLDER
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint, or a clear error if the run has none."""
    found = checkpoints(run_dir)
    if not found:
        raise GateSkipError(f"nothing to resume: no checkpoint in {Path(run_dir) / FOLDER}")
    return found[-1][1]


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """Save the full training state after `step` optimizer steps; keep the newest `keep` checkpoints.

    Every process must call this (accelerate gathers or writes shards collectively)."""
    root = Path(run_dir) / FOLDER
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
        if final.exists():  # re-saving the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restore the state saved in `path` into the prepared objects; returns the step."""
    accelerator.load_state(str(path))
    return int(json.loads((Path(path) / STATE_FILE).read_text())["step"])
