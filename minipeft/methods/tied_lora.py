"""Tied-LoRA: one pair of low-rank factors per target, shared by every layer.

Renduchintala, Konuk, Kuchaiev, "Tied-LoRA: Enhancing parameter efficiency of LoRA with weight
tying", arXiv:2311.09578.

LoRA gives every layer i its own A_i, B_i. Tied-LoRA ties them across layers: every q_proj uses one
A (r, in) and one B (out, r), every v_proj another pair, and each layer keeps only two scaling
vectors, v_i (out) and u_i (r), as diagonal matrices around B:

    y = W_i x + s * diag(v_i) B diag(u_i) A x,        s = alpha / r

The paper names its variants by which of the four tensors train, written as this product, "vBuA"
(so v scales the outputs and u the rank). Its best variant (TL6) trains all four: our default.
`trainable="BA"` is tied LoRA without vectors; `"vu"` freezes a random A and B (VeRA's structure).

VeRA ("VeRA: Vector-based Random Matrix Adaptation", Kopiczko et al. 2023, arXiv:2310.11454) writes
ΔW = Λ_b B Λ_d A with frozen random A (r, in), B (out, r) shared by all layers and trained per-layer
vectors b (out) and d (r), b = 0 and d = d_init (0.1 in Hugging Face PEFT) at the start. `"vu"` is
the same function class, exactly: v = b and s u = d (s = alpha / r), pinned by tests/test_vera.py.
It is not VeRA's training run, for three reasons: (1) the init: u = 1 gives d = s, so VeRA's d_init
needs alpha = d_init * r; (2) the parameterisation: Adam moves u by about lr, so d = s u moves by
s * lr: the same as VeRA only when s = 1; (3) the random factors: VeRA draws A, B Kaiming-uniform,
U(-sqrt(6 / fan_in), +), from its `projection_prng_key`, and PEFT keeps ONE pair, sized for the largest
target and sliced, for all targets; here U(-1/sqrt(fan_in), +) from `seed`, one pair per leaf name.
So Hugging Face PEFT VeRA directories are not read or written: their A, B could be loaded only as
frozen tensors that this method does not save (it rebuilds them from `seed`).

Initialisation leaves the model unchanged: the first trainable tensor among B, v, u, A (in that
order) starts at zero, so by default B = 0 exactly as in LoRA. A and B are otherwise uniform random
from `seed`, vectors start at 1, and a vector that does not train is fixed at 1 and left out. A
frozen random factor is not saved: load_adapter re-applies the config and the seed rebuilds it.

Parameters (all four train): sum over targets t of r*(in_t + out_t) + n_t*(out_t + r), with n_t the
number of layers wrapped; LoRA needs n_t*r*(in_t + out_t). Merge: W_i += s diag(v_i) B diag(u_i) A;
unmerge restores a copy of W_i kept at merge time (exact in every dtype, as in lora.py; the same
for the three methods below).

The shared tensors live once, in `model.peft_shared["tied_lora__q_proj"]` (a ModuleDict key cannot
hold "."); each wrapper keeps an unregistered reference, so parameters() and the saved adapter hold
them once. This file also holds what partially_tied_lora, tied_lora_extra and tensor_embedding reuse.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft


@dataclass
class TiedLoRAConfig:
    method: ClassVar[str] = "tied_lora"
    r: int = 8                 # rank of the shared A (r, in) and B (out, r)
    alpha: float = 16.0        # the update is scaled by alpha / r, as in LoRA
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")  # one A, B per leaf name; globs, "all-linear"
    trainable: str = "vBuA"    # which of v, B, u, A train (the paper's TL6: all four)
    seed: int = 0              # the random A, B come from it, so load_adapter rebuilds frozen ones

    def __post_init__(self):
        parse_trainable(self.trainable)


# ----------------------------------------------------------------------------------------------
# Pieces shared by the four tied methods


class LowRankDelta(nn.Module):
    """y = base(x) + delta(x), where delta(x) = delta_weight() @ x; subclasses give both."""

    def __init__(self, base: nn.Linear, shared: nn.ParameterDict, scale: float):
        super().__init__()
        self.base, self.scale, self.merged = base, scale, False
        object.__setattr__(self, "shared", shared)  # NOT registered: it lives once in model.peft_shared
        self.register_buffer("weight_before_merge", None, persistent=False)  # W while merged: exact unmerge

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `q_proj.weight` keeps working (as lora.py)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        dtype = next(iter(self.shared.values())).dtype  # adapter dtype (float32), whatever the base's
        return y + self.delta(x.to(dtype)).to(y.dtype)

    def merge(self) -> None:  # as LoRALinear: keep W, so that unmerge is exact in every dtype
        peft.merge_delta_keeping_base(self, self.delta_weight())

    def unmerge(self) -> None:
        peft.restore_base(self)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, merged={self.merged}"


def shared_factors(model: nn.Module, owned: dict, key: str, linear: nn.Linear, seed: int,
                   make: Callable[[torch.Generator], dict[str, torch.Tensor]],
                   trainable: set[str]) -> nn.ParameterDict:
    """The tensors shared by every targeted Linear of one leaf name, created by `make` on first use
    and stored in model.peft_shared[key]. `owned` remembers what this apply() created."""
    shape = tuple(linear.weight.shape)
    if key not in owned:
        container = peft.shared_container(model)
        if key in container:
            raise ValueError(f"model.peft_shared['{key}'] already exists: this method was already "
                             f"applied to these layers")
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))  # same seed, same factors
        dev = linear.weight.device
        container[key] = nn.ParameterDict({n: nn.Parameter(t.to(dev), requires_grad=n in trainable)
                                           for n, t in make(g).items()})
        owned[key] = (shape, container[key])
    if owned[key][0] != shape:
        raise ValueError(f"{key}: layers tied together need one weight shape; got {shape} and {owned[key][0]}")
    return owned[key][1]


def uniform(shape: tuple[int, ...], fan_in: int, g: torch.Generator) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): nn.Linear's default, which LoRA uses for A."""
    bound = fan_in ** -0.5
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


def leaf_name(name: str) -> str:
    return name.rpartition(".")[2]


def layer_index(name: str) -> int:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if m is None:
        raise ValueError(f"'{name}' is not inside a decoder layer (layers.N.*); tied methods need one")
    return int(m.group(1))


def check_slices(field: str, slices: int, n_layers: int) -> None:
    """1 <= slices <= n_layers: with n_layers slices each layer can already have its own factor, so
    more would only add parameters (and, mixed from zero, slices that no gradient ever reaches)."""
    if not 1 <= slices <= n_layers:
        raise ValueError(f"{field}={slices}: choose 1 (all layers tied) to n_layers={n_layers} "
                         f"(a slice for each layer)")


def one_hot_mixing(name: str, n_layers: int, slices: int, device) -> torch.Tensor:
    """(slices,) mixing weights: layer i starts on slice i * slices // n_layers, so with as many slices
    as layers each layer has its own, and with one slice every layer shares it."""
    w = torch.zeros(slices, device=device)
    w[layer_index(name) * slices // n_layers] = 1.0
    return w


# ----------------------------------------------------------------------------------------------
# Tied-LoRA


class TiedLoRALinear(LowRankDelta):
    peft_method = "tied_lora"

    def __init__(self, base: nn.Linear, shared: nn.ParameterDict, scale: float,
                 v: torch.Tensor | None, u: torch.Tensor | None):
        super().__init__(base, shared, scale)
        self.v = None if v is None else nn.Parameter(v)  # (out,) output scaling; None = fixed at 1
        self.u = None if u is None else nn.Parameter(u)  # (r,) rank scaling; None = fixed at 1

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (out, r)) of this layer: here the shared pair itself."""
        return self.shared["A"], self.shared["B"]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        h = F.linear(x, A)  # (..., r)
        h = h if self.u is None else h * self.u
        y = F.linear(h, B)  # (..., out)
        return self.scale * (y if self.v is None else y * self.v)

    def delta_weight(self) -> torch.Tensor:
        A, B = self.factors()
        B = B if self.v is None else self.v[:, None] * B
        B = B if self.u is None else B * self.u
        return self.scale * B @ A  # (out, in)


def parse_trainable(trainable: str) -> set[str]:
    letters = set(trainable)
    if not letters or not letters <= set("vBuA") or len(letters) != len(trainable):
        raise ValueError(f"trainable={trainable!r}: use each of the letters v, B, u, A at most once "
                         f"(e.g. 'vBuA', 'BA', 'vu')")
    return letters


def apply(model: nn.Module, config: TiedLoRAConfig) -> nn.Module:
    trainable = parse_trainable(config.trainable)
    zero = next(t for t in "BvuA" if t in trainable)  # this one starts at 0: the model is unchanged
    r, owned = config.r, {}

    def make(linear: nn.Linear) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
        out_f, in_f = linear.weight.shape
        return lambda g: {"A": torch.zeros(r, in_f) if zero == "A" else uniform((r, in_f), in_f, g),
                          "B": torch.zeros(out_f, r) if zero == "B" else uniform((out_f, r), r, g)}

    def vector(letter: str, size: int, device) -> torch.Tensor | None:
        if letter not in trainable:
            return None
        return torch.zeros(size, device=device) if zero == letter else torch.ones(size, device=device)

    def wrap(name: str, linear: nn.Linear) -> nn.Module:
        shared = shared_factors(model, owned, f"tied_lora__{leaf_name(name)}", linear, config.seed,
                                make(linear), trainable & {"A", "B"})
        dev = linear.weight.device
        return TiedLoRALinear(linear, shared, config.alpha / r, vector("v", linear.out_features, dev),
                              vector("u", r, dev))

    peft.inject(model, config.targets, wrap)
    peft.record(model, config)
    return model
