"""Checks of lab 09 (PaSTA and infix tuning): the PaSTA forward pass from the base blocks, one layer's infix
attention, and the exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). Where a wrong build
computes something else, the checks compare it with the typical mistakes computed here (PaSTA's vector added
to every token, at the index instead of the token id, after the layer instead of before; an infix visible to
the prompt's queries, or rotated by RoPE) and name the one it matches.
"""
from __future__ import annotations

import copy
import math

import torch

from .. import peft
from ..adapters import apply_method
from ..data import encode_example
from ..llama import Llama, LlamaConfig, apply_rope
from ..methods.pasta import llama3_special_ids
from ..tokenizer import Tokenizer
from . import assert_same_outputs_and_grads, close, expect, make_base, name_the_mistake


# ----------------------------------------------------------------------------------------------
# Build 1: PaSTA


def _pasta(model: Llama, E, ids, idx, where="ids", before=True, layer_of=lambda l, L: l) -> torch.Tensor:
    """PaSTA's forward pass, and its typical mistakes (a reference for the hints)."""
    x = model.embed_tokens(idx)
    cos, sin = model.rope(torch.arange(idx.shape[1]).expand_as(idx))
    L = len(model.layers)

    def add(x, l):
        for j, t in enumerate(ids):
            hit = {"ids": idx == t, "index": idx == j, "all": torch.ones_like(idx, dtype=torch.bool)}[where]
            x = x + hit[..., None] * E[layer_of(l, L), j]
        return x

    for l, layer in enumerate(model.layers):
        x = add(x, l) if before else x
        x, _ = layer(x, cos, sin)
        x = x if before else add(x, l)
    return model.lm_head(model.norm(x))


def _pasta_inputs():
    """A chat prompt (all four specials) followed by ordinary tokens, among them the ids 0..3 (the specials'
    indices j, to tell `idx == j` from `idx == ids[j]`); a second row with specials elsewhere."""
    tok = Tokenizer.byte_level()
    chat = tok.encode_dialog_prompt([{"role": "user", "content": "What is 3 + 4?"}])
    row0 = chat + [0, 1, 2, 3] + tok.encode("7", bos=False) + [tok.eot_id]
    row1 = tok.encode("Question: 2 + 2?", bos=True) + [3, 2, 1, 0] + chat[-4:]
    T = max(len(row0), len(row1))
    return torch.tensor([row + tok.encode("x" * (T - len(row))) for row in (row0, row1)])


def check_pasta_forward(my_pasta_forward) -> str:
    """my_pasta_forward(model, E, ids, idx) against apply_method(..., "pasta") holding the same vectors."""
    base = make_base(0)
    base.requires_grad_(False)
    pasta = apply_method(copy.deepcopy(base), "pasta")
    vectors = pasta.token_adapter.vectors                                      # (L, n_ids, d)
    with torch.no_grad():
        vectors.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))    # as if trained
    ids = llama3_special_ids(base.config.vocab_size)
    idx = _pasta_inputs()
    E = vectors.detach().clone()
    with torch.no_grad():
        out = my_pasta_forward(base, E.clone(), ids, idx)
        want = pasta(idx)
    expect(isinstance(out, torch.Tensor) and out.shape == want.shape,
           f"return the logits (B, T, vocab) = {tuple(want.shape)}; got "
           f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if not close(out, want, 1e-5):
        with torch.no_grad():
            args = (base, E, ids, idx)
            variants = {
                "no vector was added anywhere (these are the base model's logits): add E[l, j] where the token "
                "id equals ids[j] (compare idx, the token ids, not the positions)": base(idx),
                "the vectors were added to every token: PaSTA adds E[l, j] only where the token is ids[j], and "
                "ordinary tokens change only through attention": _pasta(*args, where="all"),
                "you compared the tokens with j, the index into ids, not with the id ids[j]: the vectors landed "
                "on tokens 0..3": _pasta(*args, where="index"),
                "the vectors were added after layer l, not before it: PaSTA changes the hidden state entering "
                "each layer": _pasta(*args, before=False),
                "layer l got another layer's vectors: E[l] goes with layer l": _pasta(
                    *args, layer_of=lambda l, L: L - 1 - l),
                "every layer got layer 0's vectors: E[l] goes with layer l": _pasta(*args, layer_of=lambda l, L: 0),
            }
        name_the_mistake(out, variants, "the logits differ: before each layer l, add E[l, j] at the positions "
                                         "whose token is ids[j]; then the layer; then model.norm and lm_head")
    my_E = E.clone().requires_grad_(True)
    expect(my_pasta_forward(base, my_E, ids, idx).requires_grad,
           "E got no gradient: the logits do not depend on it through autograd (a .detach() or torch.no_grad() "
           "too many?)")
    worst = assert_same_outputs_and_grads(lambda: my_pasta_forward(base, my_E, ids, idx), lambda: pasta(idx),
                                          [(my_E, vectors)], names=["E"])
    return f"= minipeft's PaSTA with the same vectors: logits and dL/dE; largest difference {worst:.1e}"


# ----------------------------------------------------------------------------------------------
# Build 2: infix attention


def _infix_attention(attn, x, cos, sin, K_i, V_i, reads, seen_by="reads", rope_infix=None, tile_kv=False,
                     causal=True) -> torch.Tensor:
    """One layer's infix attention, and its typical mistakes (a reference for the hints)."""
    B, T, _ = x.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = apply_rope(attn.q_proj(x).view(B, T, H, hd), cos, sin).transpose(1, 2)
    k = apply_rope(attn.k_proj(x).view(B, T, Hkv, hd), cos, sin).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    K_i = K_i[None].expand(B, -1, -1, -1)
    if rope_infix is not None:
        K_i = apply_rope(K_i.transpose(1, 2), *rope_infix).transpose(1, 2)
    grow = (lambda t: t.repeat(1, H // Hkv, 1, 1)) if tile_kv else (lambda t: t.repeat_interleave(H // Hkv, 1))
    keys, values = grow(torch.cat([K_i, k], 2)), grow(torch.cat([V_i[None].expand(B, -1, -1, -1), v], 2))
    P = K_i.shape[2]
    see = {"reads": reads, "all": torch.ones_like(reads), "prompt": ~reads}[seen_by]
    tokens = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    visible = torch.cat([see[:, None, :, None].expand(B, 1, T, P), tokens.expand(B, 1, T, T)], -1)
    scores = (q @ keys.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~visible, -math.inf)
    y = scores.softmax(-1) @ values
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))


def check_infix_attention(my_infix_attention) -> str:
    """my_infix_attention(attn, x, cos, sin, K_i, V_i, reads) against an infix-tuned layer's own forward."""
    P, T = 3, 12
    model = apply_method(make_base(0), "infix_tuning", infix_len=P)
    attn = model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, model.config.dim, generator=g)
    cos, sin = model.rope(torch.arange(T).expand(2, T))
    reads = torch.arange(T)[None] >= torch.tensor([[7], [4]])    # answer positions: from the prompt's last token
    key, value = attn.kv_prefix.key, attn.kv_prefix.value        # (n_kv, P, hd) each
    with torch.no_grad():
        out = my_infix_attention(attn, x, cos, sin, key.clone(), value.clone(), reads)
        want = attn(x, cos, sin, answer_mask=reads)[0]
    expect(isinstance(out, torch.Tensor) and out.shape == want.shape,
           f"return the layer's output (B, T, dim) = {tuple(want.shape)}, after o_proj; got "
           f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if not close(out, want, 1e-5):
        with torch.no_grad():
            a = dict(attn=attn, x=x, cos=cos, sin=sin, K_i=key, V_i=value, reads=reads)
            base_out = model.layers[0].self_attn(x, cos, sin)[0]           # no answer mask: no query sees it
            prompt_rows = ~reads
            prompt_ok = close(out[prompt_rows], want[prompt_rows], 1e-5)
            variants = {
                "the prompt positions see the infix: only the queries marked in `reads` (the prompt's last token "
                "and the answer) may attend to it; it comes after the rest of the prompt":
                    _infix_attention(**a, seen_by="all"),
                "the infix is shown to the prompt and hidden from the answer: `reads` marks the queries that see it":
                    _infix_attention(**a, seen_by="prompt"),
                "no query sees the infix: the positions marked in `reads` attend to it": base_out,
                "the infix keys were rotated by RoPE: they have no position, so RoPE turns the tokens' q and k only":
                    _infix_attention(**a, rope_infix=(cos[:, :P], sin[:, :P])),
                "the kv heads are tiled (repeat) instead of grouped: query head h reads kv head "
                "h // (n_heads // n_kv_heads) (repeat_interleave)": _infix_attention(**a, tile_kv=True),
                "the tokens see later tokens: causal over the tokens, the infix columns aside":
                    _infix_attention(**a, causal=False),
            }
        fallback = ("the outputs differ: projections split into heads, RoPE on q and k, [K_i; K], the mask "
                    "(infix columns for the `reads` queries, causal over the tokens), softmax, o_proj")
        if not prompt_ok and close(out[reads], want[reads], 1e-5):
            fallback = "the answer positions are right but the prompt positions are not: they must not see the infix"
        name_the_mistake(out, variants, fallback)
    my_key, my_value, my_x = (t.detach().clone().requires_grad_(True) for t in (key, value, x))
    their_x = x.clone().requires_grad_(True)
    worst = assert_same_outputs_and_grads(
        lambda: my_infix_attention(attn, my_x, cos, sin, my_key, my_value, reads),
        lambda: attn(their_x, cos, sin, answer_mask=reads)[0],
        [(my_key, key), (my_value, value), (my_x, their_x)], names=["K_i", "V_i", "x"])
    return (f"same output and gradients (K_i, V_i, x) as the infix-tuned layer, two rows with different "
            f"prompt lengths; largest difference {worst:.1e}")


# ----------------------------------------------------------------------------------------------
# Exercises


def exercise_1(pasta_params_3b) -> str:
    """PaSTA's trainable numbers on the llama-3.2-3b preset with the four default ids."""
    with torch.device("meta"):
        counted = peft.count_parameters(apply_method(Llama(LlamaConfig.from_name("llama-3.2-3b")), "pasta"))[0]
    expect(pasta_params_3b == counted, f"{pasta_params_3b:,} is not it: one vector of the model's width per "
                                       "layer and special token; how many layers and how wide is llama-3.2-3b?")
    return f"{counted:,} trainable numbers"


def exercise_2(generation_answer_mask) -> str:
    """generation_answer_mask(prompt_len, n_fed) -> (1, prompt_len + n_fed) bool: the answer_mask under which a full
    forward over the prompt and n_fed generated tokens predicts what cached generation does."""
    tok = Tokenizer.byte_level()
    infix = apply_method(make_base(0), "infix_tuning", infix_len=3)
    for question, n_fed in (("3 + 4?", 3), ("12 - 5?", 2)):
        ids, targets = encode_example(tok, dict(question=question, answer="7\n#### 7"))
        p = next(t for t, y in enumerate(targets) if y != -100)          # the prompt's last token
        prompt = ids[:p + 1]
        mask = generation_answer_mask(len(prompt), n_fed)
        want = (torch.arange(len(prompt) + n_fed) >= len(prompt) - 1)[None]
        expect(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == want.shape,
               f"return a bool tensor (1, prompt_len + n_fed) = {tuple(want.shape)}")
        expect(not mask[0, :len(prompt) - 1].any(), "a prompt position before the prompt's last token reads the "
                                                    "infix: the infix comes after them")
        expect(bool(mask[0, len(prompt) - 1]), "the prompt's last token must read the infix: its output predicts the "
                                               "first answer token")
        expect(bool(mask[0, len(prompt):].all()), "every generated token reads the infix (each predicts the next "
                                                  "answer token)")
        with torch.no_grad():
            new = infix.generate([prompt], max_new_tokens=n_fed + 1)[0]
            seq = torch.tensor([prompt + new[:n_fed]])
            predicted = infix(seq, answer_mask=mask)[0, len(prompt) - 1:].argmax(-1).tolist()
        expect(predicted == new, f"the full forward predicts {predicted}, generate gave {new}")
    return "a full forward under your mask predicts generate's tokens"
