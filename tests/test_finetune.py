"""Tests for the training loop (minipeft.finetune), evaluation (minipeft.evaluate) and the comparison
(minipeft.compare): on a tiny seeded model saved in the HF layout
with the byte-level tokenizer, and a small synthetic GSM8K-format sample."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minipeft import finetune, plots, runs
from minipeft.adapters import adapter_state, apply_method, load_adapter
from minipeft.data import IGNORE, collate, encode_completion, encode_example, pack, synthetic_gsm8k
from minipeft.scoring import bits_per_token, cut_after_answer
from minipeft.evaluate import main as evaluate_main
from minipeft.finetune import DataPlan, train_step, warmup_cosine
from minipeft.runs import TrainConfig, parse_method_args
from minipeft.llama import Llama, LlamaConfig
from minipeft.safetensors_io import load_file
from minipeft.tokenizer import Tokenizer
from helpers import gsm8k_folder, tiny_checkpoint

TOK = Tokenizer.byte_level()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return gsm8k_folder(tmp_path_factory.mktemp("gsm8k"), train=24, test=6)


def cli_args(checkpoint, data, out, *extra) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--lr", "1e-2", "--set", "r=4", "--max-new-tokens", "24", "--quiet", *extra]


@pytest.fixture(scope="module")
def run(checkpoint, data, tmp_path_factory) -> Path:
    """One short CLI run: 2 epochs of 6 steps, evaluated every 4 steps."""
    out = tmp_path_factory.mktemp("run")
    assert finetune.main(cli_args(checkpoint, data, out, "--epochs", "2", "--eval-every", "4")) == 0
    return out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- batches and loss

@pytest.mark.parametrize("packed", [False, True])
def test_training_batches_mask_the_prompt(packed):
    """Through DataPlan (what train() feeds the model), the only targets are each example's answer
    tokens + EOS, in order; prompts and padding are -100."""
    examples = synthetic_gsm8k(10, seed=3)
    encoded = [encode_example(TOK, ex, max_len=256) for ex in examples]
    plan = DataPlan(encoded, TrainConfig(batch_size=3, pack=packed, max_len=256), TOK.pad_id)
    seen = []
    for step in range(plan.steps_per_epoch):
        for idx, targets, seg in plan.step_batches(step):
            assert (targets[seg == 0] == IGNORE).all()  # padding
            for row in range(len(idx)):
                for s in seg[row].unique().tolist():
                    if s:
                        t = targets[row][seg[row] == s]
                        seen.append(t[t != IGNORE].tolist())
                        assert (t[:(t != IGNORE).nonzero()[0]] == IGNORE).all()  # prompt first, all masked
    wanted = sorted(encode_completion(TOK, ex["answer"]) for ex in examples)
    assert sorted(seen) == wanted  # every answer exactly once, EOS included


def test_train_step_loss_counts_answer_tokens_only():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny"))
    encoded = [encode_example(TOK, ex) for ex in synthetic_gsm8k(4, seed=1)]
    idx, targets, seg = collate(encoded)
    logits = model(idx, segment_ids=seg)
    keep = targets != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep]).item() / math.log(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    bits, tokens, n_answer, _ = train_step(model, model, opt, [(idx, targets, seg)], 1.0, torch.device("cpu"))
    assert bits == pytest.approx(expected, rel=1e-5)
    assert n_answer == int(keep.sum()) and tokens == int((seg != 0).sum())


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_loss_and_gradients_equal_unpacked():
    torch.manual_seed(0)
    model = apply_method(Llama(LlamaConfig.from_name("tiny")), "lora", r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a non-trivial adapter
    encoded = [encode_example(TOK, ex) for ex in synthetic_gsm8k(6, seed=2)]
    sums, grads = [], []
    for idx, targets, seg in (collate(encoded), pack(encoded, 400)):
        assert len(idx) == 6 if not grads else len(idx) < 6  # packing really did put examples together
        n = (targets != IGNORE).sum()
        _, loss = model(idx, targets, segment_ids=seg)
        (loss * n).backward()
        sums.append((loss * n).item())
        grads.append(_grads(model))
        model.zero_grad()
    assert sums[0] == pytest.approx(sums[1], rel=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_one_big_batch():
    """Micro-batches weighted by their answer tokens give the gradient of the whole batch."""
    encoded = [encode_example(TOK, ex) for ex in synthetic_gsm8k(6, seed=4)]
    grads = []
    for micro in ([encoded], [encoded[:2], encoded[2:]]):
        torch.manual_seed(0)
        model = apply_method(Llama(LlamaConfig.from_name("tiny")), "lora", r=4)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
        train_step(model, model, opt, [collate(m) for m in micro], 0.0, torch.device("cpu"))
        grads.append({n: before[n] - p for n, p in model.named_parameters() if p.requires_grad})  # = lr * grad
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.25) and warmup_cosine(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)  # half way through the cosine
    assert warmup_cosine(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- method arguments

def test_method_args_are_typed_by_the_config_dataclass():
    args = parse_method_args("lora", ["r=16", "alpha=32", "targets=q_proj,v_proj", "use_rslora=true",
                                      "dropout=0.1"])
    assert args == dict(r=16, alpha=32.0, targets=("q_proj", "v_proj"), use_rslora=True, dropout=0.1)
    assert parse_method_args("lora", ["targets=all-linear"]) == dict(targets="all-linear")
    with pytest.raises(ValueError, match=r"LoRAConfig has no field 'rank'; fields are r: int"):
        parse_method_args("lora", ["rank=8"])
    with pytest.raises(ValueError, match=r"r expects int: 'eight' is not a valid int"):
        parse_method_args("lora", ["r=eight"])
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        parse_method_args("lora", ["r"])
    with pytest.raises(KeyError, match="unknown PEFT method 'lorax'"):
        parse_method_args("lorax", [])


# ----------------------------------------------------------------------------- the CLI

def test_cli_run_writes_every_artifact(run, checkpoint, data):
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["method"] == "lora" and cfg["train"]["method_args"] == {"r": 4}
    assert cfg["method_config"][0]["r"] == 4 and cfg["steps"] == 12 and cfg["steps_per_epoch"] == 6
    recs = records(run)
    kinds = [r["kind"] for r in recs]
    assert kinds[0] == "baseline" and kinds[-1] == "final"
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [4, 6, 8, 12]  # every 4 and epoch ends
    assert [(r["epoch"], r["step"]) for r in recs if r["kind"] == "epoch"] == [(0, 6), (1, 12)]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss_bpt"]) for r in recs if r["kind"] == "train")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["test_bpt"] < summary["before"]["test_bpt"]  # it learned something
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and set(preds[0]) == {"question", "gold", "generated", "prediction", "correct",
                                                 "strict_match", "flexible_extract", "strict_match_extracted",
                                                 "flexible_extract_extracted", "prompt_tokens"}
    assert summary["after"]["accuracy"] == sum(p["correct"] for p in preds) / 6
    assert summary["after"]["strict_match"] == sum(p["strict_match"] for p in preds) / 6
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = plots.loss_plot_series(recs)  # what loss.png draws: the final test point and the rate
    assert series["final"] == [(12, summary["after"]["test_bpt"])] and series["test"][0] == (0, recs[0]["test_bpt"])
    assert [s for s, _ in series["lr"]] == list(range(1, 13)) and series["lr"][1][1] > series["lr"][-1][1] > 0
    assert (run / "train_state.pt").exists() and (run / "predictions_base.jsonl").exists()
    model = load_adapter(Llama.from_pretrained(checkpoint), run / "adapter")  # the adapter loads back
    assert bits_per_token(model, [encode_example(TOK, ex) for ex in json_lines(data / "test.jsonl")]) == \
        pytest.approx(summary["after"]["test_bpt"], rel=1e-5)


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_cli_on_base_and_adapter(run, checkpoint, data, capsys):
    recs = records(run)
    for extra, kind in ([], "baseline"), (["--adapter", str(run)], "final"):
        assert evaluate_main(["--checkpoint", str(checkpoint), "--data", str(data), "--max-new-tokens", "24",
                              *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        expected = next(r for r in recs if r["kind"] == kind)
        assert out["test_bpt"] == pytest.approx(expected["test_bpt"], rel=1e-5)
        assert out["accuracy"] == expected["accuracy"] and out["n"] == 6
    # a run folder alone: its checkpoint, data and format come from its config.json
    assert evaluate_main(["--adapter", str(run), "--max-new-tokens", "24"]) == 0
    assert json.loads(capsys.readouterr().out)["test_bpt"] == pytest.approx(recs[-1]["test_bpt"], rel=1e-5)


def test_cut_after_answer():
    assert cut_after_answer("He has 3+4 = <<3+4=7>>7.\n#### 7\nQuestion: more") == "He has 3+4 = <<3+4=7>>7.\n#### 7"
    assert cut_after_answer("no answer line\nat all") == "no answer line\nat all"


def _kill_at(monkeypatch, call: int):
    """Make the `call`-th train_step (1-based) die as if the process were killed."""
    real, count = finetune.train_step, [0]

    def dying(*args, **kwargs):
        count[0] += 1
        if count[0] == call:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)
    monkeypatch.setattr(finetune, "train_step", dying)


def test_resume_after_a_kill_equals_an_uninterrupted_run(checkpoint, data, tmp_path, monkeypatch, capsys):
    args = ("--max-steps", "6", "--save-every", "2", "--no-baseline", "--set", "dropout=0.1")  # dropout: RNG
    assert finetune.main(cli_args(checkpoint, data, tmp_path / "a", *args)) == 0
    _kill_at(monkeypatch, 4)  # dies during step 4: steps 1-2 are saved, step 3 is lost
    assert finetune.main(cli_args(checkpoint, data, tmp_path / "b", *args)) == 130  # Ctrl-C: says how to resume
    assert f"continue with: make resume RUN={tmp_path / 'b'} " in capsys.readouterr().err
    monkeypatch.undo()
    assert torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)["step"] == 2
    # flags equal to the saved settings may come with --resume (`make finetune ARGS="--resume RUN"` adds --method)
    assert finetune.main(["--resume", str(tmp_path / "b"), "--method", "lora", "--max-steps", "6", "--lr", "0.01",
                          "--set", "r=4", "--no-baseline", "--quiet"]) == 0
    a, b = (load_file(tmp_path / x / "adapter" / "adapter.safetensors") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(tmp_path / x / "train_state.pt", weights_only=True) for x in "ab")
    assert sa["step"] == sb["step"] == 6 and sa["scheduler"] == sb["scheduler"]
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    ra, rb = ([(r["step"], r["loss_bpt"]) for r in records(tmp_path / x) if r["kind"] == "train"] for x in "ab")
    assert ra == rb  # the same losses, and no step logged twice


@pytest.mark.parametrize("flags,named", [
    (["--lr", "1"], "--lr 1.0 differs from the run's lr = 0.01"),
    (["--method", "ia3"], "--method ia3 differs from the run's method = 'lora'"),
    (["--set", "r=8"], "--set r=8 differs from the run's method_args = {'r': 4}"),
    (["--epochs", "3"], "--epochs 3 differs from the run's epochs = 2"),
    (["--overwrite"], "--overwrite cannot come with it"),
])
def test_resume_refuses_flags_that_differ_from_the_saved_run(run, flags, named, capsys):
    assert finetune.main(["--resume", str(run), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and ("--overwrite" in flags or f"{run}/config.json" in err)
    assert err.count("\n") == 1  # one line


def test_the_run_folder_is_printed_at_the_start_and_at_the_end(checkpoint, data, tmp_path, capsys):
    out = tmp_path / "run"
    args = [a for a in cli_args(checkpoint, data, out, "--max-steps", "1", "--no-baseline", "--eval-limit", "2",
                                "--max-new-tokens", "4") if a != "--quiet"]
    assert finetune.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("recipe: lora on llama-3.2-1b: lr 0.01 (--lr;") and lines[1] == f"run folder: {out}"
    assert lines[-1].startswith(f"run folder: {out} (summary.json") and (out / "summary.json").exists()


def test_a_crash_while_saving_keeps_the_previous_adapter(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = apply_method(Llama(LlamaConfig.from_name("tiny")), "lora", r=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    runs.save_checkpoint(tmp_path, model, opt, sched, step=1)
    saved = {k: v.clone() for k, v in adapter_state(model).items()}
    with torch.no_grad():
        for p in adapter_state(model).values():
            p.add_(1.0)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        runs.save_checkpoint(tmp_path, model, opt, sched, step=2)
    monkeypatch.undo()
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["step"] == 1
    reloaded = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert all(torch.equal(reloaded[k], saved[k]) for k in saved)
    assert not list(tmp_path.rglob(".*.tmp"))  # no temp file left behind


def test_nan_loss_stops_and_keeps_the_last_good_adapter(checkpoint, data, tmp_path, monkeypatch, capsys):
    real_forward, calls = Llama.forward, [0]

    def poisoned(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls[0] += 1
            if calls[0] == 3:  # the third training step's loss
                return out[0], out[1] * float("nan")
        return out
    monkeypatch.setattr(Llama, "forward", poisoned)
    out = tmp_path / "run"
    assert finetune.main(cli_args(checkpoint, data, out, "--max-steps", "6", "--save-every", "1",
                                  "--no-baseline")) == 1
    err = capsys.readouterr().err
    assert "step 3: loss nan" in err and "last good adapter (step 2)" in err
    state = torch.load(out / "train_state.pt", weights_only=True)
    adapter = load_file(out / "adapter" / "adapter.safetensors")
    assert state["step"] == 2 and all(torch.equal(adapter[k], state["adapter"][k]) for k in adapter)
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert records(out)[-1]["kind"] == "stopped"


def test_malformed_data_is_reported_with_file_and_line(checkpoint, data, tmp_path, capsys):
    bad = tmp_path / "bad"
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[2] = '{"question": "q", "answer": "no final answer"}'
    bad.mkdir()
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    (bad / "test.jsonl").write_text((data / "test.jsonl").read_text())
    assert finetune.main(cli_args(checkpoint, bad, tmp_path / "run")) == 1
    assert f"{bad / 'train.jsonl'}:3: answer has no '#### <number>'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- compare

# the toy base and the recipes: tests/test_toy.py


def test_compare_writes_table_and_plots_with_spread_and_reuses_finished_runs(checkpoint, data, tmp_path, capsys):
    import json
    from minipeft.compare import compare, main as compare_main
    rows = compare(["lora", "ia3", "ia3pp+use_l_o=false"], tmp_path, steps=3, checkpoint=str(checkpoint),
                   data=str(data), batch_size=4, max_new_tokens=16, seeds=[0, 1])
    printed = capsys.readouterr().out
    assert "run 1/6: lora (lr 0.0001, seed 0)" in printed and "run 6/6: ia3pp+use_l_o=false" in printed
    assert [r["method"] for r in rows] == ["base model", "lora", "ia3", "ia3pp+use_l_o=false"]
    table = (tmp_path / "compare.md").read_text()
    assert "| test bits/token | accuracy (%) |" in table and table.count(" ± ") >= 6 and "seeds [0, 1]" in table
    assert "clearly below the base model's (mean + 2 standard errors over the seeds under it): " in table
    for name in ("compare_accuracy.png", "compare_bpt.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert len(saved["runs"]) == 6 and saved["settings"]["seeds"] == [0, 1]
    lora = [r for r in saved["runs"] if r["label"] == "lora"]
    mean = sum(r["test_bpt"] for r in lora) / 2
    std = abs(lora[0]["test_bpt"] - lora[1]["test_bpt"]) / 2 ** 0.5  # sample std of two values
    assert rows[1]["test_bpt"] == pytest.approx(mean) and rows[1]["test_bpt_std"] == pytest.approx(std)
    assert lora[0]["test_bpt"] != lora[1]["test_bpt"]  # the seed changes the adapter init and data order
    assert rows[1]["trainable_params"] > rows[2]["trainable_params"] > 0
    no_lo = json.loads(next((tmp_path / "runs/ia3pp+use_l_o=false").glob("lr*-seed0/config.json")).read_text())
    assert no_lo["method_config"] == [dict(method="ia3pp", use_qk_norm=True, use_l_o=False)]
    # a rerun reuses every finished run, also one recorded before a setting existed (it had the default);
    # other settings in the same folder are refused
    older = next((tmp_path / "runs/lora").glob("lr*-seed0/config.json"))
    recorded = json.loads(older.read_text())
    del recorded["train"]["train_split"]
    older.write_text(json.dumps(recorded))
    again = compare(["lora"], tmp_path, steps=3, checkpoint=str(checkpoint), data=str(data), batch_size=4,
                    max_new_tokens=16, seeds=[0, 1])
    printed = capsys.readouterr().out
    assert printed.count(": reused ") == 2 and again[1]["test_bpt"] == rows[1]["test_bpt"]
    report = compare(["lora", "ia3"], tmp_path, steps=3, checkpoint=str(checkpoint), data=str(data), batch_size=4,
                     max_new_tokens=16, seeds=[0, 1, 2], report=True)  # trains nothing: seed 2 is not there
    assert report[1]["seeds"] == [0, 1] and report[1]["test_bpt"] == rows[1]["test_bpt"]
    assert not list((tmp_path / "runs/lora").glob("*seed2"))
    assert compare_main(["--methods", "lora", "--steps", "4", "--seeds", "0", "--out", str(tmp_path),
                         "--checkpoint", str(checkpoint), "--data", str(data), "--batch-size", "4"]) == 1
    assert "holds a run with other settings" in capsys.readouterr().err
    assert compare_main(["--methods", "lora+r=x"]) == 1
    assert "r expects int" in capsys.readouterr().err


def test_sweep_picks_the_rate_with_the_lowest_last_epoch_train_loss(checkpoint, data, tmp_path):
    from minipeft.compare import sweep
    rows = sweep(["ia3"], tmp_path, steps=4, factors=(0.1, 10.0), checkpoint=str(checkpoint), data=str(data),
                 batch_size=4, max_new_tokens=8, progress=False)
    assert len(rows) == 2 and sum(r["chosen"] for r in rows) == 1
    best = min(rows, key=lambda r: r["last_epoch_train_bpt"])
    assert best["chosen"] and "| yes |" in (tmp_path / "sweep.md").read_text()




def test_compare_budgets_entries_and_jobs_by_mode(monkeypatch):
    """The full compare runs one epoch on 100 problems, with the claims' variants; the sweep keeps the
    protocol's three epochs on every problem; --quick its 40/40; explicit flags win."""
    import minipeft.compare as cmp
    seen = {}
    monkeypatch.setattr(cmp, "compare", lambda methods, out, steps, checkpoint, data, limit, eval_limit, *a, **k:
                        seen.update(mode="compare", methods=methods, steps=steps, eval_limit=eval_limit, jobs=k["jobs"]))
    monkeypatch.setattr(cmp, "sweep", lambda methods, out, steps, factors, checkpoint, data, limit, eval_limit, *a, **k:
                        seen.update(mode="sweep", methods=methods, steps=steps, eval_limit=eval_limit, jobs=k["jobs"],
                                    factors=factors))
    monkeypatch.setattr(cmp.os, "cpu_count", lambda: 2)
    assert cmp.main([]) == 0
    assert (seen["steps"], seen["eval_limit"], seen["jobs"]) == (125, 100, 2)
    assert seen["methods"][:len(cmp.available_methods())] == cmp.available_methods()
    assert {"lora+gamma=4", "lora+r=6", "partially_tied_lora+r=16", "ia3pp+use_l_o=false",
            "prefix_tuning+mlp_hidden=64", "llama_adapter+version=2"} <= set(seen["methods"])
    assert cmp.main(["--sweep"]) == 0
    assert (seen["mode"], seen["steps"], seen["eval_limit"]) == ("sweep", 375, 0)
    assert seen["factors"] == pytest.approx(cmp.SWEEP_FACTORS)
    assert cmp.main(["--sweep", "--factors", "3", "--methods", "dora"]) == 0 and seen["factors"] == (3.0,)
    assert cmp.main(["--sweep", "--factors", "1/3"]) == 0 and seen["factors"] == pytest.approx((1 / 3,))
    assert "+" not in ",".join(seen["methods"])
    assert cmp.main(["--quick"]) == 0 and (seen["steps"], seen["eval_limit"]) == (40, 40)
    assert cmp.main(["--methods", "lora", "--steps", "7", "--eval-limit", "0", "--jobs", "1"]) == 0
    assert (seen["methods"], seen["steps"], seen["eval_limit"], seen["jobs"]) == (["lora"], 7, 0, 1)
    assert cmp.main(["--checkpoint", "somewhere"]) == 0 and seen["jobs"] == 1


def test_sweep_factors_that_are_not_positive_numbers_get_a_clear_error(capsys):
    import minipeft.compare as cmp
    for bad in ("0", "x", "1/0", "-3"):
        assert cmp.main(["--sweep", "--factors", bad, "--methods", "lora"]) == 1
        assert f"--factors {bad!r}: give positive numbers" in capsys.readouterr().err


def test_compare_table_has_an_acc_norm_column_only_when_a_row_has_one():
    from minipeft.compare import table_lines

    def row(name, acc_norm=None, n=3):
        return dict(method=name, seeds=list(range(n)), failed=0, trainable_params=1, trainable_pct=0.1, test_bpt=0.5,
                    test_bpt_std=0.01, accuracy=0.5, accuracy_std=0.1, acc_norm=acc_norm, acc_norm_std=0.02,
                    seconds=1.0, lr=0.1)
    assert "acc_norm" not in table_lines([row("gsm8k"), row("old compare.json", float("nan"))])[0]
    lines = table_lines([dict(row("base model", 0.25, n=0), lr=None), row("lora", 0.3)])
    assert "| accuracy (%) | acc_norm (%) | seconds per run |" in lines[0] and lines[1].count("|") == 10
    assert "| 50.0 | 25.0 | 1 |" in lines[2] and "| 50.0 ± 10.0 | 30.0 ± 2.0 | 1 |" in lines[3]


def test_compare_names_the_entries_not_clearly_below_the_base():
    from minipeft.compare import not_clearly_below_base

    def row(name, mean, std, n=3, failed=0):
        return dict(method=name, seeds=list(range(n)), failed=failed, test_bpt=mean, test_bpt_std=std)
    base = dict(method="base model", seeds=[], failed=0, test_bpt=0.45)
    se = 0.03 / 3 ** 0.5
    rows = [base, row("clear", 0.45 - 2.1 * se, 0.03), row("noisy", 0.45 - 1.9 * se, 0.03), row("worse", 0.5, 0.01),
            row("one seed", 0.44, float("nan"), n=1), row("diverged", float("nan"), float("nan"), failed=3)]
    assert not_clearly_below_base(rows) == ["noisy", "worse", "diverged"]
    assert not_clearly_below_base(rows[1:]) == []  # no base row: nothing to say


def test_claims_verdicts_count_a_difference_only_beyond_two_standard_errors():
    from minipeft.compare import claims_table, judge

    def row(name, mean, std, failed=0, n=3):
        return dict(method=name, seeds=list(range(n)), failed=failed, test_bpt=mean, test_bpt_std=std,
                    early_test_bpt=mean, early_test_bpt_std=std, early_step=17)
    se = (2 * 0.01 ** 2 / 3) ** 0.5  # two rows with std 0.01 over 3 seeds
    assert judge(row("a", 0.10 - 2.1 * se, 0.01), row("b", 0.10, 0.01), "test_bpt", "better")[0] == "holds"
    assert judge(row("a", 0.10 - 1.9 * se, 0.01), row("b", 0.10, 0.01), "test_bpt", "better")[0] == "within noise"
    assert judge(row("a", 0.10 + 2.1 * se, 0.01), row("b", 0.10, 0.01), "test_bpt", "better")[0].startswith(
        "does not hold")
    assert judge(row("a", 0.10 + 1.9 * se, 0.01), row("b", 0.10, 0.01), "test_bpt", "same")[0].startswith("holds")
    assert judge(row("a", 0.10 + 2.1 * se, 0.01), row("b", 0.10, 0.01), "test_bpt", "same")[0].startswith("does not")
    assert judge(row("a", 0.1, 0.001), row("b", 0.1, 0.01), "test_bpt", "steadier")[0] == "holds"
    assert judge(row("a", 0.1, 0.01, failed=1), row("b", 0.1, 0.01), "test_bpt", "steadier")[0] == "does not hold"
    lines = claims_table([row("ia3pp", 0.03, 0.001), row("ia3", 0.05, 0.001), row("lora", 0.02, 0.001)])
    assert len(lines) == 4 and "| (IA)3++ beats (IA)3 | ia3pp vs ia3 | test bits/token |" in lines[2]
    assert "does not hold (higher by 0.0100)" in lines[3]
