"""Infix tuning: trainable keys and values at every layer, between the prompt and the answer.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190,
section 7 (intrinsic evaluation, "Prefix-tuning vs Infix-tuning"): instead of [PREFIX; x; y], the
sequence is [x; INFIX; y], the trainable activations placed between the source x and the target y,
at every layer as in prefix tuning. (The paper finds infixing slightly worse than prefixing, which it
attributes to the prefix affecting the activations of x as well as y, the infix only those of y.)
Per layer l, P trainable keys and values:

    head(q_t) = softmax(q_t [K_l^infix ; K_{<=t}]^T / sqrt(d)) [V_l^infix ; V_{<=t}]   answer positions t
    head(q_t) = softmax(q_t K_{<=t}^T / sqrt(d)) V_{<=t}                                prompt positions t

So infix tuning is prefix tuning whose prompt tokens cannot see the prefix (causality: the infix
comes after them). The keys carry no position (no RoPE, as prefix tuning here), so where they sit
among the keys does not matter, only which queries see them; they fill the attention's `kv_prefix`
slot with `answer_only = True`, and the attention shows them to the queries that `answer_mask` marks.

Where the answer starts: `Llama.forward(..., answer_mask=)`, (B, T) bool, True at the positions that
predict an answer token: the prompt's last token and the answer tokens. It defaults to the data
pipeline's `targets != -100` (the prompt's targets are -100), so training and evaluation need no
change, packed rows included (each example's answer positions). Without targets or answer_mask, idx
is all prompt and the model is the base model. `Llama.generate` marks the prompt's last token and
every generated token: the infix sits at the end of the prefill. The prompt's last token reads the
infix because its output predicts the first answer token (in the paper's layout that prediction
comes from the infix's last position; here the infix has no outputs of its own, like a prefix), so
the layout is exactly [x_1..x_{p-1}; INFIX; x_p; y].

Trains: the infixes, L * 2 * P * n_kv_heads * head_dim numbers (as prefix tuning without its MLP).
Initialisation: N(0, init_std^2), or the keys/values of real words (`init_token_ids`), as prefix tuning.
Not an identity at init: the prompt positions are the base model's exactly, the answer positions
are changed by the random infix (tests/test_infix.py pins both).

Merging: not possible, for prefix tuning's reason (extra attention columns, here for some queries only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .. import peft
from .prefix_tuning import LayerPrefix, tile, word_keys_values


@dataclass
class InfixTuningConfig:
    method: ClassVar[str] = "infix_tuning"
    infix_len: int = 10                   # P: virtual tokens per layer between the prompt and the answer
    init_token_ids: tuple[int, ...] = ()  # start from these words' keys/values (tiled or cut to P); () = random
    init_std: float = 1.0                 # random init N(0, init_std^2), as prefix tuning's


class LayerInfix(LayerPrefix):
    """The `kv_prefix` slot of one layer, seen only by answer positions (`answer_only`)."""

    peft_method, answer_only = "infix_tuning", True
    why_not_mergeable = ("adds trainable keys/values (extra attention columns for the answer positions), "
                         "which no weight change reproduces")


def apply(model: nn.Module, config: InfixTuningConfig) -> nn.Module:
    """Fill every layer's `kv_prefix` slot with P trainable key/value positions seen by the answer only."""
    cfg, dev, P = model.config, model.embed_tokens.weight.device, config.infix_len
    if P < 1:
        raise ValueError(f"infix_tuning: infix_len must be >= 1, got {P}")
    if config.init_token_ids:
        kvs = word_keys_values(model, tile(config.init_token_ids, P))
    else:
        shape = (cfg.n_kv_heads, P, cfg.head_dim)
        kvs = [(torch.randn(shape, device=dev) * config.init_std, torch.randn(shape, device=dev) * config.init_std)
               for _ in range(cfg.n_layers)]
    peft.fill_slot(model, "kv_prefix", lambda i, attn: LayerInfix(i, *kvs[i]))
    peft.record(model, config)
    return model
