"""AdaMix: a mixture of M bottleneck adapters, trained with stochastic routing, served as their average.

Wang et al. 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning",
arXiv:2205.12410. Each adapter of minipeft/methods/bottleneck_adapter.py (same placements, same
equation h <- h + s f(h W_down) W_up) gets M copies of W_down and M copies of W_up (section 3):

  * training, stochastic routing (3.1): every forward picks one W_down_i and one W_up_j per adapter,
    uniformly at random (i and j independent, as in the authors' MixtureSoup: one draw per
    projection per forward, shared by the whole batch). The copies are stacked in one tensor, so
    the copies not drawn get a zero gradient: AdamW's momentum and weight decay still move them;
  * consistency regularisation (3.2): two forwards of the same batch with different random routings
    give logits z_A, z_B; the loss adds, over the answer tokens,
        lambda * 1/2 (KL(softmax z_A || softmax z_B) + KL(softmax z_B || softmax z_A))
    As in the authors' code, each KL's target distribution is detached. lambda is
    `consistency_weight`: their code uses 1 for RoBERTa classification and 100 for GPT-2 generation
    (token-level KL averaged over answer tokens, as here). It reaches the training loop through
    peft.add_extra_loss: the first forward is the cross-entropy forward (its logits are kept), the
    hook runs the second; memory: two (B, T, vocab) logit tensors per micro-batch;
  * adaptation merging (3.3): at inference the copies are averaged, W_down = mean_i W_down_i and
    W_up = mean_j W_up_j (biases too: the authors' `expert_soup` averages every tensor), so serving
    costs one adapter. In eval mode the module computes with the averages; `average(model)` replaces
    every mixture by that one bottleneck_adapter for good (what to save for serving).
  * sharing (3.4): `share_up=True` keeps ONE W_up shared by the M down-projections (the authors'
    GLUE scripts do this); by default both projections have M copies.

The M copies start identical (W_up = 0, so the model starts as the base model; one Kaiming-uniform
W_down copied M times, as the authors deep-copy one expert): averaging weights is meaningful for
copies trained from a common start (the "model soup" argument of section 3.5), not for independent
random ones.

Trains: M (2 d k + k + d) numbers per adapter, M (d k + k) + d k + d with share_up. llama-3.2-1b,
houlsby placement, k = 64, M = 4: 33,824,768 (2.74% of the base's weights); served after averaging:
8,456,192.
Merges into the base weights: no (the adapters are nonlinear; peft.merge refuses). The M copies
do merge into ONE adapter (adaptation merging, `average`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft
from ..llama import IGNORE_INDEX
from .bottleneck_adapter import ACTIVATIONS, Bottleneck, BottleneckAdapterConfig, place


@dataclass
class AdaMixConfig(BottleneckAdapterConfig):  # placement, bottleneck, activation, scaling, targets as there
    method: ClassVar[str] = "adamix"
    n_experts: int = 4                # M copies of each projection (the paper: 4)
    share_up: bool = False            # one W_up shared by all down-projections (section 3.4)
    consistency_weight: float = 1.0   # lambda on the symmetric KL; 0 turns the second forward off

    def __post_init__(self):
        super().__post_init__()
        if self.n_experts < 1 or self.consistency_weight < 0:
            raise ValueError(f"AdaMixConfig: need n_experts >= 1 and consistency_weight >= 0, got "
                             f"n_experts={self.n_experts}, consistency_weight={self.consistency_weight}")


class MixtureBottleneck(nn.Module):
    """M stacked W_down and W_up (1 W_up with share_up): one random pair per training forward, the
    average in eval mode; the same s (f(h W_down + b_down) W_up + b_up) as Bottleneck, in fp32."""

    def __init__(self, dim: int, config: AdaMixConfig, device=None):
        super().__init__()
        one = Bottleneck(dim, config.bottleneck, config.activation, config.scaling, device)
        M, M_up = config.n_experts, 1 if config.share_up else config.n_experts
        self.down_weight = nn.Parameter(one.down.weight.detach().expand(M, -1, -1).clone())  # (M, k, d)
        self.down_bias = nn.Parameter(one.down.bias.detach().expand(M, -1).clone())          # (M, k)
        self.up_weight = nn.Parameter(one.up.weight.detach().expand(M_up, -1, -1).clone())   # (M_up, d, k)
        self.up_bias = nn.Parameter(one.up.bias.detach().expand(M_up, -1).clone())           # (M_up, d)
        self.activation, self.scaling = config.activation, config.scaling

    def averaged(self) -> tuple[torch.Tensor, ...]:
        """(W_down, b_down, W_up, b_up) averaged over the copies: adaptation merging."""
        return tuple(p.mean(0) for p in (self.down_weight, self.down_bias, self.up_weight, self.up_bias))

    def routed(self) -> tuple[torch.Tensor, ...]:
        """One randomly chosen copy of each projection: stochastic routing."""
        i = int(torch.randint(len(self.down_weight), ()))
        j = int(torch.randint(len(self.up_weight), ()))
        return self.down_weight[i], self.down_bias[i], self.up_weight[j], self.up_bias[j]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        wd, bd, wu, bu = self.routed() if self.training else self.averaged()
        return F.linear(ACTIVATIONS[self.activation](F.linear(h.float(), wd, bd)), wu, bu) * self.scaling


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1/2 (KL(p_a || p_b) + KL(p_b || p_a)) for logits a, b (N, V), averaged over the N rows; each
    KL's target distribution is detached, as in the authors' code."""
    a, b = a.float(), b.float()
    kl_b_a = F.kl_div(F.log_softmax(a, -1), F.softmax(b.detach(), -1), reduction="batchmean")  # KL(p_b || p_a)
    kl_a_b = F.kl_div(F.log_softmax(b, -1), F.softmax(a.detach(), -1), reduction="batchmean")  # KL(p_a || p_b)
    return 0.5 * (kl_a_b + kl_b_a)


class ConsistencyLoss:
    """The extra loss term (peft.add_extra_loss): a second forward with fresh random routings, and the
    symmetric KL between its logits and the first forward's, on the answer tokens only."""

    needs_logits = True

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, model: nn.Module, forward, batch, logits: torch.Tensor) -> torch.Tensor:
        idx, targets, segment_ids = batch
        if not model.training:  # eval mode routes nothing: both forwards would agree
            return logits.new_zeros((), dtype=torch.float32)
        second = forward(idx, segment_ids=segment_ids)  # (B, T, vocab), a new draw in every mixture
        keep = targets != IGNORE_INDEX
        return self.weight * symmetric_kl(logits[keep], second[keep])


def apply(model: nn.Module, config: AdaMixConfig) -> nn.Module:
    dev = model.embed_tokens.weight.device
    place(model, config, lambda dim: MixtureBottleneck(dim, config, dev))
    if config.consistency_weight > 0 and not any(isinstance(f, ConsistencyLoss)
                                                 for f in getattr(model, "peft_extra_losses", [])):
        peft.add_extra_loss(model, ConsistencyLoss(config.consistency_weight))
    peft.record(model, config)
    return model


def plain_config(c: AdaMixConfig) -> BottleneckAdapterConfig:
    return BottleneckAdapterConfig(placement=c.placement, bottleneck=c.bottleneck, activation=c.activation,
                                   scaling=c.scaling, targets=c.targets)


@torch.no_grad()
def average(model: nn.Module) -> nn.Module:
    """Adaptation merging for good: every mixture becomes ONE bottleneck_adapter holding the averaged
    weights (eval-mode outputs unchanged), the consistency term is dropped, and the recorded config
    becomes a BottleneckAdapterConfig, so save_adapter writes an adapter that costs what one costs."""
    if not any(isinstance(c, AdaMixConfig) for c in getattr(model, "peft_configs", [])):
        raise ValueError("average: this model has no AdaMix adapters (apply 'adamix' first)")
    for _, wrapper in peft.adapter_modules(model):
        if isinstance(getattr(wrapper, "adapter", None), MixtureBottleneck):
            mix = wrapper.adapter
            wd, bd, wu, bu = mix.averaged()
            one = Bottleneck(wd.shape[1], wd.shape[0], mix.activation, mix.scaling, wd.device).train(mix.training)
            for p, value in ((one.down.weight, wd), (one.down.bias, bd), (one.up.weight, wu), (one.up.bias, bu)):
                p.copy_(value)
            wrapper.adapter, wrapper.peft_method = one, "bottleneck_adapter"
    model.peft_configs = [plain_config(c) if isinstance(c, AdaMixConfig) else c for c in model.peft_configs]
    if not any(getattr(c, "consistency_weight", 0) > 0 for c in model.peft_configs):  # adamix_lora may need it
        terms = getattr(model, "peft_extra_losses", [])
        model.peft_extra_losses = [f for f in terms if not isinstance(f, ConsistencyLoss)]
    return model
