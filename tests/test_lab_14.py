"""Lab 14's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "14_tasks_multiple_choice_perplexity"
LETTER_SUM = "scores.append(sum(logp[len(ctx) - 1 + j, c].item() for j, c in enumerate(cont)))"
LETTER_LOGP = '''cont = tok.encode(" " + label)                              # [32, 65] for " A"
        logp = model(torch.tensor([ctx + cont]))[0].log_softmax(-1)'''
NORM = '[s / len(c) for s, c in zip(raw, ex["choices"])]'
END = "([tok.eos_id] if end else [])"
SCORED = "for i in range(prev_end, end):"
BY_SUBJECT = '''    by_subject: dict[str, list[bool]] = {}
    for q, c in zip(questions, correct):
        by_subject.setdefault(q["subject"], []).append(c)
    means: dict[str, list[float]] = {}
    for subject, v in by_subject.items():
        means.setdefault(subject_category(subject), []).append(sum(v) / len(v))
    per_category = {cat: sum(v) / len(v) for cat, v in sorted(means.items())}'''


@pytest.mark.parametrize("plant, hint", [
    # build 1: the MMLU prompt
    pytest.param([('return q["question"].strip() + options + "\\nAnswer:"',
                   'return q["question"].strip() + options + "\\nAnswer: "')], "a space too many",
                 id="prompt-trailing-space"),
    pytest.param([('subject = ex["subject"].replace("_", " ")', 'subject = ex["subject"]')],
                 "with its underscores", id="prompt-underscores"),
    pytest.param([('if ex.get("subject"):', "if False:")], "no subject line", id="prompt-no-subject-line"),
    pytest.param([('if ex.get("subject"):', "if True:"),
                  ('subject = ex["subject"].replace("_", " ")', 'subject = str(ex["subject"]).replace("_", " ")')],
                 "gets no subject line", id="prompt-subject-line-always"),
    pytest.param([('return q["question"].strip() + options', 'return q["question"] + options')], "not stripped",
                 id="prompt-not-stripped"),
    pytest.param([('+ "\\n\\n" for s in shots)', '+ "\\n" for s in shots)')], "right with no shots",
                 id="prompt-shot-separator"),
    # build 2: the letter scores
    pytest.param([('cont = tok.encode(" " + label)', "cont = tok.encode(label)")],
                 "without its leading space", id="letter-without-space"),
    pytest.param([(LETTER_SUM, LETTER_SUM.replace("for j, c in enumerate(cont)", "for j, c in enumerate(cont) if j"))],
                 "only the letter's own token", id="letter-space-term-dropped"),
    pytest.param([(LETTER_SUM, LETTER_SUM.replace("len(ctx) - 1 + j", "len(ctx) + j"))], "off by one position",
                 id="letter-off-by-one"),
    pytest.param([("ctx = tok.encode(prompt, bos=True)   ", "ctx = tok.encode(prompt)   ")],
                 "no <\\|begin_of_text\\|>", id="letter-no-bos"),
    pytest.param([(LETTER_LOGP, LETTER_LOGP.replace(".log_softmax(-1)", ""))], "raw logits", id="letter-logits"),
    # build 3: accuracy
    pytest.param([('correct = [max(range(len(s)), key=s.__getitem__) == q["answer"]',
                   'correct = [min(range(len(s)), key=s.__getitem__) == q["answer"]')], "LOWEST score",
                 id="accuracy-argmin"),
    pytest.param([("    per_category = {cat: sum(v) / len(v) for cat, v in sorted(by_category.items())}",
                   BY_SUBJECT)], "mean of its subjects", id="accuracy-mean-of-subjects"),
    pytest.param([('by_category.setdefault(subject_category(q["subject"]), [])',
                   'by_category.setdefault(q["subject"], [])')], "the keys are subjects", id="accuracy-by-subject"),
    pytest.param([("return sum(correct) / len(correct), per_category",
                   "return 100 * sum(correct) / len(correct), per_category")], "percentage", id="accuracy-percent"),
    # build 4: ARC's question dict
    pytest.param([("if labels == [str(i + 1) for i in range(len(labels))]:", "if False:")],
                 "digit labels .* stay digits", id="arc-digits-kept"),
    pytest.param([("answer=labels.index(key))", "answer=key)")], "INDEX of the answer key", id="arc-answer-key"),
    pytest.param([('        key = "ABCDE"[labels.index(key)]\n', "")], "answer key read as a letter",
                 id="arc-key-not-mapped"),
    # build 5: choice-text scores and acc_norm
    pytest.param([(NORM, '[s / len(tok.encode(" " + c.strip())) for s, c in zip(raw, ex["choices"])]')],
                 "number of TOKENS", id="norm-by-tokens"),
    pytest.param([(NORM, '[s / (len(c) + 1) for s, c in zip(raw, ex["choices"])]')], "count the leading space",
                 id="norm-with-space"),
    pytest.param([(NORM, '[s / len(c.encode()) for s, c in zip(raw, ex["choices"])]')], "BYTES",
                 id="norm-by-bytes"),
    pytest.param([('cont = tok.encode(" " + choice.strip())', "cont = tok.encode(choice.strip())")],
                 "without its leading space", id="choice-without-space"),
    # build 6: the answer-only pair
    pytest.param([(END, "[tok.eos_id]")], "a letter answer has no end token", id="pair-end-always"),
    pytest.param([(END, "[]")], "ends with <\\|end_of_text\\|>", id="pair-end-never"),
    pytest.param([('a = tok.encode(" " + answer.strip())', "a = tok.encode(answer.strip())")],
                 "no leading space", id="pair-no-space"),
    pytest.param([("return (p + a)[:-1], [IGNORE] * (len(p) - 1) + a",
                   "return (p + a)[:-1], [IGNORE] * len(p) + a[1:]")], "one too many", id="pair-mask-off-by-one"),
    # build 7: the sliding window
    pytest.param([(SCORED, "for i in range(begin + 1, end):")], "scored again", id="window-overlap-twice"),
    pytest.param([(SCORED, "for i in range(max(prev_end, end - stride), end):")], "the first window all",
                 id="window-first-window-short"),
    pytest.param([("for begin in range(0, len(ids) - 1, stride):", "for begin in range(0, len(ids) - window, stride):")],
                 "scored exactly once", id="window-stops-early"),
    pytest.param([("total -= logp[i - begin - 1, ids[i]].item()", "total -= logp[i - begin - 2, ids[i]].item()")],
                 "predict token b \\+ t \\+ 1", id="window-off-by-one"),
    # exercises
    pytest.param([("window_counts.append(end - prev_end)", "window_counts.append(end - begin - 1)")],
                 "add up to", id="ex1-overlap"),
    pytest.param([("    if end == n:\n        break\n", "")], "add up to|windows, but the loop makes",
                 id="ex1-no-break"),
    pytest.param([('choices=["7", "seven and a half apples in the basket", "no", "the answer is 7"]',
                   'choices=["7", "8", "9", "10"]')], "both pick", id="ex2-agreeing"),
    pytest.param([("max(k for k in range(4) if lengths[k] < 265)", "max(k for k in range(4) if lengths[k] <= 265)")],
                 "NOT shorter", id="ex3-at-most"),
    pytest.param([("lengths = [1 + len((head", "lengths = [len((head")], "BOS token counts", id="ex3-no-bos"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
