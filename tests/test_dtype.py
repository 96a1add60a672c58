"""Issue 12, section 4 (and the targets-is-idx trap of section 5): every method runs on a plain bf16
model without autocast; cached decoding without `positions` continues each segment's positions;
DoRA's magnitude joins LoRA+'s boosted group as in PEFT."""
import pytest
import torch

from minipeft import Tokenizer, apply_method, param_groups
from minipeft.data import encode_example
from minipeft.scoring import bits_per_token
from minipeft.llama import IGNORE_INDEX, RMSNorm
from minipeft.methods import METHODS
from helpers import tiny

IDX = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(4))

SMALL = dict(prefix_tuning=dict(prefix_len=2), prompt_tuning=dict(prompt_len=2),
             llama_adapter=dict(prompt_len=2, version=2), tied_lora_extra=dict(r1=4, r2=4))


def test_rmsnorm_output_follows_its_input_dtype():
    norm = RMSNorm(8)  # an fp32 weight: the master weight of a trainable norm
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (norm.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True)
                                                                   + norm.eps)).to(x.dtype)).to(x.dtype))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_in_plain_bf16(name):
    """Forward, generate and the evaluation loss on a bf16 base, no autocast; trainable tensors as
    fp32 master weights (as finetune keeps them), which broke LLaMA-Adapter v2's norms before."""
    m = apply_method(tiny().to(torch.bfloat16), name, **SMALL.get(name, {}))
    for p in m.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    logits = m(IDX)
    # `full` trains every weight, so its fp32 master weights make the whole model fp32
    assert logits.dtype == (torch.float32 if name == "full" else torch.bfloat16) and logits.isfinite().all()
    out = m.generate([IDX[0, :5].tolist(), IDX[1, :3].tolist()], max_new_tokens=3)
    assert [len(o) for o in out] == [3, 3]
    targets = IDX[:, 1:].clone()
    targets[:, :4] = IGNORE_INDEX
    with torch.no_grad():
        _, loss = m(IDX[:, :-1], targets, return_logits=False)
    assert loss.isfinite()
    tok = Tokenizer.byte_level()  # the evaluation's own loss path (plain on CPU: no autocast)
    examples = [encode_example(tok, dict(question="1 + 2?", answer="3\n#### 3")),
                encode_example(tok, dict(question="10 + 20?", answer="30\n#### 30"))]
    assert 0 < bits_per_token(m, examples, pad_id=tok.pad_id) < 100
    m.train()
    _, loss = m(IDX[:, :-1], targets, return_logits=False)
    loss.backward()
    assert any(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_cached_decoding_without_positions_continues_each_segment():
    """Issue 12: every decoded token used to get position 0 (0.82 rel off the full forward)."""
    m = tiny()
    seg = torch.ones_like(IDX)
    seg[0, :3] = 0  # row 0: three padding tokens on the left, its own segment
    full = m(IDX, segment_ids=seg)
    m.setup_kv_cache(2, 16)
    steps = [m(IDX[:, :6], segment_ids=seg[:, :6], cache_start=0)]
    steps += [m(IDX[:, t:t + 1], segment_ids=seg[:, t:t + 1], cache_start=t) for t in range(6, 12)]
    m.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dora", "simple_dora"])
def test_loraplus_boosts_the_magnitude_as_peft_does(name):
    """PEFT's create_loraplus_optimizer puts every 1-D trainable tensor (DoRA's magnitude) in its
    B group at lr * loraplus_lr_ratio."""
    m = apply_method(tiny(), name, loraplus_ratio=16.0)
    groups = {g["lr_scale"]: {id(p) for p in g["params"]} for g in param_groups(m, lr=1e-3)}
    q = m.layers[0].self_attn.q_proj
    assert {id(q.lora_B), id(q.magnitude)} <= groups[16.0]
    assert id(q.lora_A) in groups[1.0]


def test_targets_that_are_idx_itself_raise():
    m = tiny()
    with pytest.raises(ValueError, match=r"idx\[:, :-1\], idx\[:, 1:\]"):
        m(IDX, IDX)
    _, loss = m(IDX[:, :-1], IDX[:, 1:])  # the explicit convention still works
    assert loss.isfinite()
