"""Attention fast paths (issue 18, point 2): right-padded unpacked batches take SDPA's is_causal path
(no mask) with the same loss and gradients; packed rows' document mask as a FlexAttention block mask
gives the dense mask's outputs, and falls back to the dense mask where FlexAttention is missing or a
slot adds prefix keys."""
from __future__ import annotations

import pytest
import torch

import minipeft.masks as masks
from helpers import tiny
from minipeft.adapters import apply_method
from minipeft.data import IGNORE, attention_segments, collate, encode_example, pack, synthetic_gsm8k
from minipeft.finetune import train_step
from minipeft.tokenizer import Tokenizer

HAS_FLEX = masks.create_block_mask is not None


def _examples(n: int = 6):
    tok = Tokenizer.byte_level()
    return [encode_example(tok, ex, max_len=120) for ex in synthetic_gsm8k(n)]


def test_attention_segments_drops_the_mask_only_for_right_padded_unpacked_rows():
    enc = _examples()
    idx, targets, seg = collate(enc)
    assert (seg == 0).any() and attention_segments(targets, seg) is None  # padded, one example a row
    idx, targets, seg = pack(enc, 400)
    assert seg.max() > 1 and attention_segments(targets, seg) is seg        # packed: keep the ids
    idx, targets, seg = collate(enc)
    targets[seg == 0] = 5                                                   # a pad that carries loss
    assert attention_segments(targets, seg) is seg
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])                       # left padding: needs the mask
    assert attention_segments(torch.full_like(left, IGNORE), left) is left


def test_mask_free_right_padded_batch_gives_the_same_loss_and_gradients():
    idx, targets, seg = collate(_examples())
    losses, grads = [], []
    for segment_ids in (seg, None):
        m = tiny(seed=3).train()
        apply_method(m, "lora", targets="all-linear")
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # make the branch matter
        _, loss = m(idx, targets, segment_ids=segment_ids, return_logits=False)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_train_step_passes_no_mask_for_collated_rows_and_segments_for_packed_rows():
    m = tiny()
    apply_method(m, "lora")
    seen = []

    def forward(idx, targets, segment_ids=None, return_logits=False):
        seen.append(segment_ids)
        return m(idx, targets, segment_ids=segment_ids, return_logits=return_logits)

    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    enc = _examples()
    train_step(m, forward, opt, [collate(enc)], 1.0, torch.device("cpu"))
    train_step(m, forward, opt, [pack(enc, 400)], 1.0, torch.device("cpu"))
    assert seen[0] is None and seen[1] is not None and seen[1].max() > 1


def _packed_batch():
    seg = torch.tensor([[1] * 7 + [2] * 9 + [3] * 4 + [0] * 3, [1] * 13 + [2] * 10])
    torch.manual_seed(1)
    return torch.randint(0, 512, seg.shape), seg


@pytest.mark.skipif(not HAS_FLEX, reason="this torch has no FlexAttention")
def test_flex_document_mask_equals_the_dense_mask():
    idx, seg = _packed_batch()
    m = tiny(seed=2)
    m.attention_kernel = "dense"
    dense = m(idx, segment_ids=seg)
    m.attention_kernel = "flex"
    assert m.document_mask(seg).dtype == torch.bool  # CPU with gradients: no FlexAttention backward there
    with torch.no_grad():
        assert isinstance(m.document_mask(seg), masks.BlockMask)
        flex = m(idx, segment_ids=seg)
    real = seg != 0
    torch.testing.assert_close(flex[real], dense[real], atol=1e-5, rtol=1e-5)


def test_document_mask_falls_back_to_the_dense_mask(monkeypatch):
    idx, seg = _packed_batch()
    m = tiny(seed=2)
    m.attention_kernel = "dense"
    want = m(idx, segment_ids=seg)
    m.attention_kernel = "auto"  # on CPU: dense (eager FlexAttention has no backward on CPU)
    assert m.document_mask(seg).dtype == torch.bool
    m.attention_kernel = "flex"
    monkeypatch.setattr(masks, "create_block_mask", None)  # an older torch without FlexAttention
    with torch.no_grad():
        assert m.document_mask(seg).dtype == torch.bool
        torch.testing.assert_close(m(idx, segment_ids=seg), want.detach())
    monkeypatch.undo()
    apply_method(m, "prefix_tuning", prefix_len=3)  # prefix keys are not in a block mask: dense
    with torch.no_grad():
        assert m.document_mask(seg).dtype == torch.bool
    m.attention_kernel = "sparse"
    with pytest.raises(ValueError, match="attention_kernel"):
        m.document_mask(seg)


@pytest.mark.gpu
def test_flex_training_step_equals_dense_on_cuda():
    """On CUDA `auto` takes the compiled FlexAttention path: same loss and LoRA gradients as dense."""
    idx, seg = _packed_batch()
    idx, seg, dev = idx.cuda(), seg.cuda(), torch.device("cuda")
    targets = torch.where(seg != 0, torch.roll(idx, -1, 1), IGNORE)
    out = []
    for kernel in ("dense", "flex"):
        m = tiny(seed=2).to(dev).train()
        m.attention_kernel = kernel
        apply_method(m, "lora", targets="all-linear")
        _, loss = m(idx, targets, segment_ids=seg, return_logits=False)
        loss.backward()
        out.append((loss.detach(), [p.grad for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-4, rtol=1e-4)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_the_torch_floor_is_the_release_that_added_sdpa_enable_gqa():
    """pyproject's floor: torch 2.5 added `enable_gqa` to SDPA, which every attention call passes;
    FlexAttention (also 2.5) is optional (the dense fallback above). Not run here on 2.5 itself: this
    machine has only torch 2.13 (README, Performance)."""
    import re
    from pathlib import Path
    import torch.nn.functional as F
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"torch>=([\d.]+)"', text).group(1) == "2.5"
    assert "enable_gqa" in F.scaled_dot_product_attention.__doc__
