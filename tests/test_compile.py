"""torch.compile for training (`finetune --compile`). The RoPE frequencies are a buffer made with the
model, fp32 whatever the weights' dtype, so a compiled forward meets no attribute set on first use (it
used to trace twice at the same length); the chunked loss runs outside the graph (its Python loop over
chunks would pin the batch's shape), and finetune compiles with dynamic shapes: over an epoch of
right-padded batches of many lengths the forward is traced once, and every step's compiled loss equals
the eager model's on the same weights."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import tiny
from minipeft import finetune
from minipeft.llama import Llama, rope_frequencies
from minipeft.runs import TrainConfig


def test_rope_frequencies_are_made_with_the_model_and_stay_fp32(tmp_path):
    m = tiny()
    want = rope_frequencies(m.config)
    assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, want)
    assert "inv_freq" not in m.state_dict()  # computed from the config, never saved
    m.to(torch.bfloat16)
    assert m.embed_tokens.weight.dtype == torch.bfloat16 and torch.equal(m.inv_freq, want)
    with torch.device("meta"):
        skeleton = Llama(m.config)
    assert torch.equal(skeleton.to_empty(device="cpu").inv_freq, want)  # not left uninitialised
    m.save_pretrained(tmp_path)
    loaded = Llama.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.inv_freq.device.type == "cpu" and torch.equal(loaded.inv_freq, want)


@pytest.mark.slow
def test_an_epoch_of_the_toy_task_compiles_once_and_matches_eager(tmp_path, monkeypatch):
    """finetune.train with compile=True on the toy task (random `tiny` weights, 20 examples in batches
    of 4 of different lengths): one traced graph, and each step's loss equal to eager's to 1e-5.
    About a minute, most of it Inductor compiling the forward and backward once."""
    real_compile, steps = torch.compile, []

    def spy(module, **kwargs):  # finetune's own torch.compile call, checked against eager at every step
        compiled = real_compile(module, **kwargs)

        def forward(idx, targets, **kw):
            out = compiled(idx, targets, **kw)
            with torch.no_grad():
                steps.append((tuple(idx.shape), out[1].detach(), module(idx, targets, **kw)[1]))
            return out
        return forward

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    counters.clear()
    cfg = TrainConfig(preset="tiny", compile=True, limit=20, batch_size=4, max_len=256, lr=1e-2, baseline=False,
                      eval_limit=2, eval_batch_size=2, max_new_tokens=2, device="cpu", out=str(tmp_path / "run"))
    finetune.train(cfg, progress=False)
    assert len(steps) == 5 and len({shape for shape, _, _ in steps}) >= 3, steps  # several lengths
    for shape, compiled, eager in steps:
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5, msg=f"batch {shape}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
