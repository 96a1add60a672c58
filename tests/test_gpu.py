"""The `gpu` checks (issue 18, point 1): run by `make gpu-check` (scripts/gpu_check.py) on CUDA with the
llama-3.2-1b preset (random weights), and by its `--device cpu --quick` path on the tiny preset, so the
code cannot rot without a GPU. Never part of `make test` (the `gpu` marker is deselected there).

    MINIPEFT_GPU_DEVICE=cuda MINIPEFT_GPU_PRESET=llama-3.2-1b python -m pytest -m gpu tests/test_gpu.py
"""
from __future__ import annotations

import os

import pytest
import torch

from minipeft.adapters import METHODS, apply_method
from minipeft.llama import Llama, LlamaConfig
from minipeft.peft import param_groups

DEVICE = os.environ.get("MINIPEFT_GPU_DEVICE", "cuda")
PRESET = os.environ.get("MINIPEFT_GPU_PRESET", "llama-3.2-1b")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")]


def model(dtype: torch.dtype = torch.float32, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        return Llama(LlamaConfig.from_name(PRESET)).to(dtype).eval()


def tokens(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, shape, generator=g).to(DEVICE)  # < every preset's vocabulary


@pytest.fixture(scope="module")
def fp32_model() -> Llama:
    return model(torch.float32)


def test_bf16_autocast_forward_is_close_to_fp32(fp32_model):
    idx = tokens((2, 64))
    with torch.no_grad():
        ref = fp32_model(idx)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            low = fp32_model(idx)
    err = ((low.float() - ref).norm() / ref.norm()).item()
    print(f"bf16 autocast vs fp32 logits: relative error {err:.2e}")
    assert err < 5e-2  # bf16 rounding through every layer of a random-weight model


def test_kv_cache_generation_equals_full_forward(fp32_model):
    m, idx = fp32_model, tokens((2, 24))
    with torch.no_grad():
        full = m(idx)
        m.setup_kv_cache(2, 32)
        steps = [m(idx[:, :16], cache_start=0)] + [m(idx[:, t:t + 1], cache_start=t) for t in range(16, 24)]
        m.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-3, rtol=2e-3)
    prompt = idx[0, :10].tolist()
    generated = m.generate([prompt], max_new_tokens=6)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # greedy without the cache
            seq.append(int(m(torch.tensor([seq], device=DEVICE))[0, -1].argmax()))
    assert generated == seq[len(prompt):]


def test_generate_on_a_ragged_batch_equals_one_prompt_at_a_time(fp32_model):
    idx = tokens((3, 12), seed=5)
    prompts = [idx[0, :3].tolist(), idx[1, :12].tolist(), idx[2, :7].tolist()]
    together = fp32_model.generate(prompts, max_new_tokens=8)
    alone = [fp32_model.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert together == alone and all(len(t) == 8 for t in together)


@pytest.mark.parametrize("method", list(METHODS))
def test_one_training_step_of_every_method(method):
    """bf16 base (as training runs on CUDA), fp32 trainable tensors, autocast: no NaN, the adapters get
    gradients, and the frozen base is bit-for-bit unchanged after the optimiser step."""
    m = model(torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    apply_method(m, method)
    for p in m.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    m.train()
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    trained = {n: p for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(param_groups(m, 1e-3), lr=1e-3)
    idx = tokens((2, 65))
    idx[:, 0] = m.config.vocab_size - 256  # <|begin_of_text|>, as every prompt starts: PaSTA trains only there
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        _, loss = m(idx[:, :-1], idx[:, 1:], return_logits=False)
    loss.backward()
    assert torch.isfinite(loss), method
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained.values()), method
    assert any(p.grad.abs().sum() > 0 for p in trained.values()), method
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen), method
    print(f"{method}: loss {loss.item():.3f}, {sum(p.numel() for p in trained.values()):,} trained")
