"""Llama 3 in one readable file: the decoder, KV-cache generation, and loaders for real checkpoints.

The architecture (Meta, "The Llama 3 Herd of Models", arXiv:2407.21783) is a pre-norm decoder:

    h = x + Attention(RMSNorm(x))          grouped-query attention with rotary positions (RoPE)
    y = h + SwiGLU(RMSNorm(h))             down_proj(silu(gate_proj(h)) * up_proj(h))

with llama3-scaled RoPE frequencies and, for the 1B/3B models, the output head tied to the input
embedding. Module names follow Hugging Face transformers (`layers.0.self_attn.q_proj`, ...) so that
target names written for Hugging Face PEFT carry over unchanged. Read it top to bottom: the config and
presets, the blocks, the model's forward, generation; below the line, the checkpoint loaders (Meta's
key names and rotary layout, and its writer save_meta, are in minipeft/meta_layout.py).

PEFT methods plug in two ways (minipeft/peft.py): Linear wrappers swapped in by module name (LoRA,
DoRA, (IA)^3, ...), and five named slots that are None (a no-op) unless a method fills them:
    Attention.qk_adapter(q, k) -> (q, k)    the projected queries/keys, before RoPE ((IA)^3++)
    Attention.kv_prefix(batch) -> (k, v)    extra keys/values every query sees (prefix tuning), or only
                                            the answer positions when it has `answer_only` (infix tuning)
    Attention.extra_branch(q, attn) -> y    a second attention output added before o_proj (LLaMA-Adapter)
    Llama.input_prefix() -> (P, dim)        soft-prompt embeddings before every sequence (prompt tuning)
    Llama.token_adapter(i, x, idx) -> x     the hidden states entering layer i, seeing the token ids (PaSTA)

`answer_mask` (B, T) bool, an argument of `Llama.forward`, marks the positions that predict an answer
token (default: `targets != -100`); only infix tuning reads it. Which keys a query sees (causal,
segments, Child et al.'s sparse patterns) is built in minipeft/masks.py and minipeft/sparse_attention.py.

References read for facts: karpathy/nanoGPT model.py, pytorch-labs/gpt-fast model.py, Meta's
llama-models reference (model.py, args.py), transformers' modeling_llama.py and its llama3 RoPE init.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import masks
from .loss import IGNORE_INDEX, linear_cross_entropy
from .meta_layout import meta_to_hf
from .safetensors_io import (INDEX, REQUIRED, check_finite, check_state, check_tensor, checkpoint_files, dtype_name,
                             json_field, json_kind, load_safetensors_checkpoint, read_json, regular_file,
                             save_safetensors_checkpoint, staged_files, write_json)


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class LlamaConfig:
    vocab_size: int = 128256
    dim: int = 2048              # model width (hidden_size)
    n_layers: int = 16
    n_heads: int = 32            # query heads
    n_kv_heads: int = 8          # key/value heads; n_heads // n_kv_heads queries share each (GQA)
    ffn_dim: int = 8192          # SwiGLU hidden width (intermediate_size)
    head_dim: int = 0            # 0 -> dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # llama3 frequency scaling; None disables it. Keys as in HF's config.json "rope_scaling".
    rope_scaling: dict | None = field(default_factory=lambda: dict(LLAMA3_SCALING_32))
    max_seq_len: int = 131072    # the longest sequence generate accepts (max_position_embeddings)
    tie_embeddings: bool = True  # lm_head shares embed_tokens' weight (1B and 3B do)
    # Which keys a query sees (minipeft/sparse_attention.py; Child et al. 2019, arXiv:1904.10509):
    # "dense" (all earlier tokens), or the sparse "strided" / "fixed" patterns. Not part of the weights:
    # left out of fingerprint() and of the checkpoint's config.json.
    attention: str = "dense"
    sparse_block: int = 64       # l: block length / stride of the sparse patterns (minipeft's choice, ~sqrt(4096))
    sparse_summary: int = 8      # c: "fixed": the last c tokens of every block are visible to all later ones

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "sparse_block",
                     "sparse_summary"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.attention not in ("dense", "strided", "fixed"):
            raise ValueError(f"LlamaConfig: attention must be 'dense', 'strided' or 'fixed', got {self.attention!r}")
        if self.attention == "fixed" and self.sparse_summary > self.sparse_block:
            raise ValueError(f"LlamaConfig: sparse_summary {self.sparse_summary} must be <= sparse_block "
                             f"{self.sparse_block} (c summary tokens per block of l)")
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_name(cls, name: str) -> LlamaConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, cfg: dict, source: str | Path = "config.json") -> LlamaConfig:
        """From a Hugging Face `config.json` dict, as transformers 4.x or 5.x writes it (see config_from_hf)."""
        return config_from_hf(cls, cfg, source)

    @classmethod
    def from_meta(cls, params: dict, source: str | Path = "params.json") -> LlamaConfig:
        """From Meta's `params.json` (see config_from_meta)."""
        return config_from_meta(cls, params, source)

    def to_hf(self) -> dict:
        cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=self.vocab_size,
                   hidden_size=self.dim, num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                   num_key_value_heads=self.n_kv_heads, intermediate_size=self.ffn_dim, head_dim=self.head_dim,
                   rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta, max_position_embeddings=self.max_seq_len,
                   tie_word_embeddings=self.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
                   bos_token_id=128000, eos_token_id=128001)
        cfg["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling, rope_type="llama3")
        return cfg

    def fingerprint(self) -> dict:
        """The fields that decide whether weights (and adapters) fit this model."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RUNTIME_FIELDS}


# fields that change how the model runs, not which weights it has
RUNTIME_FIELDS = ("max_seq_len", "attention", "sparse_block", "sparse_summary")
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
LLAMA3_SCALING_32 = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
PRESETS: dict[str, dict] = {
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, tie_embeddings=False,
                         rope_scaling=dict(LLAMA3_SCALING_32, factor=8.0)),
    # CPU sizes for tests and the toy default; byte-level vocabulary (see Tokenizer.byte_level)
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=512,
                 rope_theta=10000.0, rope_scaling=None),
    "toy": dict(vocab_size=512, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688, max_seq_len=1024,
                rope_theta=10000.0, rope_scaling=None),
}


# ----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: normalised in fp32 (bf16 loses the small mean square), rounded
    to x's dtype, then times the weight (HF's rounding order). The output has x's dtype whatever the
    weight's: a trainable fp32 weight on a bf16 model must not make the next Linear's input fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm with its backward written out: with xhat = x r, r = 1 / rms(x) and g = dy * weight,
    dx = r (g - xhat mean(g xhat)). x is kept in its own dtype and xhat recomputed, where autograd would
    replay every cast and product: 48 MiB moved instead of 84 by the backward of one norm of the 1B model
    at 512 bf16 tokens (bench/opstream.py)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, weight, r)
        return (weight * (x * r).to(x.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        xhat, g = x * r, dy * weight  # xhat fp32 (..., dim); g = d loss / d xhat
        dx = torch.addcmul(g * r, xhat, r * (g * xhat).mean(-1, keepdim=True), value=-1)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.float() * xhat.to(x.dtype)).sum(tuple(range(x.dim() - 1))).to(weight.dtype)
        return dx.to(x.dtype), dw, None


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, with llama3 scaling applied (arXiv:2407.21783).

    Llama 3 stretches context by dividing LOW frequencies (wavelength > original_len / low_freq_factor)
    by `factor`, keeping HIGH ones (wavelength < original_len / high_freq_factor), and interpolating
    smoothly in between. The factor is read from the config (32 for 3.2-1B/3B, 8 for 3.1-8B).
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.float()
    factor, low, high, orig = (s[k] for k in LLAMA3_SCALING_KEYS)
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low)  # 0 at the low-frequency edge, 1 at the high one
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > orig / low, inv_freq / factor, smoothed)
    out = torch.where(wavelen < orig / high, inv_freq, out)
    return out.float()


class _RoPE(torch.autograd.Function):
    """Rotate pairs (x_i, x_{i+d/2}) by angle pos * freq_i: HF's "half-split" layout, in fp32 (cos, sin),
    rounded once to x's dtype. A rotation's gradient is the rotation back, by -angle: backward is the
    forward with -sin. No fp32 copy of x is made (x * cos promotes as it reads): for the 1B model's
    queries at 512 bf16 tokens, 28 MiB moved forward and 28 backward instead of 52 and 46 (bench/opstream.py)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((-x2, x1), dim=-1), sin).to(x.dtype)  # x cos + rot(x) sin


apply_rope = _RoPE.apply  # apply_rope(x (B, T, H, hd), cos, sin (B, T, 1, hd) fp32) -> x rotated, x's dtype


class KVCache(nn.Module):
    """Preallocated keys/values of one layer for generation (gpt-fast style)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None
        # PEFT slots: None means "not used" (see the module docstring)
        self.qk_adapter: nn.Module | None = None
        self.kv_prefix: nn.Module | None = None
        self.extra_branch: nn.Module | None = None

    def forward(self, x, cos, sin, mask=None, cache_start=None, prefix_kv=None, answer_mask=None):
        """x (B, T, dim); mask: see minipeft/masks.py (None: plain causal); prefix_kv: the soft prompt's
        keys/values for this layer; answer_mask (B, T) bool or None. Returns (y, (k, v))."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)     # (B, T, n_heads, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_adapter is not None:
            q, k = self.qk_adapter(q, k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))               # (B, heads, T, hd)
        new_kv = (k, v)
        if self.kv_cache is not None and cache_start is not None:
            k, v = self.kv_cache.update(cache_start, k, v)               # (B, n_kv, S, hd)
        y = masks.attend(q, k, v, mask, masks.prefixes(B, T, prefix_kv, self.kv_prefix, answer_mask, x.device))
        if self.extra_branch is not None:
            y = y + self.extra_branch(q, self)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, n_heads * hd)
        return self.o_proj(y), new_kv


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020, arXiv:2002.05202): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache_start=None, prefix_kv=None, answer_mask=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_start, prefix_kv, answer_mask)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


# ----------------------------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # ONE shared Parameter
        self.input_prefix: nn.Module | None = None  # prompt-tuning slot, see module docstring
        self.token_adapter: nn.Module | None = None  # PaSTA's slot: sees the token ids, see module docstring
        self.grad_checkpoint = False  # recompute each block in backward to save activation memory
        # packed rows' mask: "flex", "dense" or "auto" (flex on CUDA); with a sparse config.attention also
        # "gather", the block-sparse kernel (the default off CUDA). See minipeft/masks.py.
        self.attention_kernel = "auto"
        self.cache_segments: torch.Tensor | None = None  # generation: every cached token's segment id
        self._input_prefix_kvs: list | None = None  # soft-prompt keys/values kept for one generation
        # the RoPE frequencies, fp32 whatever the weights' dtype (_apply); made here, not on first use, so that
        # a compiled forward sees no attribute change; not in the state dict: the config defines them
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.device.type != "meta":
            nn.init.normal_(m.weight, std=0.02)

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), .bfloat16(), .to_empty() move the RoPE frequencies but never cast them: they are
        computed again in fp32 where they land (in bf16, llama-3.2-1b's would turn position 5000 up to
        4.6 radians off)."""
        super()._apply(fn, recurse)
        self.inv_freq = rope_frequencies(self.config).to(self.inv_freq.device)
        return self

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, T, 1, head_dim) fp32 for integer positions (B, T); negative positions are allowed."""
        angles = positions[..., None].float() * self.inv_freq  # (B, T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
        return angles.cos(), angles.sin()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                segment_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache_start: int | None = None, return_logits: bool = True,
                answer_mask: torch.Tensor | None = None, last_only: bool = False):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T), the token after each position
        (no shift inside; IGNORE_INDEX skips), (logits, mean cross-entropy), or (None, loss) without ever
        building the logits if return_logits=False. segment_ids (B, T): a token sees only earlier tokens of
        its segment (padding, packing), positions restarting at 0 in each unless given. cache_start: where idx
        begins in the KV cache. answer_mask (B, T) bool: the positions that predict an answer token (infix
        tuning; default targets != IGNORE_INDEX). last_only: the last position's logits only (B, 1, vocab)."""
        answer_mask = self._answer_mask(idx, targets, answer_mask)
        mask, positions = self.mask_and_positions(idx, segment_ids, positions, cache_start)
        cos, sin = self.rope(positions)
        x = self.embed_tokens(idx)  # (B, T, dim)
        for i, (layer, prefix_kv) in enumerate(zip(self.layers, self.input_prefix_kvs(cache_start))):
            if self.token_adapter is not None:
                x = self.token_adapter(i, x, idx)
            args = (x, cos, sin, mask, cache_start, prefix_kv, answer_mask)
            if self.grad_checkpoint and self.training:
                x, _ = checkpoint(layer, *args, use_reentrant=False)
            else:
                x, _ = layer(*args)
        x = self.norm(x[:, -1:] if last_only else x)
        if targets is not None and not return_logits and type(self.lm_head) is nn.Linear:
            return None, linear_cross_entropy(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        return (logits if return_logits else None), loss

    @staticmethod
    def _answer_mask(idx, targets, answer_mask):
        if targets is idx:
            raise ValueError("model(idx, targets): targets is idx itself. minipeft does not shift inside "
                             "(targets[t] is the token after idx[t]); pass model(idx[:, :-1], idx[:, 1:])")
        if answer_mask is None:
            return None if targets is None else targets != IGNORE_INDEX
        if answer_mask.shape != idx.shape or answer_mask.dtype != torch.bool:
            raise ValueError(f"answer_mask must be a bool tensor shaped like idx {tuple(idx.shape)}, got "
                             f"{answer_mask.dtype} {tuple(answer_mask.shape)}")
        return answer_mask

    def mask_and_positions(self, idx, segment_ids, positions, cache_start):
        """The attention mask (minipeft/masks.py; None = plain causal, the fast path) and the RoPE
        positions (B, T). While decoding, the cache remembers every token's segment id."""
        B, T = idx.shape
        cached = None
        if segment_ids is not None and cache_start is not None:
            self.cache_segments[:, cache_start:cache_start + T] = segment_ids
            cached = self.cache_segments[:, :cache_start + T]
        if positions is None:
            positions = masks.positions(B, T, idx.device, segment_ids, cached, cache_start)
        if self.config.attention != "dense":  # never builds a (T, T) mask (minipeft/sparse_attention.py)
            return masks.sparse_mask(self.config, positions, segment_ids, cached, cache_start,
                                     self.attention_kernel), positions
        return masks.dense_mask(T, idx.device, segment_ids, cached, cache_start, self.attention_kernel,
                                self.has_prefix_keys()), positions

    def has_prefix_keys(self) -> bool:
        return self.input_prefix is not None or any(l.self_attn.kv_prefix is not None for l in self.layers)

    def input_prefix_kvs(self, cache_start: int | None) -> list:
        """Per-layer soft-prompt keys/values (or Nones). In cached generation they are computed at
        prefill (cache_start 0) and reused for every later token."""
        if self.input_prefix is None:
            return [None] * len(self.layers)
        if cache_start is None:
            return self.run_input_prefix()
        if cache_start == 0 or self._input_prefix_kvs is None:
            self._input_prefix_kvs = self.run_input_prefix()
        return self._input_prefix_kvs

    def run_input_prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the soft prompt (P, dim) alone through the decoder; each layer's keys/values become that
        layer's prefix. Because attention is causal, this equals prepending the P embeddings to every
        sequence; they sit at positions -P..-1 so the real tokens keep positions 0, 1, ..."""
        x = self.input_prefix()[None]  # (1, P, dim)
        cos, sin = self.rope(torch.arange(-x.shape[1], 0, device=x.device)[None])
        kvs = []
        for layer in self.layers:
            x, kv = layer(x, cos, sin)
            kvs.append(kv)
        return kvs

    # ---------------------------------------------------------------- generation

    def setup_kv_cache(self, batch: int, max_len: int) -> None:
        p = self.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch, max_len, self.config.n_kv_heads, self.config.head_dim,
                                               p.dtype, p.device)
        self.cache_segments = torch.zeros(batch, max_len, dtype=torch.long, device=p.device)

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.cache_segments = self._input_prefix_kvs = None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: set[int] | tuple = (), generator: torch.Generator | None = None,
                 ) -> list[list[int]]:
        """Continue each prompt (token lists of any lengths) with the KV cache; return only the new tokens.

        Prompts are left-padded into one batch; the padding is its own segment (id 0), so it is never
        attended to and real tokens keep positions 0, 1, ... . The prompt's last token and every generated
        token are answer positions (`answer_mask`): an infix sits at the end of the prompt. temperature 0 is
        greedy; otherwise nucleus sampling over the smallest set of tokens with probability >= top_p. A row
        stops at its first stop token (not included in the output) or after max_new_tokens.
        """
        self._check_generate_args(prompts, max_new_tokens, temperature, top_p)
        B, T0, dev = len(prompts), max(map(len, prompts)), self.embed_tokens.weight.device
        idx, seg = (torch.zeros(B, T0, dtype=torch.long, device=dev) for _ in range(2))
        for b, p in enumerate(prompts):
            idx[b, T0 - len(p):], seg[b, T0 - len(p):] = torch.tensor(p, device=dev), 1
        pos = (seg.cumsum(1) - 1).clamp(min=0)
        answer = torch.zeros(B, T0, dtype=torch.bool, device=dev)
        answer[:, -1] = True  # the last prompt token predicts the first answer token
        stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
        done, new = torch.zeros(B, dtype=torch.bool, device=dev), []
        self.setup_kv_cache(B, T0 + max_new_tokens)
        try:  # prefill: only the last position's logits are needed
            logits = self(idx, segment_ids=seg, positions=pos, cache_start=0, answer_mask=answer,
                          last_only=True)[:, -1]
            for step in range(max_new_tokens):
                nxt = sample(logits, temperature, top_p, generator)  # (B,)
                new.append(nxt)
                done |= torch.isin(nxt, stops)
                if step == max_new_tokens - 1 or done.all():  # one host sync per token
                    break
                pos = pos[:, -1:] + 1
                logits = self(nxt[:, None], segment_ids=seg[:, -1:], positions=pos, cache_start=T0 + step,
                              answer_mask=answer[:, -1:])[:, -1]
        finally:
            self.clear_kv_cache()
        rows = torch.stack(new, dim=1).tolist()  # each cut at its first stop token
        return [row[:next((i for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]

    def _check_generate_args(self, prompts, max_new_tokens, temperature, top_p) -> None:
        """Clear errors for what torch would report as a shape or device-side error, or not at all."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"generate: prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}"
                             + (" (convert a tensor with .tolist())" if isinstance(prompts, torch.Tensor) else ""))
        vocab = self.config.vocab_size
        for i, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)) or not p:
                raise ValueError(f"generate: prompt {i} must be a non-empty list of token ids, got {p!r:.60}"
                                 + (" (one prompt goes in a list: [ids])" if isinstance(p, int) else ""))
            bad = next((t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), ())
            if bad != ():
                raise ValueError(f"generate: prompt {i} holds token id {bad!r}; ids must be integers in "
                                 f"[0, {vocab}) (the model's vocabulary size is {vocab})")
        for ok, what, value in (
                (not isinstance(max_new_tokens, bool) and isinstance(max_new_tokens, int) and max_new_tokens >= 1,
                 "max_new_tokens must be an integer >= 1", max_new_tokens),
                (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0,
                 "temperature must be a finite number >= 0 (0 = greedy)", temperature),
                (isinstance(top_p, (int, float)) and 0 < top_p <= 1, "top_p must be in (0, 1]", top_p)):
            if not ok:
                raise ValueError(f"generate: {what}, got {value!r}")
        longest = max(map(len, prompts))
        if longest + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"generate: the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the model's max_seq_len {self.config.max_seq_len} "
                             "(max_position_embeddings): shorten the prompt or generate fewer tokens")

    # ---------------------------------------------------------------- loading and saving (below the line)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, quantize: str | None = None) -> Llama:
        """Load a Hugging Face (config.json + *.safetensors) or Meta (params.json + consolidated.00.pth)
        checkpoint (`load_pretrained`). quantize="nf4" | "int8" | "llm_int8": then replace the blocks' Linear
        layers by frozen quantised ones (minipeft/quant.py)."""
        return load_pretrained(cls, path, dtype, device, quantize)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None) -> None:
        """Write config.json + model.safetensors (or shards + index) in the Hugging Face layout."""
        save_pretrained(self, path, max_shard_bytes)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """(B, vocab) logits -> (B,) next tokens: greedy at temperature 0, else nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens after the nucleus is already full
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)  # multinomial renormalises
    return order.gather(-1, choice).squeeze(-1)


# ==============================================================================================
# Below the line: reading checkpoints (Hugging Face and Meta layouts) and writing Hugging Face's
# ==============================================================================================

# config.json key: (LlamaConfig field, type, transformers' LlamaConfig default); None: derived below
HF_FIELDS = {"vocab_size": ("vocab_size", int, 32000), "hidden_size": ("dim", int, 4096),
             "num_hidden_layers": ("n_layers", int, 32), "num_attention_heads": ("n_heads", int, 32),
             "num_key_value_heads": ("n_kv_heads", int, None), "intermediate_size": ("ffn_dim", int, 11008),
             "head_dim": ("head_dim", int, None), "rms_norm_eps": ("norm_eps", float, 1e-6),
             "max_position_embeddings": ("max_seq_len", int, 2048),
             "tie_word_embeddings": ("tie_embeddings", bool, False)}
# fields with one value minipeft implements: another would change the computed function, never ignored
HF_FIXED = {"model_type": ("llama", "minipeft implements 'llama'"), "hidden_act": ("silu", "minipeft implements 'silu'"),
            "attention_bias": (False, "Llama 3 has no biases"), "mlp_bias": (False, "Llama 3 has no biases")}


def config_from_hf(cls, cfg: dict, source: str | Path = "config.json") -> LlamaConfig:
    """LlamaConfig from a Hugging Face `config.json` dict, as transformers 4.x or 5.x writes it.

    RoPE comes as 4.x's `rope_theta` + `rope_scaling` or 5.x's `rope_parameters` (both must agree; see
    _read_rope). Missing fields take transformers' defaults (HF_FIELDS; n_kv_heads = n_heads, head_dim =
    dim // n_heads). What would change the function and minipeft does not implement (HF_FIXED, another
    rope_type, a partial rotary factor) is an error naming `source` and the field, never ignored; every
    field is type- and range-checked by safetensors_io.json_field."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected a JSON object, got a JSON {json_kind(cfg)}")
    # transformers types these `int | None` (null = derived); 5.x writers may leave rope_theta null
    nullable = ("num_key_value_heads", "head_dim") + (("rope_theta",) if cfg.get("rope_parameters") else ())
    for key, (only, why) in HF_FIXED.items():
        value = json_field(cfg, key, type(only), only, source, nullable)
        if value != only:
            raise ValueError(f"{source}: {key} {'true' if value is True else repr(value)} is not supported ({why})")
    out = {name: json_field(cfg, key, kind, REQUIRED if default is None else default, source, nullable)
           for key, (name, kind, default) in HF_FIELDS.items() if default is not None or key in cfg
           and cfg[key] is not None}
    out.setdefault("n_kv_heads", out["n_heads"])
    out.setdefault("head_dim", out["dim"] // out["n_heads"])
    out["rope_theta"], out["rope_scaling"] = _read_rope(cfg, source, nullable)
    return _build(cls, source, **out)


def config_from_meta(cls, params: dict, source: str | Path = "params.json") -> LlamaConfig:
    """LlamaConfig from Meta's `params.json`, computing the FFN width as Meta's reference does."""
    if not isinstance(params, dict):
        raise ValueError(f"{source}: expected a JSON object, got a JSON {json_kind(params)}")
    nullable = ("n_kv_heads", "ffn_dim_multiplier", "rope_scaling_factor")
    get = lambda key, kind, default=REQUIRED: json_field(params, key, kind, default, source, nullable)  # noqa: E731
    dim, heads = get("dim", int), get("n_heads", int)
    hidden = int(2 * (4 * dim) / 3)
    if params.get("ffn_dim_multiplier") is not None:  # null: no multiplier, as Meta's reference
        hidden = int(get("ffn_dim_multiplier", float) * hidden)
    multiple_of = get("multiple_of", int, 256)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)  # round up
    # Meta's reference hard-codes factor 8 in apply_scaling; the 3.2 models were trained with 32.
    # params.json does not say which, so take the factor Meta's own 3.2 releases use by size.
    scaling = None
    if get("use_scaled_rope", bool, False):
        scaling = dict(LLAMA3_SCALING_32, factor=get("rope_scaling_factor", float, 32.0 if dim <= 3072 else 8.0))
    return _build(cls, source, vocab_size=get("vocab_size", int), dim=dim, n_layers=get("n_layers", int),
                  n_heads=heads, n_kv_heads=get("n_kv_heads", int, heads), ffn_dim=hidden,
                  norm_eps=get("norm_eps", float, 1e-5), rope_theta=get("rope_theta", float, 10000.0),
                  rope_scaling=scaling, max_seq_len=get("max_seq_len", int, 131072))


def _build(cls, source, **fields) -> LlamaConfig:
    try:
        return cls(**fields)
    except ValueError as e:  # a cross-field check of __post_init__ (heads vs key/value heads)
        raise ValueError(f"{source}: {e}") from None


def _read_rope(cfg: dict, source, nullable) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling or None) from 4.x's top-level `rope_theta` + `rope_scaling`
    ({"rope_type": "llama3", LLAMA3_SCALING_KEYS}) or 5.x's `rope_parameters` ({"rope_theta", "rope_type":
    "default" | "llama3", the same four keys}); "default" (or no scaling) is plain RoPE, theta 10000."""
    params, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{source}: field '{key}' must be an object or null, got {value!r}")
    theta = json_field(cfg, "rope_theta", float, 10000.0, source, nullable)
    if params is None:
        return theta, None if scaling is None else _read_scaling(scaling, f"{source} rope_scaling")
    p_theta = json_field(params, "rope_theta", float, theta, f"{source} rope_parameters")  # transformers 5.x
    if cfg.get("rope_theta") is not None and p_theta != theta:
        raise ValueError(f"{source}: rope_theta {theta} contradicts rope_parameters.rope_theta {p_theta}")
    from_params = _read_scaling(params, f"{source} rope_parameters")
    if scaling is not None and _read_scaling(scaling, f"{source} rope_scaling") != from_params:
        raise ValueError(f"{source}: rope_scaling {scaling} contradicts rope_parameters {params}")
    return p_theta, from_params


def _read_scaling(spec: dict, where: str) -> dict | None:
    """None for rope_type "default" (or none given), the four llama3 numbers for "llama3"."""
    kind = spec.get("rope_type", spec.get("type", "default"))
    factor = spec.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor {factor!r} is not supported (Llama rotates every dimension)")
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"{where}: rope_type {kind!r} is not supported (minipeft implements 'default' and 'llama3')")
    missing = [k for k in LLAMA3_SCALING_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{where}: rope_type 'llama3' needs {list(LLAMA3_SCALING_KEYS)}; missing {missing}")
    out = {k: json_field(spec, k, float, source=where) for k in LLAMA3_SCALING_KEYS[:3]}
    out["original_max_position_embeddings"] = json_field(spec, "original_max_position_embeddings", int, source=where)
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"{where}: high_freq_factor {out['high_freq_factor']} must exceed low_freq_factor "
                         f"{out['low_freq_factor']}")
    return out


def load_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, quantize: str | None = None) -> Llama:
    """The model of a checkpoint folder, every file and tensor checked (see Llama.from_pretrained)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint folder does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder (give the checkpoint folder, not a file in it)")
    if (path / "config.json").exists():
        cfg = LlamaConfig.from_hf(read_json(path / "config.json"), path / "config.json")
        state, origin = load_safetensors_checkpoint(path, strip="model.")
        _check_tied(cfg, state, origin, path / "config.json")
    elif (path / "params.json").exists():
        cfg = LlamaConfig.from_meta(read_json(path / "params.json"), path / "params.json")
        source = path / "consolidated.00.pth"
        if not source.exists():
            raise FileNotFoundError(f"{path}: params.json found but {source.name} is missing")
        source = regular_file(path, source.name, source)
        raw = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        # params.json does not say whether the head is tied: the weights do
        out, emb = raw.get("output.weight"), raw.get("tok_embeddings.weight")
        tied = out is None or (emb is not None and out.shape == emb.shape and torch.equal(out, emb))
        cfg = replace(cfg, tie_embeddings=tied)
        state = meta_to_hf(raw, cfg, source)
        origin = dict.fromkeys(state, source)
    else:
        raise FileNotFoundError(f"{path}: unknown checkpoint layout: expected config.json + *.safetensors "
                                "(Hugging Face) or params.json + consolidated.00.pth (Meta)")
    with torch.device("meta"):
        model = cls(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:  # some tied checkpoints still carry a copy of the head; it is the same tensor
        expected.pop("lm_head.weight"), state.pop("lm_head.weight", None)
    check_state(expected, state, origin, path)
    loaded = {k: v.to(device=device or "cpu", dtype=dtype or v.dtype) for k, v in state.items()}
    check_finite(loaded, origin, state)  # after the cast: a finite 1e5 is inf in float16
    if cfg.tie_embeddings:
        loaded["lm_head.weight"] = loaded["embed_tokens.weight"]
    model.load_state_dict(loaded, assign=True)
    model.inv_freq = rope_frequencies(cfg).to(device or "cpu")  # not in the state: still on the meta device
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if quantize:  # after loading, apart from it: QLoRA's frozen 4-bit base (or int8)
        from .quant import quantize_model
        quantize_model(model, quantize)
    return model.eval()


def save_pretrained(model: Llama, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """config.json + model.safetensors (or shards + index) in the Hugging Face layout. Every weight must be
    finite (a merge or a cast to float16 can make inf: refused, naming the tensor). The new files are
    written under temp names first, then swapped in, then the old save's files removed: a full disk
    leaves the folder's earlier checkpoint loading exactly as before (safetensors_io.staged_files)."""
    with torch.device("meta"):  # a plain Llama's keys, built without memory
        plain = Llama(model.config).state_dict()
    extra = [k for k in model.state_dict() if k not in plain]
    if extra:  # a PEFT wrapper or slot: from_pretrained (and transformers) would reject the folder
        raise ValueError(f"save_pretrained: the model carries modules a Llama checkpoint cannot hold "
                         f"('{extra[0]}', {len(extra)} tensors): fold them with "
                         "minipeft.merge_and_unload(model) first, or keep them apart with save_adapter")
    path = Path(path).expanduser()
    state = {k if k == "lm_head.weight" else f"model.{k}": v for k, v in model.state_dict().items()
             if not (model.config.tie_embeddings and k == "lm_head.weight")}
    hf = dict(model.config.to_hf(), torch_dtype=dtype_name(next(iter(state.values())).dtype))
    for k, v in state.items():
        check_tensor(k, v, f"save_pretrained: {path} (nothing written)")
    # config.json last (it makes the set loadable); then the files of an earlier save that the new one
    # does not replace, which would shadow it (config.json over params.json) or go stale (shards)
    with staged_files(path, last=(INDEX, "config.json"), stale=checkpoint_files(path)) as tmp:
        save_safetensors_checkpoint(state, tmp, max_shard_bytes)
        write_json(tmp / "config.json", hf)


def _check_tied(cfg: LlamaConfig, state: dict, origin: dict, config_path: Path) -> None:
    """A tied config must not come with a DIFFERENT lm_head.weight: one of the two is wrong."""
    head, emb = state.get("lm_head.weight"), state.get("embed_tokens.weight")
    if cfg.tie_embeddings and head is not None and emb is not None and not (
            head.shape == emb.shape and torch.equal(head, emb)):
        raise ValueError(f"{config_path}: tie_word_embeddings is true, but {origin['lm_head.weight']} holds an "
                         "lm_head.weight that differs from embed_tokens.weight; set tie_word_embeddings to false "
                         "to use that head, or remove it")
