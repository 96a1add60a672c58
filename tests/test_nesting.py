"""Issue 12, section 3: methods refuse to nest (a clear "already has ..." instead of wrapping a
wrapper's inner Linear), merge/unmerge change nothing when they fail, and training a merged model
says that it is merged."""
import copy
import itertools

import pytest
import torch

from minipeft import apply_method, load_adapter, merge, param_groups, peft, save_adapter, unmerge
from minipeft.methods.lora import LoRALinear
from helpers import tiny

IDX = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(3))

ATTN, MLP = ("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj")
# one method of each kind, small: (hyper-parameters as the first method, on attention Linears;
# as the second, on MLP Linears where it chooses its targets)
KINDS = {
    "lora": (dict(targets=ATTN), dict(targets=MLP)),
    "dora": (dict(targets=ATTN), dict(targets=MLP)),
    "tied_lora": (dict(targets=ATTN), dict(targets=MLP)),
    "ia3": (dict(targets=("k_proj", "v_proj"), feedforward_targets=()),
            dict(targets=("up_proj", "down_proj"), feedforward_targets=("down_proj",))),
    "ia3pp": (dict(), dict()),  # fixed targets k, v, o, down and the QK skip-norm slot
    "bitfit": (dict(targets=ATTN), dict(targets=MLP)),
    "prefix_tuning": (dict(prefix_len=2),) * 2,
    "prompt_tuning": (dict(prompt_len=2),) * 2,
    "llama_adapter": (dict(prompt_len=2),) * 2,
    "llama_adapter_v2": (dict(version=2, prompt_len=2, targets=ATTN), dict(version=2, prompt_len=2, targets=MLP)),
}


def apply_kind(m, kind: str, second: bool = False):
    return apply_method(m, kind.removesuffix("_v2"), **KINDS[kind][second])


def perturb(m, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def snapshot(m):
    return repr(m), copy.deepcopy(m.state_dict())


def assert_unchanged(m, snap, logits):
    structure, state = snap
    assert repr(m) == structure
    assert set(m.state_dict()) == set(state)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(m(IDX), logits, atol=0, rtol=0)


def test_the_same_method_twice_says_already_has():
    m = apply_method(tiny(), "lora", targets=("q_proj",))
    with pytest.raises(ValueError, match=r"already has lora on layers\.0\.self_attn\.q_proj"):
        apply_method(m, "lora", targets=("q_proj",))


def test_load_adapter_into_a_model_that_has_it_says_already_has(tmp_path):
    m = apply_method(tiny(), "dora", targets=("v_proj",))
    save_adapter(m, tmp_path)
    with pytest.raises(ValueError, match=r"already has dora on layers\.0\.self_attn\.v_proj"):
        load_adapter(m, tmp_path)


def test_all_linear_never_matches_a_wrappers_inner_linear():
    m = apply_method(tiny(), "ia3")
    with pytest.raises(ValueError, match=r"already has ia3 on layers\.0\.self_attn\.k_proj"):
        apply_method(m, "lora", targets="all-linear")
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    # names a new method may still take: the plain Linears, never `...k_proj.base`
    names = peft.match_targets(m, ["q_proj", "o_proj", "gate_proj", "up_proj"])
    assert names and not any(n.endswith(".base") for n in names)


def test_prefix_mlp_linears_are_not_targets():
    m = apply_method(tiny(), "prefix_tuning", prefix_len=2, mlp_hidden=8)
    names = peft.match_targets(m, "all-linear")
    assert not any("peft_shared" in n for n in names) and len(names) == 2 * 7


def test_a_second_method_on_other_modules_still_works():
    m = apply_method(tiny(), "lora", targets=("q_proj",))
    apply_method(m, "dora", targets=("v_proj",))
    perturb(m, 4)
    logits = m(IDX)
    merge(m)
    torch.testing.assert_close(m(IDX), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("first,second", list(itertools.product(KINDS, KINDS)))
def test_every_pair_of_method_kinds_refuses_or_merges_cleanly(first, second):
    m = apply_kind(tiny(), first)
    perturb(m, 5)
    snap, logits = snapshot(m), m(IDX)
    try:
        apply_kind(m, second, second=True)
    except ValueError as e:  # refused: a clear message, and the model exactly as before
        assert "already" in str(e)
        assert_unchanged(m, snap, logits)
        return
    perturb(m, 6)
    snap, logits = snapshot(m), m(IDX)
    try:
        merge(m)
    except NotImplementedError as e:  # refused: nothing merged, nothing changed
        assert "nothing was merged" in str(e)
        assert_unchanged(m, snap, logits)
        return
    torch.testing.assert_close(m(IDX), logits, atol=1e-5, rtol=1e-5)
    unmerge(m)
    exact = not {"ia3", "ia3pp"} & {first, second}  # (IA)^3 divides back: exact only to rounding
    if exact:
        assert_unchanged(m, snap, logits)
    else:
        torch.testing.assert_close(m(IDX), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora", "tied_lora", "ia3", "bitfit", "llama_adapter_v2"])
def test_all_linear_after_a_wrapping_method_is_refused_and_changes_nothing(kind):
    m = apply_kind(tiny(), kind)
    perturb(m, 8)
    snap, logits = snapshot(m), m(IDX)
    with pytest.raises(ValueError, match=r"already has \w+ on layers\.0\.self_attn\.\w+_proj"):
        apply_method(m, "dora", targets="all-linear")  # issue 12: used to nest, then break merge
    assert_unchanged(m, snap, logits)


def test_a_merge_that_fails_midway_is_rolled_back(monkeypatch):
    m = apply_method(tiny(), "lora", targets="all-linear")
    perturb(m, 7)
    snap, logits = snapshot(m), m(IDX)
    victim = m.layers[1].mlp.down_proj  # the last module merged: all the others are merged by then

    def fail():
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(victim, "merge", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge(m)
    assert not any(getattr(mod, "merged", False) for mod in m.modules())
    assert_unchanged(m, snap, logits)


def test_training_a_merged_model_says_it_is_merged():
    m = apply_method(tiny(), "lora")
    merge(m)
    with pytest.raises(RuntimeError, match="the model is merged.*unmerge"):
        param_groups(m, lr=1e-3)
    unmerge(m)
    assert param_groups(m, lr=1e-3)
