"""Put gates on a Hugging Face causal LM, run it with a skip plan, save and load the gates.

`add_gates` changes a model in place: each decoder layer and the top-level model get
a subclass of their own class that understands a skip plan, and a GateBank is attached
as `model.gate_bank`. Module names, weights and `generate` stay as they were.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..errors import GateSkipError
from ..files import atomic_path, locked
from .adapters import check_adapter, merge_adapter
from .config import GateConfig
from .gates import GateBank
from .layer import GatedLayerMixin
from .plan import ForwardContext, SkipPlan

if TYPE_CHECKING:  # annotations only: importing it loads transformers' modelling stack (and torchao)
    from transformers import PreTrainedModel

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gemma3_text")
GATE_FILE = "gateskip.safetensors"
FORMAT_VERSION = 1


class GatedCausalLMMixin:
    """Mixed in before an HF *ForCausalLM class: `forward(..., skip_plan=SkipPlan(...))`.

    Builds the call's ForwardContext (padding, context lengths) from the 2-D attention
    mask and hands it to the decoder layers; without a plan the model is the original.
    """

    # position_ids and logits_to_keep are named because HF generate reads the signature: it
    # derives positions from a left-padded mask and computes prefill logits for the last
    # token only when forward names them.
    def forward(self, input_ids=None, attention_mask=None, skip_plan: SkipPlan | None = None, position_ids=None,
                logits_to_keep=0, **kwargs):
        if skip_plan is not None:
            ref = input_ids if input_ids is not None else kwargs["inputs_embeds"]
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            if cache is None:  # no cache unless asked: a removed attention module then computes no keys either
                kwargs.setdefault("use_cache", False)
            kwargs["skip_ctx"] = ForwardContext.build(
                skip_plan, self.gate_bank, ref.shape[0], ref.shape[1], attention_mask, past, ref.device
            )
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               logits_to_keep=logits_to_keep, **kwargs)

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """The HF folder without the gates, and the gates in their own file beside it (what save_gates
        writes): `AutoModelForCausalLM.from_pretrained` then loads the plain base model without
        unexpected weights, and `gateskip.load_model(folder)` loads it with its gates."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        backbone = {k: v for k, v in state_dict.items() if not k.startswith("gate_bank.")}
        super().save_pretrained(save_directory, *args, state_dict=backbone, **kwargs)
        if kwargs.get("is_main_process", True):  # as HF: under several processes, one writes
            save_gates(self, save_directory)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _gated_subclass(mixin: type, base: type) -> type:
    """A subclass of `base` with the mixin's forward. It keeps base's name, because HF
    writes the class name into config.json as the architecture to load."""
    if (mixin, base) not in _SUBCLASSES:
        cls = type(base.__name__, (mixin, base), {"__module__": base.__module__})
        cls.__qualname__ = f"Gated{base.__name__}"
        _SUBCLASSES[(mixin, base)] = cls
    return _SUBCLASSES[(mixin, base)]


def _ungated_class(module: torch.nn.Module) -> type:
    """The HF class a gated subclass was made from: (subclass, mixin, base, ...)."""
    return type(module).__mro__[2]


def is_gated(model: torch.nn.Module) -> bool:
    return isinstance(model, GatedCausalLMMixin)


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    return model.model.layers


def check_supported(model: torch.nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(getattr(model, "model", None), "layers"):
        raise GateSkipError(
            f"unsupported architecture {model_type or type(model).__name__!r}: gateskip supports decoder-only "
            f"causal LMs of types {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def add_gates(model: PreTrainedModel, config: GateConfig | None = None) -> PreTrainedModel:
    """Attach a gate to every gated branch of every decoder layer (in place) and return the model.

    The gates start almost open (bias 5), so a freshly gated model stays close to the original;
    run it with `model(ids, skip_plan=SkipPlan(budget=...))`.
    """
    check_supported(model)
    if is_gated(model):
        raise GateSkipError("model already has gates")
    if config is not None and not isinstance(config, GateConfig):
        raise GateSkipError(f"add_gates: config must be a GateConfig (or None for the defaults), got "
                            f"{type(config).__name__}")
    config = config or GateConfig()
    layers = decoder_layers(model)
    param = next(model.parameters())
    bank = GateBank(len(layers), model.config.hidden_size, config).to(param.device)
    for layer in layers:
        layer.__class__ = _gated_subclass(GatedLayerMixin, type(layer))
    model.__class__ = _gated_subclass(GatedCausalLMMixin, type(model))
    model.add_module("gate_bank", bank)
    hook = getattr(model, "_gateskip_ungated_hook", None)
    if hook is not None:  # gated again (load_gates after remove_gates): plans are welcome
        hook.remove()
        model._gateskip_ungated_hook = None
    return model


def remove_gates(model: PreTrainedModel) -> PreTrainedModel:
    """Undo add_gates: the original classes, no gate bank. A forward given a skip plan afterwards
    is refused (the HF forward would ignore it and skip nothing without a word)."""
    if not is_gated(model):
        return model
    for layer in decoder_layers(model):
        layer.__class__ = _ungated_class(layer)
    model.__class__ = _ungated_class(model)
    del model.gate_bank
    if getattr(model, "_gateskip_ungated_hook", None) is None:
        model._gateskip_ungated_hook = model.register_forward_pre_hook(_refuse_plan_without_gates, with_kwargs=True)
    return model


def _refuse_plan_without_gates(module, args, kwargs):
    if kwargs.get("skip_plan") is not None and not is_gated(module):
        raise GateSkipError("this model has no gates (remove_gates took them off): a skip_plan would skip nothing; "
                            "add_gates or load_gates first")
    return None


def _gate_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / GATE_FILE


def save_gates(model: PreTrainedModel, path: str | os.PathLike) -> Path:
    """Write the gates, their configuration, calibrated thresholds and the model type (load_gates
    refuses other types) to one safetensors file (`path` itself if it ends in .safetensors, else
    `path/gateskip.safetensors`). The file is written whole to a temporary name and renamed into
    place (keeping a replaced file's mode), under the gate file's lock."""
    if not is_gated(model):
        raise GateSkipError("model has no gates to save")
    target = _output_gate_file(path)
    with locked(target):
        _write_gate_file(target, _bank_tensors(model.gate_bank), _bank_meta(model))
    return target


def _output_gate_file(path: str | os.PathLike) -> Path:
    """Where save_gates writes for `path`, refusing a path it cannot write to (as GateSkipError)."""
    if not isinstance(path, (str, os.PathLike)):
        raise GateSkipError(f"save_gates: path must be a folder or a .safetensors file name, got {path!r}")
    target = _gate_file(path)
    try:
        given_file, folder = Path(path).is_file(), target.is_dir()
    except OSError as e:
        raise GateSkipError(f"save_gates: cannot write to {path} ({e.strerror or e})") from None
    if given_file and target != Path(path):
        raise GateSkipError(f"save_gates: path {path} is an existing file; give a folder (the gates go into "
                            f"{GATE_FILE} inside it) or a name ending in .safetensors")
    if folder:
        raise GateSkipError(f"save_gates: {target} is a folder; give a folder holding it or another file name")
    return target


def _bank_tensors(bank: GateBank) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in bank.state_dict().items()}


def _bank_meta(model) -> dict:
    bank: GateBank = model.gate_bank
    return {
        "version": FORMAT_VERSION,
        "gate_config": bank.config.to_dict(),
        "num_layers": bank.num_layers,
        "hidden_size": bank.hidden_size,
        "model_type": model.config.model_type,
        "thresholds": bank.thresholds,
        "allocations": bank.allocations,
    }


def _write_gate_file(target: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a gate file, refusing one that read_gate_file would refuse (so nothing is saved that
    cannot be loaded back): its metadata checked as on reading, its weights finite."""
    try:
        text = json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise GateSkipError(f"cannot save gates to {target}: thresholds or allocations hold a value that is "
                            f"not JSON ({e})") from None
    _check_metadata(json.loads(text), f"cannot save gates to {target}")
    diverged = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if diverged:
        raise GateSkipError(f"cannot save gates to {target}: {diverged[0]} holds NaN or inf values")
    data = save(tensors, metadata={"gateskip": text})  # bytes: the one write below is ours (no temp file of safetensors')
    with atomic_path(target) as tmp:  # a reader never sees a half-written file
        tmp.write_bytes(data)


def update_gate_file(model: PreTrainedModel, path: str | os.PathLike, field: str, entries: dict,
                     before: dict) -> Path:
    """Save new `entries` ({key: entry}) of `field` ("thresholds" or "allocations") into the gate file
    at `path` that the model's gates came from, as a read-modify-write under the file's lock: what
    another process stored there meanwhile (other keys, the other field) is kept, and the model's
    gate bank then holds the merged table.

    `before` is the field as the file held it when the gates were loaded. Refused, with nothing
    written: a file whose gate weights are no longer the model's (replaced meanwhile), and a key
    of `entries` that another process stored or changed meanwhile (two runs computing the same
    entry: the first one's result stays)."""
    if field not in ("thresholds", "allocations"):
        raise GateSkipError(f"update_gate_file: field must be 'thresholds' or 'allocations', got {field!r}")
    target = _output_gate_file(path)
    bank: GateBank = model.gate_bank
    with locked(target):
        meta, tensors = read_gate_file(target)
        mine = _bank_tensors(bank)
        if tensors.keys() != mine.keys() or any(not torch.equal(tensors[k], mine[k]) for k in mine):
            raise GateSkipError(f"{target} now holds other gate weights than the ones this command loaded (it was "
                                "replaced while this ran); nothing was saved: rerun on the new file")
        on_disk = meta.get(field, {})
        changed = sorted(k for k in entries if on_disk.get(k) != before.get(k))
        if changed:
            raise GateSkipError(f"another run stored {field} for {changed[0]} in {target} while this one ran; "
                                "nothing was saved (its result is kept): rerun with --overwrite to replace it")
        merged = {**on_disk, **entries}
        out = {**_bank_meta(model), "thresholds": meta.get("thresholds", {}),
               "allocations": meta.get("allocations", {}), field: merged}
        _write_gate_file(target, mine, out)
    bank.thresholds = {k: dict(v) for k, v in out["thresholds"].items()}
    bank.allocations = {k: dict(v) for k, v in out["allocations"].items()}
    return target


def _existing_gate_file(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise GateSkipError(f"path must be a gate file or the folder holding {GATE_FILE}, got {type(path).__name__}")
    target = _gate_file(path)
    try:
        given_file, found = Path(path).is_file(), target.is_file()
    except OSError as e:  # a name too long for the file system
        raise GateSkipError(f"no gate file at {target} ({e.strerror or e})") from None
    if given_file and target != Path(path):
        raise GateSkipError(f"{path} is not a gate file: give a .safetensors file or the folder holding {GATE_FILE}")
    if not found:
        raise GateSkipError(f"no gate file at {target}")
    return target


def writable_gate_file(path: str | os.PathLike) -> Path:
    """The existing gate file a command will save back into (calibrate, allocate), checked before any
    work: a gate file, in a folder that takes new files, neither read-only nor immutable."""
    from ..validate import check_replaceable

    return check_replaceable(_existing_gate_file(path))


def read_gate_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a gate file; a clear error if it is missing or not ours."""
    target = _existing_gate_file(path)
    try:
        with safe_open(str(target), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["gateskip"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, json.JSONDecodeError, OSError, Exception) as e:  # safetensors raises its own error types
        raise GateSkipError(f"{target} is not a gateskip gate file ({e})") from None
    _check_metadata(meta, str(target))
    diverged = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if diverged:
        raise GateSkipError(f"{target}: {diverged[0]} holds NaN or inf values (the gates diverged in training); "
                            "retrain them, e.g. with a lower --gate-lr")
    return meta, tensors


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_metadata(meta, where: str) -> None:
    """Refuse metadata of the wrong type (a damaged, hand-edited or foreign file) before anything reads it.
    Thresholds may be -inf or inf (calibration's "skip none" and "skip all"), never NaN."""
    if not isinstance(meta, dict):
        raise GateSkipError(f"{where}: the gateskip metadata is not a JSON object")
    kinds = {"num_layers": int, "hidden_size": int, "gate_config": dict, "version": int, "model_type": str,
             "thresholds": dict, "allocations": dict}
    required = ("num_layers", "hidden_size", "gate_config")
    for key, kind in kinds.items():
        value = meta.get(key)
        if (value is not None or key in required) and (not isinstance(value, kind) or isinstance(value, bool)):
            what = {int: "a whole number", dict: "a JSON object", str: "a string"}[kind]
            raise GateSkipError(f"{where}: metadata field {key!r} should be {what}, got {value!r}")
    if meta.get("version", FORMAT_VERSION) > FORMAT_VERSION:
        raise GateSkipError(f"{where} has format version {meta['version']}, newer than this gateskip reads "
                            f"({FORMAT_VERSION}); upgrade gateskip")
    try:
        config = GateConfig.from_dict(meta["gate_config"])
    except (TypeError, ValueError, GateSkipError) as e:
        raise GateSkipError(f"{where}: gate_config is malformed ({e})") from None
    if meta["num_layers"] < 1 or meta["hidden_size"] < 1:
        raise GateSkipError(f"{where}: num_layers and hidden_size must be at least 1, got {meta['num_layers']} and "
                            f"{meta['hidden_size']}")
    modules = set(module_keys(meta["num_layers"], config))
    tables = {}
    for field in ("thresholds", "allocations"):
        for key in meta.get(field, {}):
            _check_ratio_key(key, f"{where}: {field} key", "a net-saving target" if field == "allocations" else "a skip ratio")
    tables.update({f"thresholds for ratio {r}": t for r, t in meta.get("thresholds", {}).items()})
    for target, entry in meta.get("allocations", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("ratios"), dict):
            raise GateSkipError(f"{where}: allocation {target} is malformed")
        tables[f"allocation {target}'s ratios"] = entry["ratios"]
        tables[f"allocation {target}'s thresholds"] = entry.get("thresholds", {})
        for name in ("saving", "kl", "measured_saving"):
            value = entry.get(name)
            if value is not None and not (_is_number(value) and math.isfinite(value)):
                raise GateSkipError(f"{where}: allocation {target}'s {name!r} must be a finite number, got {value!r}")
        if "chosen_from" in entry and not isinstance(entry["chosen_from"], str):
            raise GateSkipError(f"{where}: allocation {target}'s 'chosen_from' must be a string")
    for name, table in tables.items():
        if not isinstance(table, dict) or not all(_is_number(v) and not math.isnan(v) for v in table.values()):
            raise GateSkipError(f"{where}: {name} must map modules to numbers (no NaN)")
        unknown = sorted(set(table) - modules)
        if unknown:
            raise GateSkipError(f"{where}: {name} names module {unknown[0]}, which these gates do not have "
                                f"(they have {_describe_modules(modules)}: made for another model?)")
    for target, entry in meta.get("allocations", {}).items():
        if not all(0.0 <= v <= 1.0 for v in entry["ratios"].values()):
            raise GateSkipError(f"{where}: allocation {target} has a skip ratio outside [0, 1]")


def _check_ratio_key(key: str, what: str, meaning: str) -> None:
    """Keys of the thresholds and allocations tables are ratios written as text ("0.25")."""
    try:
        value = float(key)
    except ValueError:
        raise GateSkipError(f"{what} {key!r} is not a number ({meaning} like '0.25')") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise GateSkipError(f"{what} {key!r} is not {meaning} in [0, 1]")


def _describe_modules(modules: set[str]) -> str:
    layers = {int(k.partition(".")[2]) for k in modules}
    branches = sorted({k.partition(".")[0] for k in modules})
    return f"{'/'.join(branches)} of layers 0-{max(layers)}" if layers else "none"


def module_keys(num_layers: int, config: GateConfig) -> list[str]:
    """The gated modules' keys ("attn.0", "mlp.0", ...) of `num_layers` layers gated as `config` says
    (what GateBank.module_keys returns, without building the gates)."""
    return [f"{b}.{i}" for i in range(num_layers) for b in ("attn", "mlp") if b in config.branches]


def load_gates(model: PreTrainedModel, path: str | os.PathLike) -> PreTrainedModel:
    """Rebuild the gates saved by save_gates on `model` (its base). Everything is checked before
    the model is touched, so a file that does not fit leaves the model as it was. A PEFT adapter
    beside the gate file (a LoRA run's export) is merged into the backbone first (gateskip.core.adapters)."""
    meta, tensors = read_gate_file(path)
    check_supported(model)
    target = _gate_file(path)
    n_layers, width = len(decoder_layers(model)), model.config.hidden_size
    check_gates_fit(meta, model.config.model_type, n_layers, width, target)
    config = GateConfig.from_dict(meta["gate_config"])
    allocations = meta.get("allocations", {})
    check_allocation_modules(allocations, GateBank(n_layers, width, config).module_keys(), str(target))
    misfit = _first_misfit(GateBank(n_layers, width, config).state_dict(), tensors)
    if misfit:
        raise GateSkipError(f"gate file {target} does not fit this model: {misfit}")
    adapter = check_adapter(model, target)
    if is_gated(model):
        remove_gates(model)
    if adapter is not None:
        merge_adapter(model, adapter)  # in place: the LoRA layers become plain merged linears
    add_gates(model, config)
    model.gate_bank.load_state_dict(tensors, strict=True)
    model.gate_bank.thresholds = {k: dict(v) for k, v in meta.get("thresholds", {}).items()}
    model.gate_bank.allocations = {k: dict(v) for k, v in allocations.items()}
    return model


def check_gates_fit(meta: dict, model_type: str, n_layers: int, width: int, where) -> None:
    """Gates made for another model (type, layer count or width) are refused in one line."""
    saved_type = meta.get("model_type")  # absent from files written before it was recorded
    if saved_type is not None and saved_type != model_type:
        raise GateSkipError(f"gate file {where} was made for a {saved_type} model, but this model is {model_type}")
    if (meta["num_layers"], meta["hidden_size"]) != (n_layers, width):
        raise GateSkipError(
            f"gate file {where} was made for {meta['num_layers']} layers of width {meta['hidden_size']}, "
            f"but this model has {n_layers} layers of width {width}"
        )


def check_allocation_modules(allocations: dict, module_keys: list[str], where: str) -> None:
    """Refuse allocations whose modules are not this model's gated modules (made for another model);
    their structure was checked when the file was read (_check_metadata)."""
    known = set(module_keys)
    for target, entry in allocations.items():
        extra = sorted(set(entry["ratios"]) - known)
        if extra:
            raise GateSkipError(f"{where}: allocation {target} names module {extra[0]}, which these gates do not have "
                                f"(an allocation made for another model)")


def _first_misfit(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """The first reason `found` would not load into a module whose state dict is `expected`, in one line."""
    for key, want in expected.items():
        if key not in found:
            return f"{key} is missing from the file"
        if found[key].shape != want.shape:
            return f"{key} has shape {tuple(found[key].shape)} in the file but {tuple(want.shape)} in this model"
    extra = sorted(found.keys() - expected.keys())
    return f"the file has {extra[0]}, which this model's gates do not" if extra else None
