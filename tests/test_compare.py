"""minipeft.compare: one seed gives single values and no verdicts, two seeds a spread and verdicts; the
plots tell every entry apart; a damaged JSON file in a compare folder is named in a one-line error.
On the tiny seeded checkpoint, two-step runs (the full compare path is also in tests/test_finetune.py)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from minipeft import compare as cmp
from minipeft import plots
from minipeft.data import synthetic_gsm8k, write_jsonl
from minipeft.llama import Llama, LlamaConfig
from minipeft.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent.parent / "results" / "toy-compare"


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory) -> tuple[Path, list[str]]:
    """A one-seed compare of ia3 and ia3pp (a claim's two entries), two steps each; its folder and CLI args."""
    root = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    Llama(LlamaConfig.from_name("tiny")).save_pretrained(root / "ckpt")
    Tokenizer.byte_level().save(root / "ckpt" / "tokenizer.model")
    write_jsonl(synthetic_gsm8k(16, seed=0), root / "data" / "train.jsonl")
    write_jsonl(synthetic_gsm8k(4, seed=0, split="test"), root / "data" / "test.jsonl")
    args = ["--methods", "ia3,ia3pp", "--seeds", "0", "--steps", "2", "--batch-size", "4", "--max-new-tokens", "8",
            "--checkpoint", str(root / "ckpt"), "--data", str(root / "data"), "--out", str(root / "out")]
    assert cmp.main(args) == 0
    return root / "out", args


def test_one_seed_shows_single_values_and_gives_no_verdict(one_seed):
    out, _ = one_seed
    table, claims = (out / "compare.md").read_text(), (out / "claims.md").read_text()
    assert "±" not in table.split("\n\n")[0] and "±" not in claims.split("\n\n")[0].splitlines()[2]
    assert "one seed, [0] (adapter init and data order): single values, no spread and no verdicts" in table
    assert table.rstrip().endswith("(mean + 2 standard errors over the seeds under it): " + cmp.NO_VERDICT)
    line = claims.splitlines()[2]
    assert line.startswith("| (IA)3++ beats (IA)3 | ia3pp vs ia3 |") and " (1 seed) vs " in line
    assert line.endswith(f"| {cmp.NO_VERDICT} |")
    saved = json.loads((out / "compare.json").read_text())
    for row in saved["rows"][1:]:
        assert row["test_bpt_std"] is None and row["accuracy_std"] is None and row["test_bpt"] > 0


def test_two_seeds_give_a_spread_and_a_verdict(tmp_path):
    def run(label, seed, bpt):
        return dict(label=label, method=label, lr=0.1, seed=seed, trainable_params=10, trainable_pct=1.0,
                    test_bpt=bpt, accuracy=0.5, seconds=1.0, early_step=1, early_test_bpt=bpt)
    runs = [run("ia3pp", 0, 0.10), run("ia3pp", 1, 0.11), run("ia3", 0, 0.30), run("ia3", 1, 0.32)]
    base = dict(method="base model", lr=None, seeds=[], failed=0, errors=[], trainable_params=0, trainable_pct=0.0,
                test_bpt=0.45, accuracy=0.01, seconds=1.0)
    rows = [base] + cmp.aggregate(runs)
    assert rows[1]["test_bpt_std"] == pytest.approx(0.01 / math.sqrt(2))
    settings = dict(steps=2, batch_size=4, seeds=[0, 1], eval_limit=0, limit=0, max_new_tokens=8, base_params=100,
                    base="tiny", data="toy", task="gsm8k", recipes="toy")
    cmp.write_outputs(rows, runs, tmp_path, settings)
    table, claims = (tmp_path / "compare.md").read_text(), (tmp_path / "claims.md").read_text()
    assert "| 0.1050 ± 0.0071 |" in table and "mean ± sample std over seeds [0, 1]" in table
    assert table.rstrip().endswith("under it): every entry")
    assert "| 0.1050 ± 0.0071 vs 0.3100 ± 0.0141 | holds |" in claims
    # one entry with one seed among judged ones: named, not counted either way
    lone = cmp.aggregate([run("lora", 0, 0.2)])
    assert cmp.below_base_line(rows + lone) == f"every entry; {cmp.NO_VERDICT} for lora"
    assert cmp.judge(rows[1], lone[0], "test_bpt", "better")[0] == cmp.NO_VERDICT


def test_mean_std_has_no_spread_below_two_values():
    assert cmp.mean_std([0.1]) == (0.1, None) and cmp.mean_std([0.1, None, float("nan")]) == (0.1, None)
    mean, std = cmp.mean_std([])
    assert math.isnan(mean) and std is None
    assert cmp.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert cmp.pm(0.5, None) == "0.5000" and cmp.pm(0.5, 0.01) == "0.5000 ± 0.0100"


def test_every_plotted_entry_has_its_own_marker_and_colour():
    """On the committed full compare (30 entries): each entry appears once, with a (marker, colour) pair of
    its own, in its family's panel and legend; co-located points are drawn side by side."""
    saved = json.loads((RESULTS / "compare.json").read_text())
    fig = plots.vs_params_figure(saved["rows"], "test_bpt", "bits", 1, "title", logy=True)
    seen = {}
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        for c in ax.containers:
            line = c.lines[0]
            seen[c.get_label()] = (line.get_marker(), line.get_markeredgecolor())
            assert c.get_label() in legend and plots.plot_family(c.get_label()) == ax.get_title()
    entries = [r["method"] for r in saved["rows"][1:]]
    assert sorted(seen) == sorted(entries) and len(set(seen.values())) == len(entries) == 30
    assert fig.get_suptitle() == "title" and "trainable parameters" in fig.get_supxlabel()
    assert plots.dodge([(100, 0.05), (104, 0.0501), (1000, 0.05)], span=1.0, logy=False) == [-4.0, 4.0, 0.0]


def test_one_seed_plot_has_no_error_bars(one_seed):
    out, _ = one_seed
    saved = json.loads((out / "compare.json").read_text())
    fig = plots.vs_params_figure(saved["rows"], "accuracy", "accuracy", 100, "one seed")
    assert [c.has_yerr for ax in fig.axes for c in ax.containers] == [False, False]


@pytest.mark.parametrize("name", ["summary.json", "metrics.jsonl", "base_eval.json"])
def test_a_damaged_json_file_is_named_in_a_one_line_error(one_seed, tmp_path, name, capsys):
    out, args = one_seed
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    damaged = copy / name if name == "base_eval.json" else next((copy / "runs" / "ia3").glob("lr*-seed0")) / name
    damaged.write_text('{"truncated": ')
    assert cmp.main([*args[:-1], str(copy), "--report"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {damaged}") and ": not valid JSON (" in err and err.count("\n") == 1
