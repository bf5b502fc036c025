"""Checks of user input that every command shares, so that a mistake ends as one `error:` line
before any work starts, and nothing finished is overwritten by accident.

Two kinds: argparse `type=` functions (numbers, paths, devices), which raise
argparse.ArgumentTypeError so that argparse names the option; and checks that need more than
one option or a loaded model, which raise GateSkipError (the Python API's error as well).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .errors import GateSkipError

# What marks a folder as holding a model or gates: work that only --overwrite may replace.
MODEL_FILES = ("config.json", "gateskip.safetensors", "adapter_config.json")


class Parser(argparse.ArgumentParser):
    """argparse, with its mistakes reported as the commands report theirs: one `error:` line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------- argparse types


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum` (and at most `maximum`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


# Seeds reach torch (64 bits), numpy and accelerate's set_seed (32 bits): one range for every --seed.
MAX_SEED = 2**32 - 1
seed = integer(0, MAX_SEED)


def real(low: float = -math.inf, high: float = math.inf, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (in (low, high] with above=True).
    NaN and inf are refused: no option means anything at either."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or value > high or (above and value == low):
            bounds = [f"above {low:g}" if above else f"at least {low:g}"] if math.isfinite(low) else []
            bounds += [f"at most {high:g}"] if math.isfinite(high) else []
            raise argparse.ArgumentTypeError(f"must be {' and '.join(bounds)}, got {value:g}")
        return value

    return parse


ratio = real(0.0, 1.0)


def utf8_text(text: str) -> str:
    """An argparse type for free text (a prompt): valid UTF-8. Python hands undecodable bytes of the
    command line over as lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(text)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise argparse.ArgumentTypeError(f"is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
        raise argparse.ArgumentTypeError("is not UTF-8 text (it holds lone surrogate characters)") from None
    return text


def _usable_path(text: str) -> Path:
    """The path `text` names, expanded (~), refused as one line where it cannot be: an empty path
    (Path("") is the current folder: almost always an unset shell variable), a ~user that does not
    exist, a name the file system cannot take (too long)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (an unset variable?); give a path (. for the current folder)")
    try:
        path = Path(text).expanduser()
        path.exists()  # a name too long (ENAMETOOLONG) or a loop of links raises here, not later
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text}: cannot expand ~ (no such user)") from None
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror or e}") from None
    return path


def output_path(text: str) -> Path:
    """An argparse type for an output file or folder: any path but an empty or impossible one (its checks
    come with the command's options: check_output_folder, check_output_file, check_plot_file)."""
    _usable_path(text)
    return Path(text)


def output_name(text: str) -> str:
    """output_path, kept as the text (for options that end up in a JSON record)."""
    _usable_path(text)
    return text


def existing_file(text: str) -> Path:
    """An argparse type: a readable file."""
    path = _usable_path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable")
    return path


def existing_folder(text: str) -> Path:
    """An argparse type: a readable folder."""
    path = _usable_path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder" if path.exists() else f"{text} does not exist")
    if not os.access(path, os.R_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable")
    return path


def existing_path(text: str) -> str:
    """An argparse type: a file or folder that exists (a gate file or the folder holding one)."""
    if not _usable_path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def text_source(text: str) -> str:
    """An argparse type for gateskip.data.textdata sources: 'bundled', 'hf:NAME[:SPLIT]' or an existing path."""
    if text == "bundled" or text.startswith("hf:"):
        return text
    return existing_path(text)


def _device_problem(text: str | torch.device) -> str | None:
    """Why `text` is not a torch device this machine has, or None."""
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError, OverflowError):
        return f"unknown device {str(text)!r}; use cpu, cuda, cuda:N or mps"
    if dev.type == "cpu":
        return None
    if dev.type == "mps":
        count = int(torch.backends.mps.is_available())
    else:
        backend = getattr(torch, dev.type, None)
        count = backend.device_count() if backend is not None and backend.is_available() else 0
    if count == 0:
        return f"this machine has no {dev.type} device (torch sees none); use cpu"
    if dev.index is not None and dev.index >= count:
        return f"{dev} does not exist: this machine has {count} {dev.type} device(s)"
    return None


def device(text: str) -> str:
    """An argparse type: a torch device that this machine has (cpu, cuda, cuda:N, mps, ...)."""
    problem = _device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def token_batch(samples, what: str, mask_required: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Python API's (ids, attention_mask) samples: ids a (B, T) integer tensor with tokens, the mask
    a tensor of its shape (or, when not `mask_required`, ids alone or (ids, None)); GateSkipError
    naming `what` otherwise."""
    if isinstance(samples, torch.Tensor) and not mask_required:
        ids, mask = samples, None
    elif isinstance(samples, (tuple, list)) and len(samples) == 2:
        ids, mask = samples
    else:
        need = "an (ids, attention_mask) pair" if mask_required else "token ids (B, T) or an (ids, attention_mask) pair"
        raise GateSkipError(f"{what} must be {need} of tensors, got {type(samples).__name__}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0 or ids.dtype.is_floating_point:
        raise GateSkipError(f"{what}: the token ids must be a non-empty (B, T) integer tensor")
    if mask is None and not mask_required:
        return ids, None
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise GateSkipError(f"{what}: the attention mask must be a tensor of the ids' shape {tuple(ids.shape)}")
    return ids, mask


def ratio_list(values, what: str) -> list[float]:
    """A list of ratios in [0, 1] (targets, levels) from the Python API; GateSkipError naming `what` otherwise."""
    from .core.budget import check_ratio

    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or isinstance(values, torch.Tensor):
        raise GateSkipError(f"{what} must be a list of ratios in [0, 1], e.g. [0.1, 0.25], got {values!r}")
    return [check_ratio(v) for v in values]


def check_device(dev: str | torch.device) -> None:
    """The Python API's form of `device`."""
    problem = _device_problem(dev)
    if problem:
        raise GateSkipError(problem)


# ---------------------------------------------------------------- checks needing more than one option


def check_dtype(dtype: torch.dtype, device: str) -> None:
    """bfloat16 runs on every CPU, but not on every GPU."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GateSkipError(f"{device} does not support bfloat16; use --dtype float32")


def fits_context(model, tokens: int, what: str) -> None:
    """Refuse sequences longer than the model's context (its position embeddings end there)."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and tokens > context:
        raise GateSkipError(f"{what} of {tokens} tokens exceeds the model's context of {context} tokens")


def _probe(folder: Path, path: Path) -> None:
    """A new file can be created in `folder` (tried, not asked: os.access says yes to root on a
    read-only file system or an immutable folder)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".gateskip-probe-", dir=folder)
    except OSError as e:
        raise GateSkipError(f"{path} is not writable: cannot create files in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def _writable_parent(path: Path) -> None:
    """A folder that does not exist yet must be creatable: its nearest existing ancestor is a writable folder."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GateSkipError(f"{path} is not writable: {parent} is a file")
    _probe(parent, path)


def check_replaceable(path: str | os.PathLike) -> Path:
    """An existing file that a command will replace (through a temporary file renamed onto it):
    its folder takes new files, and the file is neither read-only nor immutable."""
    path = Path(path).expanduser()
    _probe(path.parent, path)
    try:
        with open(path, "ab"):  # opening for append changes nothing; an immutable or read-only file refuses
            pass
    except OSError as e:
        raise GateSkipError(f"{path} is not writable ({e.strerror or e})") from None
    return path


def check_output_folder(path: str | os.PathLike, *, writes: Iterable[str] = (), overwrite: bool = False,
                        resumes: str | None = None) -> Path:
    """An output folder that may be used without losing work, checked without creating anything.

    Refused: a file; a folder that is not writable; unless `overwrite`, a folder holding a model
    or gates, or any of the files the command `writes`. A folder holding `resumes` (the
    command's own record of an earlier run) passes: the command continues it.
    """
    path = Path(path).expanduser()
    if not path.exists():
        _writable_parent(path)
        return path
    if not path.is_dir():
        raise GateSkipError(f"output folder {path} is a file")
    if not os.access(path, os.W_OK | os.X_OK):
        raise GateSkipError(f"output folder {path} is not writable")
    _probe(path, path)
    for name in writes:  # files the command will replace (resumed or overwritten): not read-only or immutable
        if (path / name).is_file() and (overwrite or (resumes is not None and (path / resumes).exists())):
            check_replaceable(path / name)
    if resumes is not None and (path / resumes).exists():
        return path
    if not overwrite:
        model = [name for name in MODEL_FILES if (path / name).exists()]
        if model:
            raise GateSkipError(f"{path} holds a model or gates ({model[0]}); choose another folder"
                                + (" or pass --overwrite" if resumes is None else ""))
        done = [name for name in writes if (path / name).exists()]
        if done:
            raise GateSkipError(f"{path} already holds {done[0]} from an earlier run; choose another folder"
                                + (" or pass --overwrite to replace it" if resumes is None else ""))
    return path


def check_output_file(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """An output file: not a folder, in a folder that exists or can be made and takes new files,
    not replaced unless `overwrite` (and then not read-only)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise GateSkipError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise GateSkipError(f"{path} exists; pass --overwrite to replace it")
    if path.exists():
        check_replaceable(path)
    else:
        _writable_parent(path)
    return path


def plot_formats() -> list[str]:
    """File suffixes matplotlib writes (without the dot)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def check_plot_file(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """A plot's output file, as it will be written: a name without a suffix gets .png (what
    matplotlib would write, so that name is the one checked and reported), a suffix matplotlib
    cannot write is refused; then as check_output_file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise GateSkipError(f"{path} is a folder; give a file name")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    formats = plot_formats()
    if path.suffix[1:].lower() not in formats:
        raise GateSkipError(f"{path}: cannot write a plot as {path.suffix} files; use one of "
                            + ", ".join(f".{f}" for f in formats))
    return check_output_file(path, overwrite=overwrite)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file gateskip wrote earlier; a damaged one is a one-line error, not a traceback."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GateSkipError(f"{path} is not a readable {what} ({e}); move it away to start over") from None


def parse_list(text: str, what: str, choices: tuple[str, ...] | None = None) -> list[str]:
    """A comma-separated option (methods, tasks): its items in order, repeats dropped; an item
    outside `choices` is a one-line error."""
    items = [t for t in str(text).replace(" ", "").split(",") if t]
    if not items:
        raise GateSkipError(f"the {what} list is empty")
    if choices is not None:
        bad = [i for i in items if i not in choices]
        if bad:
            raise GateSkipError(f"unknown {what} {', '.join(map(repr, bad))}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(items))
