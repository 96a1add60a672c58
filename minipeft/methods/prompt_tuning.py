"""Prompt tuning: k trainable input embeddings placed before every sequence.

Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
arXiv:2104.08691. The frozen model reads a soft prompt P_e (k, dim) followed by the token embeddings
X_e (section 2):

    logits = Llama([P_e ; X_e])        only P_e trains, at the input only

It fills the model's `input_prefix` slot. Llama.run_input_prefix runs the soft prompt alone through
the decoder at positions -k..-1 and hands each layer its keys/values as a prefix; since attention
is causal, this equals prepending the k embeddings to the input, with the real tokens at positions
0, 1, ... (a test checks that equality). Unlike prefix tuning, the deeper layers' prefixes are not
free parameters: they are what the frozen model computes from the soft prompt.

This is also Li & Liang's "embedding-only" ablation of prefix tuning (arXiv:2101.00190, section 7):
virtual tokens whose activations are free in the input layer only (see methods/prefix_tuning.py).

Trains: k * dim numbers. Initialisation (the paper compares three): embeddings of given words
(`init_token_ids`, e.g. `tuple(tokenizer.encode("Solve the problem:"))`, tiled or cut to k), or
"sampled vocab": rows of random tokens. Lester et al. sample among the 5,000 most common tokens; we
sample among the first `sample_vocab_top` ids, which in a BPE vocabulary are its earliest, most
frequent merges (an approximation of "most common"). That fails in the toy base's byte-level vocabulary,
whose first ids include bytes and reserved ids it never trained: there the toy recipe starts from words.

Known difference from Hugging Face PEFT: PEFT concatenates the k soft tokens to the input embeddings,
so the real tokens sit at positions k, k+1, ...; here they keep positions 0, 1, ... (the soft prompt at
-k..-1): the same relative distances, other absolute RoPE angles.

Merging: not possible; the prompt adds positions to the input, not a change to any weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .. import peft
from .prefix_tuning import tile


@dataclass
class PromptTuningConfig:
    method: ClassVar[str] = "prompt_tuning"
    prompt_len: int = 20                  # k soft tokens (Lester et al.: gains beyond 20 are small for large models)
    init_token_ids: tuple[int, ...] = ()  # start from these tokens' embeddings (tiled or cut to k); () = sampled vocab
    sample_vocab_top: int = 5000          # "sampled vocab" init draws among the first N token ids


class SoftPrompt(nn.Module):
    """The model's `input_prefix` slot: returns the (k, dim) soft prompt in the model's dtype."""

    peft_method, merged, mergeable = "prompt_tuning", False, False
    why_not_mergeable = "prepends trainable embeddings to the input; no weight change reproduces extra input positions"

    def __init__(self, init: torch.Tensor, embed: nn.Embedding):
        super().__init__()
        self.embeddings = nn.Parameter(init.float().clone())  # (k, dim), float32 whatever the base dtype
        object.__setattr__(self, "embed", embed)  # unregistered: only read for the model's dtype

    def forward(self) -> torch.Tensor:
        return self.embeddings.to(self.embed.weight.dtype)  # (k, dim)


def apply(model: nn.Module, config: PromptTuningConfig) -> nn.Module:
    """Put a soft prompt of `prompt_len` embeddings in the model's `input_prefix` slot."""
    if model.input_prefix is not None:
        raise ValueError(f"prompt_tuning: the model's input_prefix slot is already filled by "
                         f"{type(model.input_prefix).__name__}")
    embed = model.embed_tokens
    if config.init_token_ids:
        ids = torch.tensor(tile(config.init_token_ids, config.prompt_len), device=embed.weight.device)
    else:
        top = min(config.sample_vocab_top, embed.num_embeddings)
        ids = torch.randint(0, top, (config.prompt_len,)).to(embed.weight.device)
    init = embed.weight.detach()[ids]  # (k, dim)
    peft.fill_slot(model, "input_prefix", lambda i, m: SoftPrompt(init, embed))
    peft.record(model, config)
    return model
