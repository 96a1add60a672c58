"""Checks of lab 14 (tasks: multiple choice by log-likelihood, answer-only masks, sliding-window perplexity):
the MMLU prompt, the letter scores, accuracy per category, ARC's question dict, the choice-text scores with
acc_norm, the (input_ids, targets) pair of a prompt and an answer, the sliding-window NLL, and exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). Those that need a model
use the shipped toy base (loaded once) and compare with minipeft's own scoring on their own questions.
`MMLU_FILES` are the lab's small MMLU files (the notebook writes them; exercise 3's check reads them).
"""
from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import torch

from ..base import load_base
from ..data import IGNORE
from ..scoring import continuation_logprobs, evaluate_choices, sliding_window_nll
from ..tasks import (arc_text_prompt, dolly_prompt, encode_answer, encode_pair, load_arc_jsonl, load_mmlu,
                     mc_prompt, subject_category)
from . import expect

# MMLU: no header; question, A, B, C, D, answer letter; quoted fields may hold commas and doubled quotes ""
MMLU_FILES = {
    "dev/astronomy_dev.csv": ('"Which is closer to the Sun, Mars or Venus?",Mars,Venus,"both, equally",neither,B\n'
                              "What is 3+4?,6,7,8,9,B\n"
                              "How many moons does the Earth have?,0,1,2,3,B\n"),
    "test/astronomy_test.csv": ("What is 5+6?,10,11,12,13,B\n"
                                '"Which planet is larger, Jupiter or Mars?",Mars,Jupiter,"both, equally",neither,B\n'
                                "What is 9+8?,17,16,18,15,A\n"),
    "dev/philosophy_dev.csv": "Who wrote the Republic?,Plato,Kant,Hume,Locke,A\nWhat is 2+2?,3,5,4,6,C\n",
    "test/philosophy_test.csv": ('"Ann has 3 pens, Tom has 5 pens. Who has more pens?",Ann,Tom,"the same, 4",nobody,B\n'
                                 '"He said ""x = 1"". What is x+1?",1,2,3,4,B\n'
                                 "What is 7+1?,6,7,9,8,D\n"),
    "dev/marketing_dev.csv": 'What is 10+5?,15,16,14,50,A\n"Ann sells 4 apples, then 2 more. How many?",5,6,7,8,B\n',
    "test/marketing_test.csv": "What is 6+6?,11,13,12,16,C\nIs 8 even or odd?,even,odd,a fraction,negative,A\n",
    "dev/high_school_geography_dev.csv": "What is 4+4?,8,9,7,6,A\n",
    "test/high_school_geography_test.csv": ("What is 20+3?,32,23,22,24,B\n"
                                            "Is 15 even or odd?,even,odd,a fraction,negative,B\n"),
}

LETTERS = list("ABCD")


def _q(question: str, choices: list[str], answer: int, subject: str | None = None, labels=None) -> dict:
    return dict(question=question, choices=list(choices), labels=list(labels or "ABCDE"[:len(choices)]),
                answer=answer, subject=subject)


# the checks' own questions: a subject with underscores, none, stray whitespace, a comma, 3 and 5 choices
QUESTIONS = [
    _q("What is 20+3?", ["32", "23", "22", "24"], 1, "high_school_geography"),
    _q("  Which planet is larger, Jupiter or Mars?\n", ["Mars", "Jupiter", "both, equally", "neither"], 1,
       "astronomy"),
    _q("Mia has 4 cups and buys 2 more. How many cups does Mia have?", ["2", "4", "6"], 2),
    _q("Which is a colour?", ["red", "seven", "quickly", "under the table", "blue"], 0),
]
SHOTS = [
    _q("What is 4+4?", ["8", "9", "7", "6"], 0, "high_school_geography"),
    _q("Is 15 even or odd?", ["even", "odd", "a fraction", "negative"], 1, "high_school_geography"),
    _q("What is 3+4?", ["6", "7", "8", "9"], 1, "high_school_geography"),
]
# choice texts: a long one, a non-ASCII one (characters, bytes and tokens all differ), a one-letter one
CHOICE_QUESTIONS = [
    _q("Which drink is served hot?", ["café au lait", "ice", "a cold lemonade with ice", "7"], 0),
    _q("How many pens do Ann and Tom have?", ["12", "7 pens", "naïve façade"], 1),
]
TEXT = "Mia buys 9 apples for $5 each. How much money does Mia spend? Mia spends 9*5 = $45.\n"


@functools.lru_cache(maxsize=1)
def toy_model():
    """(model, tokenizer) of the shipped toy base, loaded once."""
    model, tok, _ = load_base(progress=False)
    return model.eval(), tok


@functools.lru_cache(maxsize=1)
def _lab_mmlu() -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    """(dev, test) questions of the lab's MMLU files (written to a temporary folder and read back)."""
    with tempfile.TemporaryDirectory(prefix="lab14-check-") as tmp:
        for name, text in MMLU_FILES.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_text(text)
        return tuple(load_mmlu(tmp, "dev")), tuple(load_mmlu(tmp, "test"))


def _first_difference(got: str, want: str) -> str:
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"from character {i} on, yours reads {got[max(0, i - 15):i + 25]!r}, want {want[max(0, i - 15):i + 25]!r}"


# ---------------------------------------------------------------------------------------------- build 1

def check_mc_prompt(my_mc_prompt) -> str:
    """my_mc_prompt(ex, shots=()) -> the MMLU prompt, as tasks.mc_prompt."""
    n = 0
    for ex in QUESTIONS:
        for k in range(len(SHOTS) + 1):
            shots = SHOTS[:k] if ex.get("subject") == SHOTS[0]["subject"] else []
            got, want = my_mc_prompt(dict(ex), [dict(s) for s in shots]), mc_prompt(ex, shots)
            n += 1
            if got == want:
                continue
            expect(isinstance(got, str), f"return a str, got {type(got).__name__}")
            expect(not got.endswith("Answer: "), "the prompt ends with 'Answer: ', a space too many: it ends "
                                                 "with 'Answer:', and the space belongs to the answer ' B'")
            if ex.get("subject"):
                expect(got.startswith("The following are multiple choice questions (with answers) about "),
                       "no subject line: a question with a subject starts with 'The following are multiple "
                       "choice questions (with answers) about {subject}.' and a blank line")
                expect(ex["subject"] not in got or "_" not in ex["subject"],
                       f"the subject {ex['subject']!r} is written with its underscores: spaces in the prompt")
            else:
                expect(not got.startswith("The following"),
                       "a question with no subject (ARC, MMLU's auxiliary_train) gets no subject line")
            expect(not (ex["question"] != ex["question"].strip() and ex["question"] in got),
                   "the question is not stripped: its surrounding whitespace stays out of the prompt")
            if k and my_mc_prompt(dict(ex), []) == mc_prompt(ex, []):
                raise AssertionError(f"right with no shots, wrong with {k}: each solved example is its question "
                                     "block, ' ' + its answer letter, then a blank line; "
                                     + _first_difference(got, want))
            raise AssertionError(f"the prompt differs from mc_prompt ({k} shots): {_first_difference(got, want)}")
    return f"the same prompt as tasks.mc_prompt on {n} (question, shots) pairs"


# ---------------------------------------------------------------------------------------------- build 2

@functools.lru_cache(maxsize=128)
def _logits(tokens: tuple[int, ...]) -> torch.Tensor:
    """The toy base's logits (T, vocab) on `tokens` (remembered: the variants below reuse them)."""
    with torch.no_grad():
        return toy_model()[0](torch.tensor([tokens]))[0]


def _scores_of(ctx: list[int], conts: list[list[int]], offset: int = -1, kind: str = "log_softmax",
               skip_first: bool = False) -> list[float]:
    """Variants of the continuation scores, to name a student's mistake."""
    out = []
    for cont in conts:
        logits = _logits(tuple(ctx + cont))
        table = {"log_softmax": logits.log_softmax(-1), "logits": logits, "softmax": logits.softmax(-1)}[kind]
        terms = [table[len(ctx) + offset + j, c].item() for j, c in enumerate(cont)
                 if 0 <= len(ctx) + offset + j < table.shape[0]]
        out.append(sum(terms[1:] if skip_first else terms))
    return out


@functools.lru_cache(maxsize=64)
def _reference_scores(ctx: tuple[int, ...], conts: tuple[tuple[int, ...], ...]) -> list[float]:
    """minipeft's ln p(cont | ctx) for each continuation (the checks' references, computed once)."""
    return continuation_logprobs(toy_model()[0], [(list(ctx), list(cont)) for cont in conts])


def _close(a: list[float], b: list[float], tol: float = 1e-3) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


def check_letter_scores(my_letter_scores) -> str:
    """my_letter_scores(model, tok, prompt, labels) -> [ln p(" A" | prompt), ...], as evaluate_choices."""
    model, tok = toy_model()
    n = 0
    # MMLU prompts (after 'Answer:' the toy base gives the space a probability of almost 1), and a plain
    # text, after which the space is far from certain (so the space's term shows)
    cases = [(mc_prompt(ex, shots), list(ex["labels"]))
             for ex, shots in ((QUESTIONS[2], []),)]
    for prompt, labels in cases + [("Mia has 4", LETTERS)]:
        got = my_letter_scores(model, tok, prompt, list(labels))
        expect(isinstance(got, (list, tuple)) and len(got) == len(labels),
               f"return one score per label ({len(labels)} here), got {got!r}"[:300])
        got = [float(s) for s in got]
        ctx = tok.encode(prompt, bos=True)
        conts = [tok.encode(" " + label) for label in labels]
        want = _reference_scores(tuple(ctx), tuple(map(tuple, conts)))
        n += len(want)
        if _close(got, want, 1e-4):
            continue
        expect(not _close(got, _scores_of(ctx, [tok.encode(label) for label in labels])),
               "you score the letter without its leading space: after 'Answer:' the answer is ' A' (the "
               "prompt ends in ':', and the letter follows after a space, as in the solved examples)")
        expect(not _close(got, _scores_of(ctx, conts, skip_first=True)),
               "you score only the letter's own token: the score is the sum over ALL the continuation's tokens, "
               "the space's log-probability included (' A' is two tokens with this tokenizer)")
        expect(not _close(got, _scores_of(tok.encode(prompt), conts)),
               "the prompt has no <|begin_of_text|>: encode it with bos=True, as evaluation does")
        expect(not _close(got, _scores_of(ctx, conts, offset=0)),
               "off by one position: the logits at position t predict token t + 1, so ln p(c_j | ...) is read "
               "at position P - 1 + j (P prompt tokens, j from 0)")
        expect(not _close(got, _scores_of(ctx, conts, kind="logits")),
               "those are raw logits: take log_softmax over the vocabulary first")
        expect(not _close(got, _scores_of(ctx, conts, kind="softmax")),
               "those are probabilities summed: a sequence's log-likelihood sums the log-probabilities")
        worst = max(abs(a - b) for a, b in zip(got, want))
        raise AssertionError(f"the scores differ from evaluate_choices' by up to {worst:.3g}: "
                             "s = sum_j ln p(c_j | prompt, c_<j) over the tokens c of ' ' + the letter")
    return f"the same letter log-likelihoods as evaluate_choices on {n} (question, letter) pairs"


# ---------------------------------------------------------------------------------------------- build 3

def _accuracy_case() -> tuple[list[dict], list[list[float]]]:
    """10 questions over 3 subjects (two in one category, with 1 and 4 questions), and their scores."""
    subjects = ["astronomy"] * 3 + ["college_physics"] + ["high_school_mathematics"] * 4 + ["philosophy"] * 2
    picks = [1, 0, 2, 3, 0, 0, 1, 2, 3, 2]
    answers = [1, 1, 2, 3, 0, 1, 1, 0, 3, 3]
    questions = [_q(f"q{i}", ["a", "b", "c", "d"], a, s) for i, (a, s) in enumerate(zip(answers, subjects))]
    scores = [[-3.0 + (1.5 if j == p else 0.1 * j) for j in range(4)] for p in picks]
    return questions, scores


def check_accuracy(my_accuracy) -> str:
    """my_accuracy(questions, scores) -> (accuracy, {category: accuracy}), as evaluate_choices."""
    questions, scores = _accuracy_case()
    got = my_accuracy([dict(q) for q in questions], [list(s) for s in scores])
    expect(isinstance(got, (tuple, list)) and len(got) == 2, "return (accuracy, {category: accuracy})")
    acc, cats = got
    correct = [max(range(4), key=s.__getitem__) == q["answer"] for q, s in zip(questions, scores)]
    want_acc = sum(correct) / len(correct)
    by_cat: dict[str, list[bool]] = {}
    for q, c in zip(questions, correct):
        by_cat.setdefault(subject_category(q["subject"]), []).append(c)
    want_cats = {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}
    wrongest = sum(min(range(4), key=s.__getitem__) == q["answer"] for q, s in zip(questions, scores)) / len(scores)
    expect(not math.isclose(float(acc), wrongest) or math.isclose(wrongest, want_acc),
           "that is the accuracy of the LOWEST score: the prediction is the letter with the highest log-likelihood")
    expect(not math.isclose(float(acc), 100 * want_acc), "give the accuracy as a fraction in [0, 1], not a percentage")
    expect(math.isclose(float(acc), want_acc), f"accuracy {acc}, want the share of questions whose highest "
                                               "score is the gold answer's")
    expect(isinstance(cats, dict), f"the categories come as a dict {{category: accuracy}}, got {type(cats).__name__}")
    subjects = {q["subject"] for q in questions}
    expect(not set(cats) & subjects, "the keys are subjects: group them into the paper's categories with "
                                     "subject_category(subject) (STEM, humanities, social sciences, other)")
    expect(set(cats) == set(want_cats), f"categories {sorted(cats)}, want {sorted(want_cats)}")
    by_subject: dict[str, list[bool]] = {}
    for q, c in zip(questions, correct):
        by_subject.setdefault(q["subject"], []).append(c)
    stem = [sum(v) / len(v) for s, v in by_subject.items() if subject_category(s) == "STEM"]
    expect(not math.isclose(cats["STEM"], sum(stem) / len(stem)) or math.isclose(cats["STEM"], want_cats["STEM"]),
           "STEM's accuracy is the mean of its subjects' accuracies: a category's accuracy is over all of its "
           "questions (a subject with more questions weighs more)")
    for c, v in want_cats.items():
        expect(math.isclose(cats[c], v), f"{c}: {cats[c]}, want the share of its questions answered right")
    return f"accuracy {want_acc:.2f} and per category {want_cats}, micro-averaged"


# ---------------------------------------------------------------------------------------------- build 4

def _arc_line(stem: str, texts: list[str], labels: str, key: str) -> str:
    choices = [dict(text=t, label=label) for t, label in zip(texts, labels)]
    return json.dumps(dict(id=f"check-{len(stem)}", question=dict(stem=stem, choices=choices), answerKey=key))


ARC_CHECK_LINES = [
    _arc_line("What is 3+5?", ["8", "7", "9", "35"], "ABCD", "A"),
    _arc_line("Which animal can fly?", ["a dog", "a bird", "a fish", "a cat"], "1234", "2"),
    _arc_line("Mia has 4 cups and buys 2 more. How many cups?", ["2", "4", "6"], "ABC", "C"),
    _arc_line("What is 12-5?", ["17", "7", "5", "12"], "1234", "4"),
    _arc_line("Which is odd?", ["2", "4", "6", "8", "9"], "12345", "5"),
    _arc_line("Which is a colour?", ["red", "seven", "quickly", "under the table"], "ABCD", "D"),
]


def check_arc_question(my_arc_question) -> str:
    """my_arc_question(line) -> dict(question, choices, labels, answer), as tasks.load_arc_jsonl."""
    with tempfile.TemporaryDirectory(prefix="lab14-arc-") as tmp:
        path = Path(tmp) / "ARC-Challenge-Test.jsonl"
        path.write_text("\n".join(ARC_CHECK_LINES) + "\n")
        wanted = load_arc_jsonl(path)
    for line, want in zip(ARC_CHECK_LINES, wanted):
        want = {k: want[k] for k in ("question", "choices", "labels", "answer")}
        obj = json.loads(line)
        try:
            got = my_arc_question(line)
        except (ValueError, KeyError, IndexError) as e:
            raise AssertionError(f"on the line with answerKey {obj['answerKey']!r} and labels "
                                 f"{[c['label'] for c in obj['question']['choices']]} your code raised "
                                 f"{type(e).__name__}: {e} (is the answer key read as a letter too?)") from None
        expect(isinstance(got, dict), f"return a dict, got {type(got).__name__}")
        missing = [k for k in want if k not in got]
        expect(not missing, f"the dict has no {missing}: want question, choices, labels, answer")
        got = {k: got[k] for k in want}
        if got == want:
            continue
        digits = obj["question"]["choices"][0]["label"] == "1"
        expect(got["question"] == want["question"], "question is the stem, as written")
        expect(list(got["choices"]) == want["choices"], "choices are the choice texts, in the file's order")
        expect(not (digits and list(got["labels"]) == [c["label"] for c in obj["question"]["choices"]]),
               "digit labels '1', '2', ... stay digits: read them as letters 'A', 'B', ... (as lm-eval-harness "
               "does), so that the letter prompt and its scoring are the same for every question")
        expect(list(got["labels"]) == want["labels"], f"labels {got['labels']}, want {want['labels']}")
        expect(not isinstance(got["answer"], str), "answer is the INDEX of the answer key among the labels (an "
                                                   "int), not the key itself")
        raise AssertionError(f"answer {got['answer']} for answerKey {obj['answerKey']!r} with labels "
                             f"{[c['label'] for c in obj['question']['choices']]}: the index of the key among "
                             "the labels (a digit key is mapped with its labels)")
    return f"the same question dicts as tasks.load_arc_jsonl on {len(ARC_CHECK_LINES)} lines (digit labels, 3-5 choices)"


# ---------------------------------------------------------------------------------------------- build 5

def check_choice_scores(my_choice_scores) -> str:
    """my_choice_scores(model, tok, ex) -> (raw log-likelihoods of " {choice}", per character), as minipeft."""
    model, tok = toy_model()
    n = 0
    for ex in CHOICE_QUESTIONS:
        got = my_choice_scores(model, tok, dict(ex))
        expect(isinstance(got, (tuple, list)) and len(got) == 2, "return a pair (raw scores, per-character scores)")
        raw, norm = ([float(v) for v in part] for part in got)
        expect(len(raw) == len(norm) == len(ex["choices"]), "one raw and one normalised score per choice")
        ctx = tok.encode(arc_text_prompt(ex), bos=True)
        conts = [encode_answer(tok, c, end=False) for c in ex["choices"]]
        want_raw = _reference_scores(tuple(ctx), tuple(map(tuple, conts)))
        n += len(want_raw)
        if not _close(raw, want_raw, 1e-4):
            expect(not _close(raw, _scores_of(ctx, [tok.encode(c) for c in ex["choices"]])),
                   "you score each choice without its leading space: the continuation is ' ' + the choice text")
            expect(not _close(raw, _scores_of(tok.encode(mc_prompt(ex), bos=True), conts)),
                   "that context is the letter prompt: the choice texts follow 'Question: {stem}\\nAnswer:'")
            expect(not _close(raw, _scores_of(ctx, conts, offset=0)),
                   "off by one position: the logits at position t predict token t + 1")
            raise AssertionError("the raw scores differ from minipeft's: ln p(' ' + choice | 'Question: "
                                 "{stem}\\nAnswer:'), BOS first, summed over the continuation's tokens")
        want_norm = [s / len(c) for s, c in zip(want_raw, ex["choices"])]
        if _close(norm, want_norm, 1e-6):
            continue
        by = lambda lengths: [s / n_ for s, n_ in zip(want_raw, lengths)]  # noqa: E731
        expect(not _close(norm, by([len(cont) for cont in conts]), 1e-6),
               "you divide by the number of TOKENS of the continuation: acc_norm divides by the length of the "
               "choice text in characters, so that it does not depend on the tokenizer")
        expect(not _close(norm, by([len(c) + 1 for c in ex["choices"]]), 1e-6),
               "you count the leading space: the length is the choice text's, |c| characters, without the space")
        expect(not _close(norm, by([len(c.encode()) for c in ex["choices"]]), 1e-6),
               "you divide by the choice's length in BYTES: characters (len of the str), not its UTF-8 bytes")
        expect(not _close(norm, [s * len(c) for s, c in zip(want_raw, ex["choices"])], 1e-6),
               "you multiply by the length: acc_norm DIVIDES the log-likelihood by it")
        raise AssertionError("the per-character scores differ from ln p / len(choice text)")
    return f"the same raw and per-character choice scores as minipeft's acc_text / acc_norm on {n} choices"


# ---------------------------------------------------------------------------------------------- build 6

DOLLY_CHECK = [dict(instruction="How many pens does Tom have?", context="Ann has 3 pens, Tom has 5 pens.",
                    response="Tom has 5 pens.", category="closed_qa"),
               dict(instruction="Work out 6+7.", context="", response="  6+7 = 13\n", category="open_qa")]


def check_encode_pair(my_encode_pair) -> str:
    """my_encode_pair(tok, prompt, answer, end) -> (input_ids, targets), as tasks.encode_pair."""
    _, tok = toy_model()
    cases = [(mc_prompt(q), q["labels"][q["answer"]], False) for q in QUESTIONS[:3]]
    cases += [(dolly_prompt(r), r["response"], True) for r in DOLLY_CHECK]
    for prompt, answer, end in cases:
        got = my_encode_pair(tok, prompt, answer, end)
        expect(isinstance(got, (tuple, list)) and len(got) == 2, "return a pair (input_ids, targets)")
        x, y = [int(i) for i in got[0]], [int(i) for i in got[1]]
        want_x, want_y = encode_pair(tok, prompt, answer, end=end)
        if (x, y) == (want_x, want_y):
            continue
        p = tok.encode(prompt, bos=True)
        a = encode_answer(tok, answer, end=end)
        kind = "a dolly response" if end else "a letter answer"
        expect(len(x) == len(y), f"input_ids has {len(x)} entries and targets {len(y)}: one target per position")
        expect(x[:1] == [tok.bos_id], "input_ids must start with <|begin_of_text|> (tok.encode(prompt, bos=True))")
        expect(not (not end and y[-1:] == [tok.eos_id]),
               "a letter answer has no end token: the letter is the whole answer (end=False)")
        expect(not (end and y[-1:] != [tok.eos_id] and x == (p + a)[:-2]),
               "a dolly response ends with <|end_of_text|> (end=True): the model must learn to stop")
        expect(not (end and y[-1:] != [tok.eos_id]), f"{kind}: the last target must be <|end_of_text|> (end=True)")
        no_space = tok.encode(answer.strip()) + ([tok.eos_id] if end else [])
        expect(x != (p + no_space)[:-1], "the answer has no leading space: it follows the prompt as ' ' + the "
                                         "stripped answer")
        expect(x == want_x, f"{kind}: input_ids differ from (prompt + answer)[:-1]")
        masked = next((i for i, t in enumerate(y) if t != IGNORE), len(y))
        expect(masked != 0, "no target is masked: the prompt's tokens are in the loss; the targets that are "
                            "prompt tokens are IGNORE (-100)")
        expect(masked != len(p), f"{masked} targets masked, one too many: the target at position P - 1 is the "
                                 "answer's first token (the space), and it is in the loss")
        expect(masked != len(p) - 2, f"{masked} targets masked, one too few: the last prompt token is a target in "
                                     "the loss; the prompt has P tokens counting <|begin_of_text|>")
        raise AssertionError(f"{kind}: the targets differ from the answer-only targets (the P - 1 prompt targets "
                             "IGNORE, then the answer's tokens)")
    return f"the same (input_ids, targets) as tasks.encode_pair on {len(cases)} letter answers and dolly responses"


# ---------------------------------------------------------------------------------------------- build 7

@functools.lru_cache(maxsize=8)
def _reference_nll(window: int, stride: int) -> tuple[float, int]:
    model, tok = toy_model()
    return sliding_window_nll(model, tok.encode(TEXT, bos=True), window, stride)


def check_sliding_window_nll(my_sliding_window_nll) -> str:
    """my_sliding_window_nll(model, ids, window, stride) -> (summed NLL, tokens scored), as sliding_window_nll."""
    model, tok = toy_model()
    ids = tok.encode(TEXT, bos=True)
    n = len(ids) - 1
    worst = 0.0
    for window, stride in [(64, 40), (48, 47), (len(ids) + 1, 50)]:
        got = my_sliding_window_nll(model, list(ids), window, stride)
        expect(isinstance(got, (tuple, list)) and len(got) == 2, "return (summed NLL, number of tokens scored)")
        nll, count = float(got[0]), int(got[1])
        ref_nll, ref_count = _reference_nll(window, stride)
        case = f"window {window}, stride {stride}, {len(ids)} tokens"
        if count > n:
            every = 0
            for begin in range(0, len(ids) - 1, stride):  # the windows: each one's tokens, all of them
                end = min(begin + window, len(ids))
                every += end - begin - 1
                if end == len(ids):
                    break
            expect(count != every, f"{case}: you score {count} tokens, every window's all: tokens that the "
                                   "previous window already scored are scored again. Each window scores only "
                                   "the tokens the previous one did not reach (its last `stride`)")
            raise AssertionError(f"{case}: you score {count} tokens, but the text has {n} after the BOS: a token "
                                 "is scored twice (each is scored exactly once)")
        expect(count != n + 1, f"{case}: {count} tokens scored, one too many: the BOS (token 0) is never scored, "
                               "it has no context")
        expect(count == n, f"{case}: you score {count} tokens, the text has {n} after the BOS: every token after "
                           "the first is scored exactly once (the first window all of its W - 1; the last window "
                           "reaches the end of the text)")
        diff = abs(nll - ref_nll)
        expect(diff <= 1e-3 * max(1.0, abs(ref_nll)),
               f"{case}: every token is scored once, but the NLL is {nll:.3f}, want {ref_nll:.3f}: each window "
               "reads its earlier tokens as context, and the logits at its position t (a window starting at b) "
               "predict token b + t + 1")
        expect(nll > 0, f"{case}: the NLL is negative: it is minus the summed log-probabilities")
        worst = max(worst, diff)
    return f"the same (NLL, tokens) as sliding_window_nll for 3 (window, stride) pairs (largest difference {worst:.1e})"


# ---------------------------------------------------------------------------------------------- exercises

@functools.lru_cache(maxsize=1)
def _window_counts() -> tuple[int, ...]:
    """The targets each forward of sliding_window_nll scores: 100 ids, window 32, stride 12."""
    model, _ = toy_model()
    seen = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(int((args[1] != IGNORE).sum())))
    try:
        sliding_window_nll(model, list(range(100)), window=32, stride=12, batch_size=1)
    finally:
        hook.remove()
    return tuple(seen)


def exercise_1(window_counts) -> str:
    """The tokens each window scores: 100 ids, window 32, stride 12."""
    seen = list(_window_counts())
    expect(isinstance(window_counts, (list, tuple)), "give a list of ints, one per window")
    counts = [int(c) for c in window_counts]
    expect(sum(counts) == 99, f"your counts add up to {sum(counts)}: every token after the first is scored "
                              "exactly once, 99 in all")
    expect(counts[:1] == seen[:1], "the first window scores all of its tokens but the first (no context for it)")
    expect(len(counts) == len(seen), f"{len(counts)} windows, but the loop makes {len(seen)}: it stops at the "
                                     "first window that reaches the end of the text")
    expect(counts == seen, "each later window scores what the previous one did not reach: the stride, until "
                           "the last window")
    return f"{len(seen)} windows scoring {seen}"


def picks(ex: dict, model=None, tok=None) -> tuple[int, int]:
    """(acc_text's choice, acc_norm's choice) of `ex` by evaluate_choices: the same question with each
    choice as the gold answer, read back from correct_text / correct_norm. Without a model: the toy
    base's (remembered per question)."""
    if model is None:
        return _toy_picks(ex["question"], tuple(ex["choices"]))
    choices = list(ex["choices"])
    copies = [dict(question=ex["question"], choices=choices, labels=list("ABCDE"[:len(choices)]), answer=a,
                   subject=None) for a in range(len(choices))]
    _, recs = evaluate_choices(model, tok, copies, choice_text=True)
    return [r["correct_text"] for r in recs].index(True), [r["correct_norm"] for r in recs].index(True)


@functools.lru_cache(maxsize=32)
def _toy_picks(question: str, choices: tuple[str, ...]) -> tuple[int, int]:
    model, tok = toy_model()
    return picks(dict(question=question, choices=list(choices)), model, tok)


def exercise_2(disagreeing_question) -> str:
    """A question on which acc_text and acc_norm pick different choices (on the toy base)."""
    expect(isinstance(disagreeing_question, dict) and {"question", "choices"} <= set(disagreeing_question),
           "give dict(question=..., choices=[four strings])")
    choices = list(disagreeing_question["choices"])
    expect(len(choices) == 4 and len(set(choices)) == 4 and all(isinstance(c, str) and c.strip() for c in choices),
           "four distinct non-empty choices")
    by_text, by_norm = picks(dict(question=disagreeing_question["question"], choices=choices))
    expect(by_text != by_norm, f"both pick {choices[by_text]!r}: raw log-likelihood favours short choices, per "
                               "character a long fluent one can win")
    return f"acc_text picks {choices[by_text]!r}, acc_norm picks {choices[by_norm]!r}"


@functools.lru_cache(maxsize=1)
def _kshot() -> tuple[list[int], int]:
    """(prompt tokens with 0-3 shots, shots evaluate_choices keeps at max_len=265) for the first
    astronomy test question."""
    model, tok = toy_model()
    dev, test = _lab_mmlu()
    ex = test[0]
    pool = [d for d in dev if d["subject"] == ex["subject"]]
    lengths = [len(tok.encode(mc_prompt(ex, pool[:k]), bos=True)) for k in range(4)]
    rows = []
    hook = model.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    try:
        evaluate_choices(model, tok, [ex], max_len=265, shots=3, shot_pool=list(dev))
    finally:
        hook.remove()
    return lengths, lengths.index(rows[0] - 1)


def exercise_3(kshot_lengths) -> str:
    """(tokens of the 3-shot prompt of the first astronomy test question, shots kept at max_len=265)."""
    lengths, kept = _kshot()
    expect(isinstance(kshot_lengths, (tuple, list)) and len(kshot_lengths) == 2, "give two integers: (n3, kept)")
    n3, k = (int(v) for v in kshot_lengths)
    expect(n3 != lengths[3] - 1, f"{n3} is one short: the BOS token counts too")
    expect(n3 == lengths[3], "count the bytes of the subject line, the three solved questions and the question, "
                             "plus BOS (one token per UTF-8 byte)")
    expect(not (k == kept + 1 and lengths[k] == 265), "the 2-shot prompt has exactly 265 tokens: shots are dropped "
                                                      "while the prompt is NOT shorter than max_len")
    expect(k == kept, "drop shots from 3 while the prompt (BOS included) has max_len tokens or more")
    return f"tokens with 0-3 shots {lengths}; {kept} shots kept at max_len=265"
