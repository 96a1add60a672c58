"""Hugging Face PEFT adapter directories: load and save LoRA, rsLoRA, DoRA, AdaLoRA and (IA)^3 for a minipeft
Llama, so adapters move both ways between the libraries.

This module sits below minipeft/adapters.py: it imports the method modules and the core (peft.py),
never adapters.py, so saving an adapter goes adapters -> hf_peft -> methods -> peft, with no circle.

The format, as written by peft's `save_pretrained` (key names from `get_peft_model_state_dict` in
peft/utils/save_and_load.py, which drops the adapter name "default" and, for DoRA, the ".weight" of
the magnitude layer):

    adapter_config.json        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                                "target_modules": ["q_proj", "v_proj"] or one regex string,
                                "use_rslora": false, "use_dora": false, "lora_dropout": 0.0,
                                "rank_pattern": {}, "alpha_pattern": {}, ...}
    adapter_model.safetensors  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight         (r, in)
                               base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight         (out, r)
                               base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector (out,)  DoRA

"base_model.model." is PeftModel -> LoraModel, "model." is LlamaForCausalLM -> LlamaModel, and the
rest is our module name. PEFT scales by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), with
per-module r / alpha where rank_pattern / alpha_pattern match the module name (regex on its tail).
Only adapter_model.safetensors is read: adapter_model.bin is a pickle, convert it first.

Saving folds our extras into plain LoRA (gamma * A is an ordinary A; LoRA+ is an optimiser setting)
and refuses what PEFT cannot represent (Simple DoRA, several methods at once, mixed dropout).
We also write minipeft_base_model.json, the base model's fingerprint (PEFT ignores the file), so
that loading onto a different base fails clearly even when the shapes happen to fit.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from . import peft
from .methods import adalora, dora, ia3, lora
from .peft import check_base
from .safetensors_io import atomic_write, cast_finite, check_tensor, load_file, read_json, save_file, staged_files

PREFIX = "base_model.model.model."  # PeftModel -> LoraModel -> LlamaForCausalLM -> LlamaModel
CONFIG_FILE, WEIGHTS_FILE, BASE_FILE = "adapter_config.json", "adapter_model.safetensors", "minipeft_base_model.json"
MAGNITUDE = "lora_magnitude_vector"
MINIPEFT_FILES = ("minipeft_adapter.json", "adapter.safetensors")  # adapters.py's format (JSON first)
# adapter_config.json fields read below or that never change the forward pass; every other field
# (fan_in_fan_out, modules_to_save, lora_bias, layer_replication, use_bdlora, ... and those of future
# PEFT versions) must be unset, false or empty, and bias must be "none"
UNDERSTOOD = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
              "peft_version", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora",
              "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
              "init_lora_weights", "megatron_core", "qalora_group_size", "loftq_config", "ensure_weight_tying"}
PLAIN_INITS = (True, False, "gaussian")  # pissa, olora, loftq, corda, eva: the adapter needs a modified base


# The type of every adapter_config.json field minipeft reads (PEFT's LoraConfig / IA3Config / AdaLoraConfig
# types); a value of another type (a string "false" for a bool, 4.7 or "4" for an int) is an error, not a
# guess, and every number must be finite.
_STR_LIST, _NUMBER = (str, list), (int, float)
FIELD_TYPES = {"r": int, "lora_alpha": _NUMBER, "lora_dropout": _NUMBER, "use_rslora": bool,
               "use_dora": bool, "rank_pattern": dict, "alpha_pattern": dict, "target_modules": _STR_LIST,
               "exclude_modules": _STR_LIST, "feedforward_modules": _STR_LIST, "layers_to_transform": (int, list),
               "layers_pattern": _STR_LIST, "init_lora_weights": (bool, str), "init_ia3_weights": bool,
               "fan_in_fan_out": bool, "inference_mode": bool, "peft_type": str, "bias": str,
               "init_r": int, "target_r": int, "tinit": int, "tfinal": int, "deltaT": int, "total_step": int,
               "beta1": _NUMBER, "beta2": _NUMBER, "orth_reg_weight": _NUMBER}
# fields that PEFT reads as regular expressions: a bad one is an error naming the field, not a bare re.error
REGEX_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "rank_pattern", "alpha_pattern")
IA3_UNDERSTOOD = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                  "peft_version", "target_modules", "exclude_modules", "feedforward_modules", "init_ia3_weights"}


def check_field_types(config: dict, source: Path) -> None:
    for key, kinds in FIELD_TYPES.items():
        value = config.get(key)
        if value is None:
            continue
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if ok and isinstance(value, list):
            item = int if key == "layers_to_transform" else str
            ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
        if ok and isinstance(value, dict) and key == "rank_pattern" and config.get("peft_type") == "ADALORA":
            # AdaLoRA's rank_pattern: the kept-triplet mask of each lora_E, a list of booleans
            ok = all(isinstance(k, str) and isinstance(v, list) and all(isinstance(b, bool) for b in v)
                     for k, v in value.items())
        elif ok and isinstance(value, dict):
            item = int if key == "rank_pattern" else (int, float)
            ok = all(isinstance(k, str) and isinstance(v, item) and not isinstance(v, bool) for k, v in value.items())
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise ValueError(f"{source}: field '{key}' must be {names}, got {value!r} ({type(value).__name__})")
        numbers = value.values() if isinstance(value, dict) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"{source}: field '{key}' must be a finite number, got {value!r}")
    for key in ("r", "lora_alpha"):
        if config.get(key) is not None and config[key] <= 0:
            raise ValueError(f"{source}: field '{key}' must be > 0, got {config[key]!r}")
    for key in REGEX_FIELDS:
        value = config.get(key)
        for pattern in [value] if isinstance(value, str) else value if isinstance(value, dict) else []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{source}: field '{key}': {pattern!r} is not a valid regular expression "
                                 f"({e})") from None


def load_peft_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the adapter in a Hugging Face PEFT directory to `model` (LoRA / rsLoRA / DoRA, or IA3)."""
    path = Path(path)
    config = read_json(path / CONFIG_FILE)
    check_field_types(config, path / CONFIG_FILE)
    if (path / BASE_FILE).exists():
        check_base(model, read_json(path / BASE_FILE), path / BASE_FILE)
    tensors = _read_tensors(path)
    kind = config.get("peft_type")
    if kind == "IA3":
        bad = {k: v for k, v in config.items() if v and k not in IA3_UNDERSTOOD}
        if bad:
            raise NotImplementedError(f"{path / CONFIG_FILE}: minipeft does not implement the IA3 fields {bad}; "
                                      "they must be unset, false or empty")
        ia3_from_peft(model, config, tensors, str(path / WEIGHTS_FILE))
    elif kind == "LORA":
        _load_lora(model, config, tensors, path)
    elif kind == "ADALORA":
        _load_adalora(model, config, tensors, path)
    else:
        raise NotImplementedError(f"{path / CONFIG_FILE}: peft_type {kind!r} is not supported "
                                  "(minipeft reads LORA, with use_rslora / use_dora, ADALORA and IA3)")
    return model


def save_peft_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write the model's LoRA / DoRA (or (IA)^3) adapter as a Hugging Face PEFT directory."""
    path = Path(path)
    methods = {c.method for c in getattr(model, "peft_configs", [])}
    if not methods:
        raise ValueError("save_peft_adapter: no PEFT method has been applied to this model")
    if methods == {"ia3"}:
        config, tensors = ia3_to_peft(model)
    elif methods in ({"lora"}, {"dora"}):
        config, tensors = _lora_to_peft(model)
    elif methods == {"adalora"}:
        config, tensors = _adalora_to_peft(model)
    else:
        raise NotImplementedError(f"save_peft_adapter: a PEFT directory holds one LoRA, DoRA or IA3 adapter (or one AdaLoRA); "
                                  f"this model has {sorted(methods)}: save it with format='minipeft'")
    config["base_model_name_or_path"] = base_model_name_or_path or getattr(model, "name_or_path", None)
    try:  # before any file is touched: a NaN / inf hyper-parameter is not JSON
        text = json.dumps(config, indent=2, allow_nan=False)
    except ValueError:
        raise ValueError(f"save_peft_adapter: {path}: a hyper-parameter is NaN or inf in {config}") from None
    base = json.dumps(model.config.fingerprint(), indent=2)
    for name, t in tensors.items():
        check_tensor(name, t, f"save_peft_adapter: {path} (nothing written)")
    # all three under temp names, then renamed in (tensors first, config last); a minipeft adapter saved
    # here earlier (it would be loaded instead of this one) goes after, its JSON first
    with staged_files(path, last=(BASE_FILE, CONFIG_FILE), stale=MINIPEFT_FILES) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        for name, content in ((BASE_FILE, base), (CONFIG_FILE, text)):
            with atomic_write(tmp / name, "w") as f:
                f.write(content)


# ----------------------------------------------------------------------------------------------
# Loading LoRA / DoRA


def _load_lora(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    source = path / CONFIG_FILE
    bad = {k: v for k, v in config.items() if v and k not in UNDERSTOOD and not (k == "bias" and v == "none")}
    if bad:
        raise NotImplementedError(f"{source}: minipeft does not implement {bad}; these fields must be unset, "
                                  "false or empty (bias: 'none')")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise NotImplementedError(f"{source}: init_lora_weights={config['init_lora_weights']!r} adapters belong to a "
                                  "modified base model; save them converted to plain LoRA first")
    use_dora = bool(config.get("use_dora", False))
    groups = _lora_groups(model, config, source)
    expected = {}  # every tensor the config implies, with its shape
    for (r, _), names in groups.items():
        for name in names:
            out_f, in_f = model.get_submodule(name).weight.shape
            expected.update({f"{PREFIX}{name}.lora_A.weight": (r, in_f), f"{PREFIX}{name}.lora_B.weight": (out_f, r)})
            if use_dora:
                expected[f"{PREFIX}{name}.{MAGNITUDE}"] = (out_f,)
    _check_tensors(expected, tensors, path / WEIGHTS_FILE)
    module, config_cls = (dora, dora.DoRAConfig) if use_dora else (lora, lora.LoRAConfig)
    configs = [_config(config_cls, source, r=r, alpha=alpha, dropout=float(config.get("lora_dropout") or 0.0),
                       targets=tuple(names), use_rslora=bool(config.get("use_rslora", False)))
               for (r, alpha), names in groups.items()]
    for cfg in configs:  # one apply per (r, alpha), with the exact module names
        module.apply(model, cfg)
    weights = path / WEIGHTS_FILE
    with torch.no_grad():
        for name in (n for names in groups.values() for n in names):
            m = model.get_submodule(name)
            _copy(m.lora_A, tensors, f"{PREFIX}{name}.lora_A.weight", weights)
            _copy(m.lora_B, tensors, f"{PREFIX}{name}.lora_B.weight", weights)
            if use_dora:
                _copy(m.magnitude, tensors, f"{PREFIX}{name}.{MAGNITUDE}", weights)


def _config(config_cls, source: Path, **fields):
    """A method config built from adapter_config.json's values; its range errors name the file."""
    try:
        return config_cls(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _copy(param: torch.Tensor, tensors: dict[str, torch.Tensor], key: str, source: Path) -> None:
    """param <- tensors[key] (checked floating and finite, also once cast to the parameter's dtype)."""
    param.copy_(cast_finite(key, tensors[key], param.dtype, source))


def _lora_groups(model: nn.Module, config: dict, source: Path) -> dict[tuple[int, float], list[str]]:
    """(r, alpha) -> the module names that get them (rank_pattern / alpha_pattern, else r / lora_alpha)."""
    groups: dict[tuple[int, float], list[str]] = {}
    for name in _peft_targets(model, config, source):
        key = "model." + name
        r = _pattern_value(config.get("rank_pattern"), key, config.get("r", 8))  # PEFT's defaults: 8 and 8
        alpha = _pattern_value(config.get("alpha_pattern"), key, config.get("lora_alpha", 8))
        groups.setdefault((r, float(alpha)), []).append(name)  # types checked by check_field_types
    return groups


def _peft_match(spec, key: str, rule: str = "target") -> bool:
    """PEFT's name matching on the HF module name `key`: a str is a regex that must match the whole
    name; a list entry matches the whole name or a dotted tail of it ("target"), or any tail of it
    ("feedforward": IA3's `feedforward_modules` use `endswith`)."""
    if isinstance(spec, str):
        return spec == "all-linear" or re.fullmatch(spec, key) is not None
    return any(key == t or key.endswith(t if rule == "feedforward" else "." + t) for t in spec or [])


def _peft_targets(model: nn.Module, config: dict, source: Path) -> list[str]:
    """Our names of the Linears PEFT would adapt (its keys are "model." + our names)."""
    spec, exclude = config.get("target_modules"), config.get("exclude_modules")
    if spec is None:
        raise ValueError(f"{source}: target_modules is missing (PEFT fills it in from the model type; write it out)")
    for other in ("lm_head", "model.embed_tokens"):  # PEFT's "all-linear" leaves out the output layer
        if spec != "all-linear" and _peft_match(spec, other) and not _peft_match(exclude, other):
            raise NotImplementedError(f"{source}: target_modules {spec!r} includes '{other}'; minipeft adapts "
                                      "only the decoder's Linear layers")
    layers = config.get("layers_to_transform")
    layers = None if layers is None or isinstance(spec, str) else {layers} if isinstance(layers, int) else set(layers)
    if layers is not None and config.get("layers_pattern") not in (None, "layers", ["layers"]):
        raise NotImplementedError(f"{source}: layers_pattern={config['layers_pattern']!r}; Llama's is 'layers'")
    names = [n for n in peft.match_targets(model, "all-linear")
             if _peft_match(spec, "model." + n) and not _peft_match(exclude, "model." + n)
             and (layers is None or int(n.split(".")[1]) in layers)]
    if not names:
        raise ValueError(f"{source}: target_modules {spec!r} matched no Linear layer of this model "
                         f"(names look like 'model.layers.0.self_attn.q_proj')")
    return names


def _pattern_value(patterns: dict | None, key: str, default):
    """rank_pattern / alpha_pattern lookup as PEFT does it: the first regex matching a tail of `key`."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _check_tensors(expected: dict[str, tuple], tensors: dict[str, torch.Tensor], source: Path) -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{source}: tensors do not match adapter_config.json: missing {missing[:3]}"
                       f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                       f"{' ...' if len(unexpected) > 3 else ''}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{source}: '{key}' has shape {tuple(tensors[key].shape)}, this base model expects "
                             f"{shape} (an adapter for a different base model, or a wrong r?)")
        check_tensor(key, tensors[key], source)  # floating point and finite, before the model is touched


# ----------------------------------------------------------------------------------------------
# Saving LoRA / DoRA


def _lora_to_peft(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    mods = [(n, m) for n, m in model.named_modules() if getattr(m, "peft_method", None) in ("lora", "dora")]
    for field in ("dropout", "use_rslora"):
        if len({getattr(m.config, field) for _, m in mods}) > 1:
            raise NotImplementedError(f"save_peft_adapter: PEFT has one {field} per adapter; this model mixes "
                                      f"{sorted({getattr(m.config, field) for _, m in mods})}")
    first = mods[0][1].config
    rank_alpha = {n: (m.config.r, m.config.alpha) for n, m in mods}
    r, alpha = Counter(rank_alpha.values()).most_common(1)[0][0]  # the rest go to rank/alpha_pattern
    names = [n for n, _ in mods]
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=None, revision=None,
                  inference_mode=True, r=r, lora_alpha=alpha, lora_dropout=first.dropout,
                  target_modules=_compact(model, names), exclude_modules=None, fan_in_fan_out=False, bias="none",
                  use_rslora=first.use_rslora, use_dora=mods[0][1].peft_method == "dora", modules_to_save=None,
                  init_lora_weights=True, layers_to_transform=None, layers_pattern=None,
                  rank_pattern={re.escape(n): ra[0] for n, ra in rank_alpha.items() if ra[0] != r},
                  alpha_pattern={re.escape(n): ra[1] for n, ra in rank_alpha.items() if ra[1] != alpha})
    tensors = {}
    for n, m in mods:
        tensors[f"{PREFIX}{n}.lora_A.weight"] = (m.lora_A * m.config.gamma).detach().clone()  # fold gamma into A
        tensors[f"{PREFIX}{n}.lora_B.weight"] = m.lora_B.detach().clone()
        if m.peft_method == "dora":
            tensors[f"{PREFIX}{n}.{MAGNITUDE}"] = m.magnitude.detach().clone()
    return config, tensors


def _compact(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names (["q_proj", "v_proj"], in model order) when they pick exactly `names` in the model,
    else the full names."""
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    picked = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    return leaves if picked == set(names) else list(names)


# ----------------------------------------------------------------------------------------------
# AdaLoRA (peft/tuners/adalora: layer.py SVDLinear, model.py resize_*_by_rank_pattern, config.py)
#
# Keys: <PREFIX><name>.lora_A (r, in), .lora_E (r, 1), .lora_B (out, r): ParameterDicts, so no
# ".weight". `ranknum` is not saved (get_peft_model_state_dict keeps "lora_" keys only); PEFT rebuilds
# it as init_r and scales by lora_alpha / (ranknum + 1e-5). Once the budget has masked triplets,
# `rank_pattern` maps "model.<name>.lora_E" to init_r booleans and the tensors hold only the kept rows
# (A, E) and columns (B). We load them back at their positions in a rank-init_r module (the dropped
# triplets all-zero, masked), which gives PEFT's logits up to its 1e-5 in the divisor.

ADALORA_FIELDS = {"init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                  "total_step"}


def _load_adalora(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    source = path / CONFIG_FILE
    bad = {k: v for k, v in config.items() if v and k not in UNDERSTOOD | ADALORA_FIELDS
           and not (k == "bias" and v == "none")}
    if bad or config.get("rank_pattern") and not isinstance(config["rank_pattern"], dict):
        raise NotImplementedError(f"{source}: minipeft does not implement {bad}; these fields must be unset, "
                                  "false or empty (bias: 'none')")
    if config.get("alpha_pattern") or config.get("use_dora") or config.get("use_rslora"):
        raise NotImplementedError(f"{source}: alpha_pattern / use_dora / use_rslora are not part of AdaLoRA")
    r = config.get("init_r", 12)  # PEFT's defaults: init_r 12, target_r 8, lora_alpha 8 (types checked)
    names = _peft_targets(model, config, source)
    patterns = config.get("rank_pattern") or {}
    kept, expected = {}, {}
    for name in names:
        keep = patterns.get(f"model.{name}.lora_E", [True] * r)
        if len(keep) != r:
            raise ValueError(f"{source}: rank_pattern['model.{name}.lora_E'] has {len(keep)} entries, init_r is {r}")
        k, (out_f, in_f) = sum(bool(b) for b in keep), model.get_submodule(name).weight.shape
        kept[name] = torch.tensor([bool(b) for b in keep])
        expected.update({f"{PREFIX}{name}.lora_A": (k, in_f), f"{PREFIX}{name}.lora_E": (k, 1),
                         f"{PREFIX}{name}.lora_B": (out_f, k)})
    ranknum = {k: v for k, v in tensors.items() if k.endswith(".ranknum")}  # not written by PEFT; if present
    for key, t in ranknum.items():
        if t.numel() != 1 or float(t) != r:
            raise ValueError(f"{path / WEIGHTS_FILE}: '{key}' is {t.tolist()}, init_r is {r}: minipeft scales by "
                             "lora_alpha / init_r")
    _check_tensors(expected, {k: v for k, v in tensors.items() if k not in ranknum}, path / WEIGHTS_FILE)
    get = lambda key, default: default if config.get(key) is None else config[key]  # noqa: E731  PEFT's null
    cfg = _config(adalora.AdaLoRAConfig, source, r=r, final_r=get("target_r", 8), alpha=float(get("lora_alpha", 8)),
                  dropout=float(get("lora_dropout", 0.0)), targets=tuple(names), total_step=get("total_step", 1000),
                  tinit=get("tinit", 0), tfinal=get("tfinal", 0), delta_t=get("deltaT", 1),
                  beta1=float(get("beta1", 0.85)), beta2=float(get("beta2", 0.85)),
                  orth_reg_weight=float(get("orth_reg_weight", 0.5)))
    adalora.apply(model, cfg)
    weights = path / WEIGHTS_FILE
    with torch.no_grad():
        for name in names:
            m, keep = model.get_submodule(name), kept[name]
            for key in ("lora_A", "lora_E", "lora_B"):
                getattr(m, key).zero_()
            for key, rows in (("lora_A", keep), ("lora_E", keep), ("lora_B", (slice(None), keep))):
                p, k = getattr(m, key), f"{PREFIX}{name}.{key}"
                p[rows] = cast_finite(k, tensors[k], p.dtype, weights)  # the kept triplets' rows (B: columns)
            m.mask = None if bool(keep.all()) else keep


def _adalora_to_peft(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, adalora.AdaLoRALinear)]
    c = mods[0][1].config
    if any(m.config != c for _, m in mods):
        raise NotImplementedError("save_peft_adapter: PEFT has one AdaLoRA config per adapter; this model has several")
    rank_pattern, tensors = {}, {}
    for n, m in mods:
        keep = torch.ones(c.r, dtype=torch.bool) if m.mask is None else m.mask.cpu()
        if m.mask is not None:
            rank_pattern[f"model.{n}.lora_E"] = keep.tolist()
        tensors[f"{PREFIX}{n}.lora_A"] = m.lora_A.detach()[keep].clone()
        tensors[f"{PREFIX}{n}.lora_E"] = m.lora_E.detach()[keep].clone()
        tensors[f"{PREFIX}{n}.lora_B"] = m.lora_B.detach()[:, keep].clone()
    config = dict(peft_type="ADALORA", task_type="CAUSAL_LM", base_model_name_or_path=None, revision=None,
                  inference_mode=True, r=c.final_r, init_r=c.r, target_r=c.final_r, lora_alpha=c.alpha,
                  lora_dropout=c.dropout, target_modules=_compact(model, [n for n, _ in mods]), fan_in_fan_out=False,
                  bias="none", modules_to_save=None, init_lora_weights=True, tinit=c.tinit, tfinal=c.tfinal,
                  deltaT=c.delta_t, beta1=c.beta1, beta2=c.beta2, orth_reg_weight=c.orth_reg_weight,
                  total_step=c.total_step, rank_pattern=rank_pattern or None)
    return config, tensors


# ----------------------------------------------------------------------------------------------
# (IA)^3 (peft/tuners/ia3: layer.py stores `ia3_l`, model.py matches the names)


def ia3_from_peft(model: nn.Module, adapter_config: dict, tensors: dict[str, torch.Tensor],
                  source: str = WEIGHTS_FILE) -> nn.Module:
    """Apply (IA)^3 as a PEFT `adapter_config.json` describes it and load its `ia3_l` tensors.

    Everything is checked (keys both ways, shapes) before the model is touched."""
    if adapter_config.get("peft_type") != "IA3":
        raise ValueError(f"from_peft: peft_type is {adapter_config.get('peft_type')!r}, expected 'IA3'")
    if adapter_config.get("modules_to_save"):
        raise NotImplementedError(f"from_peft: modules_to_save={adapter_config['modules_to_save']} is not supported")
    target_spec, ff_spec = adapter_config.get("target_modules"), adapter_config.get("feedforward_modules")
    target_spec = ["k_proj", "v_proj", "down_proj"] if target_spec is None else target_spec  # PEFT's llama default
    ff_spec = ["down_proj"] if ff_spec is None else ff_spec
    exclude = adapter_config.get("exclude_modules") or []
    linears = peft.match_targets(model, "all-linear")
    targets = [n for n in linears if _peft_match(target_spec, "model." + n) and not _peft_match(exclude, "model." + n)]
    ff = [n for n in targets if _peft_match(ff_spec, "model." + n, "feedforward")]
    if not targets:
        raise ValueError(f"from_peft: target_modules {target_spec!r} matched no linear layer of this model")
    shapes = {}
    for n in targets:
        linear = model.get_submodule(n)
        shapes[PREFIX + n + ".ia3_l"] = (1, linear.in_features) if n in ff else (linear.out_features, 1)
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise KeyError(f"{source}: IA3 tensors do not match the config: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{source}: '{key}' has shape {tuple(tensors[key].shape)}, this base model expects "
                             f"{shape} (an adapter for a different base model?)")
        check_tensor(key, tensors[key], source)  # floating point and finite, before the model is touched
    ia3.apply(model, ia3.IA3Config(targets=tuple(_compact(model, targets)),
                                   feedforward_targets=tuple(_compact(model, ff))))
    with torch.no_grad():
        for n in targets:
            key, l = PREFIX + n + ".ia3_l", model.get_submodule(n).ia3_l
            l.copy_(cast_finite(key, tensors[key], l.dtype, source).reshape(-1))
    return model


def ia3_to_peft(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) in Hugging Face PEFT's IA3 layout for the model's (IA)^3 modules."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, ia3.IA3Linear) and m.peft_method == "ia3"]
    if not mods:
        raise ValueError("to_peft: the model has no (IA)^3 modules (apply the 'ia3' method first)")
    names, ff = [n for n, _ in mods], [n for n, m in mods if m.feedforward]
    leaf_targets, leaf_ff = _compact(model, names), _compact(model, ff)
    # PEFT checks feedforward_modules is a subset of target_modules, so both lists use one style
    short = leaf_targets != names and (not ff or leaf_ff != ff)
    targets, ffs = (leaf_targets, leaf_ff) if short else (names, ff)
    config = dict(peft_type="IA3", task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=ffs,
                  exclude_modules=None, fan_in_fan_out=False, modules_to_save=None, init_ia3_weights=True,
                  inference_mode=True, base_model_name_or_path=None, revision=None)
    tensors = {PREFIX + n + ".ia3_l": (m.ia3_l[None, :] if m.feedforward else m.ia3_l[:, None]).detach().clone()
               for n, m in mods}
    return config, tensors


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_FILE).exists():
        return load_file(path / WEIGHTS_FILE)
    if (path / "adapter_model.bin").exists():
        raise NotImplementedError(f"{path}: only {WEIGHTS_FILE} is read, not adapter_model.bin (a pickle); convert "
                                  "it with safetensors.torch.save_file(torch.load(bin_path), safetensors_path)")
    raise FileNotFoundError(f"{path}: {CONFIG_FILE} found but no {WEIGHTS_FILE}")
