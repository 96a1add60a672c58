"""Prefix tuning: trainable keys and values in front of every layer's attention.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190.
Every layer l gets P trainable key and value vectors that every query may attend to, "as if it
were 'virtual tokens'" (abstract):

    head(x) = softmax(q [K_l^prefix ; K]^T / sqrt(d)) [V_l^prefix ; V]

Sized for grouped-query attention: one prefix position holds n_kv_heads x head_dim keys (and as
many values), not n_heads x head_dim. The prefix keys get no RoPE (they have no position), so the
real tokens keep positions 0, 1, ... . They go through the attention's `kv_prefix` slot, which also
handles the KV cache, padding and packing masks.

Trains: the prefixes, L * 2 * P * n_kv_heads * head_dim numbers. With `mlp_hidden > 0`, the
reparameterisation of section 4.3 instead: P_l[i, :] = MLP(P'[i, :]), a smaller matrix P' (P, k)
and a tanh MLP shared by all layers whose output row splits into every layer's keys and values
("directly updating the P_theta parameters leads to unstable optimization"); it trains
P * k + (k + 1) * h + (h + 1) * L * 2 * n_kv_heads * head_dim numbers for hidden width h. After training,
`fold(model)` keeps only the prefixes the MLP produces (the paper drops the MLP the same way).

Initialisation: N(0, init_std^2), or from the activations of real words (the paper's initialisation
study in section 7: better and more stable than random, especially with little data): the words
`init_token_ids` run through the frozen model at positions -P..-1, and each layer's keys/values for
them become that layer's prefix. At init the model then behaves exactly as if those words were
prepended to every input.

The ablations of section 7 ("Intrinsic Evaluation"):
  * embedding-only (virtual tokens in the input layer only, every deeper activation computed by the
    frozen model) is prompt tuning, method `prompt_tuning` with prompt_len = P: the same function and
    the same P x dim parameters (tests/test_prefix_prompt.py builds it from the paper's definition and
    compares). minipeft keeps that one implementation. The paper finds it clearly weaker than full
    prefix tuning: free activations at every layer are more expressive.
  * infix ([x; INFIX; y]): method `infix_tuning` (methods/infix_tuning.py), these prefixes shown only
    to the answer positions.

Known differences from Hugging Face PEFT (so its prefix-tuning adapters do not load here as they are):
  * positions: here the prefixes have no position and the real tokens keep RoPE positions 0, 1, ...;
    PEFT passes the prefix as a past_key_values cache of length P, so the real tokens sit at
    positions P, P+1, ... .
  * `mlp_input_dim`, the width k of P', defaults here to the model dim; for a grouped-query model
    PEFT's prefix encoder uses n_kv_heads * head_dim (the width of one position's keys) as its
    token_dim. Set mlp_input_dim = n_kv_heads * head_dim to get PEFT's shape of P'.

Merging: not possible. The prefixes add columns to every attention matrix; no change of the
weights reproduces that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft

WHY_NOT_MERGEABLE = "adds trainable keys/values (extra attention columns), which no weight change reproduces"


@dataclass
class PrefixTuningConfig:
    method: ClassVar[str] = "prefix_tuning"
    prefix_len: int = 10                  # P: virtual tokens per layer (the paper: 10 table-to-text, 200 summaries)
    init_token_ids: tuple[int, ...] = ()  # start from these words' keys/values (tiled or cut to P); () = random
    init_std: float = 1.0                 # random init N(0, init_std^2), as HF PEFT's nn.Embedding
    mlp_hidden: int = 0                   # > 0: P = MLP(P') with this hidden width (section 4.3); 0: train P directly
    mlp_input_dim: int = 0                # width k of P' (0: the model dim, as HF PEFT's prefix_projection)


class PrefixMLP(nn.Module):
    """P_l = MLP(P') for all layers at once: tanh MLP whose output row holds every layer's keys and values."""

    peft_method, mergeable, why_not_mergeable, merged = "prefix_tuning", False, WHY_NOT_MERGEABLE, False

    def __init__(self, prefix_len: int, input_dim: int, hidden: int, n_layers: int, n_kv_heads: int,
                 head_dim: int, device):
        super().__init__()
        self.shape = (prefix_len, 2, n_kv_heads, head_dim)
        self.prefix_input = nn.Parameter(torch.randn(prefix_len, input_dim, device=device))  # P'
        self.hidden = nn.Linear(input_dim, hidden, device=device)
        self.out = nn.Linear(hidden, n_layers * 2 * n_kv_heads * head_dim, device=device)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (n_kv, P, hd) of one layer; computes only that layer's rows of the output."""
        width = 2 * self.shape[2] * self.shape[3]
        rows = slice(layer * width, (layer + 1) * width)
        h = torch.tanh(self.hidden(self.prefix_input))                   # (P, hidden)
        kv = F.linear(h, self.out.weight[rows], self.out.bias[rows])      # (P, 2 * n_kv * hd)
        k, v = kv.view(self.shape).permute(1, 2, 0, 3)                    # each (n_kv, P, hd)
        return k, v


class LayerPrefix(nn.Module):
    """The `kv_prefix` slot of one layer: its own (key, value) Parameters, or a view into a shared PrefixMLP."""

    peft_method, mergeable, why_not_mergeable, merged = "prefix_tuning", False, WHY_NOT_MERGEABLE, False

    def __init__(self, layer: int, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                 mlp: PrefixMLP | None = None):
        super().__init__()
        self.layer = layer
        if mlp is None:
            self.key, self.value = nn.Parameter(key), nn.Parameter(value)  # (n_kv, P, hd) each
        object.__setattr__(self, "mlp", mlp)  # unregistered: the MLP lives once in model.peft_shared

    def forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = (self.key, self.value) if self.mlp is None else self.mlp.layer_kv(self.layer)
        return k[None], v[None]  # (1, n_kv, P, hd); the attention broadcasts over the batch and casts


def tile(token_ids, length: int) -> list[int]:
    """Repeat the ids until there are `length`, then cut (as HF PEFT does for text initialisation)."""
    ids = list(token_ids)
    return (ids * (length // len(ids) + 1))[:length]


@torch.no_grad()
def word_keys_values(model: nn.Module, token_ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values (n_kv, P, hd) for `token_ids` run through the model at positions
    -P..-1 (as Llama.run_input_prefix places a soft prompt), so the real tokens keep positions 0, 1, ..."""
    dev = model.embed_tokens.weight.device
    x = model.embed_tokens(torch.tensor(list(token_ids), device=dev)[None])  # (1, P, dim)
    cos, sin = model.rope(torch.arange(-x.shape[1], 0, device=dev)[None])
    kvs = []
    for layer in model.layers:
        x, (k, v) = layer(x, cos, sin)
        kvs.append((k[0].float().clone(), v[0].float().clone()))
    return kvs


def apply(model: nn.Module, config: PrefixTuningConfig) -> nn.Module:
    """Fill every layer's `kv_prefix` slot with P trainable key/value positions."""
    cfg, dev, P = model.config, model.embed_tokens.weight.device, config.prefix_len
    shape = (cfg.n_kv_heads, P, cfg.head_dim)
    if config.mlp_hidden > 0:
        if config.init_token_ids:
            raise ValueError("prefix_tuning: init_token_ids needs mlp_hidden=0 (with an MLP, it makes the prefixes)")
        mlp = PrefixMLP(P, config.mlp_input_dim or cfg.dim, config.mlp_hidden, cfg.n_layers, cfg.n_kv_heads,
                        cfg.head_dim, dev)
        peft.shared_container(model)["prefix_mlp"] = mlp
        peft.fill_slot(model, "kv_prefix", lambda i, attn: LayerPrefix(i, mlp=mlp))
    else:
        if config.init_token_ids:
            kvs = word_keys_values(model, tile(config.init_token_ids, P))
        else:
            kvs = [(torch.randn(shape, device=dev) * config.init_std, torch.randn(shape, device=dev) * config.init_std)
                   for _ in range(cfg.n_layers)]
        peft.fill_slot(model, "kv_prefix", lambda i, attn: LayerPrefix(i, *kvs[i]))
    peft.record(model, config)
    return model


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """Replace the reparameterisation MLP by the prefixes it produces now (section 4.3: only the
    prefixes are kept after training). Outputs stay identical; the MLP and its parameters are gone."""
    shared = getattr(model, "peft_shared", {})
    if "prefix_mlp" not in shared:
        raise ValueError("fold: this model has no prefix-tuning MLP (apply prefix_tuning with mlp_hidden > 0)")
    mlp = shared["prefix_mlp"]
    for layer in model.layers:
        slot = layer.self_attn.kv_prefix
        if isinstance(slot, LayerPrefix) and slot.mlp is mlp:
            k, v = mlp.layer_kv(slot.layer)
            slot.key, slot.value = nn.Parameter(k.clone()), nn.Parameter(v.clone())
            object.__setattr__(slot, "mlp", None)
    del shared["prefix_mlp"]
    # what save_adapter records must rebuild the folded form
    model.peft_configs = [replace(c, mlp_hidden=0, mlp_input_dim=0) if isinstance(c, PrefixTuningConfig) else c
                          for c in model.peft_configs]
    return model
