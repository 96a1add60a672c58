"""GSM8K scored both standard ways wherever minipeft reports it: scoring.evaluate's strict_match and
flexible_extract (lm-eval's two filters, minipeft.data.gsm8k_scores) beside minipeft's own accuracy, the
prompts lm-eval builds (5 seeded training shots, the 8 CoT exemplars, Meta's chat form), the evaluate
command line's --shots / --gsm8k-style, finetune's summary line and compare's table."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from helpers import tiny
from minipeft.compare import aggregate, table_lines
from minipeft.data import (encode_gsm8k_prompt, gsm8k_fewshot, gsm8k_prompt, gsm8k_scores, load_split,
                           synthetic_gsm8k, write_jsonl)
from minipeft.runs import summary_line
from minipeft.scoring import evaluate, summary_figures
from minipeft.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = Tokenizer.byte_level()
TEST, TRAIN = synthetic_gsm8k(5, seed=3, split="test"), synthetic_gsm8k(12, seed=3, split="train")


def scripted(model, monkeypatch, answers: dict[str, str], seen: list | None = None) -> None:
    """model.generate answers each prompt with the text scripted for the question it ends with (the
    prompt's ids go to `seen`), as token ids; the rest of evaluate runs as it is."""
    def generate(prompts, max_new_tokens, stop_ids=()):
        if seen is not None:
            seen.extend(prompts)
        return [TOK.encode(next(a for q, a in answers.items() if q in TOK.decode(p))) for p in prompts]
    monkeypatch.setattr(model, "generate", generate)


def by_hand(records: list[dict], test: list[dict], style: str = "gsm8k") -> dict:
    """The two figures from gsm8k_scores applied to each written generation."""
    scores = [gsm8k_scores(r["generated"], ex["answer"], style) for r, ex in zip(records, test)]
    return {key: sum(s[key] for s in scores) / len(scores) for key in ("strict_match", "flexible_extract")}


# ----------------------------------------------------------------------------- scoring.evaluate

def test_evaluate_scores_three_ways_and_cuts_at_the_stop_strings(tmp_path, monkeypatch):
    """Five scripted generations where the three scores disagree: a `$` after ####, no #### line, a next
    question after the answer (cut at "Question:", else flexible takes its 3), a number after the ####."""
    gold = [ex["answer"].rsplit("#### ", 1)[1] for ex in TEST]
    texts = [f"So it is {gold[0]}.\n#### {gold[0]}", f"That makes ${gold[1]} a day.\n#### ${gold[1]}",
             f"It is {gold[2]} in all", f"#### {gold[3]}\nQuestion: Ava has 3 pens.", f"#### {gold[4]} then 4"]
    model = tiny()
    scripted(model, monkeypatch, {ex["question"]: t for ex, t in zip(TEST, texts)})
    result = evaluate(model, TOK, TEST, max_new_tokens=8, predictions=tmp_path / "p.jsonl")
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert records[3]["generated"] == f"#### {gold[3]}\n"  # lm-eval's `until`: cut before "Question:"
    assert [r["strict_match"] for r in records] == [True, False, False, True, True]
    assert [r["flexible_extract"] for r in records] == [True, True, True, True, False]
    assert [r["correct"] for r in records] == [True] * 5  # minipeft's grading: the number after ####, else the last
    assert (result["strict_match"], result["flexible_extract"], result["accuracy"]) == (0.6, 0.8, 1.0)
    assert by_hand(records, TEST) == {k: result[k] for k in ("strict_match", "flexible_extract")}
    assert (result["gsm8k_style"], result["shots"], result["prompts_truncated"]) == ("gsm8k", 0, 0)
    assert summary_figures(result) == {k: result[k] for k in ("test_bpt", "accuracy", "strict_match", "flexible_extract")}


def test_evaluate_on_a_tiny_model_reports_the_figures_gsm8k_scores_gives(tmp_path):
    result = evaluate(tiny(), TOK, TEST[:3], max_new_tokens=12, predictions=tmp_path / "p.jsonl")
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    for r, ex in zip(records, TEST):
        assert {k: r[k] for k in gsm8k_scores("", "#### 1")} == gsm8k_scores(r["generated"], ex["answer"])
    assert by_hand(records, TEST) == {k: result[k] for k in ("strict_match", "flexible_extract")}


def test_five_shot_prompts_are_lm_evals_byte_for_byte_and_left_truncated(monkeypatch):
    """--shots 5: question i gets gsm8k_fewshot's (i+1)-th seeded draw from the training split, the prompt
    is gsm8k_prompt's text after BOS; past max_seq_len - max_new_tokens it keeps its last tokens (lm-eval)."""
    shots = gsm8k_fewshot(TRAIN, len(TEST))
    for model, max_new in ((tiny(max_seq_len=4096), 8), (tiny(), 12)):  # room for all of it; 500 tokens
        seen: list = []
        scripted(model, monkeypatch, {ex["question"]: "#### 1" for ex in TEST}, seen)
        result = evaluate(model, TOK, TEST, max_new_tokens=max_new, shots=5, shot_pool=TRAIN)
        room = model.config.max_seq_len - max_new
        for i, ex in enumerate(TEST):
            text = gsm8k_prompt(ex["question"], "gsm8k", shots[i])
            prompt = next(p for p in seen if TOK.decode(p).endswith(f"Question: {ex['question']}\nAnswer:"))
            assert prompt == TOK.encode(text, bos=True)[-room:]
            if room > 1000:
                assert TOK.decode(prompt[1:]) == text and text.count("Question: ") == 6
        assert result["shots"] == 5 and result["prompts_truncated"] == (0 if room > 1000 else len(TEST))


@pytest.mark.parametrize("style, fmt", [("gsm8k_cot", "plain"), ("gsm8k_cot_llama", "chat")])
def test_cot_styles_are_eight_shot_with_their_own_regex_and_stops(monkeypatch, style, fmt):
    """The CoT styles: 8 exemplars unless shots say otherwise, gsm8k_cot's "The answer is N." (cut at
    "Q:"), gsm8k_cot_llama's last "The final answer is N" in Meta's multi-turn chat."""
    final = "The answer is {}." if style == "gsm8k_cot" else "The final answer is {}"
    gold = [ex["answer"].rsplit("#### ", 1)[1] for ex in TEST[:2]]
    model, seen = tiny(max_seq_len=8192), []  # Meta's 8-shot chat: 4,132 byte tokens here
    scripted(model, monkeypatch, {TEST[0]["question"]: f"3 + 4. {final.format(gold[0])}\n\nQ: 2 then 9",
                                  TEST[1]["question"]: f"#### {gold[1]}"}, seen)
    result = evaluate(model, TOK, TEST[:2], fmt, max_new_tokens=8, gsm8k_style=style)
    assert (result["strict_match"], result["flexible_extract"], result["shots"]) == (0.5, 1.0, 8)
    assert sorted(seen) == sorted(encode_gsm8k_prompt(TOK, ex["question"], style, chat=fmt == "chat")
                                  for ex in TEST[:2])
    with pytest.raises(ValueError, match="--shots 9: --gsm8k-style .* has 8 fixed exemplars"):
        evaluate(model, TOK, TEST[:2], fmt, max_new_tokens=8, gsm8k_style=style, shots=9)


# ----------------------------------------------------------------------------- the evaluate command line

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm8k-eval")
    tiny().save_pretrained(root / "ckpt")
    TOK.save(root / "ckpt" / "tokenizer.model")
    write_jsonl(TRAIN, root / "data" / "train.jsonl")
    write_jsonl(TEST, root / "data" / "test.jsonl")
    return root


@pytest.mark.parametrize("flags, style, shots", [(["--shots", "5"], "gsm8k", 5),
                                                 (["--gsm8k-style", "gsm8k_cot"], "gsm8k_cot", 8),
                                                 (["--gsm8k-style", "gsm8k"], "gsm8k", 5), ([], "gsm8k", 0)])
def test_evaluate_cli_shots_and_style(folders, tmp_path, capsys, flags, style, shots):
    from minipeft.evaluate import main
    out = tmp_path / "predictions.jsonl"
    assert main(["--checkpoint", str(folders / "ckpt"), "--data", str(folders / "data"), "--limit", "2",
                 "--max-new-tokens", "4", "--quiet", "--out", str(out), *flags]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["gsm8k_style"], result["shots"], result["n"]) == (style, shots, 2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert by_hand(records, load_split(folders / "data", "test"), style) == {
        k: result[k] for k in ("strict_match", "flexible_extract")}


@pytest.mark.parametrize("flags, message", [
    (["--gsm8k-style", "gsm8k_cot", "--shots", "9"], "error: --shots 9: --gsm8k-style gsm8k_cot has 8 fixed exemplars (0 to 8)"),
    (["--shots", "13"], "error: --shots 13: the training split has 12 examples to draw from"),
    (["--task", "mmlu", "--gsm8k-style", "gsm8k"], "error: --gsm8k-style gsm8k: only for --task gsm8k (this is --task mmlu)"),
    (["--max-new-tokens", "512"], "error: --max-new-tokens 512 leaves no room for a prompt in the model's max_seq_len 512"),
])
def test_evaluate_cli_refuses_in_one_line(folders, capsys, flags, message):
    from minipeft.evaluate import main
    assert main(["--checkpoint", str(folders / "ckpt"), "--data", str(folders / "data"), "--limit", "2", "--quiet",
                 *flags]) == 1
    assert capsys.readouterr().err == message + "\n"


# ----------------------------------------------------------------------------- summary line and compare table

def test_summary_line_and_compare_table_carry_both_figures():
    figures = dict(test_bpt=0.04, accuracy=0.57, strict_match=0.5, flexible_extract=0.56)
    s = dict(method="lora", before=dict(test_bpt=0.44, accuracy=0.015, strict_match=0.0, flexible_extract=0.2),
             after=figures, trainable_params=21504, wall_seconds=155)
    assert summary_line(s) == ("lora: test 0.4400 -> 0.0400 bits/token, accuracy 1.5% -> 57.0%, strict-match "
                               "0.0% -> 50.0%, flexible-extract 20.0% -> 56.0% (21,504 trainable params, 155s)")
    old = dict(s, before=None, after=dict(test_bpt=0.04, accuracy=0.57))  # another task, or a run without them
    assert summary_line(old) == ("lora: test 0.0400 bits/token, accuracy 57.0% (21,504 trainable params, 155s; "
                                 "the base model not evaluated)")
    run = lambda seed, strict: dict(figures, strict_match=strict, label="lora", method="lora", lr=0.01, seed=seed,
                                    trainable_params=21504, trainable_pct=1.7, seconds=100.0, early_step=None)
    rows = aggregate([run(0, 0.5), run(1, 0.7)])
    assert rows[0]["strict_match"] == pytest.approx(0.6) and rows[0]["flexible_extract"] == 0.56
    base = dict(rows[0], method="base model", lr=None, seeds=[], failed=0, strict_match=0.1, flexible_extract=None)
    lines = table_lines([base, *rows])
    assert "| accuracy (%) | strict-match (%) | flexible-extract (%) | seconds per run |" in lines[0]
    assert "| 57.0 ± 0.0 | 60.0 ± 14.1 | 56.0 ± 0.0 | 100 |" in lines[3] and "| 10.0 | - | 100 |" in lines[2]
    assert "strict-match" not in table_lines([dict(base, strict_match=None)])[0]  # other tasks: no column


# ----------------------------------------------------------------------------- the page quotes the committed run

def test_lm_eval_page_quotes_the_committed_toy_figures():
    """docs/lm-eval.md's toy table is the one scripts/gsm8k_scores.py renders from the committed
    results/toy-gsm8k-scores/summary.json, and its prose quotes that file's figures, settings and load."""
    summary = json.loads((ROOT / "results" / "toy-gsm8k-scores" / "summary.json").read_text())
    table = runpy.run_path(str(ROOT / "scripts" / "gsm8k_scores.py"), run_name="gsm8k_scores")["table"](summary)
    text = (ROOT / "docs" / "lm-eval.md").read_text()
    section = text[text.index("## Strict vs flexible on the toy task"):text.index("## A minipeft model in lm-eval")]
    assert table in section and summary["command"] in section
    pct = lambda x: f"{100 * x:.1f}%"
    before, after, cot = summary["before"], summary["after"], summary["cot_zero_shot"]
    prose = " ".join(section.split("\n\n- ", 1)[1].split())
    quoted = [f"so {pct(before['answer_line'])} of its zero-shot answers",
              f"({pct(before['accuracy'])} to {pct(after['accuracy'])})",
              f"holds it ({pct(cot['after']['strict_match'])})",
              f"number in {pct(cot['before']['flexible_extract'])} and {pct(cot['after']['flexible_extract'])}",
              f"line in {pct(cot['after']['answer_line'])} of them",
              f"falls from {pct(after['accuracy'])} to {pct(cot['after']['accuracy'])}"]
    assert [q for q in quoted if q not in prose] == []
    run, m, c = summary["run"], summary["machine"], cot["machine"]
    head = " ".join(section.split())
    assert f"rate {run['lr']}, {run['steps']} steps of batch {run['batch_size']}" in head
    assert (f"Measured {m['date']}" in head and f"took {m['wall_seconds']:.0f} s wall" in head
            and f"load average {m['load_average_1_5_15_min_before'][0]:.1f} at its start, "
                f"{m['load_average_1_5_15_min_after'][0]:.1f} at its end" in head
            and f"evaluations {c['wall_seconds']:.0f} s (load {c['load_average_1_5_15_min_before'][0]:.1f} to "
                f"{c['load_average_1_5_15_min_after'][0]:.1f})" in head)
