"""Meta's checkpoint layout (params.json + consolidated.00.pth) against Hugging Face's, both ways.

Meta's reference code (meta-llama/llama-models) names the weights its own way (`layers.0.attention.wq.weight`
for transformers' `layers.0.self_attn.q_proj.weight`) and lays out each head's rotary pairs interleaved,
(0, 1), (2, 3), ..., where transformers pairs dimension i with i + head_dim/2 (its `rotate_half`): the rows
of wq and wk are permuted head by head (transformers' convert_llama_weights_to_hf.py does the same).
`llama.load_pretrained` reads a Meta folder through `meta_to_hf`; `save_meta` writes one.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .safetensors_io import check_tensor, checkpoint_files, staged_files, torch_save, write_json


# Meta name -> HF name; {i} is the layer index (a small format-string table, as in gpt-fast)
META_TO_HF = {
    "tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight", "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "layers.{i}.mlp.down_proj.weight",
    "layers.{i}.attention_norm.weight": "layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
}
HF_TO_META = {v: k for k, v in META_TO_HF.items()}


def rename(name: str, table: dict[str, str]) -> str | None:
    """`name` through META_TO_HF or HF_TO_META, its layer index carried over; None if the table lacks it."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    pattern = table.get(f"layers.{{i}}.{m.group(2)}" if m else name)
    return None if pattern is None else pattern.format(i=m.group(1) if m else "")


def rotary_heads(cfg, hf_name: str) -> int | None:
    """The heads whose rows a q/k projection holds (their rotary pairs are laid out differently)."""
    return {"q_proj": cfg.n_heads, "k_proj": cfg.n_kv_heads}.get(hf_name.split(".")[-2])


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta's interleaved rotary pairs (0,1),(2,3).. to HF's
    half-split pairs (i, i + hd/2). Per head: row 2j -> j, row 2j+1 -> hd/2 + j."""
    return w.view(n_heads, -1, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of interleaved_to_half (used to write Meta-layout checkpoints)."""
    return w.view(n_heads, 2, -1, w.shape[1]).transpose(1, 2).reshape(w.shape)


def meta_to_hf(raw: dict[str, torch.Tensor], cfg, source: Path) -> dict[str, torch.Tensor]:
    state = {}
    for key, t in raw.items():
        name = rename(key, META_TO_HF)
        if name is None:
            if key.endswith("rope.freqs"):  # older Meta checkpoints store the frequencies; we compute them
                continue
            raise KeyError(f"{source}: unexpected key '{key}' in a Meta checkpoint")
        heads = rotary_heads(cfg, name)
        state[name] = interleaved_to_half(t, heads) if heads else t
    return state


def save_meta(model, path: str | Path) -> None:
    """Write params.json + consolidated.00.pth in Meta's layout (interleaved q/k rows). As save_pretrained:
    finite weights only; new files first, then the swap, then an earlier save's files go (config.json
    would shadow params.json)."""
    path, cfg, raw = Path(path).expanduser(), model.config, {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        key, heads = rename(name, HF_TO_META), rotary_heads(cfg, name)
        if key is None:  # a PEFT wrapper's tensor, as save_pretrained refuses it
            raise KeyError(f"save_meta: '{name}' is no Llama weight: minipeft.merge_and_unload(model) first")
        t = half_to_interleaved(t, heads) if heads else t
        check_tensor(name, t, f"save_meta: {path} (nothing written)")
        raw[key] = t.clone()
    # choose multiple_of / ffn_dim_multiplier so that from_meta's rounding gives back ffn_dim exactly
    base = int(2 * (4 * cfg.dim) / 3)
    params = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                  vocab_size=cfg.vocab_size, norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  use_scaled_rope=cfg.rope_scaling is not None, multiple_of=cfg.ffn_dim,
                  ffn_dim_multiplier=cfg.ffn_dim / base if base > cfg.ffn_dim else None)
    if cfg.rope_scaling is not None:
        params["rope_scaling_factor"] = cfg.rope_scaling["factor"]
    with staged_files(path, last=("params.json",), stale=checkpoint_files(path)) as tmp:
        torch_save(raw, tmp / "consolidated.00.pth")
        write_json(tmp / "params.json", params)
