"""Issue 12, section 2: merge_and_unload gives a plain Llama that save_pretrained / from_pretrained
carry with the adapted logits; methods that cannot fold refuse and change nothing; the export CLI
writes the tokenizer next to the weights; unmerge restores the base bit for bit in bf16 and fp32."""
import copy

import pytest
import torch
import torch.nn as nn

from minipeft import Llama, Tokenizer, apply_method, merge, merge_and_unload, save_adapter, unmerge
from minipeft.export import main as export_main
from minipeft.llama import MLP, Attention, Block, RMSNorm
from helpers import tiny

IDX = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))

MERGEABLE = [
    ("lora", dict(targets="all-linear")), ("lora", dict(use_rslora=True, gamma=4.0)),
    ("dora", dict(targets=("q_proj", "down_proj"))), ("simple_dora", dict(targets=("v_proj", "up_proj"))),
    ("tied_lora", dict(targets=("q_proj", "v_proj"))), ("partially_tied_lora", dict()),
    ("tied_lora_extra", dict(r1=4, r2=6)), ("tensor_embedding", dict(l=2)),
    ("ia3", dict()), ("ia3pp", dict(use_qk_norm=False)),
]
REFUSED = [
    ("prefix_tuning", dict(prefix_len=3), "extra attention columns"),
    ("prompt_tuning", dict(prompt_len=3), "prepends trainable embeddings"),
    ("llama_adapter", dict(version=1, prompt_len=3), "second, gated softmax"),
    ("llama_adapter", dict(version=2, prompt_len=3), "second, gated softmax"),
    ("ia3pp", dict(), "QK skip-norm"),
    ("bitfit", dict(), "attention_bias"),
]
PLAIN = (Llama, nn.Embedding, nn.ModuleList, Block, Attention, MLP, RMSNorm, nn.Linear)


def perturbed(name: str, hyper: dict, dtype=torch.float32) -> Llama:
    """The tiny model with `name` applied and every trainable tensor moved off its (identity) init."""
    m = apply_method(tiny().to(dtype), name, **hyper)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return m


def tiny_checkpoint(path, dtype=torch.float32):
    tiny().to(dtype).save_pretrained(path)
    Tokenizer.byte_level().save(path / "tokenizer.model")
    return path


@pytest.mark.parametrize("name,hyper", MERGEABLE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MERGEABLE)])
def test_merge_and_unload_gives_a_plain_llama_that_round_trips(name, hyper, tmp_path):
    m = perturbed(name, hyper)
    want = m(IDX)
    assert merge_and_unload(m) is m
    assert all(type(mod) in PLAIN for mod in m.modules()), {type(mod).__name__ for mod in m.modules()}
    assert set(m.state_dict()) == set(tiny().state_dict())  # no `.base.` keys, nothing extra
    torch.testing.assert_close(m(IDX), want, atol=1e-5, rtol=1e-5)
    m.save_pretrained(tmp_path)
    torch.testing.assert_close(Llama.from_pretrained(tmp_path)(IDX), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,hyper,reason", REFUSED, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(REFUSED)])
def test_methods_that_cannot_fold_refuse_and_change_nothing(name, hyper, reason):
    m = perturbed(name, hyper)
    before, structure, logits = copy.deepcopy(m.state_dict()), repr(m), m(IDX)
    with pytest.raises(NotImplementedError, match=reason) as err:
        merge_and_unload(m)
    assert "nothing was changed" in str(err.value)
    assert repr(m) == structure and not any(getattr(mod, "merged", False) for mod in m.modules())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(m(IDX), logits, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,hyper", [("lora", dict(targets="all-linear")), ("tied_lora", dict()),
                                        ("partially_tied_lora", dict()), ("tied_lora_extra", dict()),
                                        ("tensor_embedding", dict()), ("dora", dict()), ("simple_dora", dict()),
                                        ("bitfit", dict())])
def test_unmerge_restores_the_base_bit_for_bit(name, hyper, dtype):
    """Issue 12: in bf16 one LoRA merge + unmerge changed 31,810 of 98,304 targeted weights."""
    m = perturbed(name, hyper, dtype)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    logits = m(IDX)
    merge(m)
    changed = sum(int((m.state_dict()[k] != v).sum()) for k, v in base.items() if k in m.state_dict())
    assert changed > 0 or name == "bitfit"  # the merge did fold something into the weights
    unmerge(m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, base[k]), k
    torch.testing.assert_close(m(IDX), logits, atol=0, rtol=0)


def test_merged_bf16_lora_is_rounded_once(tmp_path):
    """The sum W + delta is formed in fp32 and rounded once into bf16: as close as bf16 can hold."""
    m = perturbed("lora", dict(targets=("q_proj",)), torch.bfloat16)
    q = m.layers[0].self_attn.q_proj
    exact = q.base.weight.float() + q.delta_weight()
    merge(m)
    assert torch.equal(q.base.weight, exact.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_cli_writes_a_loadable_checkpoint_with_its_tokenizer(tmp_path, dtype, capsys):
    base = tiny_checkpoint(tmp_path / "base", dtype)
    m = perturbed("lora", dict(targets="all-linear"))
    save_adapter(m, tmp_path / "adapter")
    want = apply_method(Llama.from_pretrained(base), "lora", targets="all-linear")
    want.load_state_dict(m.state_dict())
    assert export_main(["--checkpoint", str(base), "--adapter", str(tmp_path / "adapter"),
                        "--out", str(tmp_path / "merged")]) == 0
    out = tmp_path / "merged"
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    merged = Llama.from_pretrained(out)
    assert merged.embed_tokens.weight.dtype == dtype  # the base checkpoint's own dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(merged(IDX).float(), want.to(dtype)(IDX).float(), **tol)
    assert Tokenizer.from_file(out).vocab_size == 512
    capsys.readouterr()  # never writes over an earlier export: one line naming the folder
    assert export_main(["--checkpoint", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: {out}: not empty; choose a new folder for the merged checkpoint\n"


def test_export_refuses_before_writing_anything(tmp_path, capsys):
    base = tiny_checkpoint(tmp_path / "base")
    save_adapter(perturbed("prefix_tuning", dict(prefix_len=2)), tmp_path / "adapter")
    assert export_main(["--checkpoint", str(base), "--adapter", str(tmp_path / "adapter"),
                        "--out", str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: merge_and_unload: prefix_tuning") and err.count("\n") == 1, err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("mistake,named", [
    ("no adapter", "adapter: neither a run folder with adapter/"),
    ("no checkpoint", "nowhere: checkpoint folder does not exist"),
    ("checkpoint without weights", "base: unknown checkpoint layout"),
])
def test_export_mistakes_are_one_error_line_naming_the_file(tmp_path, capsys, mistake, named):
    """The same error style as finetune and evaluate: `error: ...` on stderr, exit status 1, no traceback."""
    base = tiny_checkpoint(tmp_path / "base")
    adapter = tmp_path / "adapter"
    if mistake == "no adapter":
        adapter.mkdir()  # a folder, but no adapter in it
    else:
        save_adapter(perturbed("lora", {}), adapter)
    if mistake == "no checkpoint":
        base = tmp_path / "nowhere"
    elif mistake == "checkpoint without weights":
        (base / "model.safetensors").unlink()
        (base / "config.json").unlink()
    assert export_main(["--checkpoint", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and err.count("\n") == 1, err


def test_transformers_loads_the_merged_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = perturbed("dora", dict(targets="all-linear"))
    want = m(IDX)
    merge_and_unload(m).save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDX).logits, want, atol=1e-4, rtol=1e-4)


def test_merge_and_unload_holds_one_pre_merge_copy_at_a_time():
    m = perturbed("lora", dict(targets="all-linear"))
    wrappers = [mod for mod in m.modules() if hasattr(mod, "weight_before_merge")]
    live = []
    for w in wrappers:
        real = w.merge

        def spy(real=real):
            live.append(sum(x.weight_before_merge is not None for x in wrappers))
            real()
        w.merge = spy
    merge_and_unload(m)
    assert live == [0] * len(wrappers)  # each copy was dropped before the next merge began


def test_export_cli_toy_base(tmp_path, monkeypatch):
    import minipeft.export
    base = tiny_checkpoint(tmp_path / "toy")
    monkeypatch.setattr(minipeft.export, "toy_base", lambda: base)  # the real one pretrains for minutes
    save_adapter(perturbed("ia3", dict()), tmp_path / "adapter")
    assert export_main(["--toy", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.model").exists() and Llama.from_pretrained(tmp_path / "out")


def test_save_pretrained_of_an_adapted_model_points_to_merge_and_unload(tmp_path):
    """Issue 12: merge() then save_pretrained wrote `...q_proj.base.weight` keys that from_pretrained rejects."""
    m = apply_method(tiny(), "lora")
    merge(m)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\..*merge_and_unload"):
        m.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
