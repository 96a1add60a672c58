"""GSM8K data: loading, answer extraction, prompt formats, batching, packing, and a synthetic toy.

GSM8K: Cobbe et al., "Training Verifiers to Solve Math Word Problems", arXiv:2110.14168;
files from github.com/openai/grade-school-math (MIT licence). Each JSON line holds a `question` and
an `answer` whose reasoning carries calculator annotations `<<48/2=24>>` and ends with `#### 72`.

The training target is the whole answer, reasoning included, and the loss counts answer tokens only:

    input_ids = tokens[:-1]      targets = tokens[1:], with -100 on every prompt token

so `model(input_ids, targets)` needs no shift of its own. Packing concatenates such already-shifted
examples, so no target ever crosses from one example into the next (the last input of an example
predicts its own EOS/<|eot_id|>, never the next example's BOS).

The synthetic problems (1-2 steps, numbers below ~100) stand in for GSM8K in the toy default, so the
tests and the CPU demo need no download.
"""
from __future__ import annotations

import bisect
import itertools
import json
import os
import random
import re
import shutil
import tempfile
import zlib
from decimal import Decimal
from pathlib import Path
from typing import Sequence

import torch

from .safetensors_io import current_umask, regular

IGNORE = -100                      # the target value cross_entropy skips
MAX_LINE_BYTES = 1_000_000         # per GSM8K line: far above any real one
SPLITS = ("train", "test")
PLAIN_PROMPT = "Question: {question}\nAnswer:"
Example = tuple[list[int], list[int]]              # (input_ids, targets), same length
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # idx, targets, segment_ids: (B, T) int64

# ----------------------------------------------------------------------------- loading

def load_gsm8k(path: str | Path) -> list[dict]:
    """Read a GSM8K JSON-lines file, a line at a time. Blank lines at the end are ignored; any other
    bad line (blank, not JSON, missing or non-string key, answer without `#### <number>`, not UTF-8,
    longer than MAX_LINE_BYTES) raises a ValueError naming the file and line. Nothing is skipped
    silently. A FIFO or device is refused before it is opened (reading it would hang)."""
    path = regular(Path(path))
    examples, blank = [], None  # blank: the first blank line since the last example (an error if one follows)
    # bytes, split at b"\n" only (str.splitlines() would also break at U+2028 inside a JSON string; no
    # UTF-8 sequence holds the byte 0x0a), each line decoded alone, so a bad byte is named on its line
    with open(path, "rb") as f:
        for n in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)  # bounded: a 2 GB line is never read whole
            if not raw:
                return examples
            if len(raw.rstrip(b"\n")) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{n}: longer than {MAX_LINE_BYTES:,} bytes (MAX_LINE_BYTES in "
                                 "minipeft/data.py); not a GSM8K line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1})") from None
            if not line.strip():
                blank = blank or n
                continue
            if blank:
                _parse_line("", f"{path}:{blank}")  # raises: a blank line before the end
            examples.append(_parse_line(line, f"{path}:{n}"))


def _parse_line(line: str, where: str) -> dict:
    if not line.strip():
        raise ValueError(f"{where}: blank line (only blank lines at the end of the file are allowed)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("question", "answer"):
        if key not in obj:
            raise ValueError(f"{where}: missing key {key!r} (found {sorted(obj)})")
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    try:
        extract_gold(obj["answer"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return obj


def load_split(data_dir: str | Path = "data/gsm8k", split: str = "train") -> list[dict]:
    """Load `{data_dir}/{split}.jsonl` with `load_gsm8k`; split is "train" or "test"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.exists():  # a FIFO or device is refused by load_gsm8k, by name
        raise FileNotFoundError(f"{path} not found; download GSM8K with `make data` "
                                "(python scripts/download_gsm8k.py)")
    return load_gsm8k(path)


def write_jsonl(examples: Sequence[dict], path: str | Path) -> None:
    """Write one JSON object per line, atomically: a temp file in the same folder, then a rename,
    so a crash never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples)
        os.chmod(tmp, 0o644)                   # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

# ----------------------------------------------------------------------------- generated data, cached

def cache_dir() -> Path:
    """$MINIPEFT_CACHE, else data/cache/ of this checkout, else ~/.cache/minipeft (for the task files)."""
    if os.environ.get("MINIPEFT_CACHE"):
        return Path(os.environ["MINIPEFT_CACHE"])
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").exists() and (root / "data").is_dir():
        return root / "data" / "cache"
    return Path.home() / ".cache" / "minipeft"


def publish(build, final: Path) -> Path:
    """Run build(tmp_dir), then rename tmp_dir to `final` (atomic; a concurrent winner is kept)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; an ordinary mkdir would not
    try:
        build(tmp)
        os.replace(tmp, final)
    except OSError:
        if not (final / "done.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def story_text(n: int, seed: int = 0) -> str:
    """`n` training-split word problems told as plain prose, the question then its worked reasoning on
    one line: no "Question:"/"Answer:" prompt, no "#### N" line, never a test question."""
    lines = []
    for ex in synthetic_gsm8k(n, seed + 1, "train"):
        reasoning = ex["answer"].rsplit("\n####", 1)[0].replace("\n", " ")
        lines.append(f"{ex['question']} {reasoning}")
    return "\n".join(lines) + "\n"

# ----------------------------------------------------------------------------- answers

# a number: optional sign (not a minus between digits, as in "5-3"), optional $, digits with
# optional thousands commas, optional decimals; never starts inside another number
_NUMBER = re.compile(r"(?<![\d.])([-+]?)\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")
_PLAIN = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")          # "12." (a sentence's full stop) is fine


def normalize_number(text: str) -> str | None:
    """Canonical form of one number, or None: "1,000" -> "1000", "$5.00" -> "5", "+4" -> "4",
    "7.50" -> "7.5", "-3" -> "-3", "12." -> "12"."""
    s = text.strip().replace(",", "").replace("$", "")
    if not _PLAIN.fullmatch(s):
        return None
    d = Decimal(s)
    if d == d.to_integral_value():
        return str(int(d))                     # also turns "-0" into "0"
    return format(d.normalize(), "f")


def extract_gold(answer: str) -> str:
    """The normalised number after the last `####` of a GSM8K answer; ValueError if there is none."""
    if "####" not in answer:
        raise ValueError("answer has no '#### <number>' line")
    tail = answer.rsplit("####", 1)[1].strip()
    gold = normalize_number(tail)
    if gold is None:
        raise ValueError(f"text after '####' is not a number: {tail!r}")
    return gold


def extract_prediction(text: str) -> str | None:
    """The first number after the first `####` of a generation (it may ramble on afterwards),
    else the last number anywhere in the text, else None; normalised like the gold answer."""
    _, sep, tail = text.partition("####")
    match = _NUMBER.search(tail) if sep else None
    if match is None:
        matches = list(_NUMBER.finditer(text))
        match = matches[-1] if matches else None
    return None if match is None else normalize_number(match.group(1) + match.group(2))


def answers_match(pred: str | None, gold: str) -> bool:
    """True when both parse to the same number ("5.0" matches "5"); a missing prediction never does."""
    p = None if pred is None else normalize_number(pred)
    g = normalize_number(gold)
    return p is not None and g is not None and Decimal(p) == Decimal(g)

# ----------------------------------------------------------------------------- prompts

def encode_prompt(tok, question: str, fmt: str = "plain") -> list[int]:
    """Token ids the model continues from: "plain" is `Question: ...\\nAnswer:` after BOS (base
    models); "chat" is the Llama 3 chat format ending in an open assistant header (Instruct models)."""
    if fmt == "plain":
        return tok.encode(PLAIN_PROMPT.format(question=question.strip()), bos=True)
    if fmt == "chat":
        return tok.encode_dialog_prompt([{"role": "user", "content": question}],
                                        add_generation_prompt=True)
    raise ValueError(f"fmt must be 'plain' or 'chat', got {fmt!r}")


def encode_completion(tok, answer: str, fmt: str = "plain") -> list[int]:
    """The tokens the model should produce: " {answer}" + EOS (plain), or answer + <|eot_id|> (chat,
    content stripped as Llama 3's encode_message does)."""
    if fmt == "plain":
        return tok.encode(" " + answer.strip()) + [tok.eos_id]
    if fmt == "chat":
        return tok.encode(answer.strip()) + [tok.eot_id]
    raise ValueError(f"fmt must be 'plain' or 'chat', got {fmt!r}")


def encode_example(tok, example: dict, fmt: str = "plain", max_len: int | None = None) -> Example:
    """(input_ids, targets) for teacher forcing with the loss on answer tokens only.

    targets[t] is the token at t+1 (the shift is done here, not in the model) and -100 while that
    token still belongs to the prompt. `max_len` keeps the first max_len positions (a long answer
    loses its tail)."""
    prompt = encode_prompt(tok, example["question"], fmt)
    answer = encode_completion(tok, example["answer"], fmt)
    input_ids = (prompt + answer)[:-1]
    targets = [IGNORE] * (len(prompt) - 1) + answer
    if max_len is not None:
        input_ids, targets = input_ids[:max_len], targets[:max_len]
    return input_ids, targets

# ----------------------------------------------------------------------------- batching

def bucket_batches(examples: Sequence[Example], batch_size: int, shuffle: bool = True,
                   seed: int = 0, chunk_batches: int = 50) -> list[list[Example]]:
    """Batches of similar length: shuffle, cut into chunks of `chunk_batches` batches, sort each chunk
    by length, cut it into batches, shuffle the batches. Every example is used once; the last batch
    of a chunk may be smaller."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(examples[i][0]))
        batches += [[examples[i] for i in part[j:j + batch_size]]
                    for j in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """Right-pad to the longest example: pads get id `pad_id`, target -100 and segment id 0."""
    T = max(len(x) for x, _ in examples)
    return _to_tensors([[i] for i in range(len(examples))], examples, T, pad_id)


def attention_segments(targets: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor | None:
    """The segment ids the model needs for attention, or None when plain causal attention gives the
    same loss and gradients: every row is ONE example (segment 1) followed by padding (segment 0)
    whose targets are all IGNORE. Causal attention never lets a real token see a later pad, and the
    pads' own outputs carry no loss, so no (B, 1, T, T) mask is needed and SDPA can take its
    `is_causal=True` path (the flash kernel on CUDA). Packed rows (segments 2, 3, ...) keep their ids.
    Call it on CPU tensors (as collate makes them): on a GPU tensor the check is a host sync."""
    one_then_pads = (segment_ids[:, 1:] <= segment_ids[:, :-1]).all() and segment_ids.max() <= 1
    pads_ignored = bool((targets[segment_ids == 0] == IGNORE).all())
    return None if bool(one_then_pads) and pads_ignored else segment_ids


def pack(examples: Sequence[Example], max_len: int, pad_id: int = 0) -> Batch:
    """Pack whole examples into rows of `max_len` (best-fit decreasing); within a row, examples keep
    their input order and get segment ids 1, 2, ...; the tail is padding (segment 0, target -100).
    No example is split or dropped: one longer than max_len raises (encode with max_len=...)."""
    too_long = [i for i, (x, _) in enumerate(examples) if len(x) > max_len]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {len(examples[too_long[0]][0])} tokens > "
                         f"max_len={max_len}; truncate with encode_example(..., max_len=)")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []           # sorted (space left, row) of rows not yet full
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
        n = len(examples[i][0])
        j = bisect.bisect_left(free, (n, -1))  # the tightest row it fits in
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if space > n:
            bisect.insort(free, (space - n, r))
    return _to_tensors([sorted(r) for r in rows], examples, max_len, pad_id)


def _to_tensors(rows: list[list[int]], examples: Sequence[Example], T: int, pad_id: int) -> Batch:
    """(len(rows), T) tensors; row r holds examples rows[r] back to back, segment ids 1, 2, ..."""
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    segment_ids = torch.zeros((len(rows), T), dtype=torch.long)
    for r, members in enumerate(rows):
        t = 0
        for seg, i in enumerate(members, start=1):
            x, y = examples[i]
            idx[r, t:t + len(x)], targets[r, t:t + len(y)] = torch.tensor(x), torch.tensor(y)
            segment_ids[r, t:t + len(x)] = seg
            t += len(x)
    return idx, targets, segment_ids

# ----------------------------------------------------------------------------- synthetic toy data

NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia",
         "Ned", "Ola", "Pam", "Raj", "Sam", "Tia"]
OBJECTS = ["apples", "pens", "books", "eggs", "cards", "shells", "stickers", "marbles",
           "cookies", "stamps"]
BOXES = ["bags", "boxes", "packs", "jars", "baskets"]


def _calc(a: int, op: str, b: int) -> tuple[int, str]:
    """Result and GSM8K-style text `a+b = <<a+b=c>>c` of one calculator step (exact division only)."""
    c = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
    assert op != "/" or a % b == 0, f"{a}/{b} is not exact"
    return c, f"{a}{op}{b} = <<{a}{op}{b}={c}>>{c}"


def _problem(r: random.Random) -> tuple[str, list[str], int]:
    """One word problem: (question, reasoning lines, final answer), 1 or 2 calculator steps."""
    n, m = r.sample(NAMES, 2)
    o, box = r.choice(OBJECTS), r.choice(BOXES)
    a, b, d = r.randint(2, 9), r.randint(2, 9), r.randint(2, 20)
    kind = r.randrange(7)
    if kind == 0:
        c, s = _calc(d, "+", r.randint(2, 20))
        return (f"{n} has {d} {o}. {m} gives {n} {c - d} more {o}. How many {o} does {n} have now?",
                [f"{n} has {s} {o} now."], c)
    if kind == 1:
        total = r.randint(5, 30)
        c, s = _calc(total, "-", r.randint(1, total - 1))
        return (f"{n} had {total} {o} and gave {total - c} of them to {m}. How many {o} does {n} have left?",
                [f"{n} has {s} {o} left."], c)
    if kind == 2:
        c, s = _calc(a, "*", b)
        return (f"{n} buys {a} {box} with {b} {o} in each. How many {o} does {n} buy?",
                [f"{n} buys {s} {o}."], c)
    if kind == 3:
        c, s = _calc(a * b, "/", a)
        return (f"{n} shares {a * b} {o} equally among {a} friends. How many {o} does each get?",
                [f"Each friend gets {s} {o}."], c)
    if kind == 4:
        c, s = _calc(a, "*", b)
        return (f"{n} buys {a} {o} for ${b} each. How much money does {n} spend?",
                [f"{n} spends {s.replace('<<', '$<<')}."], c)
    if kind == 5:
        c, s1 = _calc(a, "*", b)
        e, s2 = _calc(c, "+", d)
        return (f"{n} buys {a} {box} of {b} {o} and finds {d} more {o}. How many {o} does {n} have?",
                [f"{n} buys {s1} {o}.", f"{n} has {s2} {o} in total."], e)
    c, s1 = _calc(d, "+", b)
    e, s2 = _calc(c, "-", r.randint(1, c - 1))
    return (f"{n} has {d} {o}, gets {b} more from {m} and then gives {c - e} away. "
            f"How many {o} does {n} have left?",
            [f"{n} has {s1} {o} after getting more.", f"{n} has {s2} {o} left."], e)


def _fact(r: random.Random) -> tuple[int, int, str, int]:
    """A random (a, b, op, result) with small operands, non-negative results and exact division."""
    op = r.choice("+-*/")
    a, b = r.randint(0, 50), r.randint(0, 50)
    if op == "-":
        a, b = max(a, b), min(a, b)
    if op in "*/":
        a, b = r.randint(2, 9), r.randint(2, 9)
    if op == "/":
        a = a * b
    return a, b, op, _calc(a, op, b)[0]


def _split_of(question: str) -> str:
    # a fixed hash partition, so "train" and "test" never share a question whatever the seeds
    return "test" if zlib.crc32(question.encode()) % 8 == 0 else "train"


def synthetic_gsm8k(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` distinct GSM8K-format word problems, deterministic given `seed`. Questions are assigned to
    "train" or "test" by a hash of their text, so the two splits never overlap, whatever the seeds."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    r, seen, out = random.Random(seed), set(), []
    for _ in range(100 * n + 1000):            # bounded: the template space is finite
        if len(out) == n:
            break
        question, lines, result = _problem(r)
        if question not in seen and _split_of(question) == split:
            seen.add(question)
            out.append({"question": question, "answer": "\n".join(lines) + f"\n#### {result}"})
    if len(out) < n:
        raise ValueError(f"could only make {len(out)} distinct {split} problems, asked for {n}")
    return out


def synthetic_arithmetic_text(n: int, seed: int = 0) -> str:
    """`n` lines of plain text to pretrain a tiny model on: bare facts ("12+7=19"), calculator
    annotations ("<<3*4=12>>12"), and reasoning sentences of train-split word problems."""
    r, lines = random.Random(seed), []
    while len(lines) < n:
        kind = r.random()
        if kind < 0.3:
            question, steps, _ = _problem(r)
            if _split_of(question) == "train":  # never the reasoning of a test question
                lines.append(r.choice(steps))
            continue
        a, b, op, c = _fact(r)
        lines.append(f"{a}{op}{b}={c}" if kind < 0.7 else f"<<{a}{op}{b}={c}>>{c}")
    return "\n".join(lines) + "\n"


# =============================================================================================
# GSM8K as lm-evaluation-harness scores it: its filters, its exact match, its k-shot prompts
# =============================================================================================
# Read from EleutherAI/lm-evaluation-harness (commit 4e7e0d47): lm_eval/tasks/gsm8k/gsm8k.yaml,
# gsm8k-cot.yaml, gsm8k-cot-llama.yaml; the filters in lm_eval/filters/extraction.py (RegexFilter) and
# selection.py (take_first); exact_match in lm_eval/api/metrics.py (exact_match_hf_evaluate); the
# prompt in lm_eval/api/task.py (fewshot_context, build_qa_turn), lm_eval/api/utils.py (Message) and
# lm_eval/api/samplers.py (ContextSampler, FirstNSampler). GSM8K numbers published from lm-eval are
# these two, not minipeft's `extract_prediction` above (docs/lm-eval.md).
#
#     gsm8k_scores("... #### 1,000", "... #### 1000")  -> strict_match True, flexible_extract True
#     gsm8k_prompt(question, "gsm8k_cot")              -> the 8-shot "Q: ...\nA: ..." text
#     encode_gsm8k_prompt(tok, question, "gsm8k_cot_llama", chat=True)   -> Meta's multi-turn chat

GSM8K_STYLES = ("gsm8k", "gsm8k_cot", "gsm8k_cot_llama")  # lm-eval's task names
INVALID = "[invalid]"                                       # RegexFilter's fallback when nothing matches
# exact_match's regexes_to_ignore (the same in all three YAMLs), applied in this order to the filtered
# prediction and to the reference alike, then both lower-cased (ignore_case: true)
EXACT_MATCH_IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"                   # flexible-extract, last match (group_select -1)
STRICT = {  # strict-match: (regex, group_select)
    "gsm8k": (r"#### (\-?[0-9\.\,]+)", 0),
    "gsm8k_cot": (r"The answer is (\-?[0-9\.\,]+).", 0),
    "gsm8k_cot_llama": (r"The final answer is ((-?[$0-9.,]{2,})|(-?[0-9]+))", -1),
}
# generation_kwargs.until; lm-eval's HF model adds its own EOS text (lm_eval/models/utils.py
# handle_stop_sequences) and cuts the decoded text before the first of them (postprocess_generated_text)
GSM8K_UNTIL = {
    "gsm8k": ("Question:", "</s>", "<|im_end|>"),
    "gsm8k_cot": ("Q:", "</s>", "<|im_end|>"),
    "gsm8k_cot_llama": ("<|eot_id|>", "<|start_header_id|>user<|end_header_id|>", "Q:", "</s>", "<|im_end|>"),
}
GSM8K_NUM_FEWSHOT = {"gsm8k": 5, "gsm8k_cot": 8, "gsm8k_cot_llama": 8}
LM_EVAL_FEWSHOT_SEED = 1234   # lm_eval/defaults.py DEFAULT_OTHER_SEED, the fewshot sampler's seed
LLAMA_INSTRUCTION = ("Given the following problem, reason and give a final answer to the problem.\n"
                     "Problem: {question}\nYour response should end with \"The final answer is [answer]\" "
                     "where [answer] is the response to the problem.\n")
# Wei et al., "Chain-of-Thought Prompting Elicits Reasoning in Large Language Models", arXiv:2201.11903,
# table 20: the 8 exemplars of gsm8k-cot.yaml and gsm8k-cot-llama.yaml as (question, reasoning, answer).
# gsm8k_cot ends each with " The answer is N."; gsm8k_cot_llama with " The final answer is N" (no stop).
COT_EXEMPLARS = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
     "done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
     "have been 21 - 15 = 6.", "6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.", "5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
     "total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
     "eating 35, they had 74 - 35 = 39.", "39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
     "did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
     "20 - 12 = 8.", "8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
     "have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9.", "9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from "
     "monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29.", "29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many "
     "golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 "
     "more, he had 35 - 2 = 33 golf balls.", "33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
     "dollars left. 23 - 15 is 8.", "8"),
)


def _check_style(style: str) -> None:
    if style not in GSM8K_STYLES:
        raise ValueError(f"GSM8K style must be one of {GSM8K_STYLES} (lm-eval's task names), got {style!r}")


def lm_eval_regex(text: str, pattern: str, group_select: int = 0, fallback: str = INVALID) -> str:
    """lm-eval's `regex` filter on one response: `re.findall`, the match at index `group_select`
    (0 the first, -1 the last); a match of a pattern with several groups is a tuple, of which the
    first non-empty group counts; the result is stripped. No match: `fallback`."""
    matches = re.findall(pattern, text if isinstance(text, str) else "")
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), fallback)
    return match.strip()


def lm_eval_exact_match(prediction: str, reference: str, regexes_to_ignore: Sequence[str] = EXACT_MATCH_IGNORE,
                        ignore_case: bool = True) -> bool:
    """lm-eval's exact_match (exact_match_hf_evaluate): each regex of `regexes_to_ignore` in turn is
    deleted (re.sub) from the prediction and the reference alike, both are lower-cased, then compared
    as strings. GSM8K's list turns "1,000" into "1000", "$5" into "5", "5." into "5", and the full answer
    text "...\\n#### 72" into "72" (the greedy "(?s).*#### " eats everything up to the last "#### ")."""
    for pattern in regexes_to_ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    return prediction == reference


def gsm8k_target(answer: str, style: str = "gsm8k") -> str:
    """The reference lm-eval compares with (doc_to_target): the full answer text for gsm8k (the
    regexes of the metric cut it to the number), the text after the last `####`, stripped, for the
    two chain-of-thought styles."""
    _check_style(style)
    return answer if style == "gsm8k" else answer.split("####")[-1].strip()


def gsm8k_extract(generation: str, style: str = "gsm8k") -> dict[str, str]:
    """{"strict_match": ..., "flexible_extract": ...}: what each of lm-eval's two filters takes from a
    generation (already cut at the stop strings), "[invalid]" when its regex finds nothing.
    strict-match: the first `#### N` (gsm8k), `The answer is N.` (gsm8k_cot), the last `The final answer
    is N` (gsm8k_cot_llama); flexible-extract: the last number-like run anywhere."""
    _check_style(style)
    pattern, group = STRICT[style]
    return {"strict_match": lm_eval_regex(generation, pattern, group),
            "flexible_extract": lm_eval_regex(generation, FLEXIBLE, -1)}


def gsm8k_scores(generation: str, answer: str, style: str = "gsm8k") -> dict:
    """lm-eval's two GSM8K scores of one generation against the gold answer text (GSM8K's `answer`,
    reasoning and `#### N`): {"strict_match": bool, "flexible_extract": bool, "strict_match_extracted":
    str, "flexible_extract_extracted": str}. The means of the bools over a test set are lm-eval's
    `exact_match,strict-match` and `exact_match,flexible-extract`."""
    extracted, reference = gsm8k_extract(generation, style), gsm8k_target(answer, style)
    out: dict = {name: lm_eval_exact_match(pred, reference) for name, pred in extracted.items()}
    return out | {f"{name}_extracted": pred for name, pred in extracted.items()}


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (lm-eval's postprocess_generated_text:
    `text.split(term)[0]` for each non-empty term in turn, which keeps the shortest prefix)."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


def cot_exemplars(style: str = "gsm8k_cot", k: int = 8) -> list[dict]:
    """The first k of the 8 fixed exemplars as {"question", "target"} (lm-eval's first_n sampler over
    fewshot_config.samples, so --num_fewshot k takes the first k)."""
    if style not in ("gsm8k_cot", "gsm8k_cot_llama"):
        raise ValueError(f"fixed exemplars exist for gsm8k_cot and gsm8k_cot_llama, not {style!r}")
    if not 0 <= k <= len(COT_EXEMPLARS):
        raise ValueError(f"k={k}: {style} has {len(COT_EXEMPLARS)} exemplars")
    final = " The answer is {}." if style == "gsm8k_cot" else " The final answer is {}"
    return [{"question": q, "target": r + final.format(n)} for q, r, n in COT_EXEMPLARS[:k]]


def _shot_docs(style: str, shots: Sequence[dict] | int | None) -> list[dict]:
    if isinstance(shots, int) and not isinstance(shots, bool):
        if style == "gsm8k":
            raise ValueError("gsm8k's shots come from the training split: pass the examples "
                             "(gsm8k_fewshot(train, n) gives the ones lm-eval samples)")
        return cot_exemplars(style, shots)
    if shots is None:
        return [] if style == "gsm8k" else cot_exemplars(style)
    return list(shots)


def _turn(doc: dict, style: str) -> str:
    """doc_to_text of one question (the question is not stripped: the templates say {{question}})."""
    if style == "gsm8k":
        return f"Question: {doc['question']}\nAnswer:"
    if style == "gsm8k_cot":
        return f"Q: {doc['question']}\nA:"
    return LLAMA_INSTRUCTION.format(question=doc["question"])


def _shot_target(doc: dict, style: str) -> str:
    """doc_to_target of a shot: a GSM8K example gives its answer (gsm8k) or the number (the CoT styles:
    `answer.split('####')[-1].strip() if answer is defined else target`); an exemplar its target."""
    return gsm8k_target(doc["answer"], style) if "answer" in doc else doc["target"]


def gsm8k_messages(question: str, style: str = "gsm8k_cot_llama",
                   shots: Sequence[dict] | int | None = None) -> list[dict]:
    """The chat lm-eval builds with --apply_chat_template --fewshot_as_multiturn: one user turn per shot
    (the full doc_to_text, instruction included) answered by an assistant turn (its target), then the
    question's user turn; no system turn unless lm-eval is given --system_instruction."""
    _check_style(style)
    messages = []
    for doc in _shot_docs(style, shots):
        messages += [{"role": "user", "content": _turn(doc, style)},
                     {"role": "assistant", "content": _shot_target(doc, style)}]
    return messages + [{"role": "user", "content": _turn({"question": question}, style)}]


def gsm8k_prompt(question: str, style: str = "gsm8k", shots: Sequence[dict] | int | None = None) -> str:
    """lm-eval's plain-text prompt (no chat template) for `question`.

    Each shot is doc_to_text + target_delimiter + its target + fewshot_delimiter ("\\n\\n"); the question's
    doc_to_text ends the prompt, with no delimiter after it. target_delimiter is " " (TaskConfig's
    default) except gsm8k_cot_llama's "". `shots`: gsm8k takes training examples ({"question", "answer"};
    lm-eval's 5 are a seeded random sample: `gsm8k_fewshot`), None = zero-shot; the CoT styles take the
    first k of their 8 fixed exemplars (an int, or None for all 8) or given dicts."""
    _check_style(style)
    delimiter = "" if style == "gsm8k_cot_llama" else " "
    solved = "".join(f"{_turn(d, style)}{delimiter}{_shot_target(d, style)}\n\n" for d in _shot_docs(style, shots))
    return solved + _turn({"question": question}, style)


def encode_gsm8k_prompt(tok, question: str, style: str = "gsm8k", shots: Sequence[dict] | int | None = None,
                        chat: bool = False) -> list[int]:
    """Token ids to generate from: the plain prompt after BOS, or (chat=True, Instruct models) the
    multi-turn chat of `gsm8k_messages` in the Llama 3 format, ending in an open assistant header.
    Hugging Face's Llama 3.1/3.2 chat template adds a system turn (a knowledge cut-off and a date) that
    Meta's reference format, and so `Tokenizer.encode_dialog_prompt`, does not."""
    if chat:
        return tok.encode_dialog_prompt(gsm8k_messages(question, style, shots), add_generation_prompt=True)
    return tok.encode(gsm8k_prompt(question, style, shots), bos=True)


def gsm8k_fewshot(train: Sequence[dict], n_docs: int, k: int = 5, seed: int = LM_EVAL_FEWSHOT_SEED) -> list[list[dict]]:
    """The k shots lm-eval's gsm8k task puts before each of the first `n_docs` test questions.

    gsm8k.yaml has no fewshot_config, so the "default" ContextSampler draws them: ONE random.Random(seed)
    per task (seeded by simple_evaluate's fewshot_random_seed, 1234 unless --seed says otherwise), then
    `rnd.sample(train, k)` for each test document in turn (lm_eval/api/samplers.py; the fewshot split,
    train, is not the test split, so no document is removed). Question i therefore gets the (i+1)-th
    draw: reproducible with the same training list in the same order (lm-eval reads the openai/gsm8k
    train split from the Hugging Face hub) and the questions in test-file order from the first (--limit
    N takes the first N; data-parallel ranks draw per rank)."""
    rnd = random.Random(seed)
    return [rnd.sample(list(train), k) for _ in range(n_docs)]
