"""AdaLoRA (minipeft/methods/adalora.py) on the tiny seeded model: the five standard tests, the
orthogonality term, the importance scores and cubic budget by hand, the step hook in train_step,
Hugging Face PEFT AdaLoRA directories, and the llama-3.2-1b parameter count."""

import json

import pytest
import torch

from minipeft import peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.finetune import train_step
from minipeft.llama import Llama, LlamaConfig
from minipeft.methods import adalora
from minipeft.safetensors_io import save_file
from helpers import assert_cached_decoding_equals_full_forward, assert_merge_is_exact, tiny

HYPER = dict(r=4, final_r=2, alpha=8.0, targets="all-linear", total_step=10)
PREFIX = "base_model.model.model."
IDX = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))
CPU = torch.device("cpu")


def adapted(seed=0, **hyper):
    """AdaLoRA with random λ (λ = 0 at init would leave P and Q without gradient)."""
    m = tiny(seed)
    apply_method(m, "adalora", **{**HYPER, **hyper})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in adalora.modules(m):
            mod.lora_E.copy_(torch.randn(mod.lora_E.shape, generator=g))
    return m


def batch(idx=IDX):
    return idx[:, :-1], idx[:, 1:], torch.ones_like(idx[:, :-1])


def test_identity_at_init():
    m = tiny()
    ref = m(IDX)
    apply_method(m, "adalora", **HYPER)
    assert torch.equal(m(IDX), ref)  # λ = 0
    mod = m.layers[0].self_attn.q_proj
    assert mod.lora_A.std().item() == pytest.approx(0.02, rel=0.2) and mod.lora_B.std().item() == pytest.approx(0.02, rel=0.2)


def test_gradients_only_on_p_lambda_q_and_base_unchanged():
    m = adapted().train()
    names = {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_E", "lora_B"}
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(peft.param_groups(m, 1e-2, weight_decay=0.1))
    _, loss = m(IDX[:, :-1], IDX[:, 1:])
    loss.backward()
    assert all((p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad for p in m.parameters())
    opt.step()
    assert all(torch.equal(dict(m.named_parameters())[n], t) for n, t in frozen.items())


def test_merge_equivalence_and_exact_unmerge():
    m = adapted()
    mod = m.layers[1].mlp.down_proj
    torch.testing.assert_close(mod.delta_weight(), 2.0 * mod.lora_B @ torch.diag(mod.lora_E[:, 0]) @ mod.lora_A)
    assert_merge_is_exact(m, IDX)


def test_cached_decoding_equals_full_forward():
    assert_cached_decoding_equals_full_forward(adapted(), IDX)


def test_save_load_roundtrip_and_wrong_base(tmp_path):
    m = adapted()
    adalora.mask_to_budget(adalora.modules(m), 20)  # some λ masked to zero: saved as zeros
    out = m(IDX)
    save_adapter(m, tmp_path)
    fresh = load_adapter(tiny(), tmp_path)
    assert torch.equal(fresh(IDX), out) and fresh.peft_configs == m.peft_configs
    assert len(fresh.peft_step_hooks) == 1 and len(fresh.peft_extra_losses) == 1
    with pytest.raises(ValueError, match="n_layers: adapter 2 vs model 3"):
        load_adapter(tiny(n_layers=3), tmp_path)


def test_orthogonality_term_by_hand():
    m = adapted()
    mods = adalora.modules(m)
    P, Q = mods[0].lora_B, mods[0].lora_A
    by_hand = ((P.T @ P - torch.eye(4)) ** 2).sum() + ((Q @ Q.T - torch.eye(4)) ** 2).sum()
    torch.testing.assert_close(mods[0].orthogonality(), by_hand)
    (term,) = m.peft_extra_losses
    torch.testing.assert_close(term(m, m, batch(), None), 0.5 * sum(x.orthogonality() for x in mods) / len(mods))
    # orthonormal P, Q give 0
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(64, 4))
        mods[0].lora_A.copy_(q.T)
        mods[0].lora_B.copy_(q)
    assert mods[0].orthogonality() < 1e-10


def test_cubic_budget_schedule():
    c = adalora.AdaLoRAConfig(r=12, final_r=4, total_step=100, tinit=10, tfinal=20)
    b = [adalora.budget(c, 10, t) for t in (0, 10, 11, 45, 80, 81, 100)]
    assert b[:2] == [120, 120] and b[-2:] == [40, 40] and b[4] == 40
    assert b[3] == int(80 * (1 - 35 / 70) ** 3 + 40) == 50 and 110 < b[2] < 120


def test_importance_scores_by_hand():
    """Two steps of eqs. 9-11 for one module, recomputed from the recorded gradients."""
    m = adapted().train()
    mod = m.layers[0].self_attn.q_proj
    b1, b2 = 0.85, 0.85
    bar = {k: 0 for k in ("lora_A", "lora_E", "lora_B")}
    unc = dict(bar)
    for _ in range(2):
        m.zero_grad()
        m(IDX[:, :-1], IDX[:, 1:])[1].backward()
        mod.update_importance(b1, b2)
        for k in bar:
            p = getattr(mod, k)
            ipt = (p * p.grad).abs()
            bar[k] = b1 * bar[k] + (1 - b1) * ipt
            unc[k] = b2 * unc[k] + (1 - b2) * (ipt - bar[k]).abs()
    s = {k: bar[k] * unc[k] for k in bar}
    expected = s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0)
    torch.testing.assert_close(mod.triplet_scores(), expected)


def test_step_hook_runs_in_train_step_with_the_gradients():
    m = tiny()
    apply_method(m, "lora", r=2, targets=("q_proj",))
    seen = []
    peft.add_step_hook(m, lambda model, step: seen.append(
        (step, model.layers[0].self_attn.q_proj.lora_A.grad is not None)))
    opt = torch.optim.AdamW(peft.param_groups(m, 1e-3))
    train_step(m, m, opt, [batch()], 1.0, CPU, step=7)
    train_step(m, m, opt, [batch()], 1.0, CPU)  # no step given: one more than the last
    assert seen == [(7, True), (8, True)]


def test_training_masks_down_to_the_target_budget():
    """10 steps, tinit 2, tfinal 3: after step 7 the kept triplets are exactly final_r x modules and
    their λ are zero; the final phase keeps that mask; the loss still goes down."""
    m = tiny().train()
    apply_method(m, "adalora", **{**HYPER, "tinit": 2, "tfinal": 3})
    mods = adalora.modules(m)
    opt = torch.optim.AdamW(peft.param_groups(m, 2e-2))
    data = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(11))
    losses, kept = [], []
    for step in range(1, 11):
        losses.append(train_step(m, m, opt, [batch(data)], 1.0, CPU, step=step)[0])
        kept.append(sum(4 if x.mask is None else int(x.mask.sum()) for x in mods))
    assert kept[:2] == [56, 56] and kept[6:] == [28] * 4 and kept[2] < 56
    assert all(torch.all(x.lora_E[~x.mask] == 0) for x in mods)
    assert len({int(x.mask.sum()) for x in mods}) > 1  # the budget moved between modules
    assert losses[-1] < losses[0]


def test_no_importance_update_at_total_step_minus_tfinal():
    """As Hugging Face PEFT (RankAllocator.update_and_allocate) and the authors' update_and_mask: the
    averages are updated at every step before T - t_final (here 10 - 3 = 7), not at step 7, where the
    final mask is fixed from the averages of step 6; the frozen final phase leaves them alone too."""
    m = tiny().train()
    apply_method(m, "adalora", **{**HYPER, "tinit": 2, "tfinal": 3})
    mods = adalora.modules(m)
    opt = torch.optim.AdamW(peft.param_groups(m, 2e-2))
    data = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(11))
    state = []  # the averages after each step's hook, (step, [(ema_ipt, ema_unc) per module])
    for step in range(1, 11):
        train_step(m, m, opt, [batch(data)], 1.0, CPU, step=step)
        state.append([({k: v.clone() for k, v in x.ema_ipt.items()}, {k: v.clone() for k, v in x.ema_unc.items()})
                      for x in mods])

    def same(a, b):
        return all(ia.keys() == ib.keys() and all(torch.equal(ia[k], ib[k]) and torch.equal(ua[k], ub[k]) for k in ia)
                   for (ia, ua), (ib, ub) in zip(a, b))

    assert not same(state[5], state[4])  # step 6 still updates
    assert same(state[6], state[5])      # step 7 = T - t_final: no update
    assert all(same(state[i], state[5]) for i in (7, 8, 9))
    # the final mask is the one step 6's averages give at the target budget
    scores = torch.cat([x.triplet_scores() for x in mods])
    assert sum(int(x.mask.sum()) for x in mods) == 2 * len(mods)
    assert torch.equal(torch.cat([x.mask for x in mods]), scores > torch.kthvalue(scores, scores.numel() - 28).values)


def test_parameter_counts_llama_1b_on_meta(capsys):
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    with torch.device("meta"):
        m = Llama(cfg)
    apply_method(m, "adalora", r=12, final_r=8, targets=("q_proj", "v_proj"))
    r = 12  # per target r (in + out) + r
    assert peft.count_parameters(m)[0] == cfg.n_layers * (r * (cfg.dim + q) + r + r * (cfg.dim + kv) + r) == 1_278_336
    with capsys.disabled():
        print(f"\nllama-3.2-1b adalora init_r=12 q_proj,v_proj: {peft.trainable_report(m).splitlines()[0]}")


# ---------------------------------------------------------------- Hugging Face PEFT AdaLoRA directories


def write_dir(path, config, tensors):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return path


def test_hand_written_peft_adalora_dir(tmp_path):
    """init_r 4, a rank_pattern that keeps 2 triplets of layers.1 q_proj: W + lora_alpha / init_r B diag(E) A,
    with the saved (truncated) tensors, computed by hand."""
    config = {"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "r": 8, "init_r": 4, "target_r": 2,
              "lora_alpha": 6, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
              "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5,
              "total_step": 100, "rank_pattern": {"model.layers.1.self_attn.q_proj.lora_E": [True, False, False, True]}}
    g = torch.Generator().manual_seed(3)
    base, expected, tensors = tiny(), tiny(), {}
    for i in range(2):
        for leaf in ("q_proj", "v_proj"):
            name = f"layers.{i}.self_attn.{leaf}"
            out_f, in_f = base.get_submodule(name).weight.shape
            k = 2 if name == "layers.1.self_attn.q_proj" else 4
            A, E, B = (torch.randn(k, in_f, generator=g), torch.randn(k, 1, generator=g),
                       torch.randn(out_f, k, generator=g) * 0.1)
            tensors.update({f"{PREFIX}{name}.lora_A": A, f"{PREFIX}{name}.lora_E": E, f"{PREFIX}{name}.lora_B": B})
            with torch.no_grad():
                expected.get_submodule(name).weight += 6 / 4 * B @ (A * E)
    loaded = load_adapter(base, write_dir(tmp_path / "d", config, tensors))
    torch.testing.assert_close(loaded(IDX), expected(IDX), rtol=1e-5, atol=1e-5)
    assert loaded.layers[1].self_attn.q_proj.mask.tolist() == [True, False, False, True]
    assert loaded.peft_configs[0].r == 4 and loaded.peft_configs[0].alpha == 6.0
    # saved back: the same keys, shapes and rank_pattern
    save_adapter(loaded, tmp_path / "out", format="peft")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["peft_type"] == "ADALORA" and written["rank_pattern"] == config["rank_pattern"]
    again = load_adapter(tiny(), tmp_path / "out")
    assert torch.equal(again(IDX), loaded(IDX))
    # errors: a missing tensor, a wrong rank_pattern length
    bad = {k: v for k, v in tensors.items() if "layers.0.self_attn.v_proj" not in k}
    with pytest.raises(KeyError, match="missing"):
        load_adapter(tiny(), write_dir(tmp_path / "e1", config, bad))
    wrong = dict(config, rank_pattern={"model.layers.1.self_attn.q_proj.lora_E": [True, True]})
    with pytest.raises(ValueError, match="has 2 entries, init_r is 4"):
        load_adapter(tiny(), write_dir(tmp_path / "e2", wrong, tensors))


@pytest.mark.parametrize("set_total", [True, False])
def test_finetune_cli_runs_the_budget_schedule_with_the_global_step(tmp_path, set_total):
    """`--method adalora` through finetune.main on the tiny model: 6 steps, tfinal 2: the saved adapter
    keeps exactly final_r x modules nonzero λ (the masking ran at the right steps). Without
    `--set total_step`, finetune fills in the run's 6 steps (the class default, 1000, would stop the
    budget far above its target)."""
    from minipeft import finetune
    from minipeft.data import synthetic_gsm8k, write_jsonl
    from minipeft.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    Llama(LlamaConfig.from_name("tiny")).save_pretrained(tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt" / "tokenizer.model")
    write_jsonl(synthetic_gsm8k(24, seed=0), tmp_path / "data" / "train.jsonl")
    write_jsonl(synthetic_gsm8k(2, seed=0, split="test"), tmp_path / "data" / "test.jsonl")
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "--batch-size", "4", "--lr", "1e-2", "--max-new-tokens", "4", "--quiet", "--method", "adalora",
            "--set", "r=4", "--set", "final_r=2", "--set", "tinit=1", "--set", "tfinal=2"]
    assert finetune.main(args + (["--set", "total_step=6"] if set_total else [])) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6
    assert json.loads((tmp_path / "run" / "adapter" / "minipeft_adapter.json").read_text())["methods"][0]["total_step"] == 6
    m = load_adapter(Llama.from_pretrained(tmp_path / "ckpt"), tmp_path / "run" / "adapter")
    mods = adalora.modules(m)
    assert sum(int((x.lora_E != 0).sum()) for x in mods) == 2 * len(mods)


def test_adalora_rank_pattern_must_be_lists_of_booleans(tmp_path):
    """The typed adapter_config.json check (issue 19) knows AdaLoRA's rank_pattern is a mask per lora_E."""
    from minipeft.hf_peft import check_field_types
    good = {"peft_type": "ADALORA", "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True, False]}}
    check_field_types(good, tmp_path / "adapter_config.json")
    for bad in ({"x.lora_E": ["true"]}, {"x.lora_E": 4}):
        with pytest.raises(ValueError, match="field 'rank_pattern'"):
            check_field_types(dict(good, rank_pattern=bad), tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match="field 'rank_pattern'"):  # LoRA's rank_pattern stays ints
        check_field_types({"peft_type": "LORA", "rank_pattern": {"q_proj": [True]}}, tmp_path / "adapter_config.json")
