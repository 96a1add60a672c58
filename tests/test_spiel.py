"""SpIEL (minipeft/methods/spiel.py) on the tiny seeded model: the five standard tests, k fixed across
swaps, the drop and both growth criteria by hand, the dense gradient the observer sees, the AdamW
moments of new entries, the schedule, and the llama-3.2-1b count."""

import pytest
import torch

from minipeft import peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.finetune import train_step
from minipeft.llama import Llama, LlamaConfig
from minipeft.methods import spiel
from helpers import assert_cached_decoding_equals_full_forward, assert_merge_is_exact, tiny

HYPER = dict(density=0.05, targets="all-linear", every=4, accumulate=2, total_steps=40)
IDX = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))
DATA = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(11))
CPU = torch.device("cpu")


def mods(m):
    return [x for x in m.modules() if isinstance(x, spiel.SpIELLinear)]


def adapted(seed=0, **hyper):
    m = tiny(seed)
    apply_method(m, "spiel", **{**HYPER, **hyper})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for x in mods(m):
            x.values.copy_(torch.randn(x.values.shape, generator=g) * 0.05)
    return m


def train(m, steps, lr=1e-2):
    opt = torch.optim.AdamW(peft.param_groups(m, lr))
    batch = (DATA[:, :-1], DATA[:, 1:], torch.ones_like(DATA[:, :-1]))
    for step in range(1, steps + 1):
        train_step(m, m, opt, [batch], 1.0, CPU, step=step)
    return opt


@pytest.mark.parametrize("growth", spiel.GROWTH)
def test_identity_at_init_and_k(growth):
    m = tiny()
    ref = m(IDX)
    apply_method(m, "spiel", **HYPER, growth=growth)
    assert torch.equal(m(IDX), ref)
    q = m.layers[0].self_attn.q_proj
    assert len(q.values) == round(0.05 * 64 * 64) == len(q.indices.unique())


@pytest.mark.parametrize("growth", spiel.GROWTH)
def test_k_fixed_across_swaps_base_untouched_and_loss_falls(growth):
    """7 steps with S = 4, γ = 2 (reselections at 2 and 6): η changes, every module keeps k unique,
    sorted entries, only φ ever has a gradient, the base weights stay bit-identical, the loss falls."""
    m = tiny().train()
    apply_method(m, "spiel", **HYPER, growth=growth)
    assert {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad} == {"values"}
    base = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    start = [x.indices.clone() for x in mods(m)]
    loss0 = m(DATA[:, :-1], DATA[:, 1:])[1].item()
    train(m, 7, lr=3e-2)
    assert all(torch.equal(dict(m.named_parameters())[n], t) for n, t in base.items())
    for x, s in zip(mods(m), start):
        assert len(x.indices) == len(s) == len(x.indices.unique()) and torch.all(x.indices.diff() > 0)
    assert sum((~torch.isin(x.indices, s)).sum().item() for x, s in zip(mods(m), start)) > 0  # η moved
    assert m(DATA[:, :-1], DATA[:, 1:])[1].item() < loss0 - 0.3


def test_merge_is_exact():
    assert_merge_is_exact(adapted(), IDX)


def test_cached_decoding_equals_full_forward():
    assert_cached_decoding_equals_full_forward(adapted(growth="momentum"), IDX)


def test_save_load_roundtrip_after_swaps_and_wrong_base(tmp_path):
    m = tiny().train()
    apply_method(m, "spiel", **HYPER)
    train(m, 3)  # the full reselection at step 2 moved η
    m.eval()
    out = m(IDX)
    save_adapter(m, tmp_path)
    fresh = load_adapter(tiny(), tmp_path)  # apply() draws a random η: the saved one replaces it
    assert torch.equal(fresh(IDX), out)
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(mods(fresh), mods(m)))
    with pytest.raises(ValueError, match="n_layers: adapter 2 vs model 3"):
        load_adapter(tiny(n_layers=3), tmp_path)


def test_gradient_growth_by_hand_drop_smallest_and_function_unchanged():
    """Hand-made φ and two hand-made dense gradients: the drop takes the n smallest |φ|, the growth the
    candidates (top-k |g1|) with the largest |g1 + g2| outside the staying entries, at φ = 0; the
    update after the swap is the old one without the dropped entries."""
    m = adapted()
    x = m.layers[1].self_attn.v_proj
    k, n = len(x.values), 20
    with torch.no_grad():
        x.values.copy_(torch.linspace(-1, 1, k)[torch.randperm(k, generator=torch.Generator().manual_seed(0))])
    gen = torch.Generator().manual_seed(1)
    g1, g2 = (torch.randn(x.base.weight.shape, generator=gen) for _ in range(2))
    spiel._accumulate(x, g1)
    spiel._accumulate(x, g2)
    smallest = x.indices[x.values.abs().topk(n, largest=False).indices]
    before = x.delta_weight().flatten()
    old = x.indices.clone()
    assert spiel.swap(x, n) == n
    cand = g1.flatten().abs().topk(k).indices
    cand = cand[~torch.isin(cand, old[~torch.isin(old, smallest)])]
    grown = cand[(g1 + g2).flatten()[cand].abs().topk(n).indices]
    assert torch.equal(x.indices, torch.cat([old[~torch.isin(old, smallest)], grown]).sort().values)
    assert torch.all(x.values[torch.isin(x.indices, grown)] == 0)
    before[smallest] = 0
    assert torch.equal(x.delta_weight().flatten(), before)  # growth at φ = 0 changes nothing


def test_momentum_growth_and_sm3_accumulators_by_hand():
    m = adapted(growth="momentum", chunk=100)  # blocks of 1 row: the block loop is exercised
    x = m.layers[0].mlp.up_proj
    out_f, in_f = x.base.weight.shape
    grad = torch.randn(len(x.values))
    x.values.grad = grad.clone()
    rows, cols = x.indices // in_f, x.indices % in_f
    spiel._feed_sm3(x)
    row, col = torch.zeros(out_f), torch.zeros(in_f)
    for r, c, g in zip(rows.tolist(), cols.tolist(), grad.tolist()):
        row[r], col[c] = max(row[r], g * g), max(col[c], g * g)  # from zero accumulators: ν = g²
    assert torch.allclose(x.row_acc, row) and torch.allclose(x.col_acc, col)
    with torch.no_grad():
        x.row_acc.copy_(torch.rand(out_f))
        x.col_acc.copy_(torch.rand(in_f))
    score = torch.outer(x.row_acc, x.col_acc).flatten()
    score[x.indices] = -1
    old, n = x.indices.clone(), 15
    dropped = old[x.values.abs().topk(n, largest=False).indices]
    spiel.swap(x, n)
    assert torch.equal(x.indices, torch.cat([old[~torch.isin(old, dropped)], score.topk(n).indices]).sort().values)


def test_observer_sees_the_dense_gradient():
    """The AG observer gets dL/dW' of the module, as dense autograd computes it."""
    m = adapted()
    q = m.layers[0].self_attn.k_proj
    seen = []
    q.dense_grad_observer = seen.append
    x = torch.randn(2, 5, q.base.in_features)
    gy = torch.randn(2, 5, q.base.out_features)
    q(x).backward(gy)
    w = (q.base.weight + q.delta_weight()).detach().requires_grad_(True)
    (x @ w.T).backward(gy)
    torch.testing.assert_close(seen[0], w.grad)


@pytest.mark.parametrize("growth", spiel.GROWTH)
def test_adamw_moments_of_new_entries_reset(growth):
    """After the swap at step 2 (found through torch's optimiser hook): each kept entry still has its
    moments (moved with the re-sort); each new one has the candidates' mean g, mean g² (AG) or 0 (MA)."""
    m = tiny().train()
    apply_method(m, "spiel", **HYPER, growth=growth)
    x = mods(m)[3]
    seen = []
    if growth == "gradient":  # the hook's own observer, and a copy of each dense gradient for the check
        x.dense_grad_observer = lambda g: (seen.append(g), spiel._accumulate(x, g))
    opt = train(m, 1)
    before = set(x.indices.tolist())
    batch = (DATA[:, :-1], DATA[:, 1:], torch.ones_like(DATA[:, :-1]))
    train_step(m, m, opt, [batch], 1.0, CPU, step=2)  # the AdamW step, then the full reselection
    assert x.values.spiel_reselection.optimizer() is opt
    new = ~torch.isin(x.indices, torch.tensor(sorted(before)))
    assert new.sum() > 0 and torch.all(x.values[new] == 0)
    state = opt.state[x.values]
    for i, slot in zip(x.indices.tolist(), range(len(x.indices))):
        if i in before:  # kept entries: test_moments_follow_the_sort
            continue
        if growth == "gradient":  # the candidates' gradients over steps 1 and 2
            g = torch.stack([s.flatten()[i] for s in seen])
            assert len(seen) == 2
            torch.testing.assert_close(state["exp_avg"][slot], g.mean())
            torch.testing.assert_close(state["exp_avg_sq"][slot], g.square().mean())
        else:
            assert state["exp_avg"][slot] == 0 and state["exp_avg_sq"][slot] == 0


def test_moments_follow_the_sort():
    """A kept entry's AdamW moments move with it when η is re-sorted after the swap."""
    m = adapted(growth="momentum")
    x = mods(m)[0]
    opt = torch.optim.AdamW([x.values], lr=0.0)
    x.values.grad = torch.randn(len(x.values))
    opt.step()
    st = opt.state[x.values]
    before = dict(zip(x.indices.tolist(), zip(st["exp_avg"].tolist(), st["exp_avg_sq"].tolist())))
    with torch.no_grad():
        x.row_acc.uniform_()
        x.col_acc.uniform_()
    spiel.swap(x, 30, opt)
    kept = [(i, s) for s, i in enumerate(x.indices.tolist()) if i in before]
    assert len(kept) == len(x.values) - 30
    assert all((st["exp_avg"][s].item(), st["exp_avg_sq"][s].item()) == before[i] for i, s in kept)


def test_schedule():
    c = spiel.SpIELConfig(every=20, accumulate=5, drop_fraction=0.2, total_steps=100)
    r = spiel.Reselection(c)
    points = {t: r.fraction(t) for t in range(1, 130) if r.fraction(t) is not None}
    assert list(points) == [5, 25, 45, 65, 85]
    assert points[5] == 1.0 and points[25] == pytest.approx(0.2 * (1 - 25 / 100))
    with pytest.raises(ValueError, match="accumulate < every"):
        spiel.SpIELConfig(every=5, accumulate=5)


def test_gradient_steps_accumulated_per_reselection(monkeypatch):
    """As the released code (AlanAnsell/peft, sft/trainer.py SftSelector.step: hooks on when
    (t + 1) % S == 0, reselect when t % S == γ): with S = 4, γ = 2 the first reselection (step 2) grows
    from steps 1, 2 and the later ones (6, 10) from steps 4-6 and 8-10: γ + 1 = 3 dense gradients."""
    m = tiny().train()
    apply_method(m, "spiel", **HYPER)
    x, step_now, fired, seen = mods(m)[2], [0], [], {}
    real_accumulate, real_swap = spiel._accumulate, spiel.swap

    def accumulate(mod, g):  # the observer's reduction: record the step whose gradient it adds
        fired.extend([step_now[0]] if mod is x else [])
        real_accumulate(mod, g)

    def swap(mod, n, opt=None):  # record the steps accumulated and the count the moments divide by
        if mod is x:
            seen[step_now[0]] = (fired.copy(), mod.candidates[3])
            fired.clear()
        return real_swap(mod, n, opt)

    monkeypatch.setattr(spiel, "_accumulate", accumulate)
    monkeypatch.setattr(spiel, "swap", swap)
    opt = torch.optim.AdamW(peft.param_groups(m, 1e-2))
    batch = (DATA[:, :-1], DATA[:, 1:], torch.ones_like(DATA[:, :-1]))
    for step in range(1, 11):
        step_now[0] = step
        train_step(m, m, opt, [batch], 1.0, CPU, step=step)
    assert seen == {2: ([1, 2], 2), 6: ([4, 5, 6], 3), 10: ([8, 9, 10], 3)}
    assert fired == []  # nothing observed between reselections


def test_parameter_counts_llama_1b_on_meta():
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    with torch.device("meta"):
        m = Llama(cfg)
    apply_method(m, "spiel", density=0.001, targets=("q_proj", "v_proj"), growth="momentum")
    k = cfg.n_layers * (round(0.001 * q * cfg.dim) + round(0.001 * kv * cfg.dim))
    assert peft.count_parameters(m)[0] == k == 83_888
    # SpIEL-MA's extra state: one SM3 accumulator per row and per column of each targeted weight
    assert sum(x.row_acc.numel() + x.col_acc.numel() for x in mods(m)) == cfg.n_layers * (q + kv + 2 * cfg.dim)
