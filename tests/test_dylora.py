"""DyLoRA (minipeft/methods/dylora.py) on the tiny seeded model: the five standard tests, the sampled
rank and its scaling, the frozen-mode gradients, rank nesting and truncate(), and the 1B count."""

import math

import pytest
import torch

from minipeft import peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.finetune import train_step
from minipeft.llama import Llama, LlamaConfig
from minipeft.methods import dylora
from helpers import assert_cached_decoding_equals_full_forward, assert_merge_is_exact, tiny

HYPER = dict(r=4, r_min=1, alpha=8.0, targets="all-linear")
IDX = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))
CPU = torch.device("cpu")


def mods(m):
    return [x for x in m.modules() if isinstance(x, dylora.DyLoRALinear)]


def adapted(seed=0, **hyper):
    m = tiny(seed)
    apply_method(m, "dylora", **{**HYPER, **hyper})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for x in mods(m):
            x.lora_B.copy_(torch.randn(x.lora_B.shape, generator=g) * 0.05)
    return m


def batch(idx=IDX):
    return idx[:, :-1], idx[:, 1:], torch.ones_like(idx[:, :-1])


def test_identity_at_init():
    m = tiny()
    ref = m(IDX)
    apply_method(m, "dylora", **HYPER)
    assert torch.equal(m(IDX), ref) and torch.equal(m.train()(IDX), ref)  # B = 0, in eval and training mode


@pytest.mark.parametrize("frozen", [True, False])
def test_gradients_only_on_a_b_and_frozen_mode_only_on_the_bth(frozen):
    m = adapted(frozen=frozen).train()
    names = {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B"}
    base = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    mods(m)[0].rank.b = 3
    opt = torch.optim.AdamW(peft.param_groups(m, 1e-2, weight_decay=0.1))
    m(IDX[:, :-1], IDX[:, 1:])[1].backward()
    for x in mods(m):
        rows = (x.lora_A.grad.abs().sum(1) > 0).tolist()
        cols = (x.lora_B.grad.abs().sum(0) > 0).tolist()
        assert rows == ([False, False, True, False] if frozen else [True, True, True, False])
        assert cols == rows
    opt.step()
    assert all(torch.equal(dict(m.named_parameters())[n], t) for n, t in base.items())


@pytest.mark.parametrize("frozen", [True, False])
def test_same_as_the_authors_code(frozen):
    """The forward of huawei-noah/Efficient-NLP DyLoRA/loralib/DyLoRA.py (commit 278c345d), rewritten:
    each factor cut to b = current_rank + 1 and multiplied by sqrt(r / b), the first b-1 rows of A
    (columns of B) detached when frozen, the product scaled by LoRA's alpha / r. Same output and the same
    gradients as ours in training mode, for every b."""
    m = adapted(frozen=frozen).train()
    x = mods(m)[1]
    r, alpha = 4, 8.0
    inp = torch.randn(3, x.base.in_features, generator=torch.Generator().manual_seed(2))

    def official_dynamic(inputs, rank):  # inputs (rows, r): rank = b - 1, the column that trains
        if frozen:
            inputs = torch.cat([inputs[:, :rank].detach(), inputs[:, rank:rank + 1]], dim=-1)
        else:
            inputs = inputs[:, :rank + 1]
        return inputs * math.sqrt(r / (rank + 1))

    for b in range(1, r + 1):
        x.rank.b = b
        ours = x(inp)
        (g_A, g_B) = torch.autograd.grad(ours.square().sum(), (x.lora_A, x.lora_B))
        A, B = official_dynamic(x.lora_A.T, b - 1).T, official_dynamic(x.lora_B, b - 1)
        theirs = x.base(inp) + inp @ A.T @ B.T * (alpha / r)
        (t_A, t_B) = torch.autograd.grad(theirs.square().sum(), (x.lora_A, x.lora_B))
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(g_A, t_A)
        torch.testing.assert_close(g_B, t_B)


def test_rank_b_update_by_hand_and_the_sampled_rank():
    m = adapted()
    x = mods(m)[2]
    inp = torch.randn(3, x.base.in_features)
    for b in range(1, 5):
        x.rank.b = b
        expected = x.base(inp) + 8.0 / b * inp @ x.lora_A[:b].T @ x.lora_B[:, :b].T
        torch.testing.assert_close(x.train()(inp), expected)
    torch.testing.assert_close(x.eval()(inp), x.base(inp) + 2.0 * inp @ x.lora_A.T @ x.lora_B.T)  # eval: r_max
    seen = set()
    for _ in range(60):  # the step hook draws b uniformly in r_min..r
        peft.run_step_hooks(m)
        seen.add(x.rank.b)
    assert seen == {1, 2, 3, 4}
    assert len({id(y.rank) for y in mods(m)}) == 1  # one b for the whole model


def test_merge_equivalence_at_the_eval_rank():
    m = adapted(eval_rank=3)
    assert_merge_is_exact(m, IDX)


def test_cached_decoding_equals_full_forward():
    assert_cached_decoding_equals_full_forward(adapted(), IDX)


def test_save_load_roundtrip_and_wrong_base(tmp_path):
    m = adapted(eval_rank=2, frozen=False)
    out = m(IDX)
    save_adapter(m, tmp_path)
    fresh = load_adapter(tiny(), tmp_path)
    assert torch.equal(fresh(IDX), out) and fresh.peft_configs == m.peft_configs
    with pytest.raises(ValueError, match="n_layers: adapter 2 vs model 3"):
        load_adapter(tiny(n_layers=3), tmp_path)


def test_truncate_nests_and_saves_the_smaller_adapter(tmp_path):
    """truncate(model, b) gives the logits of eval_rank = b with b (in + out) parameters per target,
    and the truncated adapter saves and loads."""
    full = adapted()
    n_full = peft.count_parameters(full)[0]
    for b in (1, 3):
        ref = adapted(eval_rank=b)(IDX)
        small = dylora.truncate(adapted(), b)
        assert torch.equal(small(IDX), ref)
        assert peft.count_parameters(small)[0] == n_full * b // 4
    save_adapter(small, tmp_path)
    assert torch.equal(load_adapter(tiny(), tmp_path)(IDX), small(IDX))
    with pytest.raises(ValueError, match="1 <= b <= r"):
        dylora.truncate(small, 4)


def test_training_serves_every_rank():
    """The paper's claim in kind: after 40 DyLoRA steps (non-frozen) on one batch, the adapter cut to
    every rank b in 1..4 has a clearly lower loss than the base model."""
    data = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(11))
    m = tiny().train()
    base_loss = m(data[:, :-1], data[:, 1:])[1].item()
    apply_method(m, "dylora", **HYPER, frozen=False)
    opt = torch.optim.AdamW(peft.param_groups(m, 5e-3))
    torch.manual_seed(0)
    for step in range(1, 41):
        train_step(m, m, opt, [batch(data)], 1.0, CPU, step=step)
    losses = [dylora.truncate(m, b).eval()(data[:, :-1], data[:, 1:])[1].item() for b in (4, 3, 2, 1)]
    assert all(loss < base_loss - 0.3 for loss in losses), (base_loss, losses)


def test_fixed_rank_non_frozen_is_lora():
    """r_min = r and frozen=False: DyLoRA is LoRA with alpha / r, step for step."""
    a, b = tiny().train(), tiny().train()
    apply_method(a, "lora", r=4, alpha=8.0, targets=("q_proj", "down_proj"))
    apply_method(b, "dylora", r=4, r_min=4, alpha=8.0, targets=("q_proj", "down_proj"), frozen=False)
    b.load_state_dict(a.state_dict())
    opts = [torch.optim.AdamW(peft.param_groups(x, 1e-2)) for x in (a, b)]
    for step in range(1, 4):
        for x, opt in zip((a, b), opts):
            train_step(x, x, opt, [batch()], 1.0, CPU, step=step)
    torch.testing.assert_close(b(IDX), a(IDX), rtol=1e-5, atol=1e-5)


def test_parameter_counts_llama_1b_on_meta(capsys):
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    with torch.device("meta"):
        m = Llama(cfg)
    apply_method(m, "dylora", r=8, targets=("q_proj", "v_proj"))
    assert peft.count_parameters(m)[0] == cfg.n_layers * 8 * (cfg.dim + q + cfg.dim + kv) == 851_968  # as LoRA r=8
    with capsys.disabled():
        print(f"\nllama-3.2-1b dylora r=1..8 q_proj,v_proj: {peft.trainable_report(m).splitlines()[0]}")
