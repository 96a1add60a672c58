"""LLaMA-Adapter: adaption prompts behind a zero-initialised gate (v1), plus bias/scale tuning (v2).

v1: Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention", arXiv:2303.16199. Each of the top L layers gets an adaption prompt P_l (K, dim). Its keys
and values come from the layer's own frozen k_proj/v_proj, without RoPE (as in the original code),
and the queries attend to them with a SEPARATE softmax, scaled per head by a gate that starts at 0
(section 3.2; the original code gates with tanh(g)):

    y = softmax(q K^T / sqrt(d)) V  +  tanh(g_h) * softmax(q (P_l W_k)^T / sqrt(d)) (P_l W_v)

so at init the model is exactly the base model, and the prompt's influence grows as g learns.
It fills the attention's `extra_branch` slot. The prompt keys/values are computed once per forward
(not per query); while a KV cache is in use (generation, no grad) they are computed on the first
step and reused until the cache is cleared, so training never sees stale values.

v2: Gao et al. 2023, "LLaMA-Adapter V2: Parameter-Efficient Visual Instruction Model",
arXiv:2304.15010, adds to v1 (section 3, "bias tuning of linear layers"):
  * a trainable bias and scale on every linear layer: y = scale * (W x + bias), scale=1, bias=0 at init;
  * trainable RMSNorm weights (all norms, the final one included: they are base parameters whose
    requires_grad is switched back on, so they show as "unfrozen base" in peft.trainable_report).

Trains: v1: L * (K * dim + n_heads). v2 adds 2 * out_features per wrapped linear and the norms,
(2 * n_layers + 1) * dim. Scale, bias and norm weights are tagged `no_weight_decay` (decay would pull
a scale towards 0 rather than 1).

Merging: the prompt branch cannot merge (a second softmax over extra keys), so peft.merge refuses v1
and v2 alike and changes nothing. For v2, `merge_bias_scale(model)` folds only the linear part into
the weights (W <- scale * W, and the Linear gets bias scale * bias) with the prompts still active;
peft.unmerge undoes it. peft.merge_and_unload refuses v1 and v2: the prompts have no weight form,
and minipeft's Llama checkpoint has no biases.

Known difference from the authors' released code (github.com/OpenGVLab/LLaMA-Adapter), for v2's
bias and scale: we keep the paper's y = s ⊙ (W x + b) (s, b: (out,)), on which lab 05 and its checks
build. The released code differs: llama_adapter_v2_chat65b/llama/model.py
(`forward_linear_with_scale_and_bias`) scales the INPUT and adds the bias after, y = W (s ⊙ x) + b
(s: (in,), b: (out,)), on wq/wk/wv/wo and w1/w2/w3; llama_adapter_v2_multimodal7b/llama/llama.py has
no scale at all, only zero-initialised biases (`w_bias`) on wq, wo, w1, w2 and w3 (none on wk, wv).
Both forms are the identity at init and fold into the weights (W diag(s) there, diag(s) W here), but
they train differently and their weights do not map onto this module's.

Known difference from Hugging Face PEFT's `adaption_prompt`: PEFT gates each layer with ONE scalar
`adaption_gate` used as it is (no tanh); we keep the paper's code, one gate per head through tanh.
PEFT's adapter weights therefore do not map onto this module.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft
from ..llama import RMSNorm


@dataclass
class LlamaAdapterConfig:
    method: ClassVar[str] = "llama_adapter"
    version: int = 1                      # 1: gated adaption prompts; 2: + bias/scale on linears, trainable norms
    prompt_len: int = 10                  # K: prompt positions per adapted layer (the paper: 10)
    n_layers_adapted: int | None = None   # L: the top L layers get prompts; None = all (the paper: 30 of LLaMA-7B's 32)
    targets: tuple[str, ...] = ("all-linear",)  # v2 only: linears that get the bias and scale


class AdaptionPrompt(nn.Module):
    """The `extra_branch` slot of one layer: a gated attention over K learned prompt positions."""

    peft_method, merged, mergeable = "llama_adapter", False, False
    why_not_mergeable = "adds a second, gated softmax over learned prompt keys inside the attention"

    def __init__(self, prompt_len: int, dim: int, n_heads: int, device):
        super().__init__()
        # N(0, 1), the scale of the normalised hidden states that k_proj/v_proj usually see
        self.prompt = nn.Parameter(torch.randn(prompt_len, dim, device=device))  # (K, dim)
        self.gate = nn.Parameter(torch.zeros(n_heads, device=device))  # tanh(0) = 0: starts as the base model
        self.cached: tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor]] | None = None

    def prompt_kv(self, attn: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt keys/values (n_kv, K, hd) from the layer's own projections, no RoPE; reused only
        within one generation (the same KV cache object, no grad)."""
        cache = attn.kv_cache if not torch.is_grad_enabled() else None
        if cache is not None and self.cached is not None and self.cached[0]() is cache:
            return self.cached[1]
        p = self.prompt.to(dtype)
        K = p.shape[0]
        k = attn.k_proj(p).view(K, attn.n_kv_heads, attn.head_dim).transpose(0, 1)  # (n_kv, K, hd)
        v = attn.v_proj(p).view(K, attn.n_kv_heads, attn.head_dim).transpose(0, 1)
        self.cached = None if cache is None else (weakref.ref(cache), (k, v))
        return k, v

    def forward(self, q: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        """q (B, n_heads, T, hd) -> the gated prompt attention (B, n_heads, T, hd), computed in float32."""
        B = q.shape[0]
        k, v = (t.float()[None].expand(B, -1, -1, -1) for t in self.prompt_kv(attn, q.dtype))  # (B, n_kv, K, hd)
        y = F.scaled_dot_product_attention(q.float(), k, v, enable_gqa=True)  # its own softmax over the K keys
        return (torch.tanh(self.gate).view(1, -1, 1, 1) * y).to(q.dtype)


class BiasScaleLinear(nn.Module):
    """v2's y = scale * (W x + bias) around a frozen Linear; scale=1 and bias=0 at init."""

    peft_method = "llama_adapter"
    unloadable = False
    why_not_unloadable = "gives the Linear a bias, which minipeft's Llama checkpoint has no place for"

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base, self.merged = base, False
        dev = base.weight.device
        self.adapter_bias = nn.Parameter(torch.zeros(base.out_features, device=dev))
        self.adapter_scale = nn.Parameter(torch.ones(base.out_features, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:  # the base Linear now holds scale * W and bias scale * bias
            return y
        return (self.adapter_scale * (y.float() + self.adapter_bias)).to(y.dtype)

    @property
    def mergeable(self) -> bool:  # checked by peft.merge before anything changes
        return self.base.bias is None and bool((self.adapter_scale != 0).all())

    @property
    def why_not_mergeable(self) -> str:
        return ("wraps a Linear that already has a bias" if self.base.bias is not None
                else "has a scale of exactly 0, which unmerge could not divide back out")

    def merge(self) -> None:
        if self.base.bias is not None:
            raise ValueError("BiasScaleLinear.merge: the base Linear already has a bias (Llama's have none)")
        if (self.adapter_scale == 0).any():
            raise ValueError("BiasScaleLinear.merge: a scale of exactly 0 cannot be unmerged")
        w = self.base.weight
        w.copy_((w.float() * self.adapter_scale[:, None]).to(w.dtype))
        bias = (self.adapter_scale * self.adapter_bias).to(w.dtype)
        self.base.bias = nn.Parameter(bias, requires_grad=False)

    def unmerge(self) -> None:
        w = self.base.weight
        w.copy_((w.float() / self.adapter_scale[:, None]).to(w.dtype))
        self.base.bias = None


def apply(model: nn.Module, config: LlamaAdapterConfig) -> nn.Module:
    """v1: gated adaption prompts in the top L layers. v2: also bias/scale on linears and trainable norms."""
    if config.version not in (1, 2):
        raise ValueError(f"llama_adapter: version must be 1 or 2, got {config.version!r}")
    cfg, n = model.config, len(model.layers)
    L = n if config.n_layers_adapted is None else config.n_layers_adapted
    if not 1 <= L <= n:
        raise ValueError(f"llama_adapter: n_layers_adapted={L}, the model has {n} layers")
    dev = model.embed_tokens.weight.device
    if config.version == 2:
        peft.match_targets(model, config.targets)  # refuse taken targets before filling any slot
    peft.fill_slot(model, "extra_branch", lambda i, attn: AdaptionPrompt(config.prompt_len, cfg.dim, cfg.n_heads, dev),
                   layers=list(range(n - L, n)))
    if config.version == 2:
        peft.inject(model, config.targets, lambda name, linear: BiasScaleLinear(linear))
        for m in model.modules():
            if isinstance(m, BiasScaleLinear):
                m.adapter_scale.no_weight_decay = m.adapter_bias.no_weight_decay = True
        for norm in (m for m in model.modules() if isinstance(m, RMSNorm)):  # base parameters, unfrozen
            norm.weight.requires_grad_(True)
            norm.weight.no_weight_decay = True
    peft.record(model, config)
    return model


def merge_bias_scale(model: nn.Module) -> nn.Module:
    """v2: fold scale and bias into the wrapped Linears, leaving the adaption prompts active
    (peft.merge refuses, because the prompt branch cannot merge). Idempotent; undo with peft.unmerge."""
    for _, m in peft.adapter_modules(model):
        if isinstance(m, BiasScaleLinear) and not m.merged:
            with torch.no_grad():
                m.merge()
            m.merged = True
    return model
