"""Saving and loading adapters: the trained parameters only, plus what is needed to rebuild them.

A minipeft adapter directory holds
    adapter.safetensors      every trainable tensor, by its name in the model
    minipeft_adapter.json    {"format": "minipeft", "methods": [{"method": "lora", "r": 8, ...}],
                              "base_model": {dim, n_layers, ...}}   (the base model's fingerprint)
Loading re-applies each method with its recorded hyper-parameters, then copies the tensors in, and
refuses a base model whose fingerprint differs (naming the fields). Writes are atomic (temp file +
rename), the tensors first and the JSON last, so a directory with a JSON is always complete.

A Hugging Face PEFT directory (adapter_config.json + adapter_model.safetensors) is recognised and
handed to minipeft/hf_peft.py, which maps its key names and config onto the same methods. The
imports go one way: adapters -> hf_peft -> methods -> peft.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from .hf_peft import load_peft_adapter, save_peft_adapter
from .methods import METHODS
from .peft import applied_configs, check_base
from .safetensors_io import atomic_write, load_file, save_file

CONFIG_FILE, WEIGHTS_FILE = "minipeft_adapter.json", "adapter.safetensors"

# Hugging Face PEFT's names for fields that minipeft's configs call otherwise
PEFT_FIELD_NAMES = {"target_modules": "targets", "lora_alpha": "alpha", "lora_dropout": "dropout",
                    "feedforward_modules": "feedforward_targets", "num_virtual_tokens": "prefix_len or prompt_len",
                    "adapter_len": "prompt_len", "adapter_layers": "n_layers_adapted"}


def method_module(name: str):
    """(module, config class) for a method name, with a clear error for unknown names."""
    if name not in METHODS:
        raise KeyError(f"unknown PEFT method '{name}'; known methods: {sorted(METHODS)}")
    module_name, config_name = METHODS[name]
    module = importlib.import_module(module_name)
    return module, getattr(module, config_name)


def apply_method(model: nn.Module, name: str, **hyper) -> nn.Module:
    """`apply_method(model, "lora", r=8, targets=["q_proj", "v_proj"])`: build the config and apply it."""
    module, config_cls = method_module(name)
    known = {f.name for f in dataclasses.fields(config_cls)}
    for field in hyper:
        if field not in known:
            hint = (f"; '{field}' is Hugging Face PEFT's name, minipeft's is '{PEFT_FIELD_NAMES[field]}'"
                    if field in PEFT_FIELD_NAMES else "")
            raise TypeError(f"{name}: {config_cls.__name__} has no field '{field}'{hint}; "
                            f"its fields are {sorted(known)}")
    try:
        config = config_cls(**hyper)
    except TypeError as e:
        raise TypeError(f"{name}: bad hyper-parameters {hyper}: {e}") from None
    module.apply(model, config)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor, each shared tensor once (under its first name), and the buffers an
    adapter module lists in `peft_state_buffers` (sparse fine-tuning's indices: state, not trained)."""
    state, seen = {}, set()
    for name, p in model.named_parameters():  # named_parameters() skips repeats of shared tensors
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            state[name] = p.detach()
    for name, m in model.named_modules():
        for b in getattr(m, "peft_state_buffers", ()):
            state[f"{name}.{b}"] = getattr(m, b)
    return state


def save_adapter(model: nn.Module, path: str | Path, format: str = "minipeft") -> None:
    """Write the adapter to directory `path` (format "minipeft", or "peft" for Hugging Face PEFT)."""
    path = Path(path)
    if format == "peft":
        return save_peft_adapter(model, path)
    if format != "minipeft":
        raise ValueError(f"save_adapter: unknown format '{format}' (use 'minipeft' or 'peft')")
    methods = applied_configs(model)
    if not methods:
        raise ValueError("save_adapter: no PEFT method has been applied to this model")
    meta = {"format": "minipeft", "methods": methods, "base_model": model.config.fingerprint()}
    json.dumps(meta)  # fail before touching any file if the config cannot be written
    path.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), path / WEIGHTS_FILE)
    # the JSON names the exact tensors file it belongs to: a crash between the two renames leaves
    # a pair that load_adapter recognises as mismatched instead of loading silently
    meta["weights_sha256"] = sha256_file(path / WEIGHTS_FILE)
    with atomic_write(path / CONFIG_FILE, "w") as f:
        json.dump(meta, f, indent=2)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the methods recorded in `path` to `model` and load their weights (minipeft or HF PEFT dir)."""
    path = Path(path)
    if (path / "adapter_config.json").exists() and not (path / CONFIG_FILE).exists():
        return load_peft_adapter(model, path)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (minipeft) or adapter_config.json (Hugging Face PEFT)")
    meta = json.loads((path / CONFIG_FILE).read_text())
    check_base(model, meta["base_model"], path / CONFIG_FILE)
    if "weights_sha256" in meta and sha256_file(path / WEIGHTS_FILE) != meta["weights_sha256"]:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match {CONFIG_FILE} (sha256 differs): "
                         "the files come from different saves (interrupted save?)")
    for entry in meta["methods"]:
        entry = dict(entry)
        apply_method(model, entry.pop("method"), **{k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in entry.items()})
    tensors = load_file(path / WEIGHTS_FILE)
    load_adapter_state(model, tensors, path / WEIGHTS_FILE)
    return model


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `tensors` into the model's trainable parameters; every name must match, both ways."""
    target = adapter_state(model)
    missing, unexpected = sorted(set(target) - set(tensors)), sorted(set(tensors) - set(target))
    if missing or unexpected:
        raise KeyError(f"{source}: adapter tensors do not match the model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != target[name].shape:
                raise ValueError(f"{source}: '{name}' has shape {tuple(t.shape)}, the model expects "
                                 f"{tuple(target[name].shape)}")
            target[name].copy_(t)
