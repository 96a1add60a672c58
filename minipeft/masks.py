"""Which keys each query sees, and the attention call that applies it (used by minipeft/llama.py).

`Llama.forward` asks for the RoPE positions and a mask once per batch; every layer's `Attention` then
calls `attend`. A mask is one of:

  * None: plain causal attention over the batch itself, the fast path (SDPA's `is_causal`, the flash
    kernel on CUDA): right-padded rows need nothing more (a real token never sees a later pad);
  * a (B, 1, T, S) bool tensor: causal within segments (packed rows, left-padded prompts, the KV cache);
  * a FlexAttention `BlockMask` with the same meaning, for packed rows on CUDA (fully masked 128 x 128
    blocks are skipped, not computed);
  * a `sparse_attention.SparseMask`: Child et al.'s strided / fixed patterns.

Extra keys that PEFT methods add (prefix tuning's `kv_prefix`, prompt tuning's soft prompt, infix tuning's
answer-only infix) come to `attend` as `prefixes`: (keys, values, seen_by) with seen_by None (every query)
or a (B, T) bool mask of the queries that see them. They carry no position, so they sit in front.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sparse_attention import SparseMask, flex, kernel_for

try:  # FlexAttention (torch >= 2.5): document masks as a block mask instead of a dense (B, 1, T, T) tensor
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
except ImportError:  # older torch: the dense mask is used
    BlockMask = create_block_mask = None


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """(1, 1, T, S) bool: the T queries are the LAST T of the S keys."""
    q_idx = torch.arange(S - T, S, device=device)
    return (torch.arange(S, device=device)[None, :] <= q_idx[:, None])[None, None]


def segment_mask(q_seg: torch.Tensor, k_seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S) bool: causal, and a query sees only keys of its own segment (packing, padding)."""
    same = q_seg[:, :, None] == k_seg[:, None, :]  # (B, T, S)
    return same[:, None] & causal_mask(q_seg.shape[1], k_seg.shape[1], q_seg.device)


def document_block_mask(seg: torch.Tensor, block: int = 128):
    """FlexAttention's BlockMask equal to segment_mask(seg, seg): causal within each segment. Blocks of
    block x block (query, key) pairs that no query may see are skipped, not computed and masked."""
    B, T = seg.shape

    def same_segment_causal(b, h, q_idx, kv_idx):
        return (seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= q_idx)
    return create_block_mask(same_segment_causal, B=B, H=None, Q_LEN=T, KV_LEN=T, device=seg.device,
                             BLOCK_SIZE=block)


def segment_positions(seg: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at the first token of each contiguous run of equal segment ids."""
    idx = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def positions(B: int, T: int, device, segment_ids=None, cached_segments=None, cache_start=None) -> torch.Tensor:
    """The RoPE positions (B, T): 0, 1, ... (after the cache's cache_start tokens), or restarting at each
    segment. While decoding, counted over the segment ids of everything in the cache so far
    (`cached_segments`), so a token continues its segment's positions instead of starting again at 0."""
    if segment_ids is None:
        return torch.arange(T, device=device).expand(B, T) + (cache_start or 0)
    if cache_start:
        return segment_positions(cached_segments)[:, cache_start:]
    return segment_positions(segment_ids)


def dense_mask(T: int, device, segment_ids=None, cached_segments=None, cache_start=None, kernel: str = "auto",
               prefixed: bool = False):
    """The mask of dense attention (see the module docstring): None without segments and cache. Packed
    rows get a FlexAttention block mask where `kernel` asks for one ("flex"; "auto": on CUDA), unless
    prefix keys are added (`prefixed`: their columns are not in the block mask) or, on CPU, gradients are
    needed (torch has no FlexAttention backward on CPU)."""
    if segment_ids is not None and cache_start is not None:
        return segment_mask(segment_ids, cached_segments)
    if segment_ids is not None:
        if kernel not in ("auto", "flex", "dense"):
            raise ValueError(f"Llama.attention_kernel: {kernel!r}; expected 'auto', 'flex' or 'dense'")
        flex_wanted = kernel == "flex" or kernel == "auto" and segment_ids.device.type == "cuda"
        no_backward = segment_ids.device.type == "cpu" and torch.is_grad_enabled()
        if flex_wanted and create_block_mask is not None and not prefixed and not no_backward:
            return document_block_mask(segment_ids)
        return segment_mask(segment_ids, segment_ids)
    return causal_mask(T, cache_start + T, device) if cache_start else None


def sparse_mask(config, q_pos: torch.Tensor, segment_ids=None, cached_segments=None, cache_start=None,
                kernel: str = "auto") -> SparseMask:
    """The config's sparse pattern for these queries. While decoding, the cached keys' positions are
    counted from the cache's segment ids (as the queries' own positions are)."""
    k_pos, k_seg = q_pos, segment_ids
    if cache_start:
        S = cache_start + q_pos.shape[1]
        k_seg = cached_segments if segment_ids is not None else None
        k_pos = (segment_positions(k_seg) if k_seg is not None
                 else torch.arange(S, device=q_pos.device).expand(q_pos.shape[0], S))
    return SparseMask(config.attention, config.sparse_block, config.sparse_summary, q_pos, k_pos, segment_ids,
                      k_seg, kernel_for(q_pos.device, kernel))


def prefixes(B: int, T: int, prefix_kv, kv_prefix, answer_mask, device) -> list:
    """The prefixes of one attention: the soft prompt's keys/values (`prefix_kv`, every query sees them)
    and its kv_prefix slot's, seen by the answer positions only where the slot has `answer_only` (infix
    tuning; by none without an answer_mask)."""
    out = [(*prefix_kv, None)] if prefix_kv is not None else []
    if kv_prefix is not None:
        seen_by = None
        if getattr(kv_prefix, "answer_only", False):
            seen_by = torch.zeros(B, T, dtype=torch.bool, device=device) if answer_mask is None else answer_mask
        out.append((*kv_prefix(B), seen_by))
    return out


def shares_kv_heads(mask, device: torch.device) -> bool:
    """Whether SDPA gets the grouped key/value heads as they are (enable_gqa) or copied out to one per
    query head. On CUDA a dense mask with enable_gqa sends SDPA to its math kernel (the memory-efficient
    kernel takes a mask but not grouped heads, flash no mask), so there, and only there, the heads are
    copied out (as transformers' use_gqa_in_sdpa does)."""
    return mask is None or device.type != "cuda"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, prefixes: list) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, hd) over k, v (B, Hk, S, hd) and the prefixes' keys,
    under `mask`; (B, H, T, hd). Grouped-query heads are shared, not copied, but see shares_kv_heads."""
    B, T = q.shape[0], q.shape[2]
    pks = [pk.expand(B, -1, -1, -1).to(k.dtype) for pk, _, _ in prefixes]
    pvs = [pv.expand(B, -1, -1, -1).to(v.dtype) for _, pv, _ in prefixes]
    if isinstance(mask, SparseMask):  # prefix keys are extra columns every query sees
        if any(seen is not None for _, _, seen in prefixes):
            raise ValueError("infix tuning (prefix keys seen by answer positions only) does not run with a sparse "
                             "attention pattern; use attention='dense'")
        return mask.attend(q, k, v, list(zip(pks, pvs)))
    if BlockMask is not None and isinstance(mask, BlockMask):  # packed rows, no prefixes, no cache
        return flex(q, k, v, mask)
    if prefixes:  # extra keys/values in front, each visible to every query or to the answer positions
        mask = (causal_mask(T, k.shape[2], q.device) if mask is None else mask).expand(B, 1, T, -1)
        visible = [(mask.new_ones(()) if seen is None else seen[:, None, :, None]).expand(B, 1, T, pk.shape[2])
                   for pk, (_, _, seen) in zip(pks, prefixes)]
        k, v, mask = torch.cat(pks + [k], dim=2), torch.cat(pvs + [v], dim=2), torch.cat(visible + [mask], dim=-1)
    if not shares_kv_heads(mask, q.device):
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # (B, H, S, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])
