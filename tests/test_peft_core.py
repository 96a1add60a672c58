"""The PEFT core (minipeft/peft.py, minipeft/adapters.py), exercised through LoRA on the tiny model:
target matching, the parameter report, optimiser groups, merging, saving and loading."""

import json
import os

import pytest
import torch
import torch.nn as nn

from minipeft import adapters, peft, safetensors_io
from minipeft.adapters import apply_method, load_adapter, save_adapter
from helpers import tiny


def tokens():
    return torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(5))


def with_lora(seed=0, **hyper):
    model = tiny(seed)
    apply_method(model, "lora", **{"r": 4, "alpha": 8.0, **hyper})
    with torch.no_grad():  # a non-zero B, so the adapter changes the logits
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.05)
    return model


# ---------------------------------------------------------------- target matching


def test_match_targets_names_globs_all_linear():
    model = tiny()
    assert peft.match_targets(model, ["q_proj", "v_proj"]) == [
        "layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    assert peft.match_targets(model, "layers.1.*.down_proj") == ["layers.1.mlp.down_proj"]
    assert peft.match_targets(model, "layers.[01].self_attn.q_proj") == ["layers.0.self_attn.q_proj",
                                                                          "layers.1.self_attn.q_proj"]
    assert peft.match_targets(model, "mlp.up_proj") == ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
    everything = peft.match_targets(model, "all-linear")
    assert len(everything) == 2 * 7 and "lm_head" not in everything
    with pytest.raises(ValueError, match=r"matched no linear module.*layers\.0\.self_attn\.q_proj.*'down_proj'"):
        peft.match_targets(model, ["qproj"])
    with pytest.raises(ValueError, match="matched no linear module"):
        apply_method(tiny(), "lora", targets=["lm_head"])  # the output head is never a target


def test_second_method_keeps_the_first_trainable():
    """inject() freezes the base once; a later method must not freeze an earlier one's parameters."""
    model = tiny()
    apply_method(model, "lora", r=2, targets=["q_proj"])
    apply_method(model, "dora", r=2, targets=["v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layers.0.self_attn.q_proj.lora_A" in trainable and "layers.0.self_attn.v_proj.magnitude" in trainable
    assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude") for n in trainable)


def test_new_modules_follow_the_model_mode():
    model = tiny()  # eval mode
    apply_method(model, "lora", r=2, dropout=0.5)
    assert not any(m.training for m in model.modules())
    out = model(tokens())
    assert torch.equal(model(tokens()), out)  # no dropout noise in eval mode


# ---------------------------------------------------------------- report and optimiser groups


def test_trainable_report_numbers_and_format():
    model = tiny()
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    assert total == cfg.vocab_size * cfg.dim + cfg.dim + cfg.n_layers * (  # tied head: counted once
        2 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim)
    apply_method(model, "lora", r=4, targets=["q_proj", "v_proj"])
    lora = cfg.n_layers * 4 * ((cfg.dim + cfg.dim) + (cfg.dim + cfg.n_kv_heads * cfg.head_dim))  # r (in + out)
    assert peft.count_parameters(model) == (lora, total + lora)
    assert lora == 1_792 and total == 131_392
    assert peft.trainable_report(model).splitlines() == [
        "trainable params: 1,792 || all params: 133,184 || trainable%: 1.3455",
        "  lora: 1,792 (1.3455%)"]
    next(model.norm.parameters()).requires_grad_(True)  # anything else trainable is named as such
    assert peft.trainable_report(model).splitlines()[-1] == "  unfrozen base: 64 (0.0481%)"


def test_param_groups_carry_lr_scale_and_weight_decay():
    model = tiny()
    apply_method(model, "lora", r=4, targets="all-linear", loraplus_ratio=16.0)
    model.layers[0].self_attn.q_proj.lora_A.no_weight_decay = True
    groups = peft.param_groups(model, lr=1e-3, weight_decay=0.1)
    keys = sorted((g["lr_scale"], g["weight_decay"], len(g["params"])) for g in groups)
    assert keys == [(1.0, 0.0, 1), (1.0, 0.1, 13), (16.0, 0.1, 14)]
    assert {g["lr_scale"]: g["lr"] for g in groups} == {1.0: 1e-3, 16.0: pytest.approx(16e-3)}
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)  # every trainable tensor exactly once
    torch.optim.AdamW(groups)  # accepted as is


# ---------------------------------------------------------------- merging


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_merge_unmerge_idempotent_and_never_implicit():
    model, idx = with_lora(targets="all-linear"), tokens()
    w0, out = weights(model), model(idx)
    model.train(), model.eval()  # switching modes never merges (unlike loralib's train(False))
    assert not any(m.merged for _, m in peft.adapter_modules(model)) and all(
        torch.equal(v, w0[k]) for k, v in model.state_dict().items())
    peft.merge(model)
    w1 = weights(model)
    peft.merge(model)  # a second merge adds nothing
    assert all(torch.equal(v, w1[k]) for k, v in model.state_dict().items())
    model.train(), model.eval()
    assert all(m.merged for _, m in peft.adapter_modules(model))
    peft.unmerge(model)
    peft.unmerge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-7)
    torch.testing.assert_close(model(idx), out, rtol=1e-5, atol=1e-6)


class NotMergeable(nn.Module):
    peft_method, merged, mergeable = "dummy", False, False
    why_not_mergeable = "adds keys/values to attention"

    def __init__(self, attn):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1, attn.n_kv_heads, 2, attn.head_dim))

    def forward(self, batch):
        return self.p, self.p


def test_merge_refuses_non_mergeable_and_changes_nothing():
    model = with_lora()
    peft.fill_slot(model, "kv_prefix", lambda i, attn: NotMergeable(attn))
    w0 = weights(model)
    with pytest.raises(NotImplementedError, match=r"dummy at 'layers\.0\.self_attn\.kv_prefix' adds keys/values "
                                                  r"to attention \(2 such module\(s\)\); nothing was merged"):
        peft.merge(model)
    assert not any(m.merged for _, m in peft.adapter_modules(model))
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- saving and loading


def test_save_load_roundtrip_two_methods(tmp_path):
    model = with_lora(targets=["q_proj"], gamma=2.0)
    apply_method(model, "dora", r=2, targets=["layers.1.mlp.*"])
    out = model(tokens())
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "minipeft_adapter.json"]
    fresh = load_adapter(tiny(), tmp_path)
    assert torch.equal(fresh(tokens()), out)
    assert [c.method for c in fresh.peft_configs] == ["lora", "dora"]


def test_load_refuses_a_different_base(tmp_path):
    save_adapter(with_lora(), tmp_path)
    with pytest.raises(ValueError, match=r"minipeft_adapter\.json: this adapter was trained on a different base "
                                         r"model \(dim: adapter 64 vs model 32, head_dim: adapter 16 vs model 8\)"):
        load_adapter(tiny(dim=32), tmp_path)
    with pytest.raises(FileNotFoundError, match="no minipeft_adapter.json"):
        load_adapter(tiny(), tmp_path / "missing")
    with pytest.raises(KeyError, match="unknown PEFT method 'lorra'"):
        apply_method(tiny(), "lorra")
    with pytest.raises(ValueError, match="no PEFT method has been applied"):
        save_adapter(tiny(), tmp_path / "empty")


def snapshot(path):
    return {f: (path / f).read_bytes() for f in sorted(os.listdir(path))}


class FailingFile:
    """Wraps the temp file: the first write (the safetensors header) succeeds, the next one fails."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, data):
        self.writes += 1
        if self.writes > 1:
            raise OSError("simulated crash mid-save")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def fail_fsync(fd):  # every byte written, the process dies before the rename
    raise OSError("simulated crash mid-save")


@pytest.mark.parametrize("crash", ["mid-write", "before-rename"])
@pytest.mark.parametrize("format", ["minipeft", "peft"])
def test_failed_save_leaves_previous_adapter_intact(format, crash, tmp_path, monkeypatch):
    model = with_lora()
    old_logits = model(tokens())
    save_adapter(model, tmp_path, format=format)
    before = snapshot(tmp_path)
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.lora_B.add_(1.0)
    if crash == "mid-write":
        fdopen = os.fdopen
        monkeypatch.setattr(safetensors_io.os, "fdopen", lambda fd, mode: FailingFile(fdopen(fd, mode)))
    else:
        monkeypatch.setattr(safetensors_io.os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="simulated crash"):
        save_adapter(model, tmp_path, format=format)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # same files, same bytes, no temp files left behind
    torch.testing.assert_close(load_adapter(tiny(), tmp_path)(tokens()), old_logits, rtol=1e-6, atol=1e-6)


def test_crash_between_the_two_renames_is_detected(tmp_path):
    """New tensors beside the old JSON (the process died after the first rename): refused, not loaded."""
    model = with_lora()
    save_adapter(model, tmp_path)
    old_json = (tmp_path / "minipeft_adapter.json").read_bytes()
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.lora_B.add_(1.0)
    save_adapter(model, tmp_path)
    (tmp_path / "minipeft_adapter.json").write_bytes(old_json)
    with pytest.raises(ValueError, match=r"adapter\.safetensors does not match minipeft_adapter\.json"):
        load_adapter(tiny(), tmp_path)


def test_unserialisable_config_fails_before_any_write(tmp_path, monkeypatch):
    model = with_lora()
    save_adapter(model, tmp_path)
    before = snapshot(tmp_path)
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.lora_B.add_(1.0)
    monkeypatch.setattr(model.peft_configs[0], "alpha", object())  # not JSON-serialisable
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_adapter(model, tmp_path)
    assert snapshot(tmp_path) == before


def replace_weights(path, tensors):
    """Write other tensors AND re-stamp the JSON, so only the name/shape checks can catch them."""
    safetensors_io.save_file(tensors, path / adapters.WEIGHTS_FILE)
    meta = json.loads((path / adapters.CONFIG_FILE).read_text())
    meta["weights_sha256"] = adapters.sha256_file(path / adapters.WEIGHTS_FILE)
    (path / adapters.CONFIG_FILE).write_text(json.dumps(meta))


def test_loaded_tensor_names_and_shapes_are_checked(tmp_path):
    model = with_lora()
    save_adapter(model, tmp_path)
    state = adapters.adapter_state(model)
    bad = dict(state, **{"layers.0.self_attn.q_proj.lora_A": torch.zeros(3, 64)})
    replace_weights(tmp_path, bad)
    with pytest.raises(ValueError, match=r"'layers\.0\.self_attn\.q_proj\.lora_A' has shape \(3, 64\), "
                                         r"the model expects \(4, 64\)"):
        load_adapter(tiny(), tmp_path)
    replace_weights(tmp_path, {k: v for k, v in state.items() if "layers.1" not in k})
    with pytest.raises(KeyError, match=r"missing \['layers\.1\.self_attn\.q_proj\.lora_A'"):
        load_adapter(tiny(), tmp_path)
