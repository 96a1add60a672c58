"""The first candidate tried for the toy multiple choice (probes P1-P3 in ../README.md), kept to reproduce them:
questions with shuffled answer options (find the answer among them, then name its letter), the right letter
balanced. The toy base did not learn it at the toy budget, so minipeft/tasks.py writes two-statement questions.

    PYTHONPATH=. python results/toy-mc/probes/probe.py --pointer toy_lookup 400 full 1e-3 4000
"""
from __future__ import annotations

import random
import zlib

from minipeft.data import NAMES, OBJECTS, _fact
from minipeft.tasks import LETTERS

MC_SUBJECTS = ("toy_arithmetic", "toy_lookup", "toy_parity", "toy_compare")


def _mc_question(r: random.Random, subject: str) -> tuple[str, str, list[str]]:
    """(question, right answer, three wrong answers) of `subject`, on what the toy base has read:
    its arithmetic facts, named amounts it can look up in the question, parity, who has more."""
    names, o = r.sample(NAMES, 2), r.choice(OBJECTS)
    x, y = r.sample(range(2, 40), 2)
    if subject == "toy_arithmetic":
        a, b, op, c = _fact(r)
        wrong = r.sample(sorted({c + 1, c + 2, c + 10, abs(c - 1), abs(c - 2), abs(c - 10)} - {c}), 3)
        return f"What is {a}{op}{b}?", str(c), [str(w) for w in wrong]
    if subject == "toy_lookup":  # the wrong amounts are not in the question
        wrong = r.sample(sorted(set(range(2, 40)) - {x, y}), 3)
        return (f"{names[0]} has {x} {o} and {names[1]} has {y} {o}. How many {o} does {names[1]} have?",
                str(y), [str(w) for w in wrong])
    if subject == "toy_parity":
        want = r.choice(["even", "odd"])
        pool = [n for n in range(2, 100) if (n % 2 == 0) == (want == "even")]
        other = [n for n in range(2, 100) if (n % 2 == 0) != (want == "even")]
        return f"Which of these numbers is {want}?", str(r.choice(pool)), [str(n) for n in r.sample(other, 3)]
    if subject == "toy_compare":
        more = names[0] if x > y else names[1]
        others = r.sample([n for n in NAMES if n not in names], 2)
        return (f"{names[0]} has {x} {o} and {names[1]} has {y} {o}. Who has more {o}?", more,
                [names[1] if more == names[0] else names[0], *others])
    raise ValueError(f"unknown toy subject {subject!r}; expected one of {MC_SUBJECTS}")


def synthetic_mc(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` distinct four-choice questions, the subjects of MC_SUBJECTS in turn; a hash of the question
    decides its split (never shared). The right letter is balanced: every four questions of a subject
    put it once at each of A, B, C, D (a seeded order), so always answering one letter scores 25%."""
    r, seen, out = random.Random(seed), set(), []
    slots: dict[str, list[int]] = {s: [] for s in MC_SUBJECTS}
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        subject = MC_SUBJECTS[len(out) % len(MC_SUBJECTS)]
        question, right, wrong = _mc_question(r, subject)
        key = f"{question} {right} {sorted(wrong)}"  # parity questions share their text, not their options
        is_test = zlib.crc32(key.encode()) % 4 == 0
        if key in seen or is_test != (split == "test"):
            continue
        seen.add(key)
        if not slots[subject]:
            slots[subject] = r.sample(range(4), 4)
        answer = slots[subject].pop()
        choices = r.sample(wrong, 3)
        choices.insert(answer, right)
        out.append(dict(question=question, choices=choices, labels=list(LETTERS[:4]), answer=answer, subject=subject))
    return out
