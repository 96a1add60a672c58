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


def _mask(model, seg):
    """The mask Llama.forward builds for packed rows (segment ids, no cache)."""
    return model.mask_and_positions(seg, seg, None, None)[0]


@pytest.mark.skipif(not HAS_FLEX, reason="this torch has no FlexAttention")
def test_flex_document_mask_equals_the_dense_mask():
    idx, seg = _packed_batch()
    m = tiny(seed=2)
    m.attention_kernel = "dense"
    dense = m(idx, segment_ids=seg)
    m.attention_kernel = "flex"
    assert _mask(m, seg).dtype == torch.bool  # CPU with gradients: no FlexAttention backward there
    with torch.no_grad():
        assert isinstance(_mask(m, seg), masks.BlockMask)
        flex = m(idx, segment_ids=seg)
    real = seg != 0
    torch.testing.assert_close(flex[real], dense[real], atol=1e-5, rtol=1e-5)


def test_document_mask_falls_back_to_the_dense_mask(monkeypatch):
    idx, seg = _packed_batch()
    m = tiny(seed=2)
    m.attention_kernel = "dense"
    want = m(idx, segment_ids=seg)
    m.attention_kernel = "auto"  # on CPU: dense (eager FlexAttention has no backward on CPU)
    assert _mask(m, seg).dtype == torch.bool
    m.attention_kernel = "flex"
    monkeypatch.setattr(masks, "create_block_mask", None)  # an older torch without FlexAttention
    with torch.no_grad():
        assert _mask(m, seg).dtype == torch.bool
        torch.testing.assert_close(m(idx, segment_ids=seg), want.detach())
    monkeypatch.undo()
    apply_method(m, "prefix_tuning", prefix_len=3)  # prefix keys are not in a block mask: dense
    with torch.no_grad():
        assert _mask(m, seg).dtype == torch.bool
    m.attention_kernel = "sparse"
    with pytest.raises(ValueError, match="attention_kernel"):
        _mask(m, seg)


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


def test_cuda_with_a_dense_mask_copies_the_kv_heads_out_and_that_branch_is_exact(monkeypatch):
    """On CUDA, SDPA with a dense mask and enable_gqa falls back to its math kernel: there (only there)
    `attend` copies each key/value head out to its query heads. The branch is chosen by device and mask;
    taken on CPU it gives the shared-heads result."""
    cuda, cpu, mask = torch.device("cuda"), torch.device("cpu"), torch.ones(1, 1, 5, 5, dtype=torch.bool)
    assert not masks.shares_kv_heads(mask, cuda)
    assert masks.shares_kv_heads(None, cuda) and masks.shares_kv_heads(mask, cpu)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    mask = masks.causal_mask(5, 5, cpu) & (torch.rand(2, 1, 5, 5, generator=g) > 0.3)
    mask[..., 0] = True  # every query sees at least one key
    shared = masks.attend(q, k, v, mask, [])
    seen = []
    real_sdpa = masks.F.scaled_dot_product_attention
    monkeypatch.setattr(masks, "shares_kv_heads", lambda mask, device: False)  # the CUDA branch, on CPU
    monkeypatch.setattr(masks.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((k.shape[1], kw["enable_gqa"])) or real_sdpa(q, k, v, **kw))
    torch.testing.assert_close(masks.attend(q, k, v, mask, []), shared)
    assert seen == [(4, False)]  # every query head got its own copy of its key/value head


def test_generate_prefill_asks_for_the_last_position_only():
    """The prompt's other positions' logits are never used: prefill runs norm and head on one position."""
    m = tiny(seed=1)
    rows = []
    m.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    out = m.generate(prompts, max_new_tokens=3)
    assert rows == [1, 1, 1]  # prefill and two decoding steps: (B, 1, dim) each
    idx = torch.tensor([prompts[0]])
    torch.testing.assert_close(m(idx, last_only=True)[:, -1], m(idx)[:, -1])
    greedy = m(torch.tensor([prompts[0] + out[0][:2]])).argmax(-1)[0, -3:]
    assert greedy.tolist() == out[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_and_rope_backward_written_out_equal_autograds(dtype):
    """_RMSNorm and _RoPE write their backward out (fewer bytes moved: bench/opstream.py): the same
    outputs and gradients as autograd through the formulas they replace (fp32 inside, HF's rounding
    order), an fp32 norm weight's gradient included; RoPE's also passes gradcheck in float64."""
    from minipeft.llama import _RMSNorm, _RoPE

    g = torch.Generator().manual_seed(0)
    ang = torch.arange(3.0)[None, :, None, None] * torch.linspace(0.1, 1, 8)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()  # (1, 3, 1, 16)
    x64 = torch.randn(2, 3, 4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _RoPE.apply(x, cos.double(), sin.double()), (x64,))

    def rms_reference(x, w):  # transformers' LlamaRMSNorm (with a weight in its own dtype)
        xf = x.float()
        return (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)).to(x.dtype)

    def rope_reference(x):  # llama.py's apply_rope before the written-out backward
        x1, x2 = x.chunk(2, dim=-1)
        return (x.float() * cos + torch.cat((-x2, x1), -1).float() * sin).to(x.dtype)

    x = torch.randn(2, 3, 4, 16, generator=g).to(dtype)
    w = 1 + 0.1 * torch.randn(16, generator=g)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for mine, ref, params in ((lambda x, w: _RMSNorm.apply(x, w, 1e-5), rms_reference, (x, w)),
                              (lambda x: _RoPE.apply(x, cos, sin), rope_reference, (x,))):
        results = []
        for fn in (mine, ref):
            ins = [p.detach().clone().requires_grad_() for p in params]
            out = fn(*ins)
            out.backward(dy)
            results.append((out.detach(), [i.grad for i in ins]))
        torch.testing.assert_close(results[0][0], results[1][0], **tol)
        for a, b in zip(results[0][1], results[1][1]):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.float(), b.float(), **tol)
