"""Sparse attention (issue 18, point 4): Child et al.'s strided and fixed patterns as LlamaConfig.attention.

The block-sparse kernel gives the dense masked reference's outputs and gradients; the pattern is the
paper's sets; causality; cached generation equals the full forward; LLaMA-Adapter v1/v2 and prefix
tuning train through it; no (T, T) tensor is ever built; dense attention is unchanged."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_cached_decoding_equals_full_forward, tiny
from minipeft import sparse_attention
from minipeft.adapters import apply_method
from minipeft.llama import LlamaConfig
from minipeft.masks import segment_positions
from minipeft.sparse_attention import SparseMask, block_sparse_attention, create_block_mask, describe

SHAPES = [(3, 12, 1), (4, 13, 2), (5, 23, 1), (4, 16, 4), (1, 7, 1), (8, 8, 3)]  # (l, T, c); T % l != 0 too


def paper_sets(kind: str, l: int, c: int, T: int) -> torch.Tensor:
    """(T, T) bool built from the paper's A1 u A2 (section 4), one position at a time."""
    out = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        if kind == "strided":
            S = set(range(max(0, i - l), i + 1)) | {j for j in range(i + 1) if (i - j) % l == 0}
        else:
            S = {j for j in range(i + 1) if j // l == i // l} | {j for j in range(i + 1) if j % l in range(l - c, l)}
        out[i, sorted(S)] = True
    return out


def _qkv(B=2, H=4, Hk=2, T=13, hd=8, P=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    return make(B, H, T, hd), make(B, Hk, T, hd), make(B, Hk, T, hd), make(B, Hk, P, hd), make(B, Hk, P, hd)


@pytest.mark.parametrize("kind", ["strided", "fixed"])
def test_pattern_is_the_papers_and_really_sparse(kind):
    for l, T, c in SHAPES:
        pos = torch.arange(T)[None]
        mask = SparseMask(kind, l, c, pos, pos).dense_mask()[0, 0]
        assert torch.equal(mask, paper_sets(kind, l, c, T)), (l, T, c)
    pos = torch.arange(40)[None]
    mask = SparseMask(kind, 5, 1, pos, pos).dense_mask()[0, 0]
    assert mask.sum() < 0.6 * torch.ones(40, 40).tril().sum()  # far from every causal pair


@pytest.mark.parametrize("kind", ["strided", "fixed"])
@pytest.mark.parametrize("packed,chunk", [(False, 1024), (True, 1024), (True, 7)])
def test_block_sparse_kernel_equals_the_dense_masked_reference(kind, packed, chunk, monkeypatch):
    """Outputs and gradients (float64) of q, k, v and prefix keys/values, GQA, T not a multiple of l,
    packed rows (segments, positions restarting per document), queries in one or in several
    checkpointed chunks."""
    monkeypatch.setattr(sparse_attention, "QUERY_CHUNK", chunk)
    for l, T, c in SHAPES:
        q, k, v, pk, pv = _qkv(T=T, P=2, seed=l * T)
        seg = torch.tensor([[1] * (T // 3) + [2] * (T - T // 3), [1] * T]) if packed else None
        pos = segment_positions(seg) if packed else torch.arange(T).expand(2, T)
        outs = []
        for kernel in ("gather", "dense"):
            y = SparseMask(kind, l, c, pos, pos, seg, seg, kernel).attend(q, k, v, [(pk, pv)])
            outs.append((y, torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum(),
                                                (q, k, v, pk, pv))))
        (y, grads), (y_ref, grads_ref) = outs
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gather_kernel_never_builds_a_T_by_T_tensor():
    """The point of the kernel: every tensor it makes holds fewer than T * T / 4 numbers per head
    (strided: T (2l + T/l), fixed: T (2l + cT/l)); a dense mask over full scores would hold T * T."""
    T, l, H = 512, 16, 2
    q, k, v, _, _ = _qkv(B=1, H=H, Hk=1, T=T, hd=4)
    for kind in ("strided", "fixed"):
        with LargestTensor() as seen:
            y = block_sparse_attention(q, k, v, kind, l, 1, torch.arange(T)[None])
            y.sum().backward()
        assert seen.numel < H * T * T / 4, (kind, seen.numel)
    with LargestTensor() as seen:  # the check itself can fail: the reference does build T x T
        SparseMask("strided", l, 1, torch.arange(T)[None], torch.arange(T)[None], kernel="dense").attend(q, k, v, [])
    assert seen.numel >= T * T


def test_backward_keeps_no_scores():
    """The chunks are checkpointed: what autograd keeps for backward is O(T) (inputs, gathered keys), not
    the T (2l + T/l) scores; without the checkpoint it would keep about 50 times more here."""
    T, l, H, hd = 512, 16, 2, 4
    q, k, v, _, _ = _qkv(B=1, H=H, Hk=1, T=T, hd=hd)
    for kind in ("strided", "fixed"):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            block_sparse_attention(q, k, v, kind, l, 1, torch.arange(T)[None])
        assert sum(kept) <= 4 * T * H * hd, (kind, sum(kept))


class LargestTensor(TorchDispatchMode):
    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("kind", ["strided", "fixed"])
def test_model_is_causal_and_cached_generation_equals_the_full_forward(kind):
    m = tiny(attention=kind, sparse_block=3, sparse_summary=1)
    idx = torch.randint(0, 512, (2, 12))
    out = m(idx)
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 512
    torch.testing.assert_close(m(changed)[:, :8], out[:, :8])   # the future does not leak
    assert not torch.allclose(out, tiny(attention="dense")(idx), atol=1e-4)  # the pattern is really used
    assert_cached_decoding_equals_full_forward(m, idx)           # incl. a ragged, left-padded generate


@pytest.mark.parametrize("kind", ["strided", "fixed"])
def test_left_padded_cached_decoding_gives_each_prompt_its_own_logits(kind):
    """generate's path, logit by logit: a left-padded prefill (segment ids, positions) and one-token
    steps through the cache equal each sequence's full forward alone."""
    m = tiny(attention=kind, sparse_block=3, sparse_summary=1)
    a, b = torch.randint(0, 512, (12,)), torch.randint(0, 512, (8,))
    idx, seg = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)
    idx[0], idx[1, 4:], seg[0], seg[1, 4:] = a[:6], b[:2], 1, 1
    pos = (seg.cumsum(1) - 1).clamp(min=0)
    m.setup_kv_cache(2, 12)
    steps = [m(idx, segment_ids=seg, positions=pos, cache_start=0)[:, -1]]
    for t in range(6):
        pos = pos[:, -1:] + 1
        steps.append(m(torch.stack([a[6 + t], b[2 + t]])[:, None], segment_ids=torch.ones(2, 1, dtype=torch.long),
                       positions=pos, cache_start=6 + t)[:, -1])
    m.clear_kv_cache()
    steps = torch.stack(steps, dim=1)  # (2, 7, vocab)
    torch.testing.assert_close(steps[0], m(a[None])[0, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps[1], m(b[None])[0, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["strided", "fixed"])
def test_a_packed_document_sees_the_pattern_it_sees_alone(kind):
    m = tiny(attention=kind, sparse_block=3, sparse_summary=1)
    a, b = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 10))
    packed = m(torch.cat([a, b], 1), segment_ids=torch.tensor([[1] * 7 + [2] * 10]))
    torch.testing.assert_close(packed[:, 7:], m(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,args", [("llama_adapter", dict(version=1, prompt_len=3)),
                                         ("llama_adapter", dict(version=2, prompt_len=3)),
                                         ("prefix_tuning", dict(prefix_len=3)),
                                         ("prompt_tuning", dict())])
def test_methods_train_with_the_sparse_kernel_as_with_the_reference(method, args):
    """A training step's loss and adapter gradients through the gather kernel equal those of the dense
    masked reference (prefix keys visible to every query; the adapter's gated softmax apart), on packed
    rows, and the trainable tensors get non-zero gradients."""
    idx = torch.randint(0, 512, (2, 21))
    seg = torch.tensor([[1] * 9 + [2] * 12, [1] * 21])
    results = []
    for kernel in ("gather", "dense"):
        m = tiny(attention="fixed", sparse_block=4, sparse_summary=1)
        torch.manual_seed(1)
        apply_method(m, method, **args)
        for name, p in m.named_parameters():  # move LLaMA-Adapter's zero gates off 0, so prompts matter
            if name.endswith("gate"):
                p.data.fill_(0.5)
        m.attention_kernel = kernel
        m.train()
        _, loss = m(idx[:, :-1], idx[:, 1:], segment_ids=seg[:, :-1])
        loss.backward()
        results.append((loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (loss, grads), (loss_ref, grads_ref) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-6)
        assert torch.isfinite(grads[n]).all()
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "prompt" in n or "prefix" in n)


def test_dense_is_unchanged_and_the_config_is_checked():
    m = tiny()
    idx = torch.randint(0, 512, (1, 9))
    mask, _ = m.mask_and_positions(idx, None, None, None)
    assert mask is None  # the dense default keeps SDPA's mask-free causal path
    sparse_mask, _ = tiny(attention="fixed").mask_and_positions(idx, None, None, None)
    assert sparse_mask.kernel == "gather"  # on CPU the model runs the block-sparse kernel, not a dense mask
    wide = tiny(attention="strided", sparse_block=16)  # l >= T: every causal pair allowed
    torch.testing.assert_close(wide(idx), m(idx), rtol=1e-5, atol=1e-6)
    assert m.config.fingerprint() == wide.config.fingerprint()  # adapters move between the two
    with pytest.raises(ValueError, match="attention must be"):
        LlamaConfig(attention="sparse")
    with pytest.raises(ValueError, match="sparse_summary 9 must be <= sparse_block 8"):
        LlamaConfig(attention="fixed", sparse_block=8, sparse_summary=9)


@pytest.mark.skipif(create_block_mask is None, reason="no FlexAttention in this torch")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_forward_equals_the_gather_kernel():
    """The CUDA path's block mask, run eagerly on CPU (forward only: no CPU backward in torch)."""
    T = 40
    q, k, v, pk, pv = (t.detach().float() for t in _qkv(T=T, P=2))
    seg = torch.tensor([[1] * 15 + [2] * 25, [1] * T])
    pos = segment_positions(seg)
    with torch.no_grad():
        for kind in ("strided", "fixed"):
            a = SparseMask(kind, 6, 2, pos, pos, seg, seg, "flex").attend(q, k, v, [(pk, pv)])
            b = SparseMask(kind, 6, 2, pos, pos, seg, seg, "gather").attend(q, k, v, [(pk, pv)])
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    m, idx = tiny(attention="fixed", sparse_block=4, sparse_summary=1), torch.randint(0, 512, (1, 19))
    apply_method(m, "prefix_tuning", prefix_len=2)
    with torch.no_grad():
        gathered = m(idx)
        m.attention_kernel = "flex"  # one block mask built, shared by both layers
        torch.testing.assert_close(m(idx), gathered, rtol=1e-5, atol=1e-5)
    assert "gather kernel" in describe("strided", 64, 8, torch.device("cpu"))


def test_finetune_flag_sets_the_pattern():
    from minipeft.runs import build_parser, check_config, config_from_args
    cfg = config_from_args(build_parser().parse_args(["--attention", "fixed", "--sparse-block", "32",
                                                      "--sparse-summary", "4"]))
    assert (cfg.attention, cfg.sparse_block, cfg.sparse_summary) == ("fixed", 32, 4)
    with pytest.raises(ValueError, match="c <= l"):
        check_config(dataclasses.replace(cfg, sparse_summary=33))
    check_config(dataclasses.replace(cfg, attention="strided", sparse_summary=33))  # c only matters to fixed


@pytest.mark.slow
def test_bench_script_runs():
    """scripts/bench_sparse_attention.py's step section on a short row (about 30 s: 4 fresh processes)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "bench_sparse_attention.py"), "--sections", "steps",
                          "--seq-len", "128", "--versions", "1", "--steps", "1", "--block", "16", "--json", "/dev/stdout"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out[out.index("\n[") + 1:])
    assert [r["variant"] for r in rows] == ["dense", "dense-math", "strided", "fixed"]
    assert all(r["step_s"] > 0 and r["peak_mib"] >= 0 for r in rows)
