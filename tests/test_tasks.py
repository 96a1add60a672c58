"""The tasks next to GSM8K (minipeft/tasks.py): readers on hand-written files in the official layouts,
prompts and answer-only masks, letter / choice-text scoring against hand-computed log-likelihoods,
sliding-window perplexity, the dolly split, the download script, and finetune --task on the toy analogue."""
from __future__ import annotations

import hashlib
import http.client
import importlib.util
import io
import json
import math
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import minipeft.evaluate as evaluate_cli
import minipeft.scoring as ev
from minipeft.data import IGNORE
from minipeft.scoring import bits_per_token, continuation_logprobs, evaluate_choices, sliding_window_nll
from minipeft.tasks import encode_all, load_task, load_test_set
from minipeft.tasks import (ALPACA_INPUT, DOLLY_FILE, DOLLY_VALID, MC_SUBJECTS, SUBJECT_CATEGORY, TOY_SUBJECTS,
                            dolly_prompt, dolly_split, encode_dolly, encode_mc, load_arc, load_arc_jsonl, load_dolly,
                            load_dolly_jsonl, load_mmlu, load_mmlu_csv, load_text, mc_prompt, subject_category,
                            synthetic_instructions, synthetic_mc, toy_folder)
from minipeft.tokenizer import Tokenizer

from helpers import tiny, tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TOK = Tokenizer.byte_level()

# An MMLU CSV as the official files write it: no header, quoted fields with commas, doubled quotes and a
# newline inside the question (so record 2 starts on line 3).
MMLU_CSV = ('"Which is prime, 4 or 7?",4,7,"both, 4 and 7",neither,B\n'
            '"He said ""x = 1""\nthen what is x?",0,1,2,3,B\n'
            'Plain question,a,b,c,d,D\n')


def arc_line(stem, texts, labels, key, **extra) -> str:
    return json.dumps(dict(id="q", question=dict(stem=stem, choices=[dict(text=t, label=l) for t, l in zip(texts, labels)]),
                           answerKey=key, **extra))

# ----------------------------------------------------------------------------- readers


def test_mmlu_csv_quoting_and_lines(tmp_path):
    path = tmp_path / "high_school_physics_test.csv"
    path.write_text(MMLU_CSV)
    rows = load_mmlu_csv(path, "high_school_physics")
    assert [r["question"] for r in rows] == ["Which is prime, 4 or 7?", 'He said "x = 1"\nthen what is x?',
                                             "Plain question"]
    assert rows[0]["choices"] == ["4", "7", "both, 4 and 7", "neither"] and [r["answer"] for r in rows] == [1, 1, 3]
    assert [r["where"] for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:4"]  # record 2 spans lines 2-3


@pytest.mark.parametrize("bad, match", [("Q,a,b,c,D\n", r":5: expected 6 fields .* got 5"),
                                        ("Q,a,b,c,d,E\n", r":5: answer must be one of A, B, C, D, got 'E'"),
                                        (",,,,,\n", r":5: blank row")])
def test_mmlu_malformed_rows_name_file_and_line(tmp_path, bad, match):
    path = tmp_path / "anatomy_dev.csv"
    path.write_text(MMLU_CSV + bad)
    with pytest.raises(ValueError, match=rf"anatomy_dev\.csv{match}"):
        load_mmlu_csv(path)


def test_mmlu_folder_layout_and_categories(tmp_path):
    for folder, name in [("dev", "anatomy_dev.csv"), ("test", "anatomy_test.csv"), ("test", "philosophy_test.csv"),
                         ("auxiliary_train", "race.csv")]:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text(MMLU_CSV)
    test = load_mmlu(tmp_path, "test")
    assert len(test) == 6 and {r["subject"] for r in test} == {"anatomy", "philosophy"}
    assert {r["subject"] for r in load_mmlu(tmp_path, "train")} == {None}  # auxiliary_train: no subject line
    assert load_mmlu(tmp_path, "dev")[0]["subject"] == "anatomy"
    assert [subject_category(s) for s in ("astronomy", "philosophy", "econometrics", "marketing", "nope")] == \
        ["STEM", "humanities", "social sciences", "other", "unlisted"]
    # categories.py's grouping: 57 subjects, 18 / 13 / 12 / 14; anatomy (subcategory "health") in "other"
    # (lm-eval-harness has it under STEM)
    sizes = Counter(cat for s, cat in SUBJECT_CATEGORY.items() if not s.startswith("toy_"))
    assert sizes == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}
    assert subject_category("anatomy") == "other"
    with pytest.raises(FileNotFoundError, match="val: no .csv files"):
        load_mmlu(tmp_path, "val")


def test_mc_prompt_is_the_standard_form():
    shot = dict(question="1+1?", choices=["1", "2", "3", "4"], labels=list("ABCD"), answer=1, subject="college_physics")
    ex = dict(shot, question="2+2?", answer=3)
    head = "The following are multiple choice questions (with answers) about college physics.\n\n"
    assert mc_prompt(ex) == head + "2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    assert mc_prompt(ex, [shot]) == head + "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    assert mc_prompt(dict(ex, subject=None)) == "2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"


def test_arc_digit_labels_and_odd_choice_counts(tmp_path):
    path = tmp_path / "ARC-Challenge-Test.jsonl"
    path.write_text("\n".join([arc_line("Which?", ["w", "x", "y", "z"], list("1234"), "3"),
                               arc_line("Three?", ["p", "q", "r"], list("ABC"), "C"),
                               arc_line("Five?", list("vwxyz"), list("ABCDE"), "A")]) + "\n\n")
    rows = load_arc(tmp_path, "test")
    assert rows[0]["labels"] == list("ABCD") and rows[0]["answer"] == 2 and rows[0]["choices"] == list("wxyz")
    assert rows[1]["labels"] == list("ABC") and rows[1]["answer"] == 2 and len(rows[2]["labels"]) == 5
    assert mc_prompt(rows[0]) == "Which?\nA. w\nB. x\nC. y\nD. z\nAnswer:"


@pytest.mark.parametrize("line, match", [
    ("{not json", r":2: invalid JSON"),
    (json.dumps(dict(question=dict(stem="s", choices=[])), ), r":2: expected question\.stem"),
    (arc_line("s", ["a", "b"], ["A", "B"], "C"), r":2: answerKey 'C' is not one of the labels"),
    (arc_line("s", ["a", "b"], ["A", "X"], "A"), r":2: choice labels must be"),
    ("", r":2: invalid JSON")])  # a blank line before the end
def test_arc_malformed_lines_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "a.jsonl"
    path.write_text(arc_line("ok", ["a", "b"], ["A", "B"], "A") + "\n" + line + "\n" + arc_line("ok", ["a"] * 2, ["A", "B"], "B"))
    with pytest.raises(ValueError, match=rf"a\.jsonl{match}"):
        load_arc_jsonl(path)


def test_dolly_reader_split_and_prompts(tmp_path):
    records = [dict(instruction=f"i{k}", context="", response=f"r{k}", category="open_qa") for k in range(15011)]
    split = dolly_split(records)
    assert (len(split["train"]), len(split["test"])) == (13011, 2000)
    assert split == dolly_split(records) and split["test"] != dolly_split(records, seed=1)["test"]
    assert sorted(r["instruction"] for r in split["train"] + split["test"]) == sorted(r["instruction"] for r in records)
    (tmp_path / DOLLY_FILE).write_text("".join(json.dumps(r) + "\n" for r in records[:2500]))
    assert load_dolly(tmp_path, "test") == dolly_split(records[:2500])["test"]
    (tmp_path / DOLLY_FILE).write_text("".join(json.dumps(r) + "\n" for r in records[:40]))
    with pytest.raises(ValueError, match=r"databricks-dolly-15k\.jsonl: 40 records, and the split holds out 2,000"):
        load_dolly(tmp_path, "train")  # a clear error, not an empty training set
    assert len(load_test_set(str(tmp_path), "dolly")[0]) == 40  # an evaluation reads only the test split
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n" + json.dumps(dict(records[0], context=None)) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: 'context' missing or not a string"):
        load_dolly_jsonl(bad)
    with_context = dict(instruction="Sum them.", context="3 and 4", response="7", category="closed_qa")
    assert dolly_prompt(with_context) == ALPACA_INPUT.format(instruction="Sum them.", context="3 and 4")
    assert "### Input:" not in dolly_prompt(dict(with_context, context=" ")) and \
        dolly_prompt(with_context).endswith("### Response:")
    assert dolly_prompt(with_context, "chat") == "Sum them.\n\n3 and 4"


def test_text_reader(tmp_path):
    (tmp_path / "test.txt").write_text("hello\n")
    assert load_text(tmp_path, "test")[0]["text"] == "hello\n" == load_text(tmp_path / "test.txt", "train")[0]["text"]
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty.txt: the file is empty"):
        load_text(tmp_path / "empty.txt")

# ----------------------------------------------------------------------------- masks


def test_answer_only_masks():
    ex = dict(question="2+2?", choices=list("1234"), labels=list("ABCD"), answer=3, subject=None)
    [(x, y)] = encode_mc(TOK, ex)
    kept = [t for t in y if t != IGNORE]
    assert TOK.decode(kept) == " D" and y[-len(kept):] == kept and len(x) == len(y)  # the letter, no EOS
    assert x == TOK.encode(mc_prompt(ex), bos=True) + TOK.encode(" ")  # inputs: prompt then " "; targets shifted
    [(_, y)] = encode_mc(TOK, ex, "chat")
    assert TOK.decode([t for t in y if t != IGNORE]) == "D"
    rec = dict(instruction="Say hi.", context="", response="hi there", category="open_qa")
    [(x, y)] = encode_dolly(TOK, rec)
    assert [t for t in y if t != IGNORE] == TOK.encode(" hi there") + [TOK.eos_id]
    assert TOK.decode(x[:len(x) - len(" hi there")]).endswith("### Response:")

# ----------------------------------------------------------------------------- scoring


def _manual_logprob(model, ctx, cont) -> float:
    """log p(cont | ctx) by one full forward over ctx + cont, summed by hand."""
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont]))[0].log_softmax(-1)  # (T, V)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_letter_scores_match_hand_computed_loglikelihoods():
    model = tiny(3)
    qs = synthetic_mc(3, seed=5, split="test")
    requests = [(TOK.encode(mc_prompt(q), bos=True), TOK.encode(" " + label)) for q in qs for label in q["labels"]]
    requests.append((TOK.encode("Question: x\nAnswer:", bos=True), TOK.encode(" a longer choice")))
    rows = []
    hook = model.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    scores = continuation_logprobs(model, requests, batch_size=2)
    hook.remove()
    assert sum(rows) == 3 + 1  # one row per question (its four letters differ only in the last token) + the text
    for (ctx, cont), s in zip(requests, scores):
        assert s == pytest.approx(_manual_logprob(model, ctx, cont), abs=1e-4)
    result, records = evaluate_choices(model, TOK, qs, batch_size=3)
    for q, r, k in zip(qs, records, range(0, 12, 4)):
        assert r["prediction"] == q["labels"][max(range(4), key=lambda i: scores[k + i])]
    assert result["accuracy"] == sum(r["correct"] for r in records) / 3
    # bits/token of the gold letter is the training loss of encode_mc's answer-only targets
    assert result["test_bpt"] == pytest.approx(bits_per_token(model, encode_all(TOK, qs, "plain", 512, "mmlu")), abs=1e-4)


def test_scores_see_an_infix_where_training_does():
    """Infix tuning acts only on answer positions: the letter scores and the sliding window must mark the
    positions training marks (encode_mc's letter; every token of a text), or they score the base model."""
    from minipeft.adapters import apply_method
    model = apply_method(tiny(4), "infix_tuning")
    qs = synthetic_mc(4, seed=6, split="test")
    result, _ = evaluate_choices(model, TOK, qs, batch_size=3)
    trained = bits_per_token(model, encode_all(TOK, qs, "plain", 512, "mmlu"))
    base_result, _ = evaluate_choices(tiny(4), TOK, qs, batch_size=3)
    assert result["test_bpt"] == pytest.approx(trained, abs=1e-4)
    assert abs(result["test_bpt"] - base_result["test_bpt"]) > 1e-3  # the infix changes the score
    ids = TOK.encode("The quick brown fox jumps over the lazy dog. " * 2, bos=True)
    with torch.no_grad():
        _, loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))  # training's text rows: all targets
    nll, n = sliding_window_nll(model, ids, window=len(ids), stride=7)
    assert nll == pytest.approx(loss.item() * n, rel=1e-5)
    # windows of 16 every 5 tokens: each window's context positions see the infix too, as in a training row
    reference, begin, prev_end = 0.0, 0, 1
    while prev_end < len(ids):
        end = min(begin + 16, len(ids))
        x = torch.tensor([ids[begin:end - 1]])
        with torch.no_grad():
            logp = model(x, answer_mask=torch.ones_like(x, dtype=torch.bool))[0].log_softmax(-1)  # (T, V)
        reference -= sum(logp[t - begin - 1, ids[t]].item() for t in range(prev_end, end))
        begin, prev_end = begin + 5, end
    assert sliding_window_nll(model, ids, window=16, stride=5)[0] == pytest.approx(reference, rel=1e-5)


def test_acc_norm_divides_by_characters_and_categories_are_micro_averaged(monkeypatch):
    qs = [dict(question="q", choices=["a", "bbbb"], labels=["A", "B"], answer=1, subject="astronomy"),
          dict(question="q2", choices=["a", "bbbb"], labels=["A", "B"], answer=0, subject="philosophy"),
          dict(question="q3", choices=["a", "bbbb"], labels=["A", "B"], answer=0, subject="philosophy")]
    # per question: letters A, B, then the choice texts " a" (-2.1: -2.1 per character, -1.05 per byte token)
    # and " bbbb" (-8: -2.0 per character, -1.6 per token): only the per-character norm prefers "bbbb"
    fake = [-1.0, -3.0, -2.1, -8.0] * 3
    monkeypatch.setattr(ev, "continuation_logprobs", lambda model, requests, *a, **k: fake[:len(requests)])
    result, records = evaluate_choices(None, TOK, qs, choice_text=True)
    assert [r["prediction"] for r in records] == ["A"] * 3
    assert [r["correct_norm"] for r in records] == [True, False, False]   # per character "bbbb" wins
    assert [r["correct_text"] for r in records] == [False, True, True]    # raw log-likelihood "a" wins
    assert result["acc_norm"] == pytest.approx(1 / 3) and result["acc_text"] == pytest.approx(2 / 3)
    assert result["categories"] == {"STEM": 0.0, "humanities": 1.0} and result["accuracy"] == pytest.approx(2 / 3)


def test_k_shot_prompts_take_the_same_subject_and_drop_shots_that_do_not_fit(monkeypatch):
    def q(text, subject, answer=0):
        return dict(question=text, choices=list("wxyz"), labels=list("ABCD"), answer=answer, subject=subject)
    pool = [q("dev1", "anatomy", 1), q("other", "virology"), q("dev2", "anatomy", 2), q("dev3", "anatomy")]
    ex = q("test question", "anatomy")
    seen = []
    monkeypatch.setattr(ev, "continuation_logprobs", lambda m, requests, *a, **k: seen.extend(requests) or [0.0] * len(requests))
    result, records = evaluate_choices(None, TOK, [ex], shots=2, shot_pool=pool)
    assert TOK.decode(seen[0][0][1:]) == mc_prompt(ex, [pool[0], pool[2]])  # [1:]: after BOS
    assert records[0]["shots"] == 2 and (result["shots_mean"], result["questions_with_fewer_shots"]) == (2, 0)
    one_shot = len(TOK.encode(mc_prompt(ex, pool[:1]), bos=True))
    seen.clear()
    result, records = evaluate_choices(None, TOK, [ex, q("dev1", "anatomy")], shots=2, shot_pool=pool,
                                       max_len=one_shot + 1)
    assert TOK.decode(seen[0][0][1:]) == mc_prompt(ex, pool[:1])  # two shots would not fit: one is kept
    assert [r["shots"] for r in records] == [1, 1]  # dev1 is never its own shot: dev2 fits, dev3 does not
    assert (result["shots"], result["shots_mean"], result["questions_with_fewer_shots"]) == (2, 1, 2)
    result, records = evaluate_choices(None, TOK, [ex], shots=5, shot_pool=pool)  # a pool of 3 for 5 shots
    assert records[0]["shots"] == 3 and (result["shots_mean"], result["questions_with_fewer_shots"]) == (3, 1)
    # ARC's choice-text prompts (acc_norm) get the same shots, in lm-eval-harness's k-shot form
    seen.clear()
    arc_pool = [dict(q("Why?", None, 1), subject=None), dict(q("How?", None, 3), subject=None)]
    evaluate_choices(None, TOK, [dict(ex, subject=None)], shots=2, shot_pool=arc_pool, choice_text=True)
    assert TOK.decode(seen[4][0][1:]) == "Question: Why?\nAnswer: x\n\nQuestion: How?\nAnswer: z\n\n" \
                                         "Question: test question\nAnswer:"


def test_sliding_window_equals_full_context_when_the_text_fits():
    model = tiny(1)
    ids = TOK.encode("The quick brown fox jumps over the lazy dog. " * 2, bos=True)
    with torch.no_grad():
        _, loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    for window in (len(ids), len(ids) + 30):
        nll, n = sliding_window_nll(model, ids, window=window, stride=7)
        assert n == len(ids) - 1 and nll == pytest.approx(loss.item() * n, rel=1e-5)


@pytest.mark.parametrize("window, stride", [(16, 5), (16, 15), (9, 1)])
def test_sliding_window_scores_each_token_once_with_its_window_context(window, stride):
    model = tiny(2)
    ids = TOK.encode("abcdefghij klmnopqrst uvwxyz 0123456789 ABCDEFGHIJ", bos=True)
    nll, n = sliding_window_nll(model, ids, window, stride, batch_size=3)
    # reference: token i is scored by the first window (starts 0, stride, 2*stride, ...) that ends after it;
    # its context is that window's tokens before it
    ref, begin = 0.0, 0
    for i in range(1, len(ids)):
        while begin + window < i + 1:
            begin += stride
        ref -= _manual_logprob(model, ids[begin:i], [ids[i]])
    assert n == len(ids) - 1 and nll == pytest.approx(ref, abs=1e-3)
    with torch.no_grad():
        _, loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    assert abs(nll - loss.item() * n) > 1e-3  # shorter contexts: a different number from the full context
    with pytest.raises(ValueError, match="--stride"):
        sliding_window_nll(model, ids, window, window)


def test_progress_falls_back_to_a_plain_line_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were not installed
    bar = ev.Progress(4, "score")
    bar.update(4, 100)
    bar.close()
    assert "score: 4/4 done" in capsys.readouterr().err
    quiet = ev.Progress(4, "score", enabled=False)
    quiet.update(4, 100)
    assert capsys.readouterr().err == ""

# ----------------------------------------------------------------------------- toy analogues and the job


def test_toy_generators_are_deterministic_and_splits_disjoint():
    train, test = synthetic_mc(300, 0, "train"), synthetic_mc(60, 1, "test")
    assert train == synthetic_mc(300, 0, "train") and train != synthetic_mc(300, 1, "train")
    assert not {q["question"] for q in train} & {q["question"] for q in test}
    assert all(q["choices"][q["answer"]] not in q["choices"][:q["answer"]] + q["choices"][q["answer"] + 1:]
               for q in train)  # one right choice
    ins = synthetic_instructions(200, 0, "train")
    assert ins == synthetic_instructions(200, 0, "train")
    assert not {i["instruction"] + i["context"] for i in ins} & \
        {i["instruction"] + i["context"] for i in synthetic_instructions(50, 1, "test")}


def test_toy_multiple_choice_balances_the_right_letter(tmp_path, monkeypatch):
    # Always answering one letter must score 25% on the toy MMLU and ARC test files (the old analogue's
    # most frequent letter scored 41.5%, which a fine-tuned model could learn instead of the questions).
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))
    for task, loader in (("mmlu", load_mmlu), ("arc_challenge", load_arc)):
        for split in ("train", "test"):
            questions = loader(toy_folder(task), split)
            counts = Counter(q["labels"][q["answer"]] for q in questions)
            assert set(counts) == set("ABCD") and max(counts.values()) <= 0.26 * len(questions), (task, split, counts)
    for subject in MC_SUBJECTS:  # and within each subject, every four questions use each letter once
        answers = [q["answer"] for q in synthetic_mc(80, 3, "test") if q["subject"] == subject]
        assert all(sorted(answers[i:i + 4]) == [0, 1, 2, 3] for i in range(0, len(answers), 4)), subject


def statement_truth(subject: str, context: str, statement: str) -> bool:
    """A toy statement checked by hand: "12+7=19.", "Ivy has 14 pens." (against the context), "8 is even."."""
    if subject == "toy_arithmetic":
        left, right = statement.rstrip(".").split("=")
        return eval(left.replace("/", "//")) == int(right)  # the toy divisions are exact
    if subject == "toy_lookup":
        return statement.rstrip(".") in context.split(". ")[0].split(" and ")
    return int(statement.split()[0]) % 2 == 0


def test_toy_statement_questions_have_the_right_answer():
    for q in synthetic_mc(90, 4, "train", TOY_SUBJECTS) + synthetic_mc(30, 5, "test", TOY_SUBJECTS):
        context, _, rest = q["question"].rpartition("Statement 1 | ")
        first, second = rest.split(" Statement 2 | ")
        truths = [statement_truth(q["subject"], context, s) for s in (first, second)]
        assert q["choices"][q["answer"]] == ", ".join(str(t) for t in truths), q


def test_toy_analogues_load_in_the_official_layouts(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))
    for task in ("mmlu", "arc_challenge", "dolly", "text"):
        train, test, data = load_task(None, 0, task)
        assert train and test and Path(data).parent == tmp_path
    folder = tmp_path / "toy-mmlu-v2-4000-200-0"
    for split in ("train", "test"):  # the training prompts carry the subject line the test prompts have
        assert {q["subject"] for q in load_mmlu(folder, split)} == set(MC_SUBJECTS), split
    train_prompt, test_prompt = mc_prompt(load_mmlu(folder, "train")[0]), mc_prompt(load_mmlu(folder, "test")[0])
    head = "The following are multiple choice questions (with answers) about toy parity.\n\nStatement 1 | "
    assert train_prompt.startswith(head) and test_prompt.startswith(head)
    arc = (tmp_path / "toy-arc_challenge-4000-200-0" / "ARC-Challenge-Test.jsonl").read_text()
    assert '"label": "1"' in arc and '"label": "A"' in arc  # both label styles, as the official files


def test_finetune_task_mmlu_on_the_toy_analogue(tmp_path, monkeypatch):
    from minipeft.finetune import main
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["--task", "mmlu", "--max-steps", "2", "--limit", "16", "--eval-limit", "8", "--batch-size", "4",
                 "--no-baseline", "--out", str(out), "--quiet"]) == 0
    config, summary = json.loads((out / "config.json").read_text()), json.loads((out / "summary.json").read_text())
    assert config["train"]["task"] == "mmlu" and "toy-mmlu" in config["data"] and summary["n_test"] == 8
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 8 and {"gold", "prediction", "letter_logprobs"} <= set(records[0])
    assert summary["after"]["accuracy"] == sum(r["correct"] for r in records) / 8


def test_task_flag_reaches_the_config_and_its_own_run_folder():
    from minipeft.runs import build_parser, check_config, config_from_args
    cfg = config_from_args(build_parser().parse_args(["--task", "arc_challenge", "--method", "ia3pp", "--set", "use_l_o=false"]))
    assert (cfg.task, cfg.out, cfg.method_args) == ("arc_challenge", "runs/toy/arc_challenge/ia3pp", {"use_l_o": False})
    assert config_from_args(build_parser().parse_args([])).out == "runs/toy/lora"  # GSM8K keeps its folders
    cfg.task = "squad"
    with pytest.raises(ValueError, match="--task 'squad': must be one of gsm8k, mmlu, arc_challenge, dolly, text"):
        check_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["arc_challenge", "dolly", "text"])
def test_finetune_other_tasks_on_their_toy_analogues(tmp_path, monkeypatch, task):
    from minipeft.evaluate import main as evaluate_main
    from minipeft.finetune import train
    from minipeft.runs import TrainConfig
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    s = train(TrainConfig(task=task, max_steps=3, limit=24, eval_limit=8, batch_size=4, max_len=256,
                          out=str(tmp_path / "run"), baseline=False), progress=False)
    assert math.isfinite(s["after"]["test_bpt"]) and (task == "arc_challenge") == math.isfinite(s["after"]["accuracy"])
    assert evaluate_main(["--adapter", str(tmp_path / "run"), "--limit", "8", "--quiet"]) == 0  # reuses the run's task

# ----------------------------------------------------------------------------- download script


def _download_script():
    spec = importlib.util.spec_from_file_location("download_task", ROOT / "scripts" / "download_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tar(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return buf.getvalue()


def test_download_mmlu_from_a_local_archive(tmp_path, capsys):
    script = _download_script()
    blob = _tar({"data/dev/anatomy_dev.csv": MMLU_CSV, "data/val/anatomy_val.csv": MMLU_CSV,
                 "data/test/anatomy_test.csv": MMLU_CSV, "data/auxiliary_train/race.csv": MMLU_CSV,
                 "data/test/._anatomy_test.csv": "x", "data/README.txt": "ignored"})
    counts = script.install("mmlu", blob, tmp_path / "mmlu", "data.tar", dict(dev=3, val=3, test=3, auxiliary_train=3))
    assert counts == dict(auxiliary_train=3, dev=3, test=3, val=3)
    assert len(load_mmlu(tmp_path / "mmlu", "test")) == 3 and not list(tmp_path.glob(".*"))  # no staging left
    (tmp_path / "data.tar").write_bytes(blob)  # the official counts: a tiny archive is refused, nothing written
    assert script.main(["--task", "mmlu", "--source", str(tmp_path / "data.tar"), "--out", str(tmp_path / "m2")]) == 1
    assert "auxiliary_train: expected 99842 rows, got 3" in capsys.readouterr().err and not (tmp_path / "m2").exists()
    bad = _tar({"data/test/anatomy_test.csv": MMLU_CSV + "Q,a,b,c,d\n"})
    with pytest.raises(ValueError, match=r"data\.tar member test/anatomy_test\.csv:5: expected 6 fields"):
        script.install("mmlu", bad, tmp_path / "m3", "data.tar", {})


def test_download_arc_and_dolly_from_local_files(tmp_path, capsys):
    script = _download_script()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split in ("Train", "Dev", "Test"):
            z.writestr(f"ARC-V1-Feb2018-2/ARC-Challenge/ARC-Challenge-{split}.jsonl",
                       arc_line("s", ["a", "b", "c", "d"], list("1234"), "2") + "\n")
        z.writestr("ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl", "not needed")
    expected = {f"ARC-Challenge-{s}.jsonl": 1 for s in ("Train", "Dev", "Test")}
    assert script.install("arc_challenge", buf.getvalue(), tmp_path / "arc", "arc.zip", expected) == expected
    assert load_arc(tmp_path / "arc", "dev")[0]["answer"] == 1
    rows = "".join(json.dumps(dict(instruction="i", context="", response="r", category="c")) + "\n" for _ in range(3))
    (tmp_path / DOLLY_FILE).write_text(rows)
    assert script.main(["--task", "dolly", "--source", str(tmp_path / DOLLY_FILE), "--out", str(tmp_path / "d")]) == 1
    captured = capsys.readouterr()
    assert "expected 15011 rows, got 3" in captured.err
    assert f"downloaded {len(rows):,} bytes, sha256 {hashlib.sha256(rows.encode()).hexdigest()}" in captured.out
    assert script.install("dolly", rows.encode(), tmp_path / "d", DOLLY_FILE, {DOLLY_FILE: 3}) == {DOLLY_FILE: 3}


def test_download_cut_off_midway_is_a_clean_error(tmp_path, capsys, monkeypatch):
    script = _download_script()
    def cut_off(url, timeout):
        raise http.client.IncompleteRead(b"partial", 100)
    monkeypatch.setattr(script, "fetch", cut_off)
    assert script.main(["--task", "dolly", "--out", str(tmp_path / "d")]) == 1
    assert "error: dolly: IncompleteRead(7 bytes read, 100 more expected)" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- the README's GPU commands, tiny

@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A tiny model saved as HF writes Llama checkpoints (config.json + safetensors), with a tokenizer."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _mmlu_folder(root: Path) -> Path:
    """dev/val/test per subject and auxiliary_train/, as data.tar unpacks (a few questions each)."""
    rows = lambda n, s: "".join(f'"{s} question {i}, which?",a{i},"b, {i}",c,d,{"ABCD"[i % 4]}\n' for i in range(n))
    for subject in ("anatomy", "astronomy"):
        for split, n in (("dev", 5), ("val", 3), ("test", 6)):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / split / f"{subject}_{split}.csv").write_text(rows(n, subject))
    (root / "auxiliary_train").mkdir()
    (root / "auxiliary_train" / "race.csv").write_text(rows(20, "aux"))
    return root


def test_readme_gpu_commands_run_on_a_checkpoint_and_the_official_layouts(hf_checkpoint, tmp_path, capsys):
    """The README's (IA)3++ and LLaMA-Adapter command lines, with a tiny HF-layout checkpoint in place of
    Llama-3.2-1B and a few rows in each official layout in place of the downloads (only step counts cut)."""
    from minipeft.finetune import main as finetune_main
    mmlu, arc, dolly = _mmlu_folder(tmp_path / "mmlu"), tmp_path / "arc_challenge", tmp_path / "dolly"
    arc.mkdir()
    for split in ("Train", "Dev", "Test"):
        (arc / f"ARC-Challenge-{split}.jsonl").write_text("".join(
            arc_line(f"{split} stem {i}?", ["w", "x", "y", "z"], list("1234") if i % 2 else list("ABCD"),
                     "2" if i % 2 else "C") + "\n" for i in range(8)))
    dolly.mkdir()
    (dolly / DOLLY_FILE).write_text("".join(json.dumps(dict(instruction=f"Say {i}.", context="" if i % 2 else "ctx",
                                                             response=f"{i}.", category="open_qa")) + "\n"
                                            for i in range(DOLLY_VALID + 16)))  # the split holds 2,000 out
    steps = ["--max-steps", "2", "--batch-size", "4", "--eval-limit", "4", "--no-baseline", "--quiet"]
    short = steps + ["--limit", "8"]
    runs = tmp_path / "runs"
    for task, data in (("mmlu", mmlu), ("arc_challenge", arc)):
        for method, extra in (("lora", []), ("ia3", []), ("ia3pp", []), ("ia3pp", ["--set", "use_l_o=false"])):
            out = runs / task / (method + ("-no-lo" if extra else ""))
            assert finetune_main(["--task", task, "--checkpoint", str(hf_checkpoint), "--data", str(data),
                                  "--method", method, *extra, "--out", str(out), *short]) == 0
            summary = json.loads((out / "summary.json").read_text())
            assert summary["n_test"] == 4 and 0 <= summary["after"]["accuracy"] <= 1 and summary["trainable_params"] > 0
    # training on MMLU's dev split instead of auxiliary_train (10 questions, none of the 20 auxiliary ones)
    dev_run = runs / "mmlu" / "ia3pp-dev"
    assert finetune_main(["--task", "mmlu", "--checkpoint", str(hf_checkpoint), "--data", str(mmlu),
                          "--method", "ia3pp", "--train-split", "dev", "--out", str(dev_run), *steps]) == 0
    config = json.loads((dev_run / "config.json").read_text())
    assert config["train"]["train_split"] == "dev" and config["n_train"] == 10
    assert finetune_main(["--task", "arc_challenge", "--data", str(arc), "--train-split", "test", "--quiet",
                          "--out", str(runs / "bad")]) == 1
    assert "--train-split 'test': --task arc_challenge trains on one of train, dev" in capsys.readouterr().err
    no_lo = json.loads((runs / "mmlu" / "ia3pp-no-lo" / "summary.json").read_text())["trainable_params"]
    assert no_lo < json.loads((runs / "mmlu" / "ia3pp" / "summary.json").read_text())["trainable_params"]
    capsys.readouterr()
    for args in (["--adapter", str(runs / "mmlu" / "ia3pp"), "--shots", "5"],
                 ["--checkpoint", str(hf_checkpoint), "--data", str(mmlu), "--shots", "5"]):
        assert evaluate_cli.main(["--task", "mmlu", *args, "--limit", "12", "--quiet"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["n"] == 12 and result["categories"].keys() == {"STEM", "other"}, result  # astronomy, anatomy
    assert evaluate_cli.main(["--task", "dolly", "--checkpoint", str(hf_checkpoint), "--data", str(dolly), "--limit", "4",
                    "--quiet"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["perplexity"])
    for fmt in ("plain", "chat"):
        out = runs / "dolly" / f"llama_adapter-{fmt}"
        assert finetune_main(["--task", "dolly", "--checkpoint", str(hf_checkpoint), "--data", str(dolly),
                              "--format", fmt, "--method", "llama_adapter", "--out", str(out), *short]) == 0
        config = json.loads((out / "config.json").read_text())["train"]
        assert (config["task"], config["format"], config["method"]) == ("dolly", fmt, "llama_adapter")
