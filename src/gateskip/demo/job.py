"""The main job's bookkeeping: how big each stage is (JobSizes), the report folder that
lets an interrupted job continue (Job), and which gates it evaluates."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .. import files as outputs
from ..core.model import GATE_FILE, read_gate_file
from ..errors import GateSkipError
from ..inference.calibrate import ratio_key
from ..validate import read_json


REPO = Path(__file__).resolve().parents[3]
SHIPPED_GATES = {"smollm2-135m": "gates/smollm2-135m-unit/gateskip.safetensors"}  # repo-relative


@dataclass(frozen=True)
class JobSizes:
    """How much work each stage does. FULL is the main job; QUICK exercises every stage in seconds."""

    targets: tuple[float, ...] = (0.1, 0.2, 0.3)  # net savings compared; at 0 every method is the base
    train_steps: int = 24  # influence objective: one forward of the base per step
    train_batch: int = 4
    train_seq_len: int = 128
    train_tokens: int = 200_000
    gate_rank: int = 16
    gate_lr: float = 3e-3
    search_sequences: int = 2  # training-side text ShortGPT ranks layers on (as `gateskip allocate` reads)
    search_length: int = 256
    allocation_sequences: int = 1  # of those, what the search for gates trained here reads (a forward per step)
    proxy_blocks: int = 3
    proxy_length: int = 256
    agreement_prompts: int = 4  # held-out prompts the base continues greedily; the proxy scores agreement on them
    tasks: tuple[str, ...] = ("arc_easy", "piqa")
    items: int = 200  # per task; lm-eval's standard error is printed with every score
    random_targets: tuple[float, ...] = (0.2,)  # random skipping on tasks (the proxy has its whole curve)
    sample_targets: tuple[float, ...] = (0.1, 0.2)
    new_tokens: int = 40
    prefill_batch: int = 2
    prefill_length: int = 256
    decode_tokens: int = 32
    rounds: int = 2
    analysis_sequences: int = 8
    analysis_length: int = 128


FULL = JobSizes()
QUICK = JobSizes(train_steps=2, train_batch=1, train_seq_len=32, train_tokens=4_000, search_sequences=1,
                 search_length=32, proxy_blocks=2, proxy_length=32, agreement_prompts=1, tasks=("arc_easy",), items=2,
                 new_tokens=4, prefill_batch=1, prefill_length=32, decode_tokens=4, rounds=1, analysis_sequences=2,
                 analysis_length=24)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Job:
    """The report folder and the stages' bookkeeping: timings, which stages were reused, and
    whether the gates changed since the results in the folder were made."""

    def __init__(self, model: str, out: Path, sizes: JobSizes, console: Console, gates: str = "trained here"):
        self.model, self.out, self.sizes, self.console, self.gates = model, Path(out), sizes, console, gates
        self.out.mkdir(parents=True, exist_ok=True)
        self.stages: dict[str, dict] = {}
        self.gates_changed = False  # set by check_gates: later results in the folder are stale
        self.trained_now = False  # training ran in this invocation: the allocation must be searched again
        # Timings of earlier invocations: a reused stage reports what it cost when it ran.
        saved = self.out / "summary.json"
        self.earlier: dict[str, dict] = read_json(saved, "job summary").get("stages", {}) if saved.is_file() else {}
        self._check_same_job()

    def _check_same_job(self) -> None:
        """Reusing results is only right for the same model, gates and sizes."""
        path = self.out / "job.json"
        now = {"model": self.model, "gates": self.gates, "sizes": dataclasses.asdict(self.sizes)}
        now = json.loads(json.dumps(now))  # tuples as lists, as read back
        if path.is_file() and read_json(path, "job record") != now:
            raise GateSkipError(f"{self.out} holds a main job with another model, gates or size; "
                                "choose another --out or delete it")
        outputs.write_json(path, now, indent=1)

    def check_gates(self, files: dict[str, Path]) -> None:
        """Results made with other gates are stale: compare the gate files' hashes with the last run's
        (a shipped file regenerated in place, or gates retrained here, change them)."""
        path = self.out / "gates.json"
        now = {role: {"path": str(p), "sha256": _sha256(p)} for role, p in files.items()}
        if not path.is_file() or read_json(path, "gate record") != now:
            self.gates_changed = True
            self.write_json(path.name, now)

    def stage(self, name: str, reused: bool):
        """Context manager that times a stage and prints its start and end."""
        job = self

        class _Stage:
            def __enter__(self):
                self.start, self.cpu = time.perf_counter(), time.process_time()
                job.console.rule(f"[bold]{name}[/]" + (" (reusing earlier result)" if reused else ""))

            def __exit__(self, *exc):
                seconds, cpu = time.perf_counter() - self.start, time.process_time() - self.cpu
                if exc[0] is None:
                    measured = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)}
                    if reused and name in job.earlier:
                        measured = {k: job.earlier[name][k] for k in measured}
                    job.stages[name] = {**measured, "reused": reused}
                    job.console.print(f"[dim]{name}: {seconds:.0f} s wall, {cpu:.0f} s CPU[/]")

        return _Stage()

    def reusable(self, path: Path) -> bool:
        """Whether a stage's output at `path` can be reused; stale output (made with other gates) is deleted."""
        if self.gates_changed and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return path.exists()

    def write_json(self, name: str, data) -> None:
        outputs.write_json(self.out / name, data, indent=1)


# ---------------------------------------------------------------- gates: which ones, and where from


def shipped_gates(model_spec: str) -> Path | None:
    """The gate file shipped for a bundled model (None for any other model)."""
    rel = SHIPPED_GATES.get(model_spec.strip().lower())
    return None if rel is None else REPO / rel


def choose_gates(model_spec: str, gates: Path | None, train_here: bool) -> Path | None:
    """The gate file the job evaluates: --gates, else the shipped one; None: train them here."""
    if gates is not None:
        file = gates / GATE_FILE if gates.is_dir() else gates
        if not file.is_file():
            raise GateSkipError(f"--gates {gates}: no gate file there")
        return file
    shipped = None if train_here else shipped_gates(model_spec)
    if shipped is not None and not shipped.is_file():
        raise GateSkipError(f"the shipped gates for {model_spec} are missing ({shipped}); pass --gates PATH, "
                            "or --train-gates to train gates here")
    return shipped


def check_allocations(file: Path, model_spec: str, targets) -> None:
    """A gate file is only usable here with an allocation (and decoding thresholds) for every target."""
    stored = read_gate_file(file)[0].get("allocations") or {}
    missing = [k for k in map(ratio_key, sorted(targets)) if "thresholds" not in stored.get(k, {})]
    if missing:
        what = "holds no allocations"
        if stored:
            what = f"needs allocations for net savings {', '.join(missing)} (it holds {', '.join(sorted(stored, key=float))})"
        raise GateSkipError(f"{file} {what}; run `gateskip allocate {model_spec} --gates {file} "
                            f"--targets {' '.join(missing)}`")
