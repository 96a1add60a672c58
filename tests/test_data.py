"""Tests for minipeft.data: loading, answer extraction, prompt masking, batching, packing,
synthetic data, and scripts/download_gsm8k.py against a local file:// source."""
from __future__ import annotations

import importlib.util
import json
import random
import re
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from minipeft.data import (IGNORE, answers_match, bucket_batches, collate, encode_completion,
                           encode_example, encode_prompt, extract_gold, extract_prediction,
                           load_gsm8k, load_split, normalize_number, pack, synthetic_arithmetic_text,
                           synthetic_gsm8k, write_jsonl)
from minipeft.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
REAL_GSM8K = Path("/work/shared/data/gsm8k")  # development copy; absent on users' machines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


# ----------------------------------------------------------------------------- loading

def test_load_round_trip_and_split_loader(tmp_path):
    train, test = synthetic_gsm8k(20, seed=0), synthetic_gsm8k(5, seed=1, split="test")
    write_jsonl(train, tmp_path / "train.jsonl")
    write_jsonl(test, tmp_path / "test.jsonl")
    assert load_gsm8k(tmp_path / "train.jsonl") == train
    assert load_split(tmp_path, "test") == test
    assert not list(tmp_path.glob(".*.tmp"))          # the atomic write left no temp file
    with pytest.raises(FileNotFoundError, match="make data"):
        load_split(tmp_path / "missing", "train")
    with pytest.raises(ValueError, match="split"):
        load_split(tmp_path, "validation")


def test_trailing_blank_lines_are_allowed(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a\n#### 1"}) + "\n\n  \n")
    assert len(load_gsm8k(path)) == 1


GOOD = json.dumps({"question": "q", "answer": "a\n#### 1"})


@pytest.mark.parametrize("bad, message", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    (json.dumps({"question": "q"}), "missing key 'answer'"),
    (json.dumps({"question": 3, "answer": "#### 1"}), "'question' must be a string"),
    (json.dumps({"question": "q", "answer": "no final line"}), "no '#### <number>'"),
    (json.dumps({"question": "q", "answer": "#### many"}), "not a number"),
    ("", "blank line"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([GOOD, GOOD, bad, GOOD]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        load_gsm8k(path)


# ----------------------------------------------------------------------------- answers

@pytest.mark.parametrize("text, number", [
    ("1,000", "1000"), ("$5.00", "5"), ("-3", "-3"), ("7.5", "7.5"), ("+4", "4"), ("7.50", "7.5"),
    ("12.", "12"), ("-0", "0"), (" 1,234,567 ", "1234567"), ("0.25", "0.25"),
    ("abc", None), ("", None), ("1.2.3", None), ("nan", None), ("1e5", None),
])
def test_normalize_number(text, number):
    assert normalize_number(text) == number


@pytest.mark.parametrize("text, number", [
    ("so the total is 5.\n#### 1,000", "1000"),
    ("#### $5.00", "5"),
    ("#### -3", "-3"),
    ("#### 7.5", "7.5"),
    ("####+4", "4"),
    ("#### 72\n\nQuestion: Ann has 3 pens", "72"),     # the model rambles on after its answer
    ("She pays 12 + 7 = 19 dollars.", "19"),           # no ####: the last number
    ("The answer is 1,250.", "1250"),
    ("5-3 = 2 and 10-12 = -2", "-2"),                  # a minus between digits is not a sign
    ("It costs -$4.", "-4"),
    ("#### none, but 8 before", "8"),                  # #### without a number: fall back
    ("no numbers here", None),
    ("", None),
])
def test_extract_prediction(text, number):
    assert extract_prediction(text) == number


def test_extract_gold_and_match():
    assert extract_gold("Natalia sold 48/2 = <<48/2=24>>24.\n#### 72") == "72"
    assert extract_gold("x\n#### 1,000") == "1000"
    with pytest.raises(ValueError):
        extract_gold("no final answer 5")
    assert answers_match("5.0", "5") and answers_match("$1,000", "1000") and answers_match("-2", "-2")
    assert not answers_match(None, "5") and not answers_match("6", "5") and not answers_match("2", "-2")


@pytest.mark.skipif(not REAL_GSM8K.is_dir(), reason="needs the real GSM8K files (make data)")
@pytest.mark.parametrize("split", ["train", "test"])
def test_extraction_agrees_with_every_real_gold_answer(split):
    """"Agree": the extracted string is the number after #### (same value, commas dropped), and
    extract_prediction on the gold answer gives the same string."""
    examples = load_split(REAL_GSM8K, split)
    assert len(examples) == {"train": 7473, "test": 1319}[split]
    disagree = []
    for n, ex in enumerate(examples, start=1):
        gold, raw = extract_gold(ex["answer"]), ex["answer"].rsplit("####", 1)[1].strip()
        if Decimal(gold) != Decimal(raw.replace(",", "")) or extract_prediction(ex["answer"]) != gold:
            disagree.append((n, raw, gold, extract_prediction(ex["answer"])))
    assert disagree == []


# ----------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_loss_counts_exactly_the_answer_tokens(tok, fmt):
    ex = {"question": "Ava has 3 pens. How many?", "answer": "3+0 = <<3+0=3>>3\n#### 3"}
    x, y = encode_example(tok, ex, fmt)
    prompt, answer = encode_prompt(tok, ex["question"], fmt), encode_completion(tok, ex["answer"], fmt)
    assert len(x) == len(y) == len(prompt) + len(answer) - 1
    assert x == (prompt + answer)[:-1]                          # inputs: all tokens but the last
    assert y[:len(prompt) - 1] == [IGNORE] * (len(prompt) - 1)  # no loss on the prompt
    assert y[len(prompt) - 1:] == answer                        # targets[t] = token t+1
    assert answer[-1] == (tok.eos_id if fmt == "plain" else tok.eot_id)
    assert tok.decode([t for t in y if t != IGNORE][:-1]).strip() == ex["answer"]


def test_prompt_formats(tok):
    question, answer = "How many?", "#### 2"
    plain = encode_prompt(tok, question, "plain")
    assert plain[0] == tok.bos_id and tok.decode(plain[1:]) == "Question: How many?\nAnswer:"
    chat = encode_prompt(tok, question, "chat") + encode_completion(tok, answer, "chat")
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    assert chat == tok.encode_dialog_prompt(messages, add_generation_prompt=False)
    with pytest.raises(ValueError, match="fmt"):
        encode_prompt(tok, question, "alpaca")


def test_max_len_truncates(tok):
    ex = synthetic_gsm8k(1)[0]
    x, y = encode_example(tok, ex, max_len=16)
    assert len(x) == len(y) == 16 and x == encode_example(tok, ex)[0][:16]


# ----------------------------------------------------------------------------- batching

def _fake(lengths: list[int]) -> list[tuple[list[int], list[int]]]:
    """Examples whose tokens identify them: example i is [1000 + i] * length, targets ditto + 1."""
    return [([1000 + i] * n, [IGNORE] + [2000 + i] * (n - 1)) for i, n in enumerate(lengths)]


def _pads(batches) -> int:
    return sum(max(len(x) for x, _ in b) * len(b) - sum(len(x) for x, _ in b) for b in batches)


def test_bucket_batches_use_every_example_once_with_few_pads():
    lengths = [random.Random(i).randint(5, 200) for i in range(403)]
    examples = _fake(lengths)
    batches = bucket_batches(examples, batch_size=8, shuffle=True, seed=0, chunk_batches=10)
    assert sorted(x[0] for b in batches for x, _ in b) == [1000 + i for i in range(403)]
    assert all(len(b) <= 8 for b in batches)
    unbucketed = [examples[i:i + 8] for i in range(0, 403, 8)]
    assert _pads(batches) < 0.2 * _pads(unbucketed)
    again = bucket_batches(examples, batch_size=8, shuffle=True, seed=0, chunk_batches=10)
    assert [[x[0] for x, _ in b] for b in again] == [[x[0] for x, _ in b] for b in batches]
    other = bucket_batches(examples, batch_size=8, shuffle=True, seed=1, chunk_batches=10)
    assert [[x[0] for x, _ in b] for b in other] != [[x[0] for x, _ in b] for b in batches]


def test_collate_right_pads():
    idx, targets, seg = collate(_fake([3, 5]), pad_id=7)
    assert idx.shape == targets.shape == seg.shape == (2, 5) and idx.dtype == torch.long
    assert idx[0].tolist() == [1000] * 3 + [7, 7] and targets[0].tolist() == [IGNORE, 2000, 2000, IGNORE, IGNORE]
    assert seg.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_pack_keeps_every_example_whole_with_its_own_segment():
    lengths = [7, 3, 9, 4, 10, 1, 6, 2, 5, 8]
    examples = _fake(lengths)
    idx, targets, seg = pack(examples, max_len=12, pad_id=0)
    assert idx.shape[1] == 12 and idx.shape[0] < len(lengths)      # rows hold several examples
    assert idx.shape[0] == -(-sum(lengths) // 12)                  # best-fit found the minimum here
    found = {}
    for r in range(idx.shape[0]):
        ids = seg[r].tolist()
        n_real = sum(s > 0 for s in ids)
        assert ids[:n_real] == sorted(ids[:n_real]) and set(ids[n_real:]) <= {0}  # padding at the end
        assert (targets[r, n_real:] == IGNORE).all()
        for s in sorted(set(ids) - {0}):
            where = seg[r] == s
            x, y = idx[r, where].tolist(), targets[r, where].tolist()
            i = x[0] - 1000
            assert (x, y) == examples[i] and i not in found            # whole, once, unchanged
            found[i] = True
            # segment boundary: the first target of each example is its own (masked) prompt
            # token and the last is its own last token: nothing predicts the next example
            assert y[0] == IGNORE and y[-1] in (IGNORE, 2000 + i)
        assert list(range(1, max(ids) + 1)) == sorted(set(ids) - {0})  # ids 1..k, distinct
    assert sorted(found) == list(range(len(lengths)))


def test_pack_real_examples_and_refuse_too_long(tok):
    examples = [encode_example(tok, ex) for ex in synthetic_gsm8k(30, seed=3)]
    idx, targets, seg = pack(examples, max_len=512)
    assert (targets != IGNORE).sum() == sum(sum(t != IGNORE for t in y) for _, y in examples)
    assert (seg > 0).sum() == sum(len(x) for x, _ in examples)
    # each example's last target is its own EOS, never the next example's BOS
    ends = (seg[:, :-1] != seg[:, 1:]) & (seg[:, :-1] > 0)
    assert (targets[:, :-1][ends] == tok.eos_id).all()
    with pytest.raises(ValueError, match="max_len"):
        pack(examples, max_len=20)


# ----------------------------------------------------------------------------- synthetic data

def _check_annotations(answer: str) -> int:
    """Every <<expr=value>> evaluates to value and is followed by it; return the #### number."""
    steps = re.findall(r"<<([\d+\-*/]+)=(\d+)>>(\d+)", answer)
    assert steps and len(steps) == answer.count("<<")
    for expr, value, shown in steps:
        assert eval(expr) == int(value) == int(shown)   # expr is digits and + - * / only
    final = int(extract_gold(answer))
    assert final == int(steps[-1][1])
    return final


def test_synthetic_gsm8k_is_deterministic_consistent_and_small():
    train = synthetic_gsm8k(300, seed=0)
    assert train == synthetic_gsm8k(300, seed=0) and train != synthetic_gsm8k(300, seed=1)
    assert len({ex["question"] for ex in train}) == 300
    finals = [_check_annotations(ex["answer"]) for ex in train]
    assert 0 <= min(finals) and max(finals) <= 200
    assert max(ex["answer"].count("<<") for ex in train) == 2        # one- and two-step problems


def test_synthetic_splits_never_overlap():
    train = synthetic_gsm8k(2000, seed=0, split="train")
    test = synthetic_gsm8k(300, seed=0, split="test")                # even with the same seed
    assert not {ex["question"] for ex in train} & {ex["question"] for ex in test}
    for ex in test:
        _check_annotations(ex["answer"])


def test_synthetic_arithmetic_text():
    text = synthetic_arithmetic_text(500, seed=0)
    assert text == synthetic_arithmetic_text(500, seed=0) and text != synthetic_arithmetic_text(500, seed=1)
    lines = text.splitlines()
    assert len(lines) == 500 and text.isascii()
    facts = [m for line in lines for m in re.findall(r"(?<![\d<])(\d+[+\-*/]\d+)=(\d+)", line)]
    assert len(facts) > 100
    assert all(eval(expr) == int(value) for expr, value in facts)
    assert any("<<" in line for line in lines) and any(" has " in line for line in lines)


# ----------------------------------------------------------------------------- download script

def _download_script():
    spec = importlib.util.spec_from_file_location("download_gsm8k", ROOT / "scripts" / "download_gsm8k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_download_script_from_a_file_url(tmp_path, capsys):
    script, src, out = _download_script(), tmp_path / "mirror", tmp_path / "out"
    line = {"question": "q", "answer": "a\n#### 1"}
    write_jsonl([line] * 7473, src / "train.jsonl")
    write_jsonl([line] * 1319, src / "test.jsonl")
    assert script.main(["--out", str(out), "--source", src.as_uri()]) == 0
    assert len(load_split(out, "train")) == 7473 and len(load_split(out, "test")) == 1319
    printed = capsys.readouterr().out
    assert "MIT" in printed and "2021 OpenAI" in printed and src.as_uri() in printed

    # a wrong line count (here from a plain folder path) fails and writes nothing
    write_jsonl([line] * 10, src / "test.jsonl")
    assert script.main(["--out", str(tmp_path / "out2"), "--source", str(src)]) == 1
    assert "expected 1319 lines, got 10" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()             # not even the good train.jsonl
