"""Checks of lab 01 (Llama 3 from the file up): the student's RMSNorm, RoPE rotation, llama3 RoPE
frequencies, grouped-query attention, SwiGLU and whole forward pass, and the exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). A build is compared
with minipeft's own piece (`llama.RMSNorm`, `apply_rope`, `rope_frequencies`, the attention and `MLP` of
a tiny model, `Llama.forward`) on inputs the check makes itself; where the output differs, the check
computes the usual wrong versions (LayerNorm instead of RMSNorm, eps outside the root, interleaved RoPE
pairs, kv heads tiled instead of repeated, silu on the wrong half, ...) and names the one it matches.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..llama import IGNORE_INDEX, Llama, LlamaConfig, MLP, RMSNorm, apply_rope, rope_frequencies
from ..meta_layout import half_to_interleaved
from . import Wrong, assert_same_outputs_and_grads, call_with_hint, expect, make_base

LLAMA3_SCALING = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def _tensor(out, shape: tuple, what: str, nan_hint: str = "") -> torch.Tensor:
    expect(isinstance(out, torch.Tensor), f"{what} should return a tensor, got {type(out).__name__}")
    expect(tuple(out.shape) == tuple(shape), f"{what} returned shape {tuple(out.shape)}, want {tuple(shape)}")
    expect(not out.isnan().any(), f"{what} returned NaN{': ' + nan_hint if nan_hint else ''}")
    return out


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol)


def _diagnose(out: torch.Tensor, want: torch.Tensor, wrong_versions: dict[str, torch.Tensor], generic: str,
              atol: float = 1e-5) -> None:
    """Pass if out = want; else raise the hint of the first wrong version out equals, or `generic`."""
    if _close(out, want, atol):
        return
    for hint, version in wrong_versions.items():
        if _close(out, version, atol):
            raise Wrong(hint)
    diff = (out.double() - want.double()).abs().max().item()
    raise Wrong(f"{generic} (off by up to {diff:.2e})")


# ---------------------------------------------------------------------------------------------- Build 1


def check_rmsnorm(my_rmsnorm) -> str:
    """my_rmsnorm(x, weight, eps) = x / sqrt(mean(x^2) + eps) * weight, over the last dimension."""
    g = torch.Generator().manual_seed(0)
    d, eps = 64, 1e-5
    x = torch.randn(3, 5, d, generator=g) + 0.3      # a non-zero mean, so LayerNorm differs
    weight = 1 + 0.5 * torch.randn(d, generator=g)   # not ones, so a forgotten gain shows
    norm = RMSNorm(d, eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
    mean_hint = "RMSNorm divides by the root of the mean of the SQUARES, not of x itself"
    out = _tensor(call_with_hint(my_rmsnorm, x, weight, eps, hint="the mean must keep its last dimension to divide x "
                                                          "(keepdim=True)"), x.shape, "my_rmsnorm",
                  nan_hint=f"the square root of a negative mean? {mean_hint}")
    ms = x.pow(2).mean(-1, keepdim=True)
    centred = x - x.mean(-1, keepdim=True)
    _diagnose(out, norm(x).detach(), {
        "that is LayerNorm: RMSNorm subtracts no mean (and has no bias)":
            centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight,
        "the gain is missing: multiply by `weight` (g, one number per feature)": x / torch.sqrt(ms + eps),
        "the sum of the squares is d times too big: take the MEAN of the squares":
            x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight,
        "the square root is missing: divide by sqrt(mean(x^2) + eps), the root mean square": x / (ms + eps) * weight,
        mean_hint: x / torch.sqrt(x.mean(-1, keepdim=True) + eps) * weight,
        "that divides by the mean of |x|; RMSNorm divides by the root of the mean of the SQUARES":
            x / (x.abs().mean(-1, keepdim=True) + eps) * weight,
        "normalise each token over its features (the last dimension), not over the batch":
            x / torch.sqrt(x.pow(2).mean(0, keepdim=True) + eps) * weight,
    }, "not x / sqrt(mean(x^2) + eps) * weight over the last dimension")
    # eps matters only for small inputs: rms 1e-3 against eps 1e-5, and a large eps of 1e-2
    for scale, eps_ in ((1e-3, 1e-5), (1e-2, 1e-2)):
        xs = x * scale
        ms = xs.pow(2).mean(-1, keepdim=True)
        small = _tensor(call_with_hint(my_rmsnorm, xs, weight, eps_, hint="failed on a small input"), xs.shape, "my_rmsnorm")
        _diagnose(small, xs / torch.sqrt(ms + eps_) * weight, {
            "eps is missing: for a small input (rms 1e-3) the result must be x / sqrt(mean(x^2) + eps), which keeps "
            "a zero vector finite": xs / torch.sqrt(ms) * weight,
            "eps belongs inside the square root: sqrt(mean(x^2) + eps), not sqrt(mean(x^2)) + eps":
                xs / (torch.sqrt(ms) + eps_) * weight,
        }, f"with eps = {eps_:g} and a small input (rms {scale:g}) the result is off: use the eps you are given, "
           "inside the square root")
    xs = torch.zeros(2, d)
    expect(torch.isfinite(my_rmsnorm(xs, weight, eps)).all(), "a zero vector must give zeros, not NaN: eps")
    # gradients (w.r.t. x and the gain) as RMSNorm's
    x_mine, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    w_mine = weight.clone().requires_grad_()
    worst = assert_same_outputs_and_grads(lambda: my_rmsnorm(x_mine, w_mine, eps), lambda: norm(x_theirs),
                                          [(x_mine, x_theirs), (w_mine, norm.weight)], names=["x", "weight"])
    return f"= llama.RMSNorm, outputs and gradients (largest difference {worst:.1e}); eps where it belongs"


# ---------------------------------------------------------------------------------------------- Build 2


def _rope_half(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    angles = positions[:, None].double() * inv_freq.double()                       # (T, d/2)
    angles = torch.cat((angles, angles), -1)[None, :, None, :]                    # (1, T, 1, d)
    return apply_rope(x.double(), angles.cos(), angles.sin())


def _rope_interleaved(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    angles = (positions[:, None].double() * inv_freq.double())[None, :, None, :]  # (1, T, 1, d/2)
    x1, x2 = x.double()[..., 0::2], x.double()[..., 1::2]
    out = torch.stack((x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()), -1)
    return out.flatten(-2)


def _halves(d: int) -> torch.Tensor:
    """Section 8's perm: the interleaved coordinates (0, 2, 4, ..., 1, 3, 5, ...) as two halves."""
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


def check_apply_rope(my_apply_rope) -> str:
    """my_apply_rope(x, positions, inv_freq): llama.py's half-split rotation of (x_i, x_{i+d/2})."""
    g = torch.Generator().manual_seed(0)
    B, T, H, d = 2, 7, 3, 16
    x = torch.randn(B, T, H, d, generator=g)
    positions = torch.tensor([0, 1, 2, 5, 11, 40, 100])   # not 0..T-1: the check passes its own positions
    inv_freq = rope_frequencies(LlamaConfig.from_name("tiny"))
    out = _tensor(call_with_hint(my_apply_rope, x, positions, inv_freq,
                        hint="x is (B, T, H, d), positions (T,), inv_freq (d/2,): the angles are (T, d/2) and "
                             "must broadcast over the batch and the heads"), x.shape, "my_apply_rope")
    want = _rope_half(x, positions, inv_freq)
    doubled = positions[:, None].double() * inv_freq.double().repeat_interleave(2)            # (T, d)
    _diagnose(out, want, {
        "you rotate interleaved pairs (x_2j, x_2j+1), Meta's layout (section 8); llama.py and Hugging Face pair "
        "x_i with x_{i + d/2} (the two halves)": _rope_interleaved(x, positions, inv_freq),
        "the rotation goes the wrong way (by -m w_i): the first half is x1 cos - x2 sin, the second "
        "x1 sin + x2 cos": _rope_half(x, -positions, inv_freq),
        "you rotate interleaved pairs (x_2j, x_2j+1) (and write them out as halves); llama.py and Hugging Face pair "
        "x_i with x_{i + d/2} (the two halves)": _rope_interleaved(x, positions, inv_freq)[..., _halves(d)],
        "use the positions you are given, not 0 .. T-1 (a KV cache decodes one token at position t)":
            _rope_half(x, torch.arange(T), inv_freq),
        "pair i = (x_i, x_{i + d/2}) turns by m w_i: both halves use the same d/2 angles, in the same order "
        "(cat the angle table with itself, not repeat_interleave)":
            apply_rope(x.double(), doubled.cos()[None, :, None], doubled.sin()[None, :, None]),
        "x comes back unrotated": x,
    }, "not the half-split rotation (x1 cos - x2 sin, x1 sin + x2 cos) with angles m w_i")
    expect(torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-4), "a rotation keeps each head's length")
    return "= llama.apply_rope (half-split pairs) at positions up to 100; lengths kept"


# ---------------------------------------------------------------------------------------------- Build 3


def check_rope_frequencies(my_rope_frequencies) -> str:
    """my_rope_frequencies(head_dim, theta, scaling) = llama.rope_frequencies(cfg)."""
    for name in ("tiny", "llama-3.2-1b", "llama-3.1-8b"):
        cfg = LlamaConfig.from_name(name)
        out = my_rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        expect(isinstance(out, torch.Tensor), f"return a tensor, got {type(out).__name__}")
        half = cfg.head_dim // 2
        expect(tuple(out.shape) == (half,), f"for head_dim {cfg.head_dim} return {half} frequencies, one per pair "
                                            f"(i = 0 .. head_dim/2 - 1), got shape {tuple(out.shape)}")
        want = rope_frequencies(cfg).double()
        if torch.allclose(out.double(), want, rtol=1e-4):
            continue
        plain = rope_frequencies(replace(cfg, rope_scaling=None)).double()
        i = torch.arange(half, dtype=torch.float64)
        expect(not torch.allclose(out.double(), cfg.rope_theta ** (-i / cfg.head_dim), rtol=1e-4),
               "w_i = theta^(-2i/head_dim): i counts pairs, so the exponent has a 2")
        expect(not torch.allclose(out.double(), cfg.rope_theta ** (i / cfg.head_dim * 2), rtol=1e-4),
               "w_i = theta^(-2i/head_dim) is a frequency below 1: a NEGATIVE exponent")
        expect(cfg.rope_scaling is not None, f"the plain frequencies of {name} (no scaling) are off: "
                                             "w_i = theta^(-2i/head_dim), i = 0 .. head_dim/2 - 1")
        s = cfg.rope_scaling
        expect(not torch.allclose(out.double(), plain, rtol=1e-4),
               f"the llama3 scaling is missing ({name}: factor {s['factor']:g}): the slow frequencies must be "
               "divided by the factor")
        expect(not torch.allclose(out.double(), plain / s["factor"], rtol=1e-4),
               "every frequency was divided by the factor: only the slow ones (wavelength > L / a) are; the fast "
               "ones (wavelength < L / b) stay as they are")
        split = lambda f: (int(torch.isclose(f, plain, rtol=1e-4).sum()),
                           int(torch.isclose(f, plain / s["factor"], rtol=1e-4).sum()))
        (kept, divided), (kept_want, divided_want) = split(out.double()), split(want)
        expect((kept, divided) == (kept_want, divided_want),
               f"{name}: you keep {kept} frequencies and divide {divided}, want {kept_want} and {divided_want}: "
               "keep wavelengths 2 pi / w below L / high_freq_factor, divide those above L / low_freq_factor")
        raise Wrong(f"{name}: the kept and divided frequencies are right, the {half - kept - divided} in between "
                    "are not: (1 - mu) w / s + mu w with mu = (L / wavelength - a) / (b - a), 1 at the fast edge")
    return "= llama.rope_frequencies for tiny (plain), Llama-3.2-1B (15 kept, 3 interpolated, 14 / 32) and 3.1-8B"


# ---------------------------------------------------------------------------------------------- Build 4


def _sdpa(q, k, v, causal: bool = True, scale: float | None = None, tile: bool = False) -> torch.Tensor:
    g = q.shape[1] // k.shape[1]
    k, v = (t.repeat(1, g, 1, 1) if tile else t.repeat_interleave(g, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def check_attention(my_attention) -> str:
    """my_attention(q, k, v): causal grouped-query attention, q (B, H, T, d), k and v (B, Hkv, T, d)."""
    g = torch.Generator().manual_seed(0)
    for B, H, Hkv, T, d in ((2, 4, 2, 6, 8), (1, 8, 2, 5, 16), (2, 2, 2, 4, 8)):
        q, k, v = (torch.randn(B, h, T, d, generator=g) for h in (H, Hkv, Hkv))
        out = call_with_hint(my_attention, q, k, v,
                    hint=f"with H = {H} query heads and Hkv = {Hkv} kv heads q k^T does not line up: each kv head "
                         f"serves g = H / Hkv = {H // Hkv} query heads, so repeat the kv heads first")
        expect(isinstance(out, torch.Tensor), f"return a tensor, got {type(out).__name__}")
        expect(tuple(out.shape) != (B, Hkv, T, d) or H == Hkv,
               f"the output has {Hkv} heads, one per kv head: every one of the {H} query heads gives an output")
        _tensor(out, (B, H, T, d), "my_attention", nan_hint="a row of scores with every key masked? position t must "
                                                          "see keys 0 .. t, itself included: mask j > t only")
        s_wrong_dim = (q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2) / math.sqrt(d)).masked_fill(
            torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        _diagnose(out, _sdpa(q, k, v), {
            "query head h reads kv head h // g (consecutive query heads share one kv head: repeat_interleave); "
            "you paired it with kv head h % Hkv (repeat/tile)": _sdpa(q, k, v, tile=True),
            "no causal mask: position t may see keys 0 .. t only; set the scores of later keys (j > t) to -inf "
            "before the softmax": _sdpa(q, k, v, causal=False),
            "the scores must be divided by sqrt(d) (d = head_dim)": _sdpa(q, k, v, scale=1.0),
            "divide the scores by sqrt(d), not by d": _sdpa(q, k, v, scale=1.0 / d),
            "the softmax runs over the keys (the last dimension), not over the queries":
                s_wrong_dim.softmax(-2) @ v.repeat_interleave(H // Hkv, 1),
        }, "not softmax(q k^T / sqrt(d) + causal mask) v with kv head h // g for query head h")
    # the same inside a model: layer 0's attention of a tiny Llama, with RoPE, through o_proj
    model = make_base(0)
    attn, cfg = model.layers[0].self_attn, model.config
    x = torch.randn(2, 9, cfg.dim, generator=g)
    cos, sin = model.rope(torch.arange(9).expand(2, 9))
    with torch.no_grad():
        q = apply_rope(attn.q_proj(x).view(2, 9, cfg.n_heads, -1), cos, sin).transpose(1, 2)
        k = apply_rope(attn.k_proj(x).view(2, 9, cfg.n_kv_heads, -1), cos, sin).transpose(1, 2)
        v = attn.v_proj(x).view(2, 9, cfg.n_kv_heads, -1).transpose(1, 2)
        y = attn.o_proj(my_attention(q, k, v).transpose(1, 2).reshape(2, 9, -1))
        expect(torch.allclose(y, attn(x, cos, sin)[0], atol=1e-5), "right on random tensors, but not inside the "
                                                                   "model's attention: please report this")
    return "= scaled_dot_product_attention with kv head h // g, causal, 1/sqrt(d); and = the tiny model's attention"


# ---------------------------------------------------------------------------------------------- Build 5


def check_swiglu(my_swiglu) -> str:
    """my_swiglu(x, w_gate, w_up, w_down) = w_down (silu(w_gate x) * w_up x), nn.Linear layouts."""
    g = torch.Generator().manual_seed(0)
    cfg = replace(LlamaConfig.from_name("tiny"), dim=16, ffn_dim=40)
    mlp = MLP(cfg)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.weight.shape[1]))
    wg, wu, wd = (lin.weight.detach() for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = torch.randn(3, 5, cfg.dim, generator=g)
    out = _tensor(call_with_hint(my_swiglu, x, wg, wu, wd, hint="the weights are in nn.Linear's (out, in) layout: "
                                                        "w_gate and w_up are (h, d), w_down (d, h), so x @ W.T"),
                  x.shape, "my_swiglu")
    lin = lambda w, t: t @ w.T
    _diagnose(out, mlp(x).detach(), {
        "silu belongs on the gate, silu(W_gate x); W_up x is the linear half": lin(wd, lin(wg, x) * F.silu(lin(wu, x))),
        "the activation is silu(z) = z sigmoid(z), not relu": lin(wd, F.relu(lin(wg, x)) * lin(wu, x)),
        "the activation is silu(z) = z sigmoid(z), not gelu": lin(wd, F.gelu(lin(wg, x)) * lin(wu, x)),
        "the activation is silu(z) = z sigmoid(z), not the sigmoid alone":
            lin(wd, torch.sigmoid(lin(wg, x)) * lin(wu, x)),
        "the up projection is missing: silu(W_gate x) multiplies W_up x elementwise": lin(wd, F.silu(lin(wg, x))),
        "the gate's activation is missing: silu(W_gate x), not W_gate x": lin(wd, lin(wg, x) * lin(wu, x)),
    }, "not W_down (silu(W_gate x) * W_up x)")
    return "= llama.MLP (SwiGLU) on a 16 -> 40 -> 16 block"


# ---------------------------------------------------------------------------------------------- Build 6


def _forward(model: Llama, idx: torch.Tensor, final_norm: bool = True, rope: bool = True,
             post_norm: bool = False) -> torch.Tensor:
    """minipeft's forward, written out, with the usual mistakes as switches."""
    cfg = model.config
    B, T = idx.shape
    cos, sin = model.rope(torch.arange(T).expand(B, T))
    x = model.embed_tokens.weight[idx]
    for layer in model.layers:
        a = layer.self_attn
        xn = x if post_norm else layer.input_layernorm(x)
        q, k = a.q_proj(xn).view(B, T, cfg.n_heads, -1), a.k_proj(xn).view(B, T, cfg.n_kv_heads, -1)
        if rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = a.v_proj(xn).view(B, T, cfg.n_kv_heads, -1)
        y = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = layer.input_layernorm(x) if post_norm else x
        x = x + layer.mlp(x if post_norm else layer.post_attention_layernorm(x))
        x = layer.post_attention_layernorm(x) if post_norm else x
    return (model.norm(x) if final_norm else x) @ model.embed_tokens.weight.T


def check_forward(my_forward) -> str:
    """my_forward(model, idx) = model(idx), on a tiny Llama with llama3-scaled RoPE."""
    cfg = replace(LlamaConfig.from_name("tiny"), rope_scaling=dict(LLAMA3_SCALING))  # so a scaling left out shows
    model = make_base(0, cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = _tensor(my_forward(model, idx), (2, 24, cfg.vocab_size), "my_forward")
        want = model(idx)
        plain = make_base(0, replace(cfg, rope_scaling=None))
        _diagnose(out, want, {
            "the final RMSNorm (model.norm) before the head is missing": _forward(model, idx, final_norm=False),
            "RoPE is missing: rotate q and k (not v) before the scores": _forward(model, idx, rope=False),
            "that is a post-norm block; Llama is pre-norm: x + Attention(RMSNorm(x)), then h + SwiGLU(RMSNorm(h))":
                _forward(model, idx, post_norm=True),
            "the RoPE frequencies lack the llama3 scaling: build them from model.config's rope_theta AND "
            "rope_scaling": plain(idx),
        }, "the logits differ from model(idx). If builds 1-5 pass, look at the block: pre-norm residuals, "
           "input_layernorm before attention and post_attention_layernorm before SwiGLU, the final norm, the tied "
           "head x W_E^T", atol=1e-4)
    return "the logits of a 2-layer tiny Llama (llama3-scaled RoPE, GQA, tied head) = Llama.forward"


# ---------------------------------------------------------------------------------------------- Exercises


def exercise_1(meta_order) -> str:
    """meta_order(hd): the index that undoes perm = (0, 2, 4, ..., 1, 3, 5, ...) (HF -> Meta order)."""
    for hd in (8, 16, 64):
        perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
        inverse = meta_order(hd)
        expect(isinstance(inverse, torch.Tensor) and inverse.dtype == torch.long and tuple(inverse.shape) == (hd,),
               f"for hd = {hd} return a LongTensor of {hd} indices")
        expect(not torch.equal(inverse, perm), f"that is perm itself; for hd = {hd} perm is not its own inverse")
        expect(torch.equal(perm[inverse], torch.arange(hd)),
               f"for hd = {hd}, x[:, perm][:, inverse] is not x: perm[inverse] should be 0, 1, 2, ... "
               "(for each old position, where did perm put it?)")
    n_heads, hd, dim = 4, 16, 12
    w_hf = torch.randn(n_heads * hd, dim, generator=torch.Generator().manual_seed(0))
    by_hand = w_hf.view(n_heads, hd, dim)[:, meta_order(hd)].reshape_as(w_hf)
    expect(torch.equal(by_hand, half_to_interleaved(w_hf, n_heads)), "not meta_layout.half_to_interleaved's order")
    return f"hd = 16: {meta_order(16).tolist()} = meta_layout.half_to_interleaved"


def exercise_2(kv_cache_bytes) -> str:
    """(bytes with GQA, bytes without) of Llama-3.2-1B's KV cache, batch 8 x 4096 tokens, bf16."""
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    attention_only = replace(cfg, vocab_size=8, ffn_dim=8)   # the cache depends on the attention's shapes only
    expect(isinstance(kv_cache_bytes, (tuple, list)) and len(kv_cache_bytes) == 2,
           "give two numbers: (bytes with GQA, bytes without)")
    per_token = lambda kv_heads: 2 * cfg.n_layers * kv_heads * cfg.head_dim * 2   # k and v, bf16
    with torch.device("meta"):                      # the cache llama.py allocates, measured (no memory used)
        m = Llama(attention_only)
        m.setup_kv_cache(batch=8, max_len=4096)
        allocated = sum(l.self_attn.kv_cache.k.numel() + l.self_attn.kv_cache.v.numel() for l in m.layers) * 2
    assert allocated == 8 * 4096 * per_token(cfg.n_kv_heads)
    with_gqa, without = kv_cache_bytes
    expect(with_gqa != allocated / 2, "with GQA: half of it; keys AND values are cached")
    expect(with_gqa == allocated, f"with GQA: {with_gqa:,} is not it; count numbers per token (keys and values, "
                                  "every layer, every kv head, head_dim each), then bytes (bf16: 2 a number)")
    expect(without == 8 * 4096 * per_token(cfg.n_heads), "without GQA: one kv head per query head")
    return f"{with_gqa / 2**30:g} GiB with GQA, {without / 2**30:g} GiB without"


def exercise_3(ce_grads) -> str:
    """ce_grads(h, W, targets) -> (dL/dh, dL/dW) of the mean cross-entropy of h @ W.T, from softmax - onehot."""
    g = torch.Generator().manual_seed(0)
    n_pos, d, V = 10, 16, 50
    h, W = torch.randn(n_pos, d, generator=g), torch.randn(V, d, generator=g) / math.sqrt(d)
    targets = torch.randint(0, V, (n_pos,), generator=g)
    targets[[0, 4]] = IGNORE_INDEX
    h_ref, W_ref = h.clone().requires_grad_(), W.clone().requires_grad_()
    F.cross_entropy(h_ref @ W_ref.T, targets, ignore_index=IGNORE_INDEX).backward()
    with torch.no_grad():   # the formula, not autograd
        grads = ce_grads(h, W, targets)
    expect(isinstance(grads, (tuple, list)) and len(grads) == 2, "return two tensors: (dh, dW)")
    dh, dW = grads
    expect(tuple(dh.shape) == (n_pos, d), f"dh has h's shape {(n_pos, d)}, got {tuple(dh.shape)}")
    expect(tuple(dW.shape) == (V, d), f"dW has W's shape {(V, d)}, got {tuple(dW.shape)} (transposed?)")
    counted = int((targets != IGNORE_INDEX).sum())
    expect(not torch.allclose(dh * n_pos / counted, h_ref.grad, atol=1e-6),
           f"divided by all {n_pos} positions: N counts only the {counted} positions whose target is not -100")
    expect(dh[[0, 4]].abs().max() == 0, "a position whose target is -100 gets no gradient at all")
    expect(torch.allclose(dh, h_ref.grad, atol=1e-6), "d loss / d h is off: the chain rule through logits = h W^T")
    expect(torch.allclose(dW, W_ref.grad, atol=1e-6), "d loss / d W is off: a sum over positions of outer products")
    return "= autograd for h and W, two of ten positions skipped"
