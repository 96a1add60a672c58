"""Bad files and settings are refused with a clear error, nothing half-loaded, nothing lost (issue 19):
resume state that cannot run code, safetensors validated as the format's reader does, shard indexes,
saves that leave no shadowing files, adapters typed and loaded transactionally, run folders that are
never wiped or mixed, every flag's range, and generation's arguments."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from helpers import gsm8k_folder, tiny, tiny_checkpoint
from minipeft import finetune, runs
from minipeft.adapters import apply_method, load_adapter, save_adapter, sha256_file
from minipeft.data import synthetic_gsm8k, write_jsonl
from minipeft.base import load_base
from minipeft.tasks import load_task
from minipeft.evaluate import main as evaluate_main
from minipeft.llama import Llama
from minipeft.meta_layout import save_meta
from minipeft.peft import adapter_modules
from minipeft.safetensors_io import load_file, save_file
from minipeft.tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
IDX = torch.arange(12).reshape(2, 6) * 37 % 512


# ----------------------------------------------------------------------------- safetensors files

def write_raw(path: Path, header: dict, data: bytes, length_delta: int = 0) -> None:
    """A safetensors file with a hand-made header (padded with 1-8 spaces); the stored header length
    can be shortened by `length_delta` bytes, into the padding."""
    raw = json.dumps(header).encode()
    raw += b" " * (8 - len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) + length_delta) + raw + data)


def f32(begin, end, n=4):
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, end]}


def test_overlapping_offsets_are_refused(tmp_path):
    write_raw(tmp_path / "x.safetensors", {"a": f32(0, 16), "b": f32(0, 16)}, bytes(16))
    with pytest.raises(ValueError, match=r"x\.safetensors: tensor '(a|b)' starts at byte 0 .* overlaps"):
        load_file(tmp_path / "x.safetensors")


def test_gaps_and_a_short_cover_are_refused(tmp_path):
    write_raw(tmp_path / "gap.safetensors", {"a": f32(0, 16), "b": f32(32, 48)}, bytes(48))
    with pytest.raises(ValueError, match="leaves a gap of 16 bytes"):
        load_file(tmp_path / "gap.safetensors")
    write_raw(tmp_path / "tail.safetensors", {"a": f32(0, 16)}, bytes(24))
    with pytest.raises(ValueError, match="cover 16 bytes but the data section has 24"):
        load_file(tmp_path / "tail.safetensors")
    write_raw(tmp_path / "ok.safetensors", {"b": f32(16, 32), "a": f32(0, 16)}, bytes(32))  # header order is free
    assert set(load_file(tmp_path / "ok.safetensors")) == {"a", "b"}


def test_a_header_length_shortened_into_its_padding_is_refused(tmp_path):
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    write_raw(tmp_path / "ok.safetensors", {"a": f32(0, 32, 8)}, data)
    assert torch.equal(load_file(tmp_path / "ok.safetensors")["a"], torch.arange(8.0))
    write_raw(tmp_path / "short.safetensors", {"a": f32(0, 32, 8)}, data, length_delta=-1)
    with pytest.raises(ValueError, match="short.safetensors: the tensors cover 32 bytes but the data section has 33"):
        load_file(tmp_path / "short.safetensors")


# ----------------------------------------------------------------------------- checkpoints

def sharded(tmp_path: Path, seed: int = 0) -> Path:
    path = tmp_path / "sharded"
    tiny(seed).save_pretrained(path, max_shard_bytes=200_000)
    assert len(list(path.glob("model-*.safetensors"))) > 1
    return path


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    path = sharded(tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name, home = "model.norm.weight", index["model.norm.weight"]
    other = next(f for f in sorted(set(index.values())) if f != home)
    tensors = load_file(path / other)
    save_file(dict(tensors, **{name: torch.full((64,), 7.0)}), path / other)
    with pytest.raises(ValueError, match=rf"{other}: tensor 'model\.norm\.weight' is also in {home}"):
        Llama.from_pretrained(path)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "/dev/stdin"])
def test_shard_paths_outside_the_folder_are_refused(tmp_path, entry):
    path = sharded(tmp_path)
    shutil.copy(next(path.glob("model-00001-*")), tmp_path / "outside.safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = entry
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="must be a relative path inside"):
        Llama.from_pretrained(path)


def test_a_fifo_named_model_safetensors_is_refused_without_hanging(tmp_path):
    tiny().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a regular file"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("first, second", [("sharded", "single"), ("single", "sharded"), ("meta", "single"),
                                           ("single", "meta")])
def test_saving_over_another_layout_loads_what_was_saved(tmp_path, first, second):
    def save(model, layout):
        if layout == "meta":
            save_meta(model, tmp_path)
        else:
            model.save_pretrained(tmp_path, max_shard_bytes=200_000 if layout == "sharded" else None)
    save(tiny(1), first)
    save(tiny(2), second)
    torch.testing.assert_close(Llama.from_pretrained(tmp_path)(IDX), tiny(2)(IDX))
    assert not (second != "sharded" and list(tmp_path.glob("model-*-of-*.safetensors")))


def test_nan_in_a_weight_is_refused_naming_it(tmp_path):
    tiny().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"].clone()
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("inf")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'layers\.1\.mlp\.up_proj\.weight' holds 1 NaN or inf"):
        Llama.from_pretrained(tmp_path)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    tiny().save_pretrained(tmp_path)  # vocab 512
    ranks = {bytes([b]): b for b in range(256)} | {bytes([97, b]): 256 + b for b in range(100)}
    Tokenizer(ranks).save(tmp_path / "tokenizer.model")  # 356 ranks + 256 specials = 612 ids
    with pytest.raises(ValueError, match=r"tokenizer\.model: the tokenizer has 612 ids .* embedding for only 512"):
        load_base(str(tmp_path))


def test_non_utf8_files_are_named(tmp_path):
    tiny().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"model_type": "ll\xffama"}')
    with pytest.raises(ValueError, match=r"config\.json: not UTF-8"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"YQ== 0\nYg== 1\nY\xff== 2\n")
    with pytest.raises(ValueError, match=r"tokenizer\.model:3: not UTF-8 text \(byte 0xff at column 2\)"):
        Tokenizer.from_file(tmp_path / "tokenizer.model")
    data = tmp_path / "data"
    write_jsonl(synthetic_gsm8k(3), data / "train.jsonl")
    write_jsonl(synthetic_gsm8k(3, split="test"), data / "test.jsonl")
    lines = (data / "train.jsonl").read_bytes().split(b"\n")
    (data / "train.jsonl").write_bytes(b"\n".join([lines[0], lines[1].replace(b"?", b"\xe9?", 1), *lines[2:]]))
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not UTF-8"):
        load_task(str(data))


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[1, 600]]), r"token id 600; ids must be integers in \[0, 512\) .*vocabulary size is 512"),
    (dict(prompts=[[1, -1]]), "token id -1"),
    (dict(prompts=torch.tensor([[1, 2]])), r"got Tensor \(convert a tensor with \.tolist\(\)\)"),
    (dict(prompts=[1, 2, 3]), r"prompt 0 must be a non-empty list .*one prompt goes in a list"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    (dict(prompts=[[1]], max_new_tokens=-1), "max_new_tokens must be an integer >= 1, got -1"),
    (dict(prompts=[[1]], temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(prompts=[[1]], top_p=-0.5), r"top_p must be in \(0, 1\]"),
    (dict(prompts=[[1] * 510]), r"longest prompt \(510 tokens\) \+ max_new_tokens \(64\) exceeds .*max_seq_len 512"),
])
def test_generate_arguments_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny().generate(**kwargs)


# ----------------------------------------------------------------------------- adapters

def with_lora(seed=0, **hyper):
    model = apply_method(tiny(), "lora", r=4, **hyper)
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("field, value, message", [
    ("use_rslora", "false", r"field 'use_rslora' must be bool, got 'false'"),
    ("r", 4.7, r"field 'r' must be int, got 4\.7"),
    ("alpha", None, r"field 'alpha' must be float, got None"),
    ("ranks", 4, r"LoRAConfig has no field 'ranks'"),
])
def test_minipeft_hyper_parameters_are_typed(tmp_path, field, value, message):
    save_adapter(with_lora(), tmp_path)
    edit_json(tmp_path / "minipeft_adapter.json", lambda m: m["methods"][0].__setitem__(field, value))
    model = tiny()
    with pytest.raises(ValueError, match=rf"minipeft_adapter\.json methods\[0\]: {message}"):
        load_adapter(model, tmp_path)
    assert not adapter_modules(model)


@pytest.mark.parametrize("field, value", [("use_rslora", "false"), ("r", 4.7), ("use_dora", "no"),
                                          ("lora_alpha", "8"), ("rank_pattern", {"q_proj": 2.5})])
def test_peft_hyper_parameters_are_typed(tmp_path, field, value):
    save_adapter(with_lora(), tmp_path, format="peft")
    edit_json(tmp_path / "adapter_config.json", lambda c: c.__setitem__(field, value))
    with pytest.raises(ValueError, match=rf"adapter_config\.json: field '{field}' must be"):
        load_adapter(tiny(), tmp_path)


def test_unknown_ia3_fields_are_refused(tmp_path):
    save_adapter(apply_method(tiny(), "ia3"), tmp_path, format="peft")
    edit_json(tmp_path / "adapter_config.json", lambda c: c.__setitem__("scale_mode", "exp"))
    with pytest.raises(NotImplementedError, match=r"does not implement the IA3 fields \{'scale_mode': 'exp'\}"):
        load_adapter(tiny(), tmp_path)


def test_a_missing_sha256_pin_is_an_error(tmp_path):
    save_adapter(with_lora(), tmp_path)
    edit_json(tmp_path / "minipeft_adapter.json", lambda m: m.pop("weights_sha256"))
    with pytest.raises(ValueError, match=r"field 'weights_sha256' missing: the pin of the tensors file is required"):
        load_adapter(tiny(), tmp_path)


@pytest.mark.parametrize("method", ["prefix_tuning", "lora", "llama_adapter"])
def test_a_failed_load_leaves_the_model_exactly_as_before(tmp_path, method):
    source = apply_method(tiny(), method)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.05)
    save_adapter(source, tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    tensors = load_file(tmp_path / "bad" / "adapter.safetensors")
    last = sorted(tensors)[-1]
    tensors[last] = tensors[last].reshape(-1)[:-1].clone()  # one tensor cut short: fails after the apply
    save_file(tensors, tmp_path / "bad" / "adapter.safetensors")
    edit_json(tmp_path / "bad" / "minipeft_adapter.json",
              lambda m: m.__setitem__("weights_sha256", sha256_file(tmp_path / "bad" / "adapter.safetensors")))
    model = tiny()
    before, names = model(IDX), [n for n, _ in model.named_modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(model, tmp_path / "bad")
    assert [n for n, _ in model.named_modules()] == names and not adapter_modules(model)
    assert [p.requires_grad for p in model.parameters()] == flags and not getattr(model, "peft_configs", [])
    torch.testing.assert_close(model(IDX), before, rtol=0, atol=0)
    load_adapter(model, tmp_path / "good")  # and a good adapter loads afterwards
    torch.testing.assert_close(model(IDX), source(IDX))


@pytest.mark.parametrize("first, second", [("minipeft", "peft"), ("peft", "minipeft")])
def test_saving_an_adapter_over_the_other_format_loads_what_was_saved(tmp_path, first, second):
    save_adapter(with_lora(seed=1), tmp_path, format=first)
    new = with_lora(seed=2)
    save_adapter(new, tmp_path, format=second)
    torch.testing.assert_close(load_adapter(tiny(), tmp_path)(IDX), new(IDX))
    left = {p.name for p in tmp_path.iterdir()}
    assert left == ({"adapter_config.json", "adapter_model.safetensors", "minipeft_base_model.json"}
                    if second == "peft" else {"minipeft_adapter.json", "adapter.safetensors"})


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return gsm8k_folder(tmp_path_factory.mktemp("gsm8k"), train=8, test=2)


def args(checkpoint, data, out, *extra) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--max-steps", "2", "--save-every", "1", "--no-baseline", "--max-new-tokens", "4", "--quiet", *extra]


@pytest.fixture(scope="module")
def finished(checkpoint, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "a"
    assert finetune.main(args(checkpoint, data, out)) == 0
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def test_a_resume_state_with_a_code_payload_is_refused(finished, tmp_path, capsys):
    run, marker = copy_run(finished, tmp_path), tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")  # unpickling this would create the marker file
    state = torch.load(run / "train_state.pt", weights_only=True)
    torch.save(dict(state, extra=Payload()), run / "train_state.pt")
    assert finetune.main(["--resume", str(run), "--quiet"]) == 1
    assert "train_state.pt: cannot be read as a training state" in capsys.readouterr().err
    assert not marker.exists()


def test_the_state_of_another_run_is_refused(finished, checkpoint, data, tmp_path, capsys):
    other = tmp_path / "b"
    assert finetune.main(args(checkpoint, data, other, "--seed", "1")) == 0
    run = copy_run(finished, tmp_path)
    shutil.copy(other / "train_state.pt", run / "train_state.pt")
    assert finetune.main(["--resume", str(run), "--quiet"]) == 1
    assert "train_state.pt belongs to another run: its config hash" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "train_state.pt").write_bytes((run / "train_state.pt").read_bytes()[:300]),
     "train_state.pt: cannot be read as a training state"),
    (lambda run: edit_json(run / "config.json", lambda c: c.pop("train")), r"config\.json: no 'train' section"),
    (lambda run: edit_json(run / "config.json", lambda c: c["train"].__setitem__("lr", "fast")),
     r"config\.json: train\.lr must be float, got 'fast'"),
    (lambda run: (run / "config.json").write_text("[]"), r"config\.json: no 'train' section"),
])
def test_a_damaged_run_folder_is_named_on_resume(finished, tmp_path, capsys, damage, message):
    run = copy_run(finished, tmp_path)
    damage(run)
    assert finetune.main(["--resume", str(run), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert load_adapter(tiny(), run / "adapter")  # the last good save stays loadable


def test_an_existing_run_folder_is_refused_unless_resume_or_overwrite(finished, checkpoint, data, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    metrics = (run / "metrics.jsonl").read_text()
    assert finetune.main(args(checkpoint, data, run)) == 1  # the same command again
    err = capsys.readouterr().err
    assert f"{run} already exists" in err and f"--resume {run}" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing wiped
    (run / "stale.txt").write_text("from the old run")
    assert finetune.main(args(checkpoint, data, run, "--overwrite")) == 0
    assert not (run / "stale.txt").exists() and (run / "summary.json").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    assert finetune.main(args(checkpoint, data, notes, "--overwrite")) == 1
    assert "holds no run" in capsys.readouterr().err and (notes / "thesis.tex").exists()


FLAGS = [("--epochs", "-1"), ("--grad-accum", "-1"), ("--grad-accum", "0"), ("--max-steps", "-5"),
         ("--min-lr-ratio", "-1"), ("--batch-size", "0"), ("--eval-batch-size", "0"), ("--eval-batch-size", "-1"),
         ("--max-len", "-1"), ("--warmup", "-1"), ("--weight-decay", "-1"), ("--save-every", "-1"),
         ("--max-new-tokens", "0"), ("--max-new-tokens", "-1"), ("--limit", "-1"), ("--eval-limit", "-1"),
         ("--lr", "nan"), ("--lr", "0"), ("--clip", "-1"), ("--eval-every", "-2")]


@pytest.mark.parametrize("flag, value", FLAGS)
def test_every_numeric_flag_is_range_checked_by_name(tmp_path, capsys, flag, value):
    assert finetune.main(["--out", str(tmp_path / "r"), flag, value, "--quiet"]) == 1
    assert re.match(rf"error: {flag} {re.escape(value)}(\.0)?: must be", capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("device, message", [("foo", "not a device name"), ("cuda", "cuda is not available")])
def test_a_device_this_machine_lacks_is_refused(tmp_path, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert finetune.main(["--out", str(tmp_path / "r"), "--device", device, "--quiet"]) == 1
    assert message in capsys.readouterr().err


def test_empty_splits_and_answerless_settings_are_refused(checkpoint, data, tmp_path, capsys):
    empty = tmp_path / "empty"
    shutil.copytree(data, empty)
    (empty / "test.jsonl").write_text("\n  \n")
    assert finetune.main(args(checkpoint, empty, tmp_path / "r1")) == 1
    assert "test.jsonl: no examples" in capsys.readouterr().err
    assert finetune.main(args(checkpoint, data, tmp_path / "r2", "--max-len", "5")) == 1
    assert "--max-len 5: no test example keeps an answer token" in capsys.readouterr().err


def test_a_full_disk_leaves_no_temp_files(tmp_path, monkeypatch):
    model = apply_method(tiny(), "lora", r=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    (tmp_path / "config.json").write_text("{}")
    real_fdopen = os.fdopen

    class FullDisk:  # every write fails, and so does the flush that close() attempts
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)
    monkeypatch.setattr("minipeft.safetensors_io.os.fdopen", FullDisk)
    with pytest.raises(OSError, match="No space left"):
        runs.save_checkpoint(tmp_path, model, opt, sched, step=1)
    assert not list(tmp_path.rglob("*.tmp"))


def test_ctrl_c_says_how_to_resume(checkpoint, data, tmp_path, monkeypatch, capsys):
    real, calls = finetune.train_step, [0]

    def interrupted(*a, **kw):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(finetune, "train_step", interrupted)
    assert finetune.main(args(checkpoint, data, tmp_path / "r")) == 130
    run = tmp_path / "r"
    assert (f"last save is step 1; continue with: make resume RUN={run} (or .venv/bin/python -m minipeft.finetune "
            f"--resume {run})") in capsys.readouterr().err


def test_evaluate_prints_one_line_errors(tmp_path, capsys):
    assert evaluate_main(["--checkpoint", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
    assert evaluate_main(["--limit", "-1"]) == 1
    assert "--limit -1: must be >= 0" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{not json")
    for adapter, named in (("runs/lora", "runs/lora: --adapter folder does not exist"),
                           (tmp_path / "empty", "empty: neither a run folder with adapter/"),
                           (tmp_path / "run", "run/config.json: not valid JSON")):
        assert evaluate_main(["--adapter", str(adapter), "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and err.count("\n") == 1, err


def test_help_lists_methods_and_defaults(capsys):
    with pytest.raises(SystemExit):
        finetune.main(["--help"])
    out = capsys.readouterr().out
    assert "prefix_tuning" in out and "--list-methods" in out and "--set help" in out
    assert finetune.main(["--list-methods"]) == 0
    assert "lora (LoRAConfig): r: int = 8" in capsys.readouterr().out
    assert finetune.main(["--method", "ia3", "--set", "help"]) == 0
    assert capsys.readouterr().out.startswith("ia3 (IA3Config): targets")
    from minipeft import compare
    for main, prog, default in ((evaluate_main, "evaluate", 256), (compare.main, "compare", 160)):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        assert out.startswith(f"usage: python -m minipeft.{prog}") and f"generation budget (default: {default})" in \
            " ".join(out.split()) or f"budget for accuracy (default: {default})" in " ".join(out.split())


def test_no_answer_token_is_undefined_not_zero_and_such_examples_are_skipped():
    from minipeft.scoring import bits_per_token
    assert math.isnan(bits_per_token(tiny(), [([1, 2, 3], [-100, -100, -100])]))
    kept, skipped = finetune.with_answer_tokens([([1, 2], [-100, -100]), ([1, 2], [-100, 5])], max_len=2)
    assert kept == [([1, 2], [-100, 5])] and skipped == 1
    with pytest.raises(ValueError, match="--max-len 2: no training example keeps an answer token"):
        finetune.with_answer_tokens([([1, 2], [-100, -100])], max_len=2)
    with pytest.raises(ValueError, match="no answer token"):
        finetune.train_step(tiny(), tiny(), None, [(torch.ones(1, 2, dtype=torch.long),
                                                    torch.full((1, 2), -100), torch.ones(1, 2))], 1.0, "cpu")
