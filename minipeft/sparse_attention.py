"""Sparse attention for long context: the factorised patterns of the Sparse Transformer.

Child, Gray, Radford & Sutskever 2019, "Generating Long Sequences with Sparse Transformers",
arXiv:1904.10509, section 4. Query i attends to a set S_i of keys j <= i; the paper builds S_i from
two sets with a block length (stride) l:

    strided:  A1 = {max(0, i - l), ..., i}                 the previous l positions
              A2 = {j : (i - j) mod l = 0}                 every l-th position before i
    fixed:    A1 = {j : floor(j / l) = floor(i / l)}       i's own block of l
              A2 = {j : j mod l in {l - c, ..., l - 1}}    the last c positions ("summary") of every block

Every head here attends to the union S_i = A1 u A2 (causal), the paper's "merged" form, so that a
pretrained model fine-tunes with every head seeing both the neighbourhood and the long-range columns.
Positions i, j are the tokens' RoPE positions (the position within the document): a packed document
or a left-padded prompt sees the same pattern as it would alone. With segment ids (packing, padding),
a query also sees only its own segment.

Cost: a query sees about l + T/l keys (strided) or l + c T/l keys (fixed) instead of T, so for
l ~ sqrt(T) compute and memory go from O(T^2) to O(T sqrt(T)). That only happens when the kernel never
builds the (T, T) scores; a boolean mask over dense scores (`dense_mask`, kept as the test reference
and for one-token decoding) saves nothing. Two kernels do it:

  * `block_sparse_attention` (plain PyTorch, any device, with autograd): per block of l queries it
    scores only the key blocks and columns the pattern allows, in one softmax over
    [local window | strided or summary columns | prefix keys]:
      - local: the query block and the block before it (2l keys; covers A1 of both patterns);
      - strided A2 \\ A1: queries and keys regrouped by residue i mod l, (T/l) x (T/l) per residue;
      - fixed A2 \\ A1: the summary columns gathered once per row (c T/l keys).
    Scores computed: T * (2l + T/l) (strided), T * (2l + cT/l) (fixed), instead of T * T; a sequence
    no longer than one block (T <= l) is not padded to l but scored densely under the pattern's mask
    (T * T), so l = 4096 on 6 tokens costs what 6 tokens cost. The queries go in checkpointed chunks
    of QUERY_CHUNK, so a training step holds one chunk's scores at a time.
    Measured against dense kernels in README ("Sparse attention for long context"): far less memory and
    time than attention that keeps its T x T scores; no memory saving against a fused (flash) kernel.
  * FlexAttention (torch.nn.attention.flex_attention) with the pattern as a block mask, compiled on
    CUDA; it skips only (128 x 128) blocks with no allowed pair, and with l <= 128 the strided and
    summary columns reach into almost every block, so there the saving is memory (no scores kept),
    not FLOPs. torch has no FlexAttention backward on CPU, so CPU training uses the gather kernel.

Keys that methods add (prefix tuning's `kv_prefix`, prompt tuning's prefix) are visible to every query,
as in dense attention; LLaMA-Adapter's gated prompt attention is a separate softmax (its
`extra_branch`) and is not affected by the pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # FlexAttention (torch >= 2.5); on CPU forward only
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    create_block_mask = flex_attention = None

PATTERNS = ("strided", "fixed")


def allowed(kind: str, block: int, summary: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """The pattern alone (no causality, no segments): may a query at q_pos see a key at k_pos?
    Broadcasts; positions are integers >= 0."""
    if kind == "strided":
        dist = q_pos - k_pos
        return (dist <= block) | (dist % block == 0)
    if kind == "fixed":
        return (q_pos // block == k_pos // block) | (k_pos % block >= block - summary)
    raise ValueError(f"sparse attention: pattern {kind!r} unknown; expected one of {PATTERNS}")


def kernel_for(device: torch.device, requested: str = "auto") -> str:
    """Which kernel runs the pattern: "flex" (FlexAttention block mask, CUDA), "gather" (plain PyTorch
    block-sparse, any device), or "dense" (a mask over full scores: the reference, for comparison)."""
    if requested not in ("auto", "flex", "gather", "dense"):
        raise ValueError(f"Llama.attention_kernel: {requested!r}; expected 'auto', 'flex', 'gather' or 'dense'")
    if requested == "auto":
        return "flex" if device.type == "cuda" and flex_attention is not None else "gather"
    if requested == "flex" and (flex_attention is None or device.type == "cpu" and torch.is_grad_enabled()):
        return "gather"  # no FlexAttention, or no FlexAttention backward (CPU)
    return requested


def describe(kind: str, block: int, summary: int, device: torch.device, requested: str = "auto") -> str:
    """One line for start-up: the pattern and the kernel that will compute it."""
    what = f"l={block}" + (f", c={summary}" if kind == "fixed" else "")
    kernel = kernel_for(device, requested)
    how = {"flex": "FlexAttention block mask (compiled; skips empty 128x128 blocks)",
           "gather": "block-sparse gather kernel in plain PyTorch (no FlexAttention backward here)"
           if device.type == "cpu" else "block-sparse gather kernel in plain PyTorch",
           "dense": "a dense mask over full scores (reference only: no saving)"}[kernel]
    return f"sparse attention: {kind} ({what}), kernel: {how}"


@dataclass
class SparseMask:
    """What Llama passes as Attention's `mask` when the config asks for a sparse pattern.

    q_pos (B, T) / k_pos (B, S): the positions of queries and keys; q_seg / k_seg the segment ids or
    None (one segment). S > T only while decoding with a KV cache (the T queries are the last T keys).
    Positions must grow by one per token within a segment (as segment_positions and generate make them).
    """
    kind: str
    block: int
    summary: int
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_seg: torch.Tensor | None = None
    k_seg: torch.Tensor | None = None
    kernel: str = "gather"
    block_masks: dict = field(default_factory=dict, repr=False)  # FlexAttention's, per prefix length: built
                                                                 # once per forward, shared by all layers

    def dense_mask(self) -> torch.Tensor:
        """(B, 1, T, S) bool over full scores: causal, same segment, and the pattern."""
        T, S = self.q_pos.shape[1], self.k_pos.shape[1]
        rows = torch.arange(S - T, S, device=self.q_pos.device)
        ok = torch.arange(S, device=self.q_pos.device)[None, :] <= rows[:, None]  # (T, S) causal
        ok = ok & allowed(self.kind, self.block, self.summary, self.q_pos[:, :, None], self.k_pos[:, None, :])
        if self.q_seg is not None:
            ok = ok & (self.q_seg[:, :, None] == self.k_seg[:, None, :])
        return ok[:, None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               prefixes: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """q (B, H, T, hd), k/v (B, Hk, S, hd), prefixes [(B, Hk, P, hd) keys, values] -> (B, H, T, hd)."""
        pk = torch.cat([k_ for k_, _ in prefixes], dim=2) if prefixes else None
        pv = torch.cat([v_ for _, v_ in prefixes], dim=2) if prefixes else None
        decoding = q.shape[2] != k.shape[2]
        if self.kernel == "gather" and not decoding:
            return block_sparse_attention(q, k, v, self.kind, self.block, self.summary, self.q_pos,
                                          self.q_seg, pk, pv, chunk=QUERY_CHUNK)
        if self.kernel == "flex" and not decoding:
            return flex_sparse_attention(q, k, v, self, pk, pv)
        # one-token (or short) decoding with a cache, or the dense reference: T x S scores are cheap
        # for T = 1 and are the point of the reference
        return _one_block(q, k, v, self, pk, pv)


def _one_block(q, k, v, m: SparseMask, pk=None, pv=None) -> torch.Tensor:
    """Attention over full (T, S) scores under `m.dense_mask()`, the prefix keys visible to all."""
    mask = m.dense_mask()
    if pk is not None:
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        mask = F.pad(mask, (pk.shape[2], 0), value=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


QUERY_CHUNK = 1024  # queries per chunk: the scores of one chunk are all that is held at once


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, block: int,
                           summary: int, pos: torch.Tensor, seg: torch.Tensor | None = None,
                           prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None,
                           chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """Child et al.'s pattern computed block-sparsely: see the module docstring.

    q (B, H, T, hd), k/v (B, Hk, T, hd) with H a multiple of Hk (GQA), pos/seg (B, T), prefix_k/v
    (B, Hk, P, hd) or None. Returns (B, H, T, hd), equal to softmax over the allowed keys only.
    The queries go in chunks of about `chunk`; with gradients each chunk is checkpointed: backward
    recomputes its scores instead of keeping them (the paper's "recomputation of attention weights"),
    so a training step holds one chunk's scores, not a layer's."""
    B, H, T, hd = q.shape
    if T <= block:  # one block holds the sequence: its T x T scores cost less than padding it to l
        return _one_block(q, k, v, SparseMask(kind, block, summary, pos, pos, seg, seg), prefix_k, prefix_v)
    Hk, l = k.shape[1], block
    g, nb = H // Hk, math.ceil(T / block)
    pad = nb * l - T
    if seg is None:
        seg = torch.zeros_like(pos)
    # pad T up to nb * l; padded keys get segment -1 so no real query sees them
    seg, pos = F.pad(seg, (0, pad), value=-1), F.pad(pos, (0, pad))
    qb = F.pad(q, (0, 0, 0, pad)).view(B, Hk, g, nb, l, hd)       # (B, Hk, g, nb, l, hd)
    kb = F.pad(k, (0, 0, 0, pad)).view(B, Hk, 1, nb, l, hd)       # (B, Hk, 1, nb, l, hd)
    vb = F.pad(v, (0, 0, 0, pad)).view(B, Hk, 1, nb, l, hd)
    ids = (seg.view(B, nb, l), pos.view(B, nb, l))
    # each query block's local keys: [previous block | own block], 2l of them
    local = (torch.cat([_previous_block(kb), kb], dim=-2),        # (B, Hk, 1, nb, 2l, hd)
             torch.cat([_previous_block(vb), vb], dim=-2),
             torch.cat([_previous_block(ids[0], fill=-2), ids[0]], dim=-1),  # (B, nb, 2l); -2: no block
             torch.cat([_previous_block(ids[1]), ids[1]], dim=-1))
    if kind == "strided":
        far = (kb, vb)
    else:  # fixed: the summary columns, gathered once per row
        idx, valid = _summary_columns(pos[:, :T], l, summary)     # (B, M)
        gather = idx[:, None, :, None].expand(B, Hk, idx.shape[1], hd)
        far = (k.gather(2, gather)[:, :, None, None], v.gather(2, gather)[:, :, None, None],  # (B, Hk, 1, 1, M, hd)
               seg.gather(1, idx), pos.gather(1, idx), valid)
    per = max(1, chunk // l)  # query blocks per chunk
    outs = []
    for a0 in range(0, nb, per):
        args = (kind, l, a0, qb[..., a0:a0 + per, :, :], ids, local, far, prefix_k, prefix_v)
        outs.append(checkpoint(_query_blocks, *args, use_reentrant=False) if torch.is_grad_enabled()
                    else _query_blocks(*args))
    return torch.cat(outs, dim=-3).reshape(B, H, nb * l, hd)[:, :, :T]


def _query_blocks(kind, l, a0, qc, ids, local, far, prefix_k, prefix_v) -> torch.Tensor:
    """The output (B, Hk, g, n, l, hd) of query blocks a0 .. a0 + n - 1: one softmax over
    [local window | strided or summary columns | prefix keys]."""
    n, dev, scale = qc.shape[-3], qc.device, qc.shape[-1] ** -0.5
    blocks = slice(a0, a0 + n)
    seg_q, pos_q = ids[0][:, blocks], ids[1][:, blocks]           # (B, n, l)
    k_loc, v_loc, seg_loc, pos_loc = local[0][..., blocks, :, :], local[1][..., blocks, :, :], \
        local[2][:, blocks], local[3][:, blocks]
    dist = l + torch.arange(l, device=dev)[:, None] - torch.arange(2 * l, device=dev)  # (l, 2l): i - j
    ok = (dist >= 0) & (seg_q[..., :, None] == seg_loc[..., None, :])  # (B, n, l, 2l)
    if kind == "strided":
        ok = ok & (dist <= l)  # A1; the multiples of l inside the window (0, l) are in it too
    else:
        ok = ok & (pos_q[..., :, None] // l == pos_loc[..., None, :] // l)  # A1: the same block
    scores, masks = [(qc @ k_loc.transpose(-1, -2)) * scale], [ok[:, None, None]]  # (B, Hk, g, n, l, 2l)

    if kind == "strided":  # A2 minus the window: keys l*m back, m >= 2, grouped by residue i mod l
        nk = a0 + n                                               # key blocks up to the chunk's last
        k_res = far[0][..., :nk, :, :].transpose(-3, -2)          # (B, Hk, 1, l, nk, hd)
        s = (qc.transpose(-3, -2) @ k_res.transpose(-1, -2)) * scale  # (B, Hk, g, l, n, nk)
        scores.append(s.transpose(-3, -2))                        # (B, Hk, g, n, l, nk)
        a, b = torch.arange(a0, nk, device=dev), torch.arange(nk, device=dev)
        seg_k = ids[0][:, :nk].transpose(1, 2)[:, None]          # (B, 1, l, nk)
        ok = (b[None, :] <= a[:, None] - 2)[None, :, None, :] & (seg_q[..., None] == seg_k)  # (B, n, l, nk)
    else:  # fixed, A2 minus the own block: the summary columns of earlier blocks
        k_sum, _, seg_s, pos_s, valid = far
        scores.append((qc @ k_sum.transpose(-1, -2)) * scale)      # (B, Hk, g, n, l, M)
        ok = ((seg_q[..., None] == seg_s[:, None, None, :]) & (pos_s[:, None, None, :] // l < pos_q[..., None] // l)
              & valid[:, None, None, :])
    masks.append(ok[:, None, None])

    if prefix_k is not None:  # trainable or soft-prompt keys: every query sees all of them
        scores.append((qc @ prefix_k[:, :, None, None].transpose(-1, -2)) * scale)  # (B, Hk, g, n, l, P)
        masks.append(torch.ones(prefix_k.shape[-2], dtype=torch.bool, device=dev))

    widths = [sc.shape[-1] for sc in scores]
    s = torch.cat([sc.masked_fill(~m, float("-inf")) for sc, m in zip(scores, masks)], dim=-1)
    s = s.to(torch.promote_types(s.dtype, torch.float32))         # bf16/fp16 scores: softmax in fp32
    p = torch.softmax(s, dim=-1).to(qc.dtype).split(widths, dim=-1)  # one softmax over the union
    y = p[0] @ v_loc                                              # (B, Hk, g, n, l, hd)
    if kind == "strided":
        v_res = far[1][..., :a0 + n, :, :].transpose(-3, -2)      # (B, Hk, 1, l, nk, hd)
        y = y + (p[1].transpose(-3, -2) @ v_res).transpose(-3, -2)
    else:
        y = y + p[1] @ far[1]
    if prefix_k is not None:
        y = y + p[2] @ prefix_v[:, :, None, None]
    return y


def _previous_block(x: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """x with blocks shifted by one along the block axis (block a holds block a - 1; block 0: fill).
    The block axis is -3 for (.., nb, l, hd) tensors and -2 for (B, nb, l) ids."""
    if x.dim() == 3:  # (B, nb, l)
        return F.pad(x, (0, 0, 1, 0), value=fill)[:, :-1]
    return F.pad(x, (0, 0, 0, 0, 1, 0), value=fill)[..., :-1, :, :]


def _summary_columns(pos: torch.Tensor, block: int, summary: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, M) of each row's summary tokens (pos mod l >= l - c), in order, and which of the M
    are real (rows with fewer are padded with index 0, marked invalid)."""
    is_summary = pos % block >= block - summary                     # (B, T)
    count = is_summary.sum(1)
    M = max(int(count.max()), 1)
    order = torch.sort((~is_summary).to(torch.int8), dim=1, stable=True).indices[:, :M]
    valid = torch.arange(M, device=pos.device)[None, :] < count[:, None]
    return torch.where(valid, order, 0), valid


def flex_sparse_attention(q, k, v, m: SparseMask, prefix_k=None, prefix_v=None) -> torch.Tensor:
    """The pattern as a FlexAttention block mask (prefix keys first, visible to all). Compiled on CUDA;
    eager elsewhere (forward only on CPU: the tests compare it there without gradients)."""
    B, T, P = q.shape[0], q.shape[2], 0 if prefix_k is None else prefix_k.shape[2]
    if prefix_k is not None:
        k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
    pos = m.q_pos
    seg = torch.zeros_like(pos) if m.q_seg is None else m.q_seg
    kind, l, c = m.kind, m.block, m.summary

    def mask_mod(b, h, q_idx, kv_idx):
        j = (kv_idx - P).clamp(min=0)
        real = (j <= q_idx) & (seg[b, q_idx] == seg[b, j]) & allowed(kind, l, c, pos[b, q_idx], pos[b, j])
        return (kv_idx < P) | ((kv_idx >= P) & real)

    if P not in m.block_masks:
        m.block_masks[P] = create_block_mask(mask_mod, B=B, H=None, Q_LEN=T, KV_LEN=T + P, device=q.device)
    return flex(q, k, v, m.block_masks[P])


def flex(q, k, v, block_mask):
    """flex_attention under `block_mask`, compiled on CUDA (eager it is a dense reference implementation)."""
    global _FLEX_COMPILED
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED(q, k, v, block_mask=block_mask, enable_gqa=True)


_FLEX_COMPILED = None
