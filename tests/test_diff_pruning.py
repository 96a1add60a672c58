"""Diff pruning (minipeft/methods/diff_pruning.py) on the tiny seeded model: the five standard tests,
the hard-concrete mask and expected L0 by hand, the penalty through train_step, the final magnitude
cut to a sparse_ft adapter, and the llama-3.2-1b count."""

import math

import pytest
import torch

from minipeft import peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.finetune import train_step
from minipeft.llama import Llama, LlamaConfig
from minipeft.methods import diff_pruning, sparse_ft
from helpers import assert_cached_decoding_equals_full_forward, assert_merge_is_exact, tiny

HYPER = dict(targets=("q_proj", "down_proj"))
IDX = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))
CPU = torch.device("cpu")


def mods(m):
    return [x for x in m.modules() if isinstance(x, diff_pruning.DiffPruneLinear)]


def adapted(seed=0, **hyper):
    m = tiny(seed)
    apply_method(m, "diff_pruning", **{**HYPER, **hyper})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for x in mods(m):
            x.diff.copy_(torch.randn(x.diff.shape, generator=g) * 0.02)
            x.log_alpha.copy_(torch.randn(x.log_alpha.shape, generator=g) * 2)
    return m


def test_identity_at_init_in_train_and_eval_mode():
    m = tiny()
    ref = m(IDX)
    apply_method(m, "diff_pruning", **HYPER)
    assert torch.equal(m(IDX), ref) and torch.equal(m.train()(IDX), ref)
    assert torch.all(mods(m)[0].eval().mask() == 1)  # init_log_alpha 3: deterministic masks open


def test_gradients_only_on_diff_and_log_alpha():
    m = adapted().train()
    assert {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad} == {"diff", "log_alpha"}
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(peft.param_groups(m, 1e-2, weight_decay=0.1))
    m(IDX[:, :-1], IDX[:, 1:])[1].backward()
    assert all((p.grad is not None) == p.requires_grad for p in m.parameters())
    opt.step()
    assert all(torch.equal(dict(m.named_parameters())[n], t) for n, t in frozen.items())


def test_hard_concrete_mask_and_expected_l0_by_hand():
    m = adapted()
    x = mods(m)[0]
    la = x.log_alpha.detach()
    torch.testing.assert_close(x.eval().mask(), (torch.sigmoid(la) * 1.2 - 0.1).clamp(0, 1))
    torch.manual_seed(3)
    sample = x.train().mask()
    torch.manual_seed(3)
    u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
    torch.testing.assert_close(sample, (torch.sigmoid((u.log() - (1 - u).log() + la) / (2 / 3)) * 1.2 - 0.1).clamp(0, 1))
    assert (sample == 0).any() and (sample == 1).any()  # hard zeros and ones: the "hard" in hard-concrete
    torch.testing.assert_close(x.expected_l0(), torch.sigmoid(la - 2 / 3 * math.log(0.1 / 1.1)).sum())
    (term,) = m.peft_extra_losses
    total = sum(y.diff.numel() for y in mods(m))
    torch.testing.assert_close(term(m, m, None, None), sum(y.expected_l0() for y in mods(m)) / total)


def test_l0_penalty_closes_masks_through_train_step():
    m = tiny().train()
    apply_method(m, "diff_pruning", **HYPER, l0_weight=50.0, init_log_alpha=0.0)
    opt = torch.optim.AdamW(peft.param_groups(m, 5e-2))
    batch = (IDX[:, :-1], IDX[:, 1:], torch.ones_like(IDX[:, :-1]))
    before = sum(x.expected_l0() for x in mods(m)).item()
    for step in range(1, 21):
        train_step(m, m, opt, [batch], 1.0, CPU, step=step)
    assert sum(x.expected_l0() for x in mods(m)).item() < 0.8 * before


def test_merge_equivalence_in_eval_mode():
    m = adapted()
    assert_merge_is_exact(m, IDX)


def test_cached_decoding_equals_full_forward():
    assert_cached_decoding_equals_full_forward(adapted(), IDX)


def test_save_load_roundtrip_and_wrong_base(tmp_path):
    m = adapted()
    out = m(IDX)
    save_adapter(m, tmp_path)
    fresh = load_adapter(tiny(), tmp_path)
    assert torch.equal(fresh(IDX), out) and fresh.peft_configs == m.peft_configs
    with pytest.raises(ValueError, match="n_layers: adapter 2 vs model 3"):
        load_adapter(tiny(n_layers=3), tmp_path)


def test_finalize_keeps_the_largest_diffs_as_a_sparse_adapter(tmp_path):
    m = adapted()
    deltas = {n: x.eval().delta_weight().detach() for n, x in m.named_modules() if isinstance(x, diff_pruning.DiffPruneLinear)}
    expected = tiny()
    with torch.no_grad():
        for n, d in deltas.items():
            k = round(0.1 * d.numel())
            keep = d.abs().flatten().topk(k).indices
            expected.get_submodule(n).weight.view(-1)[keep] += d.flatten()[keep]
    diff_pruning.finalize(m, 0.1)
    assert not mods(m) and len(sparse_ft.modules(m)) == 4 and not m.peft_extra_losses
    torch.testing.assert_close(m(IDX), expected(IDX), rtol=1e-5, atol=1e-5)
    assert peft.count_parameters(m)[0] == sum(round(0.1 * d.numel()) for d in deltas.values())
    save_adapter(m, tmp_path)
    assert torch.equal(load_adapter(tiny(), tmp_path)(IDX), m(IDX))


def test_parameter_counts_llama_1b_on_meta(capsys):
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    with torch.device("meta"):
        m = Llama(cfg)
    apply_method(m, "diff_pruning", targets=("q_proj", "v_proj"))
    assert peft.count_parameters(m)[0] == cfg.n_layers * 2 * (q * cfg.dim + kv * cfg.dim) == 167_772_160
    with capsys.disabled():
        print(f"\nllama-3.2-1b diff_pruning q_proj,v_proj (training; w and log alpha): "
              f"{peft.trainable_report(m).splitlines()[0]}")
