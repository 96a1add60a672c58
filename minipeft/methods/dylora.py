"""DyLoRA: "DyLoRA: Parameter-Efficient Tuning of Pretrained Models using Dynamic Search-Free Low-Rank
Adaptation" (Valipour et al. 2023, arXiv:2210.07558).

LoRA trained for every rank at once. Each training step draws one b uniformly from {r_min..r_max}
(one b for the whole model, drawn again after every optimiser step by a peft.add_step_hook) and every
target uses the first b rows of A and the first b columns of B (the paper's eq. 3):

    h = W x + (alpha / b) B[:, :b] A[:b] x,    A: (r_max, in),  B: (out, r_max)

so the update of rank b is the rank-(b-1) update plus one more outer product: the ranks are nested
("sorted") as in nested dropout. `frozen=True` (the default) lets only the b-th row of A and the b-th
column of B receive a gradient in that step (the first b-1 are used with .detach()); `frozen=False`
trains A[:b] and B[:, :b] together. Checked (issue 16) against the authors' code, huawei-noah/Efficient-NLP,
DyLoRA/ at commit 278c345d (the paper's Section 3 text could not be retrieved here): in
loralib/DyLoRA.py, `dynamic.forward` detaches the first b-1 rows of A / columns of B when frozen and
multiplies each factor by sqrt(r / b) on top of LoRA's alpha / r, i.e. alpha / b for the product (eq. 3);
examples/NLU/examples/text-classification/run_glue.py draws b uniformly in 1..r before every step, one b
for the whole model, and trains with frozen=True. We do the same (test_same_as_the_authors_code).
AdamW still moves a zero-gradient row by its momentum and weight decay: "frozen" is about the gradient,
in their code (one Parameter per factor under the HF Trainer's AdamW) as here. Putting the untrained rows
back after each step (branch spiel, commit cae4351) made the toy-task curve worse (scripts/dylora_curve.py,
300 steps: frozen 0.17-0.19 vs 0.06-0.11 bits/token, non-frozen b = 8 0.0551 vs 0.0491), so it was not kept.
Initialisation as LoRA (A Kaiming-uniform, B = 0): the model starts unchanged. A and B train.

Outside training (eval mode) the adapter runs at `eval_rank` (0 = r_max). `truncate(model, b)` cuts
every module to rank b for good, a smaller adapter that gives the same logits as eval_rank = b.
Merges: W <- W + (alpha / eval_rank) B[:, :eval_rank] A[:eval_rank]; unmerge restores a copy of W.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft


@dataclass
class DyLoRAConfig:
    method: ClassVar[str] = "dylora"
    r: int = 8                  # r_max: the largest rank trained (A is (r, in), B (out, r))
    r_min: int = 1              # the smallest rank drawn
    alpha: float = 16.0         # the update of rank b is scaled by alpha / b
    dropout: float = 0.0        # dropout on the branch's input
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")  # names, globs or "all-linear"
    eval_rank: int = 0          # the rank used outside training and by merge (0 = r)
    frozen: bool = True         # only the b-th row of A / column of B gets a gradient (authors' default)

    def __post_init__(self):
        if not (1 <= self.r_min <= self.r and 0 <= self.eval_rank <= self.r and 0 <= self.dropout < 1):
            raise ValueError(f"DyLoRAConfig: need 1 <= r_min <= r, 0 <= eval_rank <= r, 0 <= dropout < 1; "
                             f"got r={self.r}, r_min={self.r_min}, eval_rank={self.eval_rank}, dropout={self.dropout}")

    @property
    def rank_for_eval(self) -> int:
        return self.eval_rank or self.r


class SampledRank:
    """The rank b of the current training step, shared by every module of one apply; the step hook."""

    def __init__(self, config: DyLoRAConfig):
        self.config, self.b = config, config.r
        self.resample()

    def resample(self) -> None:
        self.b = int(torch.randint(self.config.r_min, self.config.r + 1, ()))

    def __call__(self, model: nn.Module, step: int) -> None:
        self.resample()


class DyLoRALinear(nn.Module):
    """base(x) + (alpha / b) B[:, :b] A[:b] dropout(x), b = the sampled rank (training) or eval_rank."""

    peft_method = "dylora"

    def __init__(self, base: nn.Linear, config: DyLoRAConfig, rank: SampledRank):
        super().__init__()
        self.base, self.config, self.rank = base, config, rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r, base.in_features, device=dev))   # (r_max, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.r, device=dev))  # (out, r_max)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False
        self.register_buffer("weight_before_merge", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def factors(self, b: int, frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:b] (b, in), B[:, :b] (out, b)); frozen: rows/columns before the b-th carry no gradient."""
        A, B = self.lora_A[:b], self.lora_B[:, :b]
        if frozen and b > 1:
            A = torch.cat([A[:-1].detach(), A[-1:]])
            B = torch.cat([B[:, :-1].detach(), B[:, -1:]], dim=1)
        return A, B

    def current_rank(self) -> int:
        return self.rank.b if self.training else self.config.rank_for_eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        b = self.current_rank()
        A, B = self.factors(b, frozen=self.training and self.config.frozen)
        x = self.dropout(x)
        h = F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))  # the factors cast, not x (lora.py)
        return y + (h * (self.config.alpha / b)).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        b = self.config.rank_for_eval
        A, B = self.factors(b)
        return B @ A * (self.config.alpha / b)  # (out, in)

    def merge(self) -> None:
        peft.merge_delta_keeping_base(self, self.delta_weight())

    def unmerge(self) -> None:
        peft.restore_base(self)

    def extra_repr(self) -> str:
        c = self.config
        return f"r={c.r_min}..{c.r}, eval_rank={c.rank_for_eval}, frozen={c.frozen}, merged={self.merged}"


def truncate(model: nn.Module, b: int) -> nn.Module:
    """Cut every DyLoRA module to rank b (A[:b], B[:, :b]; eval_rank = r = b): a smaller adapter with the
    logits the full one gives at eval_rank = b. The recorded config changes too, so it saves and loads."""
    mods = [m for m in model.modules() if isinstance(m, DyLoRALinear)]
    if not mods:
        raise ValueError("truncate: the model has no DyLoRA modules")
    if any(m.merged for m in mods) or not all(1 <= b <= m.config.r for m in mods):
        raise ValueError(f"truncate: need an unmerged model and 1 <= b <= r (r = {mods[0].config.r}); got b={b}")
    new = {}
    for m in mods:
        c = m.config
        new.setdefault(id(c), dataclasses.replace(c, r=b, r_min=min(c.r_min, b), eval_rank=b))
        m.config = new[id(c)]
        m.lora_A = nn.Parameter(m.lora_A.detach()[:b].clone())
        m.lora_B = nn.Parameter(m.lora_B.detach()[:, :b].clone())
        m.rank.config = m.config
        m.rank.b = min(m.rank.b, b)
    model.peft_configs = [new.get(id(c), c) for c in model.peft_configs]
    return model


def apply(model: nn.Module, config: DyLoRAConfig) -> nn.Module:
    rank = SampledRank(config)
    peft.inject(model, config.targets, lambda name, linear: DyLoRALinear(linear, config, rank))
    peft.add_step_hook(model, rank)
    peft.record(model, config)
    return model
