"""The embedded default: a small pretrained Llama shipped in data/toy_base/, and a GSM8K-format toy task.

`make finetune` on a laptop with no checkpoint and no download runs the real pipeline on these:

1. The toy base (`data/toy_base/`, loaded as is: every machine fine-tunes the same bytes). A Llama
   with the architecture of Llama 3 (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied head),
   6 layers of width 128 (`TOY_BASE`, 1,246,848 parameters), byte-level vocabulary
   (`Tokenizer.byte_level()`), pretrained from scratch on CPU (`PretrainRecipe`) on documents
   `<BOS> text <EOS>` of five kinds, so that, like Llama-3.2-1B, it has seen every byte, word and
   piece of format the task uses, but never the task itself in that format:
     * arithmetic (`synthetic_arithmetic_text`): facts `12+7=19`, calculator annotations
       `<<3*4=12>>12`, reasoning sentences of train-split problems;
     * copies (`copy_text`): named amounts said twice, `Ivy 14, Dan 9; Ivy 14, Dan 9`, which teach
       the model to copy a number it has read (induction heads);
     * stories (`story_text`): train-split task problems told as prose, question then reasoning on
       one line, with no `Question:`/`Answer:` and no `#### N`;
     * Q&A (`qa_text`): the exact task layout `Question: ...\\nAnswer: <reasoning lines>\\n#### N<EOS>`
       on OTHER content: arithmetic questions ("What is 3*4+5?"), look-up questions ("Ivy has 14
       pens and Dan has 9 pens. How many pens does Dan have?"), sums of two named amounts, and a
       word-problem family with different templates (pages read, ages, miles walked).
   No pretraining document contains a test question (tests/test_toy.py checks it): task problems appear
   only as train-split prose, and the Q&A families use templates that the task never produces.
2. The task: `synthetic_gsm8k` word problems (1-2 calculator steps), split train/test by a hash of
   the question text, written as train.jsonl/test.jsonl in the GSM8K format (cached in data/cache/).

So the base knows the words, the arithmetic, the prose problems and the Q&A layout separately, and
fine-tuning has to put them together. Its probes (data/toy_base/toy_base.json; greedy): arithmetic
facts 20.5%, test problems told as prose 45%, fresh other-content Q&A 25%. Given a task problem in
the Q&A prompt it writes the right layout (197 of 200 end in `#### N`) but answers with the look-up
habit of its Q&A documents ("Dan has 16 stickers.\n#### 16"): 1.5% right, 0.444 bits/token.

Pretraining (`PretrainRecipe`: 1,000 steps of 16 x 256 tokens, 4.1M tokens) took 1,646 s on this
project's 2-core CPU sandbox with one torch thread while other jobs shared the cores. A rebuild on
another machine is not bit-identical (CPU kernels differ); `--rebuild` prints how far it lands from
the shipped weights and probes. Fine-tuning never depends on that: it always loads the shipped file,
and finetune seeds the adapter initialisation and the data order itself.

    .venv/bin/python -m minipeft.toy                         # check the shipped base (sha256), write the task
    .venv/bin/python -m minipeft.toy --rebuild [--out DIR]   # pretrain it again and compare with the shipped one
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .base import SHIPPED, WEIGHTS, toy_base
from .data import (NAMES, OBJECTS, _calc, _fact, answers_match, cache_dir, extract_gold, extract_prediction,
                   load_split, story_text, synthetic_arithmetic_text, synthetic_gsm8k)
from .llama import Llama, LlamaConfig
from .scoring import evaluate, predict
from .tasks import toy_task
from .tokenizer import Tokenizer

# The toy base: width 128 keeps fine-tuning under 3 minutes on 2 CPU cores; 6 layers, not 4, for
# the two-step problems.
TOY_BASE = dict(vocab_size=512, dim=128, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=384,
                max_seq_len=1024, rope_theta=10000.0, rope_scaling=None, tie_embeddings=True)
INFO_FILE = "toy_base.json"


@dataclass
class PretrainRecipe:
    n_lines: int = 120_000    # synthetic_arithmetic_text lines (~18 bytes), 8 per document
    n_copy: int = 30_000      # copy_text lines (~70 bytes), 3 per document
    n_stories: int = 40_000   # story_text lines (~150 bytes), 2 per document
    n_qa: int = 60_000        # qa_text documents (~110 bytes), one Q&A each
    seq_len: int = 256        # tokens per training window (each starts at a document's BOS)
    batch_size: int = 16
    steps: int = 1000         # 1000 x 16 x 256 = 4.1M tokens (about a fifth of the corpus)
    lr: float = 3e-3          # peak; linear warmup then cosine to 10%
    warmup: int = 40
    weight_decay: float = 0.1
    seed: int = 0


TINY_RECIPE = PretrainRecipe(n_lines=400, n_copy=100, n_stories=100, n_qa=200, seq_len=64, batch_size=4,
                             steps=3, warmup=1)  # seconds: for tests of the build path


# What `python -m minipeft.finetune` uses without --checkpoint, for options not given (TrainConfig's
# own defaults are for Llama 3.2 1B on GSM8K). The learning rate comes from minipeft/recipes.py.
TOY_TRAINING = dict(epochs=3, batch_size=16, max_len=256, max_new_tokens=160, eval_every=50)


# ----------------------------------------------------------------------------- the corpus

def copy_text(n: int, seed: int = 0) -> str:
    """`n` lines of named amounts said twice, e.g. "Ivy 14, Dan 9, Raj 31; Ivy 14, Dan 9, Raj 31".
    The second half is predictable only by looking back for the same name and copying what followed
    it: the "induction head" pattern (Olsson et al. 2022, arXiv:2209.11895) that reading numbers out
    of a question needs. Arithmetic text alone only ever copies a few bytes back."""
    r, lines = random.Random(seed), []
    for _ in range(n):
        pairs = ", ".join(f"{name} {r.randint(0, 99)}" for name in r.sample(NAMES, r.randint(3, 6)))
        lines.append(f"{pairs}; {pairs}")
    return "\n".join(lines) + "\n"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _qa(r: random.Random) -> tuple[str, list[str], int]:
    """One question of a family the task never asks: (question, reasoning lines, answer)."""
    n, m = r.sample(NAMES, 2)
    o = r.choice(OBJECTS)
    kind = r.randrange(8)
    if kind <= 1:  # arithmetic, one or two calculator steps
        a, b, op, c = _fact(r)
        if kind == 0:
            return f"What is {a}{op}{b}?", [_calc(a, op, b)[1]], c
        op2 = r.choice("+-")
        d = r.randint(1, 20) if op2 == "+" else r.randint(0, c)
        e, s2 = _calc(c, op2, d)
        return f"What is {a}{op}{b}{op2}{d}?", [_calc(a, op, b)[1], s2], e
    if kind <= 3:  # look-up: copy one amount out of the question
        names = r.sample(NAMES, r.randint(2, 4))
        amounts = [r.randint(2, 40) for _ in names]
        i = r.randrange(len(names))
        listing = _and([f"{x} has {k} {o}" for x, k in zip(names, amounts)])
        return f"{listing}. How many {o} does {names[i]} have?", [f"{names[i]} has {amounts[i]} {o}."], amounts[i]
    if kind == 4:  # two amounts from the question, added
        x, y = r.randint(2, 40), r.randint(2, 40)
        c, s = _calc(x, "+", y)
        return (f"{n} has {x} {o} and {m} has {y} {o}. How many {o} do they have together?",
                [f"They have {s} {o} together."], c)
    a, b = r.randint(2, 9), r.randint(2, 9)
    if kind == 5:
        c, s = _calc(a, "*", b)
        return f"{n} reads {a} pages a day for {b} days. How many pages does {n} read?", [f"{n} reads {s} pages."], c
    x, y = r.randint(5, 40), r.randint(2, 20)
    if kind == 6:
        c, s = _calc(x, "+", y)
        return (f"{n} is {x} years old. {m} is {y} years older than {n}. How old is {m}?",
                [f"{m} is {s} years old."], c)
    c, s1 = _calc(x, "+", y)
    e, s2 = _calc(c, "-", a)
    return (f"{n} walks {x} miles on Monday and {y} miles on Tuesday, then rests for {a} of them. "
            f"How many miles does {n} walk on the other days?",
            [f"{n} walks {s1} miles.", f"{n} walks {s2} miles on the other days."], e)


def qa_text(n: int, seed: int = 0) -> list[str]:
    """`n` documents in the task's exact layout (data.PLAIN_PROMPT, then " " + answer as
    data.encode_completion writes it), on content the task never asks about."""
    r = random.Random(seed)
    docs = []
    for _ in range(n):
        question, lines, result = _qa(r)
        docs.append(f"Question: {question}\nAnswer: " + "\n".join(lines) + f"\n#### {result}")
    return docs


def _group(text: str, k: int) -> list[str]:
    lines = text.splitlines()
    return ["\n".join(lines[i:i + k]) for i in range(0, len(lines), k)]


def pretraining_documents(recipe: PretrainRecipe, seed_offset: int = 0) -> list[str]:
    """Every document of the corpus, shuffled (each becomes <BOS> text <EOS>)."""
    s = recipe.seed + seed_offset
    docs = (_group(synthetic_arithmetic_text(recipe.n_lines, s), 8) + _group(copy_text(recipe.n_copy, s), 3) +
            _group(story_text(recipe.n_stories, s), 2) + qa_text(recipe.n_qa, s))
    random.Random(s).shuffle(docs)
    return docs


def token_stream(docs: list[str], tok: Tokenizer) -> tuple[torch.Tensor, list[int]]:
    """The documents as one token stream and the offsets of their BOS tokens."""
    ids, starts = [], []
    for doc in docs:
        starts.append(len(ids))
        ids += tok.encode(doc, bos=True, eos=True)
    return torch.tensor(ids), starts


# ----------------------------------------------------------------------------- pretraining

def pretrain(recipe: PretrainRecipe = PretrainRecipe(), log_every: int = 100,
             progress: bool = True) -> tuple[Llama, list[float]]:
    """Train TOY_BASE from scratch on the corpus; returns the model and the loss per step (nats)."""
    torch.manual_seed(recipe.seed)
    tok, model = Tokenizer.byte_level(), Llama(LlamaConfig(**TOY_BASE))
    stream, starts = token_stream(pretraining_documents(recipe), tok)
    starts = [s for s in starts if s + recipe.seq_len + 1 <= len(stream)]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                            betas=(0.9, 0.95))
    rng, losses, t0 = random.Random(recipe.seed), [], time.time()
    model.train()
    for step in range(recipe.steps):
        for g in opt.param_groups:
            g["lr"] = recipe.lr * _warmup_cosine(step, recipe.warmup, recipe.steps, floor=0.1)
        offsets = [rng.choice(starts) for _ in range(recipe.batch_size)]
        rows = torch.stack([stream[o:o + recipe.seq_len + 1] for o in offsets])  # (B, T+1), BOS first
        _, loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress and (step % log_every == 0 or step == recipe.steps - 1):
            elapsed = time.time() - t0
            eta = elapsed / (step + 1) * (recipe.steps - step - 1)
            print(f"  pretrain step {step:5d}/{recipe.steps}  loss {losses[-1] / math.log(2):.3f} bits/token"
                  f"  ({elapsed:.0f}s, eta {eta:.0f}s)", flush=True)
    return model.eval(), losses


def _warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- probes

@torch.no_grad()
def loss_probe(model: Llama, tok: Tokenizer, n: int = 8) -> dict[str, float]:
    """Bits/token of `n` fresh documents of each kind (a seed pretraining never used): a seconds-long
    fingerprint of the weights, stable to ~1e-5 across CPU kernels."""
    kinds = dict(arithmetic=_group(synthetic_arithmetic_text(8 * n, 1000), 8),
                 copies=_group(copy_text(3 * n, 1000), 3), stories=_group(story_text(2 * n, 1000), 2),
                 qa=qa_text(n, 1000))
    out = {}
    for kind, docs in kinds.items():
        rows = [tok.encode(doc, bos=True, eos=True) for doc in docs]
        T = max(map(len, rows)) - 1
        idx = torch.tensor([r[:-1] + [tok.pad_id] * (T + 1 - len(r)) for r in rows])      # (n, T)
        targets = torch.tensor([r[1:] + [-100] * (T + 1 - len(r)) for r in rows])         # (n, T)
        _, loss = model(idx, targets)  # mean over the real tokens; padding comes after them
        out[kind] = round(loss.item() / math.log(2), 5)
    return out


@torch.no_grad()
def arithmetic_probe(model: Llama, tok: Tokenizer, n: int = 200, seed: int = 12345) -> float:
    """Fraction of fresh facts `a op b=` the model completes correctly (greedy): does it know arithmetic?"""
    r = random.Random(seed)
    facts = []
    for _ in range(n):
        op = r.choice("+-*")
        a, b = (r.randint(2, 9), r.randint(2, 9)) if op == "*" else (r.randint(0, 50), r.randint(0, 50))
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        facts.append((f"{a}{op}{b}=", str(eval(f"{a}{op}{b}"))))
    newline = tok.encode("\n")[0]
    prompts = [tok.encode(q, bos=True) for q, _ in facts]
    outs = model.generate(prompts, max_new_tokens=4, stop_ids={newline, tok.eos_id})
    return sum(tok.decode(o).strip() == want for o, (_, want) in zip(outs, facts)) / n


@torch.no_grad()
def prose_probe(model: Llama, tok: Tokenizer, n: int = 100) -> float:
    """Fraction of test problems told as prose (question, then a space) whose greedy continuation's
    last number is the answer: what the base can do before it knows the task's format."""
    test = synthetic_gsm8k(n, seed=0, split="test")
    newline = tok.encode("\n")[0]
    outs = model.generate([tok.encode(f"{ex['question']} ", bos=True) for ex in test],
                          max_new_tokens=120, stop_ids={newline, tok.eos_id})
    return sum(answers_match(extract_prediction(tok.decode(o)), extract_gold(ex["answer"]))
               for o, ex in zip(outs, test)) / n


@torch.no_grad()
def qa_probe(model: Llama, tok: Tokenizer, n: int = 100) -> float:
    """Fraction of fresh Q&A-family questions (not the task) answered right in the task's layout."""
    docs = [d.split("\nAnswer: ", 1) for d in qa_text(n, seed=2000)]
    records = predict(model, tok, [dict(question=q.removeprefix("Question: "), answer=a) for q, a in docs],
                      max_new_tokens=80)
    return sum(r["correct"] for r in records) / n


@torch.no_grad()
def task_probe(model: Llama, tok: Tokenizer) -> dict:
    """Accuracy and bits/token on the toy task's 200 test problems in the fine-tuning format: the
    `before` of `python -m minipeft.finetune`."""
    r = evaluate(model, tok, load_split(toy_task(), "test"), max_len=256, max_new_tokens=160)
    return dict(accuracy=r["accuracy"], test_bpt=round(r["test_bpt"], 4))


def probes(model: Llama, tok: Tokenizer, full: bool = True) -> dict:
    out = dict(loss=loss_probe(model, tok))
    if full:
        out.update(facts=arithmetic_probe(model, tok), prose=prose_probe(model, tok),
                   qa_other_content=qa_probe(model, tok), task_before_finetuning=task_probe(model, tok))
    return out


# ----------------------------------------------------------------------------- the shipped base

def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_base(recipe: PretrainRecipe, out: Path, progress: bool = True, full_probes: bool = True) -> Llama:
    """Pretrain a base with `recipe` in this process and write it to `out` (weights, config,
    tokenizer, and toy_base.json with the recipe, probes and the weights' sha256)."""
    t0 = time.time()
    model, losses = pretrain(recipe, progress=progress)
    seconds = round(time.time() - t0, 1)
    out = Path(out)
    model.save_pretrained(out)
    Tokenizer.byte_level().save(out / "tokenizer.model")
    info = dict(architecture=TOY_BASE, parameters=sum(p.numel() for p in model.parameters()),
                recipe=asdict(recipe), pretrain_seconds=seconds, torch=torch.__version__,
                threads=torch.get_num_threads(), first_loss_bits=round(losses[0] / math.log(2), 4),
                final_loss_bits=round(sum(losses[-50:]) / len(losses[-50:]) / math.log(2), 4),
                probes=probes(model, Tokenizer.byte_level(), full_probes), sha256=sha256(out / WEIGHTS))
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return model


def max_weight_diff(a: Llama, b: Llama) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Check the shipped toy base and write the toy task, or rebuild the base.")
    p.add_argument("--rebuild", action="store_true", help="pretrain the base again (PretrainRecipe)")
    p.add_argument("--out", type=Path, default=None, help="where --rebuild writes (default data/cache/toy_base_rebuild)")
    p.add_argument("--steps", type=int, default=PretrainRecipe.steps, help="pretraining steps (for a quicker try)")
    args = p.parse_args(argv)
    shipped = json.loads((SHIPPED / INFO_FILE).read_text()) if (SHIPPED / INFO_FILE).exists() else None
    if not args.rebuild:
        base = toy_base()
        if shipped is None:
            raise FileNotFoundError(f"{SHIPPED / INFO_FILE} is missing (it holds the sha256 and probes of the base)")
        ok = sha256(base / WEIGHTS) == shipped["sha256"]
        print(f"base: {base} ({shipped['parameters']:,} parameters), sha256 {'OK' if ok else 'MISMATCH'}")
        print(json.dumps(shipped["probes"], indent=2))
        print(f"task: {toy_task()}")
        return
    out = args.out or cache_dir() / "toy_base_rebuild"
    print(f"pretraining the toy base into {out} ...", flush=True)
    model = build_base(PretrainRecipe(steps=args.steps), out)
    info = json.loads((out / INFO_FILE).read_text())
    print(f"done in {info['pretrain_seconds']}s; sha256 {info['sha256']}")
    if shipped is None or out.resolve() == SHIPPED.resolve():
        print(json.dumps(info["probes"], indent=2))
        return
    diff = max_weight_diff(model, Llama.from_pretrained(SHIPPED))
    print(f"max |rebuilt - shipped| weight: {diff:.3g}"
          f" ({'bit-identical' if info['sha256'] == shipped['sha256'] else 'not bit-identical'})")
    print(f"{'probe':<40} {'shipped':>10} {'rebuilt':>10}")
    new, old = _flat(info["probes"]), _flat(shipped["probes"])
    for k in old:
        print(f"{k:<40} {old[k]:>10.4g} {new.get(k, float('nan')):>10.4g}")


if __name__ == "__main__":
    main()
