"""The lower layers keep what a user owns, refuse what is not finite, and never hang (issue "nothing a
user owns is ever deleted or half-written, nothing non-finite passes, no hang"): checkpoint, adapter and
dataset saves on a full disk leave the earlier files loading as before; NaN / inf, integer weights and
mistyped AdaLoRA fields are refused by name; a half-quantised model cannot happen; a FIFO where a file
should be is refused at once; a sparse block longer than the sequence costs what the sequence costs."""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import os
import re
import resource
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import no_hang, snapshot, tiny
from minipeft import sparse_attention
from minipeft.adapters import apply_method, load_adapter, save_adapter, sha256_file
from minipeft.llama import Llama
from minipeft.meta_layout import save_meta
from minipeft.peft import adapter_modules
from minipeft.quant import NF4_BLOCK, QuantLinear, dequantize_nf4, quantize_model, quantize_nf4
from minipeft.safetensors_io import load_file, save_file
from minipeft.tasks import json_lines, load_arc, load_dolly, load_mmlu, load_mmlu_csv, load_text
from minipeft.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
IDX = torch.arange(12).reshape(2, 6) * 37 % 512


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """`ulimit -f`, in this process: a write past `nbytes` fails with Errno 27 (EFBIG; Python ignores
    SIGXFSZ). Only for the block: the limit goes back to what it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def full_disk(monkeypatch, code: int = errno.ENOSPC) -> None:
    """Every write through safetensors_io's temp files fails as on a full disk (so does close's flush)."""
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, mode, *a, **kw):
            self.f = real_fdopen(fd, mode, *a, **kw)

        def write(self, data):
            raise OSError(code, os.strerror(code))

        def close(self):
            self.f.close()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)
    monkeypatch.setattr("minipeft.safetensors_io.os.fdopen", FullDisk)


def with_lora(seed=0, method="lora", **hyper):
    model = apply_method(tiny(), method, **hyper)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


# ----------------------------------------------------------------------------- 3. checkpoints on a full disk

@pytest.mark.parametrize("old, new", [("single", "single"), ("sharded", "single"), ("single", "sharded"),
                                      ("single", "meta"), ("meta", "single")])
@pytest.mark.parametrize("disk", ["EFBIG (ulimit -f 64)", "ENOSPC"])
def test_saving_a_checkpoint_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch, old, new, disk):
    def save(model, layout):
        if layout == "meta":
            save_meta(model, tmp_path)
        else:
            model.save_pretrained(tmp_path, max_shard_bytes=200_000 if layout == "sharded" else None)
    save(tiny(1), old)
    (tmp_path / "tokenizer.model").write_text("kept\n")
    before, expected = snapshot(tmp_path), Llama.from_pretrained(tmp_path)(IDX)
    if disk == "ENOSPC":
        full_disk(monkeypatch)
        with pytest.raises(OSError, match="No space left"):
            save(tiny(2), new)
    else:
        with file_size_limit(64 * 1024), pytest.raises(OSError) as e:  # the model is 528 kB
            save(tiny(2), new)
        assert e.value.errno == errno.EFBIG
    assert snapshot(tmp_path) == before  # no temp file or folder left either
    torch.testing.assert_close(Llama.from_pretrained(tmp_path)(IDX), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- 4. adapters on a full disk

@pytest.mark.parametrize("first, second", [("minipeft", "peft"), ("peft", "minipeft"), ("minipeft", "minipeft")])
def test_saving_an_adapter_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch, first, second):
    save_adapter(with_lora(seed=1, r=4), tmp_path, format=first)
    before, expected = snapshot(tmp_path), load_adapter(tiny(), tmp_path)(IDX)
    with file_size_limit(4 * 1024), pytest.raises(OSError) as e:  # the adapter's tensors take 33 kB
        save_adapter(with_lora(seed=2, r=4), tmp_path, format=second)
    assert e.value.errno == errno.EFBIG
    assert snapshot(tmp_path) == before
    torch.testing.assert_close(load_adapter(tiny(), tmp_path)(IDX), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- 5. downloads

GSM8K_LINE = {"question": "q", "answer": "a\n#### 1"}


def gsm8k_mirror(folder: Path, answer: str = "a") -> Path:
    """The official line counts; test lines ~1 kB, so test.jsonl (1.3 MB) is larger than train.jsonl."""
    folder.mkdir(parents=True)
    line = lambda question, n: json.dumps(dict(question=question, answer=f"{answer}\n#### {n}")) + "\n"  # noqa: E731
    (folder / "train.jsonl").write_text(line("q", 1) * 7473)
    (folder / "test.jsonl").write_text(line("q" * 1000, 2) * 1319)
    return folder


def test_a_gsm8k_redownload_on_a_full_disk_keeps_the_old_pair(tmp_path, capsys):
    dl, out = script("download_gsm8k"), tmp_path / "gsm8k"
    assert dl.main(["--out", str(out), "--source", str(gsm8k_mirror(tmp_path / "old", "old"))]) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    new = gsm8k_mirror(tmp_path / "new", "new")
    with file_size_limit(1 << 20):  # train.jsonl (0.4 MB) fits, test.jsonl (1.3 MB) does not
        assert dl.main(["--out", str(out), "--source", str(new)]) == 1
    assert "File too large" in capsys.readouterr().err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["gsm8k", "new", "old"]
    assert dl.main(["--out", str(out), "--source", str(new)]) == 0  # with room: the new pair, the user's file kept
    assert snapshot(out) == {**snapshot(new), "notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gsm8k", "new", "old"]


def mmlu_tar(answer: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for split in ("dev", "val", "test", "auxiliary_train"):
            text = f"q,a,b,c,d,{answer}\n".encode()
            info = tarfile.TarInfo(f"data/{split}/anatomy_{split}.csv")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    return buf.getvalue()


def test_a_task_redownload_that_fails_midway_keeps_the_old_set(tmp_path, monkeypatch):
    dl, out = script("download_task"), tmp_path / "mmlu"
    counts = dict(dev=1, val=1, test=1, auxiliary_train=1)
    dl.install("mmlu", mmlu_tar("A"), out, "data.tar", counts)
    before = snapshot(out)
    real, calls = os.replace, []

    def second_rename_fails(src, dst):  # rename(2) fails with ENOSPC when the directory needs a block
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="No space left"):
        dl.install("mmlu", mmlu_tar("B"), out, "data.tar", counts)
    monkeypatch.setattr(os, "replace", real)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mmlu"]
    dl.install("mmlu", mmlu_tar("B"), out, "data.tar", counts)
    assert {ex["answer"] for ex in load_mmlu(out, "test")} == {1}


def test_a_download_is_streamed_with_a_size_limit(tmp_path, monkeypatch, capsys):
    dl, task = script("download_gsm8k"), script("download_task")
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(3 << 20))
    path = dl.fetch(big.as_uri(), max_bytes=4 << 20, dest=tmp_path / "got.bin")
    assert path.stat().st_size == 3 << 20
    with pytest.raises(ValueError, match=r"big\.bin: larger than the limit of 2,097,152 bytes"):
        dl.fetch(big.as_uri(), max_bytes=2 << 20, dest=tmp_path / "cut.bin")
    assert not (tmp_path / "cut.bin").exists()
    monkeypatch.setattr(task, "MAX_BYTES", 1 << 20)
    assert task.main(["--task", "dolly", "--source", str(big), "--out", str(tmp_path / "d")]) == 1
    assert "larger than the limit of 1,048,576 bytes (MAX_BYTES in download_task.py)" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- 6. MMLU answers

@pytest.mark.parametrize("answer", ['""', "BC", "ABCD", "E", "a"])
def test_an_mmlu_answer_that_is_not_one_letter_is_refused(tmp_path, answer):
    path = tmp_path / "anatomy_test.csv"
    path.write_text(f"q1,a,b,c,d,A\nq2,a,b,c,d,{answer}\n")
    shown = repr("" if answer == '""' else answer)
    with pytest.raises(ValueError, match=rf"anatomy_test\.csv:2: answer must be one of A, B, C, D, got {shown}"):
        load_mmlu_csv(path)


# ----------------------------------------------------------------------------- 9. NaN / inf

def poison(path: Path, key_part: str, value: float, dtype=None) -> str:
    """Put `value` into the first tensor whose name holds `key_part` (optionally cast the file's tensor)."""
    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if key_part in k)
    t = tensors[name].clone().to(dtype or tensors[name].dtype)
    t.view(-1)[0] = value
    save_file(dict(tensors, **{name: t}), path)
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_minipeft_adapter_is_refused_naming_it(tmp_path, value):
    save_adapter(with_lora(r=4), tmp_path)
    name = poison(tmp_path / "adapter.safetensors", "lora_B", value)
    edit_json(tmp_path / "minipeft_adapter.json",
              lambda m: m.__setitem__("weights_sha256", sha256_file(tmp_path / "adapter.safetensors")))
    model = tiny()
    with pytest.raises(ValueError, match=rf"adapter\.safetensors: tensor '{name}' holds 1 NaN or inf"):
        load_adapter(model, tmp_path)
    assert not adapter_modules(model)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adalora"])
def test_nan_in_a_peft_adapter_is_refused_naming_it(tmp_path, method):
    save_adapter(with_lora(method=method), tmp_path, format="peft")
    name = poison(tmp_path / "adapter_model.safetensors", "", float("nan"))
    model = tiny()
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors: tensor '{name}' holds 1 NaN or inf"):
        load_adapter(model, tmp_path)
    assert not adapter_modules(model)


@pytest.mark.parametrize("field", ["lora_alpha", "lora_dropout"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_non_finite_number_in_a_peft_config_is_refused(tmp_path, field, value):
    save_adapter(with_lora(r=4), tmp_path, format="peft")
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    (tmp_path / "adapter_config.json").write_text(text.replace(f'"{field}": {json.dumps(config[field])}',
                                                               f'"{field}": {value}'))
    with pytest.raises(ValueError, match=rf"adapter_config\.json: field '{field}' is -?(nan|inf)"):
        load_adapter(tiny(), tmp_path)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e999"])
def test_a_non_finite_number_in_a_minipeft_config_is_refused(tmp_path, value):
    save_adapter(with_lora(r=4), tmp_path)
    path = tmp_path / "minipeft_adapter.json"
    path.write_text(path.read_text().replace('"alpha": 16.0', f'"alpha": {value}'))
    with pytest.raises(ValueError, match=r"minipeft_adapter\.json: field 'methods\[0\]\.alpha' is (nan|inf)"):
        load_adapter(tiny(), tmp_path)


def test_a_non_finite_hyper_parameter_is_not_saved(tmp_path):
    model = with_lora(r=4, alpha=float("nan"))
    with pytest.raises(ValueError, match="save_adapter: .* a hyper-parameter is NaN or inf"):
        save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="save_peft_adapter: .* a hyper-parameter is NaN or inf"):
        save_adapter(model, tmp_path / "b", format="peft")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("format", ["minipeft", "peft"])
def test_an_adapter_holding_nan_is_not_saved(tmp_path, format):
    model = with_lora(r=4)
    with torch.no_grad():
        model.layers[1].self_attn.v_proj.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"tensor '.*layers\.1\.self_attn\.v_proj\.lora_B.*' holds 1 NaN or inf"):
        save_adapter(model, tmp_path, format=format)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_save_pretrained_refuses_nan_and_a_float16_overflow(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"save_pretrained: .*tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                                         r"holds 1 NaN or inf value\(s\) \(float32\)"):
        model.save_pretrained(tmp_path / "nan")
    model = tiny()
    with torch.no_grad():
        model.layers[1].self_attn.o_proj.weight[0, 0] = 1e5
    model = model.to(torch.float16)  # what export --dtype float16 does before saving
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.o_proj\.weight' holds 1 NaN or inf "
                                         r"value\(s\) \(float16\)"):
        model.save_pretrained(tmp_path / "fp16")
    with pytest.raises(ValueError, match=r"save_meta: .*'layers\.1\.self_attn\.o_proj\.weight' holds 1 NaN"):
        save_meta(model, tmp_path / "meta")
    assert not any((tmp_path / d).exists() and list((tmp_path / d).iterdir()) for d in ("nan", "fp16", "meta"))


def test_loading_in_float16_refuses_a_weight_that_overflows_it(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[0, 0] = 1e5
    model.save_pretrained(tmp_path)
    assert Llama.from_pretrained(tmp_path).layers[1].mlp.down_proj.weight[0, 0] == 1e5  # float32 holds it
    with pytest.raises(ValueError, match=r"model\.safetensors \(loaded as float16\): tensor "
                                         r"'layers\.1\.mlp\.down_proj\.weight' overflows float16: its largest "
                                         r"\|value\| 1e\+05 exceeds float16's maximum 6\.55e\+04"):
        Llama.from_pretrained(tmp_path, dtype=torch.float16)


def test_an_adapter_value_that_overflows_the_parameter_dtype_is_refused(tmp_path):
    save_adapter(with_lora(r=4), tmp_path)
    name = poison(tmp_path / "adapter.safetensors", "lora_B", 1e300, dtype=torch.float64)  # fp32 holds at most 3.4e38
    edit_json(tmp_path / "minipeft_adapter.json",
              lambda m: m.__setitem__("weights_sha256", sha256_file(tmp_path / "adapter.safetensors")))
    with pytest.raises(ValueError, match=rf"tensor '{name}' overflows float32"):
        load_adapter(tiny(), tmp_path)


# ----------------------------------------------------------------------------- 10. AdaLoRA fields

@pytest.mark.parametrize("field, value", [("init_r", 4.7), ("init_r", "4"), ("target_r", 2.9), ("tinit", "x"),
                                          ("total_step", True), ("deltaT", 1.5), ("beta1", "0.85")])
def test_adalora_fields_are_typed_not_coerced(tmp_path, field, value):
    save_adapter(with_lora(method="adalora", r=4, final_r=2), tmp_path, format="peft")
    edit_json(tmp_path / "adapter_config.json", lambda c: c.__setitem__(field, value))
    model = tiny()
    with pytest.raises(ValueError, match=rf"adapter_config\.json: field '{field}' must be int( or float)?, "
                                         + re.escape(f"got {value!r}")):
        load_adapter(model, tmp_path)
    assert not adapter_modules(model)


def test_adalora_range_errors_name_the_file(tmp_path):
    save_adapter(with_lora(method="adalora", r=4, final_r=2), tmp_path, format="peft")
    edit_json(tmp_path / "adapter_config.json", lambda c: c.__setitem__("target_r", 9))
    with pytest.raises(ValueError, match=r"adapter_config\.json: AdaLoRAConfig: need 1 <= final_r <= r"):
        load_adapter(tiny(), tmp_path)


# ----------------------------------------------------------------------------- 11. quantisation

def test_quantize_checks_every_layer_before_replacing_any():
    model = tiny(dim=48, ffn_dim=101)  # q, k, v, o fit blocks of 64; gate_proj's 101 x 48 = 4848 does not
    before = model(IDX)
    with pytest.raises(ValueError, match=r"quantize: layers\.0\.mlp\.gate_proj: its weight \(101, 48\) has 4848 "
                                         r"values, not a multiple of the NF4 block size 64; nothing was quantised"):
        quantize_model(model, "nf4")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(model(IDX), before, rtol=0, atol=0)
    assert len(quantize_model(model, "int8")) == 14  # int8 has one scale per row: any shape


def test_nf4_double_quantisation_near_an_outlier_block_as_documented():
    """quant.py's docstring: one block x1000 doubles the relative error of the 255 blocks sharing its group
    of 256 constants (0.091 -> 0.193); every other block is unchanged, as without double quantisation."""
    torch.manual_seed(0)
    w = torch.randn(1024, 1024) * 0.02
    w.view(-1, NF4_BLOCK)[300] *= 1000  # block 300: in the constants' group 1 (blocks 256..511)

    def rel_error(double_quant: bool) -> torch.Tensor:
        r = dequantize_nf4(quantize_nf4(w, double_quant=double_quant), w.shape)
        return ((r - w).view(-1, NF4_BLOCK).norm(dim=1) / w.view(-1, NF4_BLOCK).norm(dim=1))
    e, plain = rel_error(True), rel_error(False)
    group = torch.cat([e[256:300], e[301:512]])
    others = torch.cat([e[:256], e[512:]])
    assert group.mean() == pytest.approx(0.193, abs=0.005) and plain[256:512].mean() == pytest.approx(0.091, abs=0.003)
    assert torch.allclose(others, torch.cat([plain[:256], plain[512:]]), atol=2e-3)
    assert e[300] == pytest.approx(float(plain[300]), abs=1e-3)


# ----------------------------------------------------------------------------- 12. integer weights

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_an_integer_weight_is_refused_naming_it(tmp_path, dtype):
    tiny().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(64, dtype=dtype)
    save_file(tensors, tmp_path / "model.safetensors")
    name = str(dtype).removeprefix("torch.")
    for load_dtype in (torch.float32, None):  # with a dtype, the old loader cast the integers to floats silently
        with pytest.raises(ValueError, match=rf"model\.safetensors: tensor 'norm\.weight' has dtype {name}; a "
                                             "weight must be floating point"):
            Llama.from_pretrained(tmp_path, dtype=load_dtype)


@pytest.mark.parametrize("format", ["minipeft", "peft"])
def test_an_integer_adapter_tensor_is_refused_naming_it(tmp_path, format):
    save_adapter(with_lora(r=4), tmp_path, format=format)
    weights = tmp_path / ("adapter.safetensors" if format == "minipeft" else "adapter_model.safetensors")
    tensors = load_file(weights)
    name = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[name] = torch.ones_like(tensors[name], dtype=torch.int32)
    save_file(tensors, weights)
    if format == "minipeft":
        edit_json(tmp_path / "minipeft_adapter.json", lambda m: m.__setitem__("weights_sha256", sha256_file(weights)))
    model = tiny()
    with pytest.raises(ValueError, match=rf"{weights.name}: tensor '{name}' has dtype int32; a weight must be"):
        load_adapter(model, tmp_path)
    assert not adapter_modules(model)


# ----------------------------------------------------------------------------- 13. FIFOs

def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("format", ["minipeft", "peft"])
def test_an_adapter_weights_file_that_is_a_fifo_is_refused_at_once(tmp_path, format):
    save_adapter(with_lora(r=4), tmp_path, format=format)
    weights = fifo(tmp_path / ("adapter.safetensors" if format == "minipeft" else "adapter_model.safetensors"))
    with no_hang(), pytest.raises(ValueError, match=rf"{weights.name}: not a regular file"):
        load_adapter(tiny(), tmp_path)
    with no_hang(), pytest.raises(ValueError, match=rf"{weights.name}: not a regular file"):
        load_file(weights)


def test_task_and_tokenizer_files_that_are_fifos_are_refused_at_once(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "a_test.csv").write_text("q,a,b,c,d,A\n")
    fifo(tmp_path / "mmlu" / "test" / "b_test.csv")
    cases = [(lambda: load_mmlu(tmp_path / "mmlu", "test"), "b_test.csv"),
             (lambda: load_arc(tmp_path, "test"), fifo(tmp_path / "ARC-Challenge-Test.jsonl").name),
             (lambda: load_dolly(tmp_path, "test"), fifo(tmp_path / "test.jsonl").name),
             (lambda: load_text(tmp_path, "test"), fifo(tmp_path / "test.txt").name),
             (lambda: load_text(tmp_path / "test.txt"), "test.txt"),
             (lambda: list(json_lines(tmp_path / "test.jsonl")), "test.jsonl"),
             (lambda: Tokenizer.from_file(tmp_path / "tok"), fifo(tmp_path / "tok" / "tokenizer.model").name),
             (lambda: Tokenizer.from_file(tmp_path / "tok" / "tokenizer.model"), "tokenizer.model")]
    for load, name in cases:
        with no_hang(), pytest.raises(ValueError, match=rf"{name}: not a regular file"):
            load()


# ----------------------------------------------------------------------------- WEAK: one error style

@pytest.mark.parametrize("field, value", [("target_modules", ".*(q_proj"), ("exclude_modules", "*"),
                                          ("rank_pattern", {"q_proj[": 2}), ("alpha_pattern", {"(": 4.0})])
def test_an_invalid_regex_in_a_peft_config_names_the_file_and_field(tmp_path, field, value):
    save_adapter(with_lora(r=4), tmp_path, format="peft")
    edit_json(tmp_path / "adapter_config.json", lambda c: c.__setitem__(field, value))
    with pytest.raises(ValueError, match=rf"adapter_config\.json: field '{field}': .* is not a valid regular "
                                         "expression"):
        load_adapter(tiny(), tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("r", 0, r"LoRAConfig: need r >= 1"), ("dropout", 1.5, r"LoRAConfig: need r >= 1, .*dropout=1\.5"),
    ("targets", ["no_such_layer"], r"targets \['no_such_layer'\] matched no linear module"),
])
def test_range_errors_in_a_minipeft_config_name_the_file(tmp_path, field, value, message):
    save_adapter(with_lora(r=4), tmp_path)
    edit_json(tmp_path / "minipeft_adapter.json", lambda m: m["methods"][0].__setitem__(field, value))
    model = tiny()
    with pytest.raises(ValueError, match=rf"minipeft_adapter\.json methods\[0\]: {message}"):
        load_adapter(model, tmp_path)
    assert not adapter_modules(model)


def test_range_errors_in_a_peft_config_name_the_file(tmp_path):
    save_adapter(with_lora(r=4), tmp_path, format="peft")
    edit_json(tmp_path / "adapter_config.json", lambda c: c.__setitem__("lora_dropout", 1.5))
    with pytest.raises(ValueError, match=r"adapter_config\.json: LoRAConfig: need .*dropout=1\.5"):
        load_adapter(tiny(), tmp_path)


@pytest.mark.parametrize("kind", ["strided", "fixed"])
def test_a_sparse_block_longer_than_the_sequence_is_not_padded_to_it(kind, monkeypatch):
    """--sparse-block 4096 on 6 tokens took 11 s and 3.7 GB: the 6 queries were padded to a 4096 block."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    pos = torch.arange(6)[None]
    m = sparse_attention.SparseMask(kind, 4096, 8, pos, pos, kernel="dense")
    reference = m.attend(q, k, v, [])

    def padded(*a, **kw):
        raise AssertionError("block_sparse_attention padded 6 tokens to a block of 4096")
    monkeypatch.setattr(sparse_attention, "_query_blocks", padded)
    out = sparse_attention.block_sparse_attention(q, k, v, kind, 4096, 8, pos)
    torch.testing.assert_close(out, reference)
