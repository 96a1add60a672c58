"""(IA)^3: learned vectors that rescale keys, values and the feed-forward hidden state.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (T-Few), arXiv:2205.05638, section 3.3. Three vectors per block, initialised to ones:

    softmax(Q (l_k ⊙ K)^T / sqrt(d_k)) (l_v ⊙ V)        l_k, l_v scale the k_proj / v_proj outputs
    (l_ff ⊙ gamma(W_1 x)) W_2                            l_ff scales the INPUT of down_proj

For SwiGLU, gamma(W_1 x) is silu(gate_proj(x)) * up_proj(x), the input of down_proj. Hugging Face
PEFT calls a layer whose vector multiplies the input a "feedforward module"; we keep its names:
`target_modules` (which Linears get a vector) and `feedforward_modules` (which of them scale the input).

Trains: the vectors only, L * (2 * n_kv_heads * head_dim + ffn_dim) numbers with the defaults
(147,456 for llama-3.2-1b, 0.0119% of its 1,235,814,400 weights).
Merges: yes, into the weight. Output scaling is diag(l) W (rows), input scaling W diag(l) (columns);
unmerge divides back, exact up to float rounding in fp32; bf16 weights keep 8 mantissa bits, so each
merged entry is rounded to ~0.4% there: merge in fp32 when exactness matters. A vector with a zero entry would wipe a row or
column that unmerge could not restore, so such a module reports `mergeable = False` and
peft.merge refuses with the reason before changing anything.

Interop: `from_peft` / `to_peft` read and write Hugging Face PEFT's IA3 format, where each vector is
`base_model.model.<HF module name>.ia3_l`, shaped (out, 1), or (1, in) for feed-forward modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from . import peft

PEFT_PREFIX = "base_model.model.model."  # PeftModel -> IA3Model -> LlamaForCausalLM -> LlamaModel


@dataclass
class IA3Config:
    method: ClassVar[str] = "ia3"
    # Linears that get a vector (names or globs, as in peft.inject); the paper's k, v and FFN choice
    target_modules: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    # the subset whose vector scales the INPUT (the FFN hidden state); the rest scale the output
    feedforward_modules: tuple[str, ...] = ("down_proj",)


class IA3Linear(nn.Module):
    """A frozen Linear whose output (or, if `feedforward`, input) is multiplied by a learned vector."""

    def __init__(self, base: nn.Linear, feedforward: bool, method: str = "ia3"):
        super().__init__()
        self.base, self.feedforward, self.peft_method, self.merged = base, feedforward, method, False
        n = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, dtype=torch.float32, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        l = self.ia3_l
        if self.feedforward:
            return self.base((x.to(l.dtype) * l).to(x.dtype))
        y = self.base(x)
        return (y.to(l.dtype) * l).to(y.dtype)

    @property
    def mergeable(self) -> bool:
        return bool((self.ia3_l != 0).all())

    @property
    def why_not_mergeable(self) -> str:
        zeros = (self.ia3_l == 0).nonzero().flatten().tolist()
        return (f"has zero entries at {zeros[:5]} in its vector; folding them into the weight would "
                f"erase rows/columns that unmerge could not restore")

    def merge(self) -> None:
        w, l = self.base.weight, self.ia3_l.to(self.base.weight.dtype)
        if self.feedforward:
            w.mul_(l)                     # W diag(l): column j of W meets input feature j
        else:
            w.mul_(l[:, None])            # diag(l) W: row i of W makes output feature i
            if self.base.bias is not None:
                self.base.bias.mul_(l)    # l * (W x + b)

    def unmerge(self) -> None:
        w, l = self.base.weight, self.ia3_l.to(self.base.weight.dtype)
        if self.feedforward:
            w.div_(l)
        else:
            w.div_(l[:, None])
            if self.base.bias is not None:
                self.base.bias.div_(l)


def apply(model: nn.Module, config: IA3Config) -> nn.Module:
    """Wrap every Linear named by `config.target_modules` in an IA3Linear (vectors of ones)."""
    targets = peft.match_targets(model, config.target_modules)
    ff = set(peft.match_targets(model, config.feedforward_modules)) if config.feedforward_modules else set()
    if ff - set(targets):
        raise ValueError(f"IA3Config: feedforward_modules must be a subset of target_modules; "
                         f"{sorted(ff - set(targets))[:3]} are not targets")
    peft.inject(model, config.target_modules, lambda name, linear: IA3Linear(linear, feedforward=name in ff))
    peft.record(model, config)
    return model


# ----------------------------------------------------------------------------------------------
# Hugging Face PEFT format (peft/tuners/ia3: layer.py stores `ia3_l`, model.py matches the names)


def _peft_match(key: str, spec, rule: str) -> bool:
    """PEFT's name matching on the HF module name `key`: a str is a regex (fullmatch); a list entry
    matches the whole name or a dotted tail ("target"), or any tail ("feedforward": `endswith`)."""
    if isinstance(spec, str):
        return spec == "all-linear" or re.fullmatch(spec, key) is not None
    return any(key == t or key.endswith(t if rule == "feedforward" else "." + t) for t in spec)


def _compact(model: nn.Module, chosen: list[str]) -> list[str]:
    """Leaf names ("k_proj") when they pick exactly `chosen` among the model's modules, else full names."""
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in chosen))
    picked = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves]
    return leaves if set(picked) == set(chosen) else list(chosen)


def from_peft(model: nn.Module, adapter_config: dict, tensors: dict[str, torch.Tensor],
              source: str = "adapter_model.safetensors") -> nn.Module:
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
    targets = [n for n in linears if _peft_match("model." + n, target_spec, "target")
               and not _peft_match("model." + n, exclude, "target")]
    ff = [n for n in targets if _peft_match("model." + n, ff_spec, "feedforward")]
    if not targets:
        raise ValueError(f"from_peft: target_modules {target_spec!r} matched no linear layer of this model")
    shapes = {}
    for n in targets:
        linear = model.get_submodule(n)
        shapes[PEFT_PREFIX + n + ".ia3_l"] = (1, linear.in_features) if n in ff else (linear.out_features, 1)
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise KeyError(f"{source}: IA3 tensors do not match the config: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{source}: '{key}' has shape {tuple(tensors[key].shape)}, this base model expects "
                             f"{shape} (an adapter for a different base model?)")
    apply(model, IA3Config(target_modules=tuple(_compact(model, targets)),
                           feedforward_modules=tuple(_compact(model, ff))))
    with torch.no_grad():
        for n in targets:
            model.get_submodule(n).ia3_l.copy_(tensors[PEFT_PREFIX + n + ".ia3_l"].reshape(-1))
    return model


def to_peft(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) in Hugging Face PEFT's IA3 layout for the model's (IA)^3 modules."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear) and m.peft_method == "ia3"]
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
    tensors = {PEFT_PREFIX + n + ".ia3_l": (m.ia3_l[None, :] if m.feedforward else m.ia3_l[:, None]).detach().clone()
               for n, m in mods}
    return config, tensors
