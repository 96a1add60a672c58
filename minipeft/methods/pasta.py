"""PaSTA: a trainable vector added to the hidden state of each special token, at every layer.

Yang, Huang, Zhou & Chen 2023 (EACL), "Parameter-Efficient Tuning with Special Token Adaptation",
arXiv:2210.04382. PaSTA modifies "the special token representations (e.g., [SEP] and [CLS] in BERT)
before the self-attention module at each layer" (abstract); the sequence length stays the same
(section 2: "we add the introduced vectors to the hidden states of special tokens"). For the hidden
states H^l (T, d) entering layer l:

    H^l_t <- H^l_t + e(v_p^l)    if token t is the special token p,   else H^l_t unchanged

Here "entering layer l" is the residual stream before layer l's RMSNorm and attention (BERT's layer
input is both the attention's input and its residual; in a pre-norm decoder the residual stream plays
that part), so the vector of layer l also reaches the later layers through the residual. The update
spreads to ordinary tokens only through attention (the paper's "vertical attention heads", section 1).

For Llama 3 the special tokens are `<|begin_of_text|>` (every prompt starts with it) and, in the chat
format, `<|start_header_id|>`, `<|end_header_id|>` and `<|eot_id|>`: the default `token_ids` (resolved
from the vocabulary size: Llama 3 puts its 256 specials last, in Meta's order, as minipeft/tokenizer.py
checks; the toy base's byte-level vocabulary does the same at 256..511). In the plain
`Question: ...\\nAnswer:` format only `<|begin_of_text|>` occurs in the inputs.

Trains: one vector per (layer, special-token id), L x n_ids x d numbers, zero-initialised (the model
is the base model exactly at init). On the llama-3.2-1b preset with the four default ids:
16 x 4 x 2048 = 131,072 (0.0106% of 1.236 B; tests/test_pasta.py checks it on the meta device).
For scale: on BERT-large (24 layers, d = 1024, about 335 M parameters) one vector per layer is
24,576 numbers = 0.0073%, so the 0.015-0.022% quoted for PaSTA on BERT-large are 2-3 such vectors
per layer (our arithmetic).

Merging: not possible. The vector is added at some token positions only (it depends on the token id),
which no change of a weight matrix reproduces. merge() refuses, naming the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn as nn

from .. import peft
from ..tokenizer import NUM_SPECIAL, SPECIAL_NAMES

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass
class PaSTAConfig:
    method: ClassVar[str] = "pasta"
    token_ids: tuple[int, ...] = ()  # the ids that get vectors; () = Llama 3's LLAMA3_SPECIALS for this vocabulary


def llama3_special_ids(vocab_size: int, names=LLAMA3_SPECIALS) -> tuple[int, ...]:
    """Ids of Llama 3 special tokens by name: the 256 specials are the last ids, in Meta's order."""
    if vocab_size < NUM_SPECIAL:
        raise ValueError(f"pasta: a vocabulary of {vocab_size} ids has no room for Llama 3's {NUM_SPECIAL} "
                         "special tokens; give token_ids explicitly")
    return tuple(vocab_size - NUM_SPECIAL + SPECIAL_NAMES.index(n) for n in names)


class SpecialTokenVectors(nn.Module):
    """The model's `token_adapter` slot: adds vectors[l, j] to the hidden state of every token equal to
    token_ids[j], before layer l."""

    peft_method, merged, mergeable = "pasta", False, False
    why_not_mergeable = ("adds a vector at special-token positions only (it depends on the token id), "
                         "which no weight change reproduces")

    def __init__(self, n_layers: int, token_ids: tuple[int, ...], dim: int, device):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long, device=device), persistent=False)
        # fp32 whatever the base dtype; zero: identity at init
        self.vectors = nn.Parameter(torch.zeros(n_layers, len(token_ids), dim, device=device))  # (L, n_ids, d)

    def forward(self, layer: int, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        is_special = (idx[..., None] == self.token_ids).to(self.vectors.dtype)  # (B, T, n_ids) one-hot or 0
        return x + (is_special @ self.vectors[layer]).to(x.dtype)              # (B, T, d)


def apply(model: nn.Module, config: PaSTAConfig) -> nn.Module:
    """Fill the model's `token_adapter` slot with zero vectors for `config.token_ids` at every layer."""
    cfg = model.config
    ids = tuple(config.token_ids) or llama3_special_ids(cfg.vocab_size)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"pasta: token_ids holds {bad[0]!r}; ids must be integers in [0, {cfg.vocab_size})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"pasta: token_ids {ids} repeats an id (one vector per id and layer)")
    peft.fill_slot(model, "token_adapter",
                   lambda _, m: SpecialTokenVectors(cfg.n_layers, ids, cfg.dim, m.embed_tokens.weight.device))
    peft.record(model, replace(config, token_ids=ids))  # the saved config names the ids it resolved
    return model
