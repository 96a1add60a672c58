"""The tasks finetune and evaluate know: their files, prompts, answer-only targets, and toy analogues.

One `Task` per name in `TASKS`; adding a task is a row there and touches no method.

* gsm8k: grade-school maths (minipeft.data), greedy generation scored by the number after `####` (minipeft's
  accuracy) and by lm-evaluation-harness's strict-match and flexible-extract; lm-eval's k-shot and
  chain-of-thought prompts with `gsm8k_prompts` (docs/lm-eval.md).
* mmlu: Hendrycks et al., "Measuring Massive Multitask Language Understanding", arXiv:2009.03300.
  CSV files without a header (question, A, B, C, D, answer letter), `<subject>_{dev,val,test}.csv`
  in dev/ val/ test/, and auxiliary_train/*.csv (the training pool). The prompt is the paper's (with lm-eval-harness's
  single space before the subject, where the paper's evaluate.py writes two):

      The following are multiple choice questions (with answers) about {subject}.\\n\\n
      [k solved dev questions, each "...Answer: B\\n\\n"]{question}\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\nAnswer:

  and the answer is the letter (" B" after the prompt): scored by comparing the log-likelihoods of
  " A" ... " D" (as lm-eval-harness does), trained with the loss on the letter only.
* arc_challenge: Clark et al., "Think you have Solved Question Answering? Try ARC", arXiv:1803.05457.
  JSON lines with question.stem, question.choices[].text/label, answerKey; labels "1".."4" are read
  as "A".."D" (as lm-eval-harness's v0.3 arc task did; today's indexes the label list: the same
  answer). Letter prompt as MMLU's (no subject line), plus the choice-text score "acc_norm":
  `Question: {stem}\\nAnswer:` + " {choice}", log-likelihood divided by the choice text's length in
  characters (lm-eval-harness's arc_challenge; with --shots, its k-shot form).
* dolly: databricks-dolly-15k (instruction, context, response, category). Prompt: the Alpaca template
  as the LLaMA-Adapter repo writes it (with an "### Input:" block when there is a context); the loss
  is on the response, which follows after one space (minipeft's choice: Llama 3's tokenizer writes a
  word with its leading space; the LLaMA-Adapter and Alpaca code append the response with nothing
  between). Split 13,011 train / 2,000 validation by a seeded shuffle, as the LLaMA-Adapter report
  sizes it. Scored by bits/token and perplexity of the responses.
* text: any plain-text file, scored by sliding-window perplexity (minipeft.scoring.sliding_window_nll).

Each task has a toy analogue that runs on the shipped toy base (minipeft.toy) with no download:
multiple choice questions written in the MMLU and ARC layouts, an instruction set in the dolly layout,
and toy prose as text. All are seeded and deterministic. The multiple-choice questions are MMLU's
two-statement kind ("Statement 1 | 14 is even. Statement 2 | 9 is even." with the options "True, True",
"False, False", "True, False", "False, True" in that order), the right letter balanced over A-D; toy_folder
writes the parity subject, which full fine-tuning of the toy base learns within 300 steps and LoRA in one
run of three within 400 (results/toy-mc/: the vector methods did not). On questions with
shuffled options (find the answer among them, then name its letter) it stayed at chance there, with LoRA
and with full fine-tuning (results/toy-mc/README.md, probes P1-P3).
"""
from __future__ import annotations

import csv
import io
import json
import random
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .data import (GSM8K_NUM_FEWSHOT, IGNORE, NAMES, OBJECTS, Example, _fact, cache_dir, encode_example,
                   encode_gsm8k_prompt, encode_prompt, gsm8k_fewshot, load_split, publish, story_text,
                   synthetic_arithmetic_text, synthetic_gsm8k, write_jsonl)
from .safetensors_io import atomic_write
from .tokenizer import Tokenizer, read_utf8

LETTERS = "ABCDE"

# ----------------------------------------------------------------------------- prompt + answer pairs

def encode_text_prompt(tok, text: str, fmt: str = "plain") -> list[int]:
    """`text` as the prompt: after BOS (plain), or as the user turn of the Llama 3 chat format."""
    if fmt == "plain":
        return tok.encode(text, bos=True)
    if fmt == "chat":
        return tok.encode_dialog_prompt([{"role": "user", "content": text}], add_generation_prompt=True)
    raise ValueError(f"fmt must be 'plain' or 'chat', got {fmt!r}")


def encode_answer(tok, answer: str, fmt: str = "plain", end: bool = True) -> list[int]:
    """" {answer}" (plain) or the stripped answer (chat), then EOS / <|eot_id|> when `end`."""
    if fmt == "plain":
        return tok.encode(" " + answer.strip()) + ([tok.eos_id] if end else [])
    if fmt == "chat":
        return tok.encode(answer.strip()) + ([tok.eot_id] if end else [])
    raise ValueError(f"fmt must be 'plain' or 'chat', got {fmt!r}")


def encode_pair(tok, prompt: str, answer: str, fmt: str = "plain", max_len: int | None = None,
                end: bool = True) -> Example:
    """(input_ids, targets) with the loss on the answer only, shifted as data.encode_example does."""
    p, a = encode_text_prompt(tok, prompt, fmt), encode_answer(tok, answer, fmt, end)
    input_ids, targets = (p + a)[:-1], [IGNORE] * (len(p) - 1) + a
    return (input_ids[:max_len], targets[:max_len]) if max_len is not None else (input_ids, targets)

# ----------------------------------------------------------------------------- MMLU

# Subject -> category, from the MMLU repository's categories.py (github.com/hendrycks/test: each subject's
# subcategory grouped into the paper's four categories; "other" is its "other (business, health, misc.)").
# lm-eval-harness groups one subject differently: anatomy (subcategory "health") under STEM; here it is
# "other", as categories.py has it. A subject not listed here is reported under "unlisted".
CATEGORIES = {
    "STEM": """abstract_algebra astronomy college_biology college_chemistry college_computer_science
        college_mathematics college_physics computer_security conceptual_physics electrical_engineering
        elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science
        high_school_mathematics high_school_physics high_school_statistics machine_learning""",
    "humanities": """formal_logic high_school_european_history high_school_us_history high_school_world_history
        international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy
        prehistory professional_law world_religions""",
    "social sciences": """econometrics high_school_geography high_school_government_and_politics
        high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality
        professional_psychology public_relations security_studies sociology us_foreign_policy""",
    "other": """anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management
        marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine
        virology""",
}
SUBJECT_CATEGORY = {s: cat for cat, subjects in CATEGORIES.items() for s in subjects.split()}
SUBJECT_CATEGORY.update(toy_arithmetic="STEM", toy_parity="STEM", toy_lookup="other", toy_compare="other")  # toy
MMLU_FOLDERS = {"train": "auxiliary_train", "dev": "dev", "val": "val", "test": "test"}


def subject_category(subject: str | None) -> str:
    return SUBJECT_CATEGORY.get(subject or "", "unlisted")


def load_mmlu_csv(path: str | Path, subject: str | None = None) -> list[dict]:
    """One MMLU CSV file (no header; question, A, B, C, D, answer letter; fields may be quoted and hold
    commas, quotes and newlines). Any bad row raises a ValueError naming the file and its line."""
    path = Path(path)
    text = read_utf8(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    out, line = [], 1
    try:
        for row in reader:
            where = f"{path}:{line}"
            line = reader.line_num + 1  # the next record starts after this one's last line
            if not any(field.strip() for field in row):
                raise ValueError(f"{where}: blank row")
            if len(row) != 6:
                raise ValueError(f"{where}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
            if row[5].strip() not in ("A", "B", "C", "D"):  # one letter: not a substring test ("", "BC")
                raise ValueError(f"{where}: answer must be one of A, B, C, D, got {row[5]!r}")
            out.append(dict(question=row[0], choices=row[1:5], labels=list(LETTERS[:4]),
                            answer=LETTERS.index(row[5].strip()), subject=subject, where=where))
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return out


def load_mmlu(data: str | Path, split: str = "test") -> list[dict]:
    """Every question of a split, subjects in name order: "train" (auxiliary_train/), "dev", "val", "test"
    (`<subject>_<split>.csv`). Auxiliary-train questions have no subject (no subject line in the prompt)."""
    if split not in MMLU_FOLDERS:
        raise ValueError(f"MMLU split must be one of {sorted(MMLU_FOLDERS)}, got {split!r}")
    folder = Path(data) / MMLU_FOLDERS[split]
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .csv files; download MMLU with `make data TASK=mmlu`")
    suffix = f"_{split}.csv"
    return [ex for f in files
            for ex in load_mmlu_csv(f, f.name[:-len(suffix)] if f.name.endswith(suffix) else None)]


def mc_block(ex: dict) -> str:
    """"{question}\\nA. ...\\nB. ...\\nAnswer:" (the MMLU paper's format_example without the answer)."""
    options = "".join(f"\n{label}. {text}" for label, text in zip(ex["labels"], ex["choices"]))
    return f"{ex['question'].strip()}{options}\nAnswer:"


def mc_prompt(ex: dict, shots: Sequence[dict] = ()) -> str:
    """The subject line (when the question has a subject), k solved examples, then the question."""
    head = (f"The following are multiple choice questions (with answers) about "
            f"{ex['subject'].replace('_', ' ')}.\n\n") if ex.get("subject") else ""
    solved = "".join(f"{mc_block(s)} {s['labels'][s['answer']]}\n\n" for s in shots)
    return head + solved + mc_block(ex)


def encode_mc(tok, ex: dict, fmt: str = "plain", max_len: int | None = None) -> list[Example]:
    """Zero-shot prompt, loss on the answer letter only (no EOS: the letter is the whole answer)."""
    return [encode_pair(tok, mc_prompt(ex), ex["labels"][ex["answer"]], fmt, max_len, end=False)]

def json_lines(path: str | Path) -> Iterator[tuple[str, object]]:
    """("file:line", parsed object) for each line of a JSON-lines file (trailing blank lines ignored);
    a line that is not JSON raises naming file, line and column."""
    path = Path(path)
    lines = read_utf8(path).split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    for n, line in enumerate(lines, start=1):
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None


# ----------------------------------------------------------------------------- ARC

ARC_FILES = {"train": "ARC-Challenge-Train.jsonl", "dev": "ARC-Challenge-Dev.jsonl",
             "test": "ARC-Challenge-Test.jsonl"}


def load_arc_jsonl(path: str | Path) -> list[dict]:
    """ARC JSON lines; digit labels "1".."5" become "A".."E". A bad line raises naming file and line."""
    out = []
    for where, obj in json_lines(path):
        try:
            stem, choices, key = obj["question"]["stem"], obj["question"]["choices"], obj["answerKey"]
            texts, labels = [c["text"] for c in choices], [str(c["label"]) for c in choices]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: expected question.stem, question.choices[].text/label and answerKey "
                             f"(missing or wrong type: {e})") from None
        if not isinstance(stem, str) or not all(isinstance(t, str) for t in texts) or len(texts) < 2:
            raise ValueError(f"{where}: stem and choice texts must be strings, with at least 2 choices")
        digits = [str(i) for i in range(1, len(labels) + 1)]
        if labels == digits:  # some ARC questions number their choices
            labels, key = list(LETTERS[:len(labels)]), dict(zip(digits, LETTERS)).get(str(key), key)
        if labels != list(LETTERS[:len(labels)]):
            raise ValueError(f"{where}: choice labels must be A, B, ... or 1, 2, ..., got {labels}")
        if key not in labels:
            raise ValueError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        out.append(dict(question=stem, choices=texts, labels=labels, answer=labels.index(key), subject=None,
                        where=where))
    return out


def load_arc(data: str | Path, split: str = "test") -> list[dict]:
    if split not in ARC_FILES:
        raise ValueError(f"ARC split must be one of {sorted(ARC_FILES)}, got {split!r}")
    path = Path(data) / ARC_FILES[split]
    if not path.exists():  # a FIFO or device is refused by the reader (read_utf8), not called missing
        raise FileNotFoundError(f"{path} not found; download ARC with `make data TASK=arc_challenge`")
    return load_arc_jsonl(path)


def arc_text_prompt(ex: dict, shots: Sequence[dict] = ()) -> str:
    """lm-eval-harness's arc_challenge context; each choice is scored as the continuation " {text}". Its
    k-shot form puts each solved example as "Question: ...\nAnswer: {right choice}" before, "\n\n" between."""
    solved = "".join(f"Question: {s['question'].strip()}\nAnswer: {s['choices'][s['answer']]}\n\n" for s in shots)
    return f"{solved}Question: {ex['question'].strip()}\nAnswer:"

# ----------------------------------------------------------------------------- dolly

DOLLY_FILE, DOLLY_ROWS, DOLLY_VALID, DOLLY_SEED = "databricks-dolly-15k.jsonl", 15011, 2000, 0
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
DOLLY_KEYS = ("instruction", "context", "response", "category")


def load_dolly_jsonl(path: str | Path) -> list[dict]:
    """dolly JSON lines (string instruction, context, response, category); errors name file and line."""
    out = []
    for where, obj in json_lines(path):
        bad = [k for k in DOLLY_KEYS if not isinstance(obj, dict) or not isinstance(obj.get(k), str)]
        if bad:
            raise ValueError(f"{where}: {', '.join(map(repr, bad))} missing or not a string")
        out.append({k: obj[k] for k in DOLLY_KEYS})
    return out


def dolly_split(records: Sequence[dict], n_valid: int = DOLLY_VALID, seed: int = DOLLY_SEED) -> dict:
    """{"train", "test"}: a seeded shuffle, the first `n_valid` for validation (15,011 -> 13,011 / 2,000)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return dict(test=[records[i] for i in order[:n_valid]], train=[records[i] for i in order[n_valid:]])


def load_dolly(data: str | Path, split: str = "test") -> list[dict]:
    """`data`/databricks-dolly-15k.jsonl split by dolly_split, or already split train.jsonl / test.jsonl."""
    data = Path(data)
    if (data / f"{split}.jsonl").exists():  # exists, not is_file: the reader refuses a FIFO by name
        return load_dolly_jsonl(data / f"{split}.jsonl")
    if not (data / DOLLY_FILE).exists():
        raise FileNotFoundError(f"{data}: neither {DOLLY_FILE} nor {split}.jsonl; download dolly with "
                                "`make data TASK=dolly`")
    records = load_dolly_jsonl(data / DOLLY_FILE)
    if split == "train" and len(records) <= DOLLY_VALID:
        raise ValueError(f"{data / DOLLY_FILE}: {len(records):,} records, and the split holds out {DOLLY_VALID:,} "
                         f"for validation, which leaves none to train on; put your own split in {data} as "
                         "train.jsonl and test.jsonl")
    return dolly_split(records)[split]


def dolly_prompt(ex: dict, fmt: str = "plain") -> str:
    """The Alpaca template (plain); for the chat format the instruction and context as the user turn."""
    if fmt == "chat":
        return ex["instruction"].strip() + (f"\n\n{ex['context'].strip()}" if ex["context"].strip() else "")
    template = ALPACA_INPUT if ex["context"].strip() else ALPACA_NO_INPUT
    return template.format(instruction=ex["instruction"].strip(), context=ex["context"].strip())


def encode_dolly(tok, ex: dict, fmt: str = "plain", max_len: int | None = None) -> list[Example]:
    return [encode_pair(tok, dolly_prompt(ex, fmt), ex["response"], fmt, max_len)]

# ----------------------------------------------------------------------------- plain text

def load_text(data: str | Path, split: str = "test") -> list[dict]:
    """A text file itself (for any split), or `data`/{split}.txt: one record with the whole text."""
    data = Path(data)
    path = data if data.exists() and not data.is_dir() else data / f"{split}.txt"
    if not path.exists():  # a FIFO or device is refused by read_utf8, by name
        raise FileNotFoundError(f"{path} not found (give a text file, or a folder with train.txt and test.txt)")
    text = read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return [dict(text=text, where=str(path))]


def encode_text(tok, ex: dict, fmt: str = "plain", max_len: int | None = None) -> list[Example]:
    """BOS + the text, cut into consecutive rows of max_len predictions, every token a target."""
    ids = tok.encode(ex["text"], bos=True)
    step = max_len or len(ids)
    return [(ids[s:s + step], ids[s + 1:s + step + 1]) for s in range(0, len(ids) - 1, step)]

# ----------------------------------------------------------------------------- the toy analogues

# MMLU's two-statement questions (abstract_algebra and others): "Statement 1 | ... Statement 2 | ..."
# with these four options, always in this order, so the letter follows from the two truth values.
STATEMENT_OPTIONS = ("True, True", "False, False", "True, False", "False, True")
TOY_SUBJECTS = ("toy_parity", "toy_lookup", "toy_arithmetic")
MC_SUBJECTS = ("toy_parity",)  # what toy_folder writes: the one fine-tuning learned in probes (results/toy-mc/)


def _statement(r: random.Random, subject: str, true: bool, context: tuple) -> str:
    """One statement of `subject` that is `true` or not, on what the toy base has read: its arithmetic
    facts, an amount said in the question's first sentence (`context`), the parity of a number."""
    if subject == "toy_arithmetic":
        a, b, op, c = _fact(r)
        return f"{a}{op}{b}={c if true else c + r.choice([1, 2, 10]) * r.choice([-1, 1]) if c > 10 else c + r.randint(1, 3)}."
    if subject == "toy_lookup":
        (name, amount), o = r.choice(context[0]), context[1]
        return f"{name} has {amount if true else r.choice([k for k in range(2, 40) if k != amount])} {o}."
    if subject == "toy_parity":
        return f"{r.choice(range(2 if true else 3, 100, 2))} is even."
    raise ValueError(f"unknown toy subject {subject!r}; expected one of {TOY_SUBJECTS}")


def _mc_question(r: random.Random, subject: str, answer: int) -> str:
    """A two-statement question of `subject` whose right option is STATEMENT_OPTIONS[answer]."""
    truths = [option == "True" for option in STATEMENT_OPTIONS[answer].split(", ")]
    names, o = r.sample(NAMES, 2), r.choice([o for o in OBJECTS if len(o) <= 5])  # prompts within 256 bytes
    amounts = r.sample(range(2, 40), 2)
    head = f"{names[0]} has {amounts[0]} {o} and {names[1]} has {amounts[1]} {o}. " if subject == "toy_lookup" else ""
    first, second = (_statement(r, subject, t, (list(zip(names, amounts)), o)) for t in truths)
    return f"{head}Statement 1 | {first} Statement 2 | {second}"


def synthetic_mc(n: int, seed: int = 0, split: str = "train", subjects: Sequence[str] = MC_SUBJECTS) -> list[dict]:
    """`n` distinct four-choice questions, the `subjects` (of TOY_SUBJECTS) in turn; a hash of the question
    decides its split (never shared). The right letter is balanced: every four questions of a subject
    put it once at each of A, B, C, D (a seeded order), so always answering one letter scores 25%."""
    r, seen, out = random.Random(seed), set(), []
    slots: dict[str, list[int]] = {s: [] for s in subjects}
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        subject = subjects[len(out) % len(subjects)]
        if not slots[subject]:
            slots[subject] = r.sample(range(4), 4)
        question = _mc_question(r, subject, slots[subject][-1])
        is_test = zlib.crc32(question.encode()) % 4 == 0
        if question in seen or is_test != (split == "test"):
            continue
        seen.add(question)
        out.append(dict(question=question, choices=list(STATEMENT_OPTIONS), labels=list(LETTERS[:4]),
                        answer=slots[subject].pop(), subject=subject))
    return out


def write_mmlu_layout(folder: Path, sets: dict[str, list[dict]]) -> None:
    """`sets` {"train"/"dev"/"val"/"test": questions} as <split folder>/<subject>_<split>.csv. Real MMLU's
    auxiliary_train files have no subject (no subject line in their prompts); the toy's training questions
    keep theirs, so that they are asked with the subject line the test questions have: the toy base does
    not carry what it learned across that change (tested 2026-12-03: LoRA trained without the line and
    tested with it, 42.5%; the same adapter on the same test questions without it, 100%; results/toy-mc)."""
    for split, questions in sets.items():
        by_file: dict[str, list[dict]] = {}
        for q in questions:
            name = f"{q['subject']}_{split}.csv"
            by_file.setdefault(name, []).append(q)
        for name, qs in by_file.items():
            (folder / MMLU_FOLDERS[split]).mkdir(parents=True, exist_ok=True)
            with atomic_write(folder / MMLU_FOLDERS[split] / name, "w") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerows([q["question"], *q["choices"], q["labels"][q["answer"]]] for q in qs)


def write_arc_layout(folder: Path, sets: dict[str, list[dict]]) -> None:
    """ARC JSON lines; every fifth question numbers its choices "1".."4", as some ARC questions do."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, questions in sets.items():
        rows = []
        for i, q in enumerate(questions):
            labels = [str(k + 1) for k in range(len(q["choices"]))] if i % 5 == 4 else q["labels"]
            rows.append(dict(id=f"toy-{split}-{i}", answerKey=labels[q["answer"]],
                             question=dict(stem=q["question"], choices=[dict(text=t, label=lab) for t, lab
                                                                        in zip(q["choices"], labels)])))
        with atomic_write(folder / ARC_FILES[split], "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def synthetic_instructions(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` dolly-layout records on the toy world (three instruction kinds, with and without context)."""
    r, out, seen = random.Random(seed), [], set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        names, o = r.sample(NAMES, 3), r.choice(OBJECTS)
        amounts = [r.randint(2, 40) for _ in names]
        kind = r.randrange(3)
        if kind == 0:
            a, b, op, c = _fact(r)
            rec = dict(instruction=f"Work out {a}{op}{b}.", context="", response=f"{a}{op}{b} = {c}",
                       category="open_qa")
        elif kind == 1:
            i = r.randrange(3)
            rec = dict(instruction=f"How many {o} does {names[i]} have?",
                       context=", ".join(f"{x} has {k} {o}" for x, k in zip(names, amounts)) + ".",
                       response=f"{names[i]} has {amounts[i]} {o}.", category="closed_qa")
        else:
            rec = dict(instruction="List the names in the text, in order.",
                       context=", ".join(f"{x} {k}" for x, k in zip(names, amounts)),
                       response=", ".join(names), category="information_extraction")
        key = rec["instruction"] + rec["context"]
        if key in seen or (zlib.crc32(key.encode()) % 5 == 0) != (split == "test"):
            continue
        seen.add(key)
        out.append(rec)
    return out


@dataclass
class ToyTask:
    n_train: int = 2000       # synthetic GSM8K-format problems
    n_test: int = 200
    seed: int = 0


def toy_task(task: ToyTask = ToyTask(), root: Path | None = None) -> Path:
    """A folder with train.jsonl / test.jsonl of synthetic GSM8K-format problems (written once)."""
    final = (root or cache_dir()) / f"toy-gsm8k-{task.n_train}-{task.n_test}-{task.seed}"
    if (final / "done.json").exists():
        return final

    def build(tmp: Path) -> None:
        write_jsonl(synthetic_gsm8k(task.n_train, task.seed, "train"), tmp / "train.jsonl")
        write_jsonl(synthetic_gsm8k(task.n_test, task.seed, "test"), tmp / "test.jsonl")
        (tmp / "done.json").write_text(json.dumps(asdict(task)))

    return publish(build, final)


@dataclass(frozen=True)
class ToySizes:
    n_train: int = 1000     # training instructions / text lines
    n_train_mc: int = 4000  # training questions (mmlu, arc_challenge): one letter of loss each
    n_test: int = 200
    n_dev: int = 40         # MMLU dev (the k-shot pool) / ARC dev
    seed: int = 0


# A toy analogue's version goes into its cache folder's name, so that files written by older code are
# not reused. mmlu 2: the training questions carry their subject (write_mmlu_layout).
TOY_VERSIONS = {"mmlu": 2}


def toy_folder(task: str, sizes: ToySizes = ToySizes(), root: Path | None = None) -> Path:
    """The toy analogue of `task`, written once under the cache folder, in the task's official layout."""
    if task == "gsm8k":
        return toy_task(root=root)
    mc = task in ("mmlu", "arc_challenge")
    version = f"-v{TOY_VERSIONS[task]}" if task in TOY_VERSIONS else ""
    final = (root or cache_dir()) / (f"toy-{task}{version}-{sizes.n_train_mc if mc else sizes.n_train}-"
                                     f"{sizes.n_test}-{sizes.seed}")
    if (final / "done.json").exists():
        return final
    s = sizes.seed

    def build(tmp: Path) -> None:
        if mc:
            sets = dict(train=synthetic_mc(sizes.n_train_mc, s, "train"), test=synthetic_mc(sizes.n_test, s + 1, "test"),
                        dev=synthetic_mc(sizes.n_dev, s + 2, "train"))  # dev: the k-shot pool, never a test question
            if task == "mmlu":
                write_mmlu_layout(tmp, dict(sets, val=sets["dev"]))
            else:
                write_arc_layout(tmp, sets)
        elif task == "dolly":
            write_jsonl(synthetic_instructions(sizes.n_train, s, "train"), tmp / "train.jsonl")
            write_jsonl(synthetic_instructions(sizes.n_test, s + 1, "test"), tmp / "test.jsonl")
        elif task == "text":
            (tmp / "train.txt").write_text(story_text(sizes.n_train // 2, s + 3000) +
                                           synthetic_arithmetic_text(sizes.n_train, s + 3000))
            (tmp / "test.txt").write_text(story_text(sizes.n_test // 4, s + 4000) +
                                          synthetic_arithmetic_text(sizes.n_test // 2, s + 4000))
        else:
            raise ValueError(f"no toy analogue for task {task!r}")
        (tmp / "done.json").write_text(json.dumps(dict(task=task, n_train=sizes.n_train_mc if mc else sizes.n_train,
                                                       n_test=sizes.n_test,
                                                       n_dev=sizes.n_dev, seed=sizes.seed)))

    return publish(build, final)

# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Task:
    name: str
    kind: str       # how evaluate scores it: "generate", "choice", "response" (bits/token), "text" (sliding window)
    load: Callable[[Path, str], list[dict]]                 # (data folder, split) -> examples
    encode: Callable[..., list[Example]]                    # (tok, example, fmt, max_len) -> (input, targets) rows
    default_data: str                                       # where `make data TASK=...` puts it
    shots_split: str | None = None  # where k-shot examples come from (choice tasks; gsm8k's lm-eval style)
    train_splits: tuple[str, ...] = ("train",)  # what --train-split may name (never the test split)
    choice_text: bool = False       # also score the choice texts (acc_norm), as lm-eval-harness's ARC


def _encode_gsm8k(tok, ex: dict, fmt: str = "plain", max_len: int | None = None) -> list[Example]:
    return [encode_example(tok, ex, fmt, max_len)]


def _load_gsm8k(data: Path, split: str) -> list[dict]:
    return load_split(data, split)


def gsm8k_shots(style: str | None, shots: int | None) -> int:
    """How many solved examples a GSM8K prompt holds: `shots`, or when not given the style's own number
    (lm-eval's num_fewshot: gsm8k 5, the CoT styles their 8 exemplars), 0 without a style (minipeft's
    fine-tuning prompt). A count the style cannot give is a one-line ValueError naming the flag."""
    if shots is None:
        return GSM8K_NUM_FEWSHOT[style] if style else 0
    if style in ("gsm8k_cot", "gsm8k_cot_llama") and not 0 <= shots <= GSM8K_NUM_FEWSHOT[style]:
        raise ValueError(f"--shots {shots}: --gsm8k-style {style} has {GSM8K_NUM_FEWSHOT[style]} fixed exemplars "
                         f"(0 to {GSM8K_NUM_FEWSHOT[style]})")
    return shots


def gsm8k_prompts(tok, examples: Sequence[dict], fmt: str = "plain", style: str | None = None, shots: int = 0,
                  pool: Sequence[dict] = ()) -> list[list[int]]:
    """The token ids to generate from, one list per example. Without a style and shots: minipeft's
    fine-tuning prompt (data.encode_prompt; in plain format the text of lm-eval's zero-shot gsm8k prompt for
    every GSM8K question, none of which has surrounding whitespace to strip). Otherwise lm-eval's `style`
    prompt (data.encode_gsm8k_prompt; chat format: the multi-turn chat of --apply_chat_template
    --fewshot_as_multiturn): gsm8k's `shots` drawn from `pool` (the training split) as lm-eval draws them,
    question i the (i+1)-th seeded draw (data.gsm8k_fewshot); the CoT styles' first `shots` exemplars."""
    if style is None and not shots:
        return [encode_prompt(tok, ex["question"], fmt) for ex in examples]
    style = style or "gsm8k"
    if style == "gsm8k":
        if shots > len(pool):
            raise ValueError(f"--shots {shots}: the training split has {len(pool)} examples to draw from")
        per_question = gsm8k_fewshot(pool, len(examples), shots) if shots else [[] for _ in examples]
    else:
        per_question = [shots] * len(examples)  # an int: the first k fixed exemplars
    return [encode_gsm8k_prompt(tok, ex["question"], style, s, chat=fmt == "chat")
            for ex, s in zip(examples, per_question)]


TASKS: dict[str, Task] = {
    "gsm8k": Task("gsm8k", "generate", _load_gsm8k, _encode_gsm8k, "data/gsm8k", shots_split="train"),
    "mmlu": Task("mmlu", "choice", load_mmlu, encode_mc, "data/mmlu", shots_split="dev",
                 train_splits=("train", "dev", "val")),  # train = auxiliary_train/
    "arc_challenge": Task("arc_challenge", "choice", load_arc, encode_mc, "data/arc_challenge", shots_split="train",
                          choice_text=True, train_splits=("train", "dev")),
    "dolly": Task("dolly", "response", load_dolly, encode_dolly, "data/dolly"),
    "text": Task("text", "text", load_text, encode_text, "data/text"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"--task {name!r}: must be one of {', '.join(TASKS)}")
    return TASKS[name]


def check_train_split(task: str, split: str) -> None:
    """Raise unless `task` can train on `split` (an unknown task raises too, naming the tasks)."""
    splits = get_task(task).train_splits
    if split not in splits:
        raise ValueError(f"--train-split {split!r}: --task {task} trains on one of {', '.join(splits)}")


# ----------------------------------------------------------------------------- loading a task

def load_task(data: str | None = None, limit: int = 0, task: str = "gsm8k",
              train_split: str = "train") -> tuple[list[dict], list[dict], str]:
    """(train, test, description) of `task` (minipeft/tasks.py): the files in `data`, or the task's
    synthetic toy analogue; the first `limit` examples of each split when limit > 0. `train_split`
    picks another training split where the task has one (MMLU's dev or val, ARC's dev)."""
    if limit < 0:
        raise ValueError(f"--limit {limit}: must be >= 0 (0: all)")
    check_train_split(task, train_split)
    test, data = load_test_set(data, task, limit)
    train = load_examples(data, train_split, task)
    return (train[:limit] if limit else train), test, data


def load_test_set(data: str | None, task: str = "gsm8k", limit: int = 0) -> tuple[list[dict], str]:
    """(test examples, description) of `task`: what an evaluation reads (never the training split);
    the first `limit` when limit > 0."""
    get_task(task)  # an unknown name fails here, naming the tasks
    data = data or str(toy_folder(task))
    test = load_examples(data, "test", task)
    return (test[:limit] if limit else test), data


def load_examples(data: str, split: str, task: str = "gsm8k") -> list[dict]:
    """One split of `task` in `data`, with a non-UTF-8 byte named by file and line, and an empty split refused."""
    try:
        examples = get_task(task).load(Path(data).expanduser(), split)
    except UnicodeDecodeError:  # the GSM8K reader decodes strictly; the other tasks' readers use read_utf8
        read_utf8(Path(data).expanduser() / f"{split}.jsonl")  # raises, naming the file, line and column
        raise
    if not examples:
        where = Path(data).expanduser() / f"{split}.jsonl" if task == "gsm8k" else f"{data} ({task} {split} split)"
        raise ValueError(f"{where}: no examples (the file is empty or blank)")
    return examples


def encode_all(tok: Tokenizer, examples: Sequence[dict], fmt: str, max_len: int, task: str = "gsm8k") -> list[Example]:
    """Every (input_ids, targets) row of the examples, the loss on the answer only (task.encode)."""
    encode = get_task(task).encode
    return [row for ex in examples for row in encode(tok, ex, fmt, max_len)]
