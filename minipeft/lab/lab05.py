"""Checks of lab 05 (virtual tokens and a handful of vectors): prefix attention, prompt tuning, the prefix MLP,
LLaMA-Adapter's gated branch, BitFit, LLaMA-Adapter v2, and the exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). Where a wrong build
computes something else, the checks compare it with the typical mistakes computed here (a prefix rotated by
RoPE, a causal mask that forgot the prefix columns, the kv heads tiled instead of repeated, an extra tanh,
a gate without tanh, ...) and name the one it matches.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft
from ..adapters import apply_method
from ..llama import Llama, LlamaConfig, RMSNorm, apply_rope
from ..methods.llama_adapter import AdaptionPrompt, BiasScaleLinear
from ..methods.prefix_tuning import PrefixMLP
from . import assert_same_outputs_and_grads, check_build, close, expect, make_base, name_the_mistake

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _first(t: torch.Tensor) -> str:
    """A tensor's first entries, rounded, for a hint."""
    values = [round(v, 4) for v in t.detach().flatten()[:3].tolist()]
    return f"{values}" + ("..." if t.numel() > 3 else "")


def _idx(model: Llama, T: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Build 1: attention over [prefix; tokens]


def _prefix_attention(attn, x, cos, sin, k_p, v_p, prefix_rope=None, rope=True, tile_kv=False,
                      mask="right", scale=None) -> torch.Tensor:
    """The prefix attention layer, and its typical mistakes (a reference for the hints)."""
    B, T, _ = x.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, hd)
    k = attn.k_proj(x).view(B, T, Hkv, hd)
    v = attn.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    if rope:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if prefix_rope is not None:  # the mistake: the prefix keys rotated as if they were tokens
        k_p = apply_rope(k_p.transpose(1, 2), *prefix_rope).transpose(1, 2)
    grow = (lambda t: t.repeat(1, H // Hkv, 1, 1)) if tile_kv else (lambda t: t.repeat_interleave(H // Hkv, 1))
    keys = grow(torch.cat([k_p.expand(B, -1, -1, -1), k], 2))
    values = grow(torch.cat([v_p.expand(B, -1, -1, -1), v], 2))
    P = k_p.shape[2]
    scores = q @ keys.transpose(-1, -2) * (hd ** -0.5 if scale is None else scale)   # (B, H, T, P + T)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    hidden = {"right": F.pad(future, (P, 0)),                                   # prefix always visible
              "none": torch.zeros(T, P + T, dtype=torch.bool),                  # tokens see the future
              "unshifted": torch.ones(T, P + T, dtype=torch.bool).triu(1)}[mask]  # triu over P + T columns
    y = scores.masked_fill(hidden, -math.inf).softmax(-1) @ values
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))


def check_prefix_attention(my_prefix_attention) -> str:
    """my_prefix_attention(attn, x, cos, sin, k_p, v_p) against a prefix-tuned layer's own forward."""
    P, T = 6, 10
    model = apply_method(make_base(0), "prefix_tuning", prefix_len=P)
    attn = model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, model.config.dim, generator=g)
    cos, sin = model.rope(torch.arange(T).expand(2, T))
    key, value = attn.kv_prefix.key, attn.kv_prefix.value                      # (n_kv, P, hd) each
    my_key, my_value, my_x = (t.detach().clone().requires_grad_(True) for t in (key, value, x))
    their_x = x.clone().requires_grad_(True)
    with torch.no_grad():
        out = my_prefix_attention(attn, x, cos, sin, key[None].clone(), value[None].clone())
        want = attn(x, cos, sin)[0]
    expect(isinstance(out, torch.Tensor) and out.shape == want.shape,
           f"return the layer's output (B, T, dim) = {tuple(want.shape)}, after o_proj; got "
           f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if not close(out, want, 1e-5):
        with torch.no_grad():
            one, zero = torch.ones_like(cos), torch.zeros_like(sin)            # RoPE at position 0: no rotation
            pos_free = my_prefix_attention(attn, x, one, zero, key[None].clone(), value[None].clone())
            cos_p, sin_p = model.rope(torch.arange(-P, 0).expand(2, P))
            pr = dict(attn=attn, x=x, cos=cos, sin=sin, k_p=key[None], v_p=value[None])
            rotated = ("your prefix keys were rotated by RoPE, as if they sat at positions {}: the prefix has no "
                       "position, so RoPE turns the tokens' q and k only")
            variants = {
                rotated.format("0..P-1"): _prefix_attention(**pr, prefix_rope=(cos[:1, :P], sin[:1, :P])),
                rotated.format("-P..-1"): _prefix_attention(**pr, prefix_rope=(cos_p[:1], sin_p[:1])),
                "q and k of the tokens need RoPE (apply_rope before the scores); only the prefix goes without":
                    _prefix_attention(**pr, rope=False),
                "the mask: tokens may not see later tokens (causal), while all P prefix columns stay visible "
                "to every query": _prefix_attention(**pr, mask="none"),
                "the causal mask must be shifted by the P prefix columns: a triu over all P + T keys hides prefix "
                "positions from early queries and shows later tokens": _prefix_attention(**pr, mask="unshifted"),
                "the kv heads are tiled (repeat) instead of grouped: query head h reads kv head "
                "h // (n_heads // n_kv_heads) (repeat_interleave)": _prefix_attention(**pr, tile_kv=True),
                "the scores miss their 1 / sqrt(head_dim)": _prefix_attention(**pr, scale=1.0),
                "the scores are divided by head_dim, not sqrt(head_dim)":
                    _prefix_attention(**pr, scale=1 / attn.head_dim),
            }
            with_positions_off = attn(x, one, zero)[0]
        fallback = ("the outputs differ: projections split into heads, RoPE on q and k, [K_p; K], the mask, "
                    "softmax, o_proj")
        if close(pos_free, with_positions_off, 1e-5):
            fallback = ("the outputs agree when RoPE is the identity (every position 0) but not at positions 0..T-1: "
                        "something is rotated that should not be (the prefix keys, the values) or not rotated that "
                        "should be (q and k)")
        name_the_mistake(out, variants, fallback)
    worst = assert_same_outputs_and_grads(
        lambda: my_prefix_attention(attn, my_x, cos, sin, my_key[None], my_value[None]),
        lambda: attn(their_x, cos, sin)[0],
        [(my_key, key), (my_value, value), (my_x, their_x)], names=["k_p", "v_p", "x"])
    return f"same output and gradients (k_p, v_p, x) as the prefix-tuned layer; largest difference {worst:.1e}"


# ----------------------------------------------------------------------------------------------
# Build 2: prompt tuning


def _prompted(model: Llama, prompt, idx, prompt_first=True, keep=None, norm=True) -> torch.Tensor:
    k, (B, T) = prompt.shape[0], idx.shape
    parts = [prompt.expand(B, -1, -1), model.embed_tokens(idx)]
    x = torch.cat(parts if prompt_first else parts[::-1], 1)
    cos, sin = model.rope(torch.arange(-k, T).expand(B, -1))
    for layer in model.layers:
        x, _ = layer(x, cos, sin)
    x = x[:, k:] if keep is None else keep(x)
    return model.lm_head(model.norm(x) if norm else x)


def check_prompt_tuning(my_prompt_tuning) -> str:
    """my_prompt_tuning(model, prompt, idx) against apply_method(..., "prompt_tuning")."""
    k = 5
    frozen = make_base(0).requires_grad_(False)
    before = {n: p.clone() for n, p in frozen.state_dict().items()}
    prompted = apply_method(copy.deepcopy(frozen), "prompt_tuning", prompt_len=k)
    soft = prompted.input_prefix.embeddings                                   # (k, dim)
    idx = _idx(frozen)
    with torch.no_grad():
        out = my_prompt_tuning(frozen, soft.detach().clone(), idx)
        want = prompted(idx)
    expect(frozen.input_prefix is None and all(torch.equal(p, before[n]) for n, p in frozen.state_dict().items()),
           "my_prompt_tuning changed the model it was given: the base stays frozen and unchanged, only the "
           "prompt is new")
    expect(isinstance(out, torch.Tensor) and out.shape == want.shape,
           f"return logits for the T tokens only, (B, T, vocab) = {tuple(want.shape)}; got "
           f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__} (the k prompt positions "
           "predict nothing)")
    if not close(out, want, 1e-4):
        with torch.no_grad():
            p = soft.detach()
            variants = {
                "the prompt goes BEFORE the tokens: [prompt; tokens], so every token can attend to it (causal)":
                    _prompted(frozen, p, idx, prompt_first=False, keep=lambda x: x[:, :idx.shape[1]]),
                "you kept the first T positions of [prompt; tokens]: the tokens' hidden states are the last T":
                    _prompted(frozen, p, idx, keep=lambda x: x[:, :idx.shape[1]]),
                "the final RMSNorm (model.norm) is missing before lm_head": _prompted(frozen, p, idx, norm=False),
            }
        name_the_mistake(out, variants, "the logits differ: run every layer on [prompt; tokens] with RoPE for "
                                         "positions -k..T-1, then model.norm and lm_head on the tokens' positions")
    my_soft = soft.detach().clone().requires_grad_(True)
    expect(my_prompt_tuning(frozen, my_soft, idx).requires_grad,
           "the prompt got no gradient: the logits do not depend on it through autograd (a .detach() or "
           "torch.no_grad() too many?)")
    worst = assert_same_outputs_and_grads(lambda: my_prompt_tuning(frozen, my_soft, idx), lambda: prompted(idx),
                                          [(my_soft, soft)], names=["the prompt"])
    return f"same logits and the same gradient for the prompt as prompt_tuning; largest difference {worst:.1e}"


# ----------------------------------------------------------------------------------------------
# Build 3: the prefix MLP


def _mlp_kv(mlp: PrefixMLP, layer: int, inner=lambda h: torch.tanh(h), outer=lambda y: y, layout="lkh",
            swap=False) -> torch.Tensor:
    P, _, n_kv, hd = mlp.shape
    rows = outer(mlp.out(inner(mlp.hidden(mlp.prefix_input))))               # (P, L * 2 * n_kv * hd)
    if layout == "lkh":
        kv = rows.view(P, -1, 2, n_kv, hd)[:, layer]
    elif layout == "klh":                                                     # [key/value][layer] instead
        kv = rows.view(P, 2, -1, n_kv, hd)[:, :, layer]
    else:                                                                     # (hd, n_kv) swapped
        kv = rows.view(P, -1, 2, hd, n_kv)[:, layer].transpose(-1, -2)
    k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)
    return torch.stack((v, k) if swap else (k, v))


def check_prefix_mlp(my_prefix_mlp) -> str:
    """my_prefix_mlp(prefix_input, hidden, out, layer, n_kv, head_dim) against PrefixMLP.layer_kv."""
    cfg = LlamaConfig.from_name("tiny")
    torch.manual_seed(0)
    # input width = hidden width, so that a second pass through `hidden` runs (and is caught) instead of crashing
    theirs = PrefixMLP(4, 32, 32, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, "cpu")
    mine = copy.deepcopy(theirs)
    n_kv, hd = cfg.n_kv_heads, cfg.head_dim
    for layer in range(cfg.n_layers):
        with torch.no_grad():
            got = my_prefix_mlp(mine.prefix_input, mine.hidden, mine.out, layer, n_kv, hd)
            want = torch.stack(theirs.layer_kv(layer))
        expect(isinstance(got, (tuple, list)) and len(got) == 2, "return two tensors: (keys, values)")
        got = torch.stack(tuple(got)) if all(t.shape == want[0].shape for t in got) else None
        expect(got is not None, f"keys and values are each (n_kv, P, hd) = {tuple(want[0].shape)}")
        if not close(got, want, 1e-5):
            with torch.no_grad():
                m = theirs
                variants = {
                    "the tanh is applied twice: the MLP is out(tanh(hidden(P'))), one nonlinearity":
                        _mlp_kv(m, layer, inner=lambda h: torch.tanh(torch.tanh(h))),
                    "a tanh after `out` as well: the MLP is out(tanh(hidden(P'))), its output is not squashed":
                        _mlp_kv(m, layer, outer=torch.tanh),
                    "P' went through `hidden` (and the tanh) twice: one pass of the MLP, hidden then tanh then out":
                        _mlp_kv(m, layer, inner=lambda h: torch.tanh(m.hidden(torch.tanh(h)))),
                    "the tanh is missing: the MLP is out(tanh(hidden(P')))": _mlp_kv(m, layer, inner=lambda h: h),
                    "keys and values are swapped: a layer's slice holds its keys first, then its values":
                        _mlp_kv(m, layer, swap=True),
                    "the row is laid out [layer][key/value][kv head][hd]: split by layer first, then key/value":
                        _mlp_kv(m, layer, layout="klh"),
                    "within a key (or value), the row holds kv head after kv head, each of head_dim numbers":
                        _mlp_kv(m, layer, layout="hd_first"),
                }
                for other in range(cfg.n_layers):
                    if other != layer:
                        variants[f"layer {layer} got layer {other}'s slice of the row"] = _mlp_kv(m, other)
            name_the_mistake(got, variants, "the values differ: P' -> hidden -> tanh -> out, once, for all layers; "
                                             "layer l reads its slice, laid out [layer][key/value][kv head][hd]")
    pairs = list(zip(mine.parameters(), theirs.parameters()))
    names = ["P'", "hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    worst = 0.0
    for layer in range(cfg.n_layers):
        worst = max(worst, assert_same_outputs_and_grads(
            lambda: torch.stack(tuple(my_prefix_mlp(mine.prefix_input, mine.hidden, mine.out, layer, n_kv, hd))),
            lambda: torch.stack(theirs.layer_kv(layer)), pairs, names=names))
    return f"= PrefixMLP.layer_kv for every layer, values and gradients of P' and both Linears; diff {worst:.1e}"


# ----------------------------------------------------------------------------------------------
# Build 4: LLaMA-Adapter's gated branch


def _branch(prompt, gate, q, attn, gate_fn=torch.tanh, scale=None, tile_kv=False) -> torch.Tensor:
    K, Hkv, hd = prompt.shape[0], attn.n_kv_heads, attn.head_dim
    rep = attn.n_heads // Hkv
    grow = (lambda t: t.repeat(rep, 1, 1)) if tile_kv else (lambda t: t.repeat_interleave(rep, 0))
    k_p = grow(attn.k_proj(prompt).view(K, Hkv, hd).transpose(0, 1))            # (n_heads, K, hd)
    v_p = grow(attn.v_proj(prompt).view(K, Hkv, hd).transpose(0, 1))
    w = (q @ k_p.transpose(-1, -2) * (hd ** -0.5 if scale is None else scale)).softmax(-1)
    return gate_fn(gate).view(1, -1, 1, 1) * (w @ v_p)


def _adapted(model: Llama, make) -> Llama:
    model = copy.deepcopy(model)
    peft.fill_slot(model, "extra_branch", make)
    return model


def check_adaption_prompt(MyAdaptionPrompt) -> str:
    """MyAdaptionPrompt(K, dim, n_heads): the extra_branch slot of LLaMA-Adapter v1."""
    base = make_base(0)
    cfg, K = base.config, 6
    torch.manual_seed(0)
    module = MyAdaptionPrompt(K, cfg.dim, cfg.n_heads)
    for name in ("prompt", "gate"):
        expect(isinstance(getattr(module, name, None), nn.Parameter),
               f"`self.{name}` should be an nn.Parameter (so it trains and shows in named_parameters())")
    prompt, gate = module.prompt, module.gate
    expect(tuple(prompt.shape) == (K, cfg.dim), f"the prompt has shape {tuple(prompt.shape)}; K positions of "
                                                f"width dim: {(K, cfg.dim)}")
    expect(tuple(gate.shape) == (cfg.n_heads,), f"the gate has shape {tuple(gate.shape)}; one gate per query head: "
                                                f"({cfg.n_heads},)")
    expect(torch.count_nonzero(gate) == 0,
           f"the gate starts at {_first(gate)}: it must start at 0, so tanh(gate) = 0 and "
           "the model starts exactly as the base model (the zero gate is the point of LLaMA-Adapter)")
    expect(torch.count_nonzero(prompt) > 0, "the prompt is all zeros: then every prompt key is 0, the branch is the "
                                            "mean of zero values, and the gate gets no gradient; start it random")
    expect(abs(prompt.std().item() - 1) < 0.25 and abs(prompt.mean().item()) < 0.25,
           f"the prompt has mean {prompt.mean():.3g} and std {prompt.std():.3g}: start it N(0, 1), the scale of the "
           "normalised hidden states k_proj and v_proj usually see")
    # in a model: the base model at init, the gate trains first
    idx, target = _idx(base), _idx(base, seed=1)
    mine = _adapted(base, lambda i, attn: MyAdaptionPrompt(K, cfg.dim, cfg.n_heads))
    with torch.no_grad():
        expect(torch.allclose(mine(idx), base(idx), atol=1e-6), "at init the adapted model must give the base "
                                                                "model's logits (tanh(0) = 0 switches the branch off)")
    mine(idx, target)[1].backward()
    branches = [layer.self_attn.extra_branch for layer in mine.layers]
    expect(all(b.gate.grad is not None and torch.count_nonzero(b.gate.grad) > 0 for b in branches),
           "at init the gate gets no gradient: dL/dg = tanh'(0) <dL/dy, softmax(q K_p^T) V_p> should not be 0 "
           "(a .detach() or torch.no_grad() in the branch?)")
    expect(all(b.prompt.grad is None or torch.count_nonzero(b.prompt.grad) == 0 for b in branches),
           "at init the prompt should get no gradient (it is multiplied by tanh(0) = 0)")
    # the branch itself, with the gate open: tanh, its own softmax, the kv grouping
    attn, theirs = base.layers[0].self_attn, AdaptionPrompt(K, cfg.dim, cfg.n_heads, "cpu")
    with torch.no_grad():
        theirs.prompt.copy_(prompt)
        gate.copy_(torch.linspace(-1.5, 2.0, cfg.n_heads))
        theirs.gate.copy_(gate)
        q = torch.randn(2, cfg.n_heads, 10, cfg.head_dim, generator=torch.Generator().manual_seed(2))
        got, want = module(q, attn), theirs(q, attn)
        expect(isinstance(got, torch.Tensor) and got.shape == want.shape,
               f"return the gated branch (B, n_heads, T, hd) = {tuple(want.shape)}")
        if not close(got, want, 1e-5):
            p = prompt.detach()
            variants = {
                "the gate multiplies the branch through tanh: tanh(gate_h), as in the paper's code":
                    _branch(p, gate, q, attn, gate_fn=lambda t: t),
                "the gate is squashed with a sigmoid: sigmoid(0) = 1/2, so the branch would be on at init; "
                "use tanh(gate_h)": _branch(p, gate, q, attn, gate_fn=torch.sigmoid),
                "the scores miss their 1 / sqrt(head_dim)": _branch(p, gate, q, attn, scale=1.0),
                "the kv heads are tiled (repeat) instead of grouped: query head h reads kv head "
                "h // (n_heads // n_kv_heads) (repeat_interleave)": _branch(p, gate, q, attn, tile_kv=True),
            }
            name_the_mistake(got, variants, "the branch differs: tanh(gate_h) * softmax(q K_p^T / sqrt(hd)) V_p, "
                                             "with K_p, V_p = k_proj(prompt), v_proj(prompt) split into kv heads, "
                                             "and the softmax over the K prompt positions only")
    summary = check_build(mine, apply_method(copy.deepcopy(base), "llama_adapter", prompt_len=K), idx)
    return f"gate 0, base model at init, only the gate trains first; {summary}"


# ----------------------------------------------------------------------------------------------
# Build 5: BitFit


def check_bitfit(MyBitFit) -> str:
    """MyBitFit(base): y = W x + b around a frozen Linear, b = 0 at init."""
    n, m = 48, 24
    torch.manual_seed(0)
    linear = nn.Linear(n, m, bias=False)
    layer = MyBitFit(linear)
    bias = getattr(layer, "bias", None)
    expect(isinstance(bias, nn.Parameter), "`self.bias` should be an nn.Parameter (so it trains)")
    expect(tuple(bias.shape) == (m,), f"the bias has shape {tuple(bias.shape)}; it is added to the output: "
                                      f"(out_features,) = ({m},)")
    expect(bias.requires_grad, "the bias is frozen: it is the one thing BitFit trains")
    expect(torch.count_nonzero(bias) == 0,
           f"the bias starts at {_first(bias)}: Llama's Linears have no bias, so BitFit's new one "
           "must start at zero, or the model no longer starts as the base model")
    x = torch.randn(5, n)
    with torch.no_grad():
        expect(torch.equal(layer(x), linear(x)), "at init the layer must return base(x) exactly (bias = 0)")
        b = torch.linspace(-1, 1, m)
        bias.copy_(b)
        out = layer(x)
        expect(close(out, linear(x) + b, 1e-6), "with a non-zero bias the layer should return W x + b: the bias "
                                                 "is added once, to the output, unscaled")
    base = make_base(0)
    mine = copy.deepcopy(base)
    peft.inject(mine, BLOCK_LINEARS, lambda name, lin: MyBitFit(lin))
    idx = _idx(base)
    with torch.no_grad():
        expect(torch.equal(mine(idx), base(idx)), "the model with your BitFit layers is not the base model at init")
    return check_build(mine, apply_method(copy.deepcopy(base), "bitfit"), idx)


# ----------------------------------------------------------------------------------------------
# Build 6: LLaMA-Adapter v2


def check_llama_adapter_v2(MyBiasScale, my_llama_adapter_v2) -> str:
    """MyBiasScale(base): y = scale * (W x + bias); my_llama_adapter_v2(model, K): v1 + that on every Linear
    + trainable norms, against apply_method(..., "llama_adapter", version=2)."""
    n, m = 48, 24
    torch.manual_seed(0)
    linear = nn.Linear(n, m, bias=False)
    layer = MyBiasScale(linear)
    for name in ("bias", "scale"):
        p = getattr(layer, name, None)
        expect(isinstance(p, nn.Parameter), f"`self.{name}` should be an nn.Parameter (so it trains)")
        expect(tuple(p.shape) == (m,), f"{name} has shape {tuple(p.shape)}; one per output: ({m},)")
    expect(torch.count_nonzero(layer.bias) == 0, "the bias must start at zero (the base model at init)")
    expect(torch.equal(layer.scale, torch.ones(m)), f"the scale must start at one (the base model at init), not "
                                                    f"{_first(layer.scale)}")
    x = torch.randn(5, n)
    with torch.no_grad():
        s, b = 1 + 0.5 * torch.linspace(-1, 1, m), torch.linspace(-1, 1, m).flip(0)
        layer.scale.copy_(s)
        layer.bias.copy_(b)
        out, Wx = layer(x), linear(x)
        if not close(out, s * (Wx + b), 1e-6):
            name_the_mistake(out, {"the bias sits inside the scale: y = scale * (W x + bias), so it is scaled too":
                                    s * Wx + b}, "with scale s and bias b the layer should return s * (W x + b)")
    base = make_base(0)
    before = {n_: p.clone() for n_, p in base.state_dict().items()}
    mine = my_llama_adapter_v2(base, 6)
    expect(mine is not base and not peft.adapter_modules(base)
           and all(torch.equal(p, before[n_]) for n_, p in base.state_dict().items()),
           "my_llama_adapter_v2 changed the model it was given: adapt a copy (copy.deepcopy) and return it")
    norms = [n_ for n_, mod in mine.named_modules() if isinstance(mod, RMSNorm) and not mod.weight.requires_grad]
    expect(not norms, f"the RMSNorm weights stay frozen ({', '.join(norms[:2])}, ...): v2 trains every norm, the "
                      "final one too")
    wrapped = [n_ for n_, mod in mine.named_modules() if isinstance(mod, MyBiasScale)]
    want = peft.match_targets(base, "all-linear")
    expect(sorted(wrapped) == sorted(want), f"{len(wrapped)} Linears carry a MyBiasScale, want all {len(want)} of "
                                            "the decoder's (\"all-linear\")")
    idx = _idx(base)
    with torch.no_grad():
        expect(torch.allclose(mine(idx), base(idx), atol=1e-6), "at init v2 must be the base model (gates 0, "
                                                                "scales 1, biases 0)")
    theirs = apply_method(copy.deepcopy(base), "llama_adapter", version=2, prompt_len=6)
    return check_build(mine, theirs, idx, {"bias": "adapter_bias", "scale": "adapter_scale"})


# ----------------------------------------------------------------------------------------------
# Exercises


def exercise_1(gate_one_effects) -> str:
    """(changes_the_model_at_init, prompt_gets_a_gradient_at_init) with every gate at 1."""
    expect(isinstance(gate_one_effects, (tuple, list)) and len(gate_one_effects) == 2
           and all(isinstance(a, bool) for a in gate_one_effects), "give two booleans: (changes the model at init, "
                                                                    "the prompt gets a gradient at init)")
    tiny = make_base(0)
    ids, targets = _idx(tiny, 8), _idx(tiny, 8, seed=1)
    adapted = apply_method(copy.deepcopy(tiny), "llama_adapter", prompt_len=4)
    with torch.no_grad():
        for mod in adapted.modules():
            if isinstance(mod, AdaptionPrompt):
                mod.gate.fill_(1.0)
        changed = not torch.allclose(adapted(ids), tiny(ids), atol=1e-4)
    adapted(ids, targets)[1].backward()
    prompt_grad = any(mod.prompt.grad.abs().max() > 0 for mod in adapted.modules() if isinstance(mod, AdaptionPrompt))
    expect(gate_one_effects[0] == changed, "not the first: what is tanh(1), and so what does the branch "
                                           "tanh(g) softmax(q K_p^T) V_p add at init?")
    expect(gate_one_effects[1] == prompt_grad, "not the second: the prompt's gradient passes through the factor "
                                               "tanh(g); is it 0 when g = 1?")
    return "with gate 1 the random prompt's attention is added at init and the prompt trains from step 0"


def _count_1b(method: str, **hyper) -> int:
    with torch.device("meta"):
        return peft.count_parameters(apply_method(Llama(LlamaConfig.from_name("llama-3.2-1b")), method, **hyper))[0]


def exercise_2(virtual_token_counts) -> str:
    """(prompt tuning with 20 soft tokens, prefix tuning with P = 10) trainable numbers on Llama-3.2-1B."""
    expect(isinstance(virtual_token_counts, (tuple, list)) and len(virtual_token_counts) == 2,
           "give two numbers: (prompt_tuning, prefix_tuning)")
    prompt, prefix = _count_1b("prompt_tuning", prompt_len=20), _count_1b("prefix_tuning", prefix_len=10)
    expect(virtual_token_counts[0] == prompt, f"prompt tuning: {virtual_token_counts[0]:,} is not it; the soft tokens "
                                              "live where the token embeddings do, at the input only")
    expect(virtual_token_counts[1] == prefix, f"prefix tuning: {virtual_token_counts[1]:,} is not it; every layer "
                                              "has keys and values, and a prefix position holds n_kv_heads * head_dim "
                                              "of each (grouped-query attention), not dim")
    return f"prompt tuning (20) {prompt:,}, prefix tuning (10) {prefix:,} trainable numbers"


def exercise_3(bitfit_qgu_params_1b) -> str:
    """BitFit on q_proj, gate_proj, up_proj of Llama-3.2-1B: the number of trainable values."""
    counted = _count_1b("bitfit", targets=("q_proj", "gate_proj", "up_proj"))
    expect(bitfit_qgu_params_1b == counted, f"{bitfit_qgu_params_1b:,} is not it: a bias has out_features numbers; "
                                            "what are q_proj's, gate_proj's and up_proj's output widths?")
    return f"{counted:,} trainable numbers ({counted / _count_1b('bitfit'):.0%} of the default BitFit's)"


def exercise_4(merge_scale_bias) -> str:
    """merge_scale_bias(W, scale, bias) -> (W_merged, b_merged) with F.linear(x, W_m, b_m) = scale * (W x + bias)."""
    gen = torch.Generator().manual_seed(0)
    W, x = torch.randn(5, 3, generator=gen), torch.randn(4, 3, generator=gen)
    scale, bias = 1 + 0.2 * torch.randn(5, generator=gen), 0.3 * torch.randn(5, generator=gen)
    merged = merge_scale_bias(W.clone(), scale.clone(), bias.clone())
    expect(isinstance(merged, (tuple, list)) and len(merged) == 2, "return two tensors: (W_merged, b_merged)")
    W_m, b_m = merged
    layer = BiasScaleLinear(nn.Linear(3, 5, bias=False))
    with torch.no_grad():
        layer.base.weight.copy_(W)
        layer.adapter_scale.copy_(scale)
        layer.adapter_bias.copy_(bias)
        layer.merge()
    expect(isinstance(W_m, torch.Tensor) and W_m.shape == W.shape,
           f"W_merged must have W's shape {tuple(W.shape)} (out, in)")
    expect(torch.allclose(W_m, layer.base.weight, atol=1e-6), "W_merged is not it: the scale has one entry per "
                                                              "output; which axis of W (out, in) does it multiply?")
    expect(isinstance(b_m, torch.Tensor) and torch.allclose(b_m, layer.base.bias, atol=1e-6),
           "b_merged is not it: the bias sits inside the scale")
    expect(torch.allclose(F.linear(x, W_m, b_m), scale * (F.linear(x, W) + bias), atol=1e-6),
           "F.linear(x, W_merged, b_merged) differs from scale * (W x + bias)")
    return "merge_scale_bias = BiasScaleLinear.merge"
