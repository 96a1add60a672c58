"""Saving and loading adapters: the trained parameters only, plus what is needed to rebuild them.

A minipeft adapter directory holds
    adapter.safetensors      every trainable tensor, by its name in the model
    minipeft_adapter.json    {"format": "minipeft", "methods": [{"method": "lora", "r": 8, ...}],
                              "base_model": {dim, n_layers, ...}}   (the base model's fingerprint)
Loading re-applies each method with its recorded hyper-parameters, then copies the tensors in, and
refuses a base model whose fingerprint differs (naming the fields), a weight that is not floating
point, and NaN / inf in a tensor or a number. Saving writes both files under temp names, then renames
them in, the tensors first and the JSON last, then removes the files of an earlier save in the other
format (safetensors_io.staged_files): a folder with a JSON is always complete, and a failed save (a
full disk) leaves the earlier adapter loading as before.

A Hugging Face PEFT directory (adapter_config.json + adapter_model.safetensors) is recognised and
handed to minipeft/hf_peft.py, which maps its key names and config onto the same methods. The
imports go one way: adapters -> hf_peft -> methods -> peft.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import types
import typing
from pathlib import Path

import torch
import torch.nn as nn

from .hf_peft import BASE_FILE as PEFT_BASE_FILE
from .hf_peft import CONFIG_FILE as PEFT_CONFIG_FILE
from .hf_peft import WEIGHTS_FILE as PEFT_WEIGHTS_FILE
from .hf_peft import load_peft_adapter, save_peft_adapter
from .methods import METHODS
from .peft import applied_configs, check_base
from .safetensors_io import (atomic_write, cast_finite, check_tensor, dtype_name, load_file, read_json, regular,
                             save_file, staged_files)

CONFIG_FILE, WEIGHTS_FILE = "minipeft_adapter.json", "adapter.safetensors"
PEFT_FILES = (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, PEFT_BASE_FILE)

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
    try:  # fail before touching any file if the config cannot be written, or holds NaN / inf
        json.dumps(meta, allow_nan=False)
    except ValueError:
        raise ValueError(f"save_adapter: {path}: a hyper-parameter is NaN or inf in {methods}") from None
    state = adapter_state(model)
    for name, t in state.items():
        check_tensor(name, t, f"save_adapter: {path} (nothing written)", floating=False)
    # an earlier Hugging Face PEFT save here goes once this one is in place: one adapter, this one
    with staged_files(path, last=(CONFIG_FILE,), stale=PEFT_FILES) as tmp:
        save_file(state, tmp / WEIGHTS_FILE)
        # the JSON names the exact tensors file it belongs to: a crash between the two renames leaves
        # a pair that load_adapter recognises as mismatched instead of loading silently
        meta["weights_sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        with atomic_write(tmp / CONFIG_FILE, "w") as f:
            json.dump(meta, f, indent=2)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(regular(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the methods recorded in `path` to `model` and load their weights (minipeft or HF PEFT dir).

    Transactional: on any error (a bad file, a wrong shape, a truncated tensor file) the model is left
    exactly as it was, with no half-built method in it."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: adapter folder does not exist (no {CONFIG_FILE} or {PEFT_CONFIG_FILE})")
    with rollback_on_error(model):
        if (path / PEFT_CONFIG_FILE).exists() and not (path / CONFIG_FILE).exists():
            return load_peft_adapter(model, path)
        if not (path / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (minipeft) or {PEFT_CONFIG_FILE} (Hugging Face PEFT)")
        source = path / CONFIG_FILE
        meta = read_json(source)
        for key, kind in (("base_model", dict), ("methods", list), ("weights_sha256", str)):
            if not isinstance(meta.get(key), kind):
                why = ("missing: the pin of the tensors file is required, so that a changed or swapped "
                       f"{WEIGHTS_FILE} cannot load silently (re-save the adapter with save_adapter)"
                       if key == "weights_sha256" and key not in meta else f"must be a JSON {kind.__name__}")
                raise ValueError(f"{source}: field '{key}' {why}")
        check_base(model, meta["base_model"], source)
        if sha256_file(path / WEIGHTS_FILE) != meta["weights_sha256"]:
            raise ValueError(f"{path / WEIGHTS_FILE} does not match {CONFIG_FILE} (sha256 differs): the files "
                             "come from different saves (interrupted save?), or the tensors file was changed")
        entries = [checked_hyper(entry, f"{source} methods[{i}]") for i, entry in enumerate(meta["methods"])]
        tensors = load_file(path / WEIGHTS_FILE)
        for i, (name, hyper) in enumerate(entries):
            try:  # what only the model can tell (targets that match no Linear, a method already there)
                apply_method(model, name, **hyper)
            except ValueError as e:
                raise ValueError(f"{source} methods[{i}]: {e}") from None
        load_adapter_state(model, tensors, path / WEIGHTS_FILE)
    return model


def checked_hyper(entry, where: str) -> tuple[str, dict]:
    """(method name, hyper-parameters) of one recorded method, each value's type checked against the
    method's config dataclass: "false" is not a bool, 4.7 is not an int, an unknown field is an error."""
    if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
        raise ValueError(f"{where}: expected an object with a 'method' name, got {entry!r:.80}")
    entry = dict(entry)
    name = entry.pop("method")
    _, config_cls = method_module(name)
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls)}
    for key, value in entry.items():
        if key not in known:
            raise ValueError(f"{where}: {config_cls.__name__} has no field '{key}'; its fields are {sorted(known)}")
        if not value_has_type(value, hints[key]):
            raise ValueError(f"{where}: field '{key}' must be {type_name(hints[key])}, got {value!r} "
                             f"({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: field '{key}' must be a finite number, got {value!r}")
    hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
    try:  # the config's own range checks (r >= 1, 0 <= dropout < 1, ...), before any method is applied
        config_cls(**hyper)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return name, hyper


def value_has_type(value, t) -> bool:
    """Whether a JSON value fits a config field's type hint (bool, int, float, str, Literal, tuple/list,
    unions, Optional). Strict: a bool is not an int, an int is a float, a JSON list is a tuple."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return any(value_has_type(value, a) for a in args)
    if t is type(None):
        return value is None
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (tuple, list):
        item = args[0] if args else typing.Any
        return isinstance(value, (list, tuple)) and all(value_has_type(v, item) for v in value)
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is str:
        return isinstance(value, str)
    return t is typing.Any or (isinstance(t, type) and isinstance(value, t))


def type_name(t) -> str:
    return getattr(t, "__name__", None) if typing.get_origin(t) is None else str(t).replace("typing.", "")


@contextlib.contextmanager
def rollback_on_error(model: nn.Module):
    """On an exception inside the block, put back every submodule, parameter, buffer, model attribute
    and requires_grad flag as they were before it: applying a method only adds modules and attributes
    and swaps children, so this undoes a half-done load exactly (and costs no tensor copy)."""
    modules = list(model.modules())
    saved = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), dict(m.__dict__)) for m in modules]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    configs = list(getattr(model, "peft_configs", []))
    try:
        yield
    except BaseException:
        for m, children, params, buffers, attrs in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for store, old in ((m._modules, children), (m._parameters, params), (m._buffers, buffers)):
                store.clear()
                store.update(old)
        for p, flag in flags:
            p.requires_grad_(flag)
        if hasattr(model, "peft_configs"):
            model.peft_configs[:] = configs
        raise


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `tensors` into the model's trainable parameters; every name must match, both ways. Every
    tensor is checked before any is copied (a method that trains base weights copies into the base):
    its shape; a floating weight must come as a finite floating tensor, finite in the parameter's dtype
    too; an index buffer (sparse fine-tuning) in its own integer dtype."""
    target = adapter_state(model)
    missing, unexpected = sorted(set(target) - set(tensors)), sorted(set(tensors) - set(target))
    if missing or unexpected:
        raise KeyError(f"{source}: adapter tensors do not match the model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    checked = {}
    for name, t in tensors.items():
        want = target[name]
        if t.shape != want.shape:
            raise ValueError(f"{source}: '{name}' has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(want.shape)}")
        if want.is_floating_point():
            checked[name] = cast_finite(name, t, want.dtype, source)
        elif t.dtype != want.dtype:
            raise ValueError(f"{source}: tensor '{name}' has dtype {dtype_name(t.dtype)}, the model's is "
                             f"{dtype_name(want.dtype)}")
        else:
            checked[name] = t
    with torch.no_grad():
        for name, t in checked.items():
            target[name].copy_(t)
