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
from safetensors.torch import save_file

from .adapters import check_adapter, merge_adapter
from .config import GateConfig
from .errors import GateSkipError
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
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
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
    config = config or GateConfig()
    layers = decoder_layers(model)
    param = next(model.parameters())
    bank = GateBank(len(layers), model.config.hidden_size, config).to(param.device)
    for layer in layers:
        layer.__class__ = _gated_subclass(GatedLayerMixin, type(layer))
    model.__class__ = _gated_subclass(GatedCausalLMMixin, type(model))
    model.add_module("gate_bank", bank)
    return model


def remove_gates(model: PreTrainedModel) -> PreTrainedModel:
    """Undo add_gates: the original classes, no gate bank."""
    if not is_gated(model):
        return model
    for layer in decoder_layers(model):
        layer.__class__ = _ungated_class(layer)
    model.__class__ = _ungated_class(model)
    del model.gate_bank
    return model


def _gate_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / GATE_FILE


def save_gates(model: PreTrainedModel, path: str | os.PathLike) -> Path:
    """Write the gates, their configuration, calibrated thresholds and the model type (load_gates
    refuses other types) to one safetensors file (`path` itself if it ends in .safetensors, else
    `path/gateskip.safetensors`)."""
    if not is_gated(model):
        raise GateSkipError("model has no gates to save")
    bank: GateBank = model.gate_bank
    target = _gate_file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "version": FORMAT_VERSION,
        "gate_config": bank.config.to_dict(),
        "num_layers": bank.num_layers,
        "hidden_size": bank.hidden_size,
        "model_type": model.config.model_type,
        "thresholds": bank.thresholds,
        "allocations": bank.allocations,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in bank.state_dict().items()}
    tmp = target.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"gateskip": json.dumps(meta)})
    os.replace(tmp, target)  # a reader never sees a half-written file
    return target


def read_gate_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a gate file; a clear error if it is missing or not ours."""
    target = _gate_file(path)
    if Path(path).is_file() and target != Path(path):
        raise GateSkipError(f"{path} is not a gate file: give a .safetensors file or the folder holding {GATE_FILE}")
    if not target.is_file():
        raise GateSkipError(f"no gate file at {target}")
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
        GateConfig.from_dict(meta["gate_config"])
    except (TypeError, ValueError) as e:
        raise GateSkipError(f"{where}: gate_config is malformed ({e})") from None
    tables = {f"thresholds for ratio {r}": t for r, t in meta.get("thresholds", {}).items()}
    for target, entry in meta.get("allocations", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("ratios"), dict):
            raise GateSkipError(f"{where}: allocation {target} is malformed")
        tables[f"allocation {target}'s ratios"] = entry["ratios"]
        tables[f"allocation {target}'s thresholds"] = entry.get("thresholds", {})
    for name, table in tables.items():
        if not isinstance(table, dict) or not all(_is_number(v) and not math.isnan(v) for v in table.values()):
            raise GateSkipError(f"{where}: {name} must map modules to numbers (no NaN)")
    for target, entry in meta.get("allocations", {}).items():
        if not all(0.0 <= v <= 1.0 for v in entry["ratios"].values()):
            raise GateSkipError(f"{where}: allocation {target} has a skip ratio outside [0, 1]")


def load_gates(model: PreTrainedModel, path: str | os.PathLike) -> PreTrainedModel:
    """Rebuild the gates saved by save_gates on `model` (its base). Everything is checked before
    the model is touched, so a file that does not fit leaves the model as it was. A PEFT adapter
    beside the gate file (a LoRA run's export) is merged into the backbone first (gateskip.adapters)."""
    meta, tensors = read_gate_file(path)
    check_supported(model)
    target, model_type = _gate_file(path), model.config.model_type
    saved_type = meta.get("model_type")  # absent from files written before it was recorded
    if saved_type is not None and saved_type != model_type:
        raise GateSkipError(f"gate file {target} was made for a {saved_type} model, but this model is {model_type}")
    n_layers, width = len(decoder_layers(model)), model.config.hidden_size
    if (meta["num_layers"], meta["hidden_size"]) != (n_layers, width):
        raise GateSkipError(
            f"gate file {target} was made for {meta['num_layers']} layers of width {meta['hidden_size']}, "
            f"but this model has {n_layers} layers of width {width}"
        )
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
