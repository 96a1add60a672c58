"""Bottleneck adapters: Houlsby, Pfeiffer and parallel placements of h <- h + f(h W_down) W_up.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751: a small
two-layer network with a skip connection, inserted after each sub-layer's output projection and
before the residual add (section 2.1, Figure 2):

    h <- h + s (f(h W_down + b_down) W_up + b_up),    W_down: (d, k),  W_up: (k, d),  k << d

f is a nonlinearity (GELU as in the lecture; `activation` also takes relu or silu). W_up and b_up
start at zero, so each adapter is exactly the identity and the model starts as the base model;
W_down starts Kaiming-uniform (nn.Linear's init; He et al.'s code does the same with its "lora"
init option), b_down at zero.

Placements (`placement`), for this pre-norm decoder:
  * "houlsby": on the outputs of o_proj and down_proj, i.e. before each residual add (two per layer).
  * "pfeiffer": after the feed-forward only, on down_proj's output (one per layer). Pfeiffer et al.
    2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", arXiv:2005.00247,
    keep the adapter after the FFN and drop the one after attention. Their extra layer norms belong
    to BERT's post-norm blocks and are not reproduced here.
  * "parallel": He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning",
    arXiv:2110.04366: the adapter reads the sub-layer's INPUT and adds to its output,
    mlp(x) + s * f(x W_down) W_up, where x is the normed hidden state that gate_proj and up_proj read.
    A wrapper on down_proj never sees x, so the whole `mlp` module is wrapped (peft.wrap_modules).
    Only the feed-forward takes a parallel adapter: He et al. find the FFN the better place (their
    section 4.4; the "MAM adapter" puts it there, with s = 4), and `self_attn` cannot be wrapped here,
    because it returns (y, kv) and holds the KV cache and the attention slots by name.

`targets` selects modules: Linear names or globs for houlsby/pfeiffer (default o_proj + down_proj,
resp. down_proj), module names for parallel (default mlp); empty means the placement's default.

Trains: the adapters, 2 d k + k + d numbers each; one per target per layer. For llama-3.2-1b
(d = 2048, 16 layers) and k = 64: 264,256 per adapter, 8,456,192 with houlsby (0.684% of its
1,235,814,400 weights), 4,228,096 with pfeiffer or parallel.
Merges: no. f sits between W_down and W_up; no change of the frozen weights reproduces a nonlinear
branch, so peft.merge refuses and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
DEFAULT_TARGETS = {"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",), "parallel": ("mlp",)}
WHY_NOT_MERGEABLE = "has a nonlinearity f between W_down and W_up, which no change of the frozen weights reproduces"


@dataclass
class BottleneckAdapterConfig:
    method: ClassVar[str] = "bottleneck_adapter"
    placement: str = "houlsby"        # "houlsby" (after o_proj and down_proj), "pfeiffer" (after the FFN), "parallel"
    bottleneck: int = 64              # k, the bottleneck width (Houlsby et al. sweep 8..256)
    activation: str = "gelu"          # f: "gelu", "relu" or "silu"
    scaling: float = 1.0              # s on the branch; He et al.'s scaled parallel adapter uses 4
    targets: tuple[str, ...] = ()     # modules that get an adapter; () = the placement's default

    def __post_init__(self):
        if self.placement not in DEFAULT_TARGETS:
            raise ValueError(f"{type(self).__name__}: placement must be one of {sorted(DEFAULT_TARGETS)}, "
                             f"got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        if self.bottleneck < 1:
            raise ValueError(f"{type(self).__name__}: bottleneck must be >= 1, got {self.bottleneck}")
        self.targets = tuple([self.targets] if isinstance(self.targets, str) else self.targets) \
            or DEFAULT_TARGETS[self.placement]


class Bottleneck(nn.Module):
    """s (f(h W_down + b_down) W_up + b_up), in fp32; W_up, b_up = 0 so it starts at 0."""

    def __init__(self, dim: int, bottleneck: int, activation: str, scaling: float, device=None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device)   # Kaiming-uniform weight (nn.Linear's init)
        self.up = nn.Linear(bottleneck, dim, device=device)
        for p in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(p)
        self.activation, self.scaling = activation, scaling

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(ACTIVATIONS[self.activation](self.down(h.float()))) * self.scaling


class AdapterLinear(nn.Module):
    """Sequential (Houlsby/Pfeiffer) adapter on a frozen Linear's output: y + adapter(y), y = base(x)."""

    mergeable, why_not_mergeable, merged = False, WHY_NOT_MERGEABLE, False

    def __init__(self, base: nn.Linear, adapter: nn.Module, method: str):
        super().__init__()
        self.base, self.adapter, self.peft_method = base, adapter, method

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `o_proj.weight` keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.adapter(y).to(y.dtype)


class ParallelAdapter(nn.Module):
    """Parallel adapter around a whole sub-layer: base(x) + adapter(x), the adapter reads the input."""

    mergeable, why_not_mergeable, merged = False, WHY_NOT_MERGEABLE, False

    def __init__(self, base: nn.Module, adapter: nn.Module, method: str):
        super().__init__()
        self.base, self.adapter, self.peft_method = base, adapter, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.adapter(x).to(y.dtype)


def place(model: nn.Module, config, make: Callable[[int], nn.Module]) -> list[str]:
    """Put `make(dim)` adapters where `config.placement` and `config.targets` say (shared with AdaMix)."""
    if config.placement != "parallel":
        return peft.inject(model, config.targets,
                           lambda name, linear: AdapterLinear(linear, make(linear.out_features), config.method))

    def wrap(name: str, module: nn.Module) -> nn.Module:
        if not hasattr(module, "down_proj"):  # an MLP has one; self_attn returns (y, kv) and holds the cache
            raise ValueError(f"{config.method}: the parallel placement wraps feed-forward modules ('mlp'); "
                             f"'{name}' is a {type(module).__name__}")
        return ParallelAdapter(module, make(model.config.dim), config.method)  # the MLP maps dim -> dim

    return peft.wrap_modules(model, config.targets, wrap)


def apply(model: nn.Module, config: BottleneckAdapterConfig) -> nn.Module:
    dev = model.embed_tokens.weight.device
    place(model, config, lambda dim: Bottleneck(dim, config.bottleneck, config.activation, config.scaling, dev))
    peft.record(model, config)
    return model
