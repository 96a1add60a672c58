"""The embedded default: a small Llama pretrained here, and a GSM8K-format toy task to fine-tune it on.

`make finetune` on a laptop with no checkpoint and no download runs the real pipeline on these:

1. A base model that knows arithmetic and has read word problems, but not in the GSM8K format. A
   Llama with the architecture of Llama 3 (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied
   head), 4 layers of width 128 (`TOY_BASE`, 853,120 parameters), byte-level vocabulary
   (`Tokenizer.byte_level()`), pretrained from scratch for a few minutes on three kinds of lines:
     * `synthetic_arithmetic_text`: facts (`12+7=19`), calculator annotations (`<<3*4=12>>12`) and
       reasoning sentences (`Ava has 5+2 = <<5+2=7>>7 books after getting more.`);
     * `copy_text`: named amounts said twice (`Ivy 14, Dan 9; Ivy 14, Dan 9`), which makes the
       model learn to copy a number it has read (induction heads); without them it never learns to
       take the numbers out of a question in this budget (measured: 0-5% solved, see below);
     * `story_text`: training-split problems told as prose, question then reasoning on one line.
   It never sees a test question, the `Question: ...\nAnswer:` prompt, or a `#### N` line.
2. The task: `synthetic_gsm8k` word problems (1-2 calculator steps), split train/test by a hash of
   the question text, written as train.jsonl/test.jsonl in the GSM8K format.

So the base can often work a problem out when it is told as prose, but given the GSM8K prompt it
writes garbage and never a `####` line (~1-3% accuracy, by chance). Fine-tuning has to teach the
format, where the answer goes, and to keep the question's numbers. `done.json` next to the cached
base records both probes: arithmetic facts and prose problems solved.

Both are cached under `cache_dir()` (data/cache/ in a checkout, else ~/.cache/minipeft;
`MINIPEFT_CACHE` overrides), keyed by a hash of the recipe, and built in a temp folder renamed into
place, so an interrupted run never leaves a half-written base.

    python -m minipeft.toy                  # pretrain (or find) the base, write the task, probe it
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import NAMES, OBJECTS, synthetic_arithmetic_text, synthetic_gsm8k, write_jsonl
from .llama import Llama, LlamaConfig
from .safetensors_io import current_umask
from .tokenizer import Tokenizer

# The toy base: the "toy" preset is 3.5x slower per token on 2 CPU cores for little gain here.
TOY_BASE = dict(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                max_seq_len=1024, rope_theta=10000.0, rope_scaling=None, tie_embeddings=True)


@dataclass
class PretrainRecipe:
    n_lines: int = 120_000    # lines of synthetic_arithmetic_text (~18 bytes each)
    n_copy: int = 30_000      # lines of copy_text (~70 bytes each)
    n_stories: int = 20_000   # lines of story_text (~150 bytes each)
    seq_len: int = 256        # bytes per training window (each starts at a line, after BOS)
    batch_size: int = 16
    steps: int = 800          # 800 x 16 x 256 = 3.3M tokens: 303 s measured on 2 idle cores
    lr: float = 3e-3          # peak; linear warmup then cosine to 10%
    warmup: int = 30
    weight_decay: float = 0.1
    seed: int = 0


@dataclass
class ToyTask:
    n_train: int = 2000       # synthetic GSM8K-format problems
    n_test: int = 200
    seed: int = 0


# What `python -m minipeft.finetune` uses without --checkpoint, for options not given (TrainConfig's
# own defaults are for Llama 3.2 1B on GSM8K).
TOY_TRAINING = dict(epochs=3, lr=3e-3, batch_size=16, max_len=256, max_new_tokens=160, eval_every=50)


def cache_dir() -> Path:
    """$MINIPEFT_CACHE, else data/cache/ of this checkout, else ~/.cache/minipeft."""
    if os.environ.get("MINIPEFT_CACHE"):
        return Path(os.environ["MINIPEFT_CACHE"])
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").exists() and (root / "data").is_dir():
        return root / "data" / "cache"
    return Path.home() / ".cache" / "minipeft"


def _key(*parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def _publish(build, final: Path) -> Path:
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


# ----------------------------------------------------------------------------- the base model

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


def story_text(n: int, seed: int = 0) -> str:
    """`n` training-split word problems told as plain prose, the question then its worked reasoning on
    one line: no "Question:"/"Answer:" prompt, no "#### N" line, never a test question."""
    lines = []
    for ex in synthetic_gsm8k(n, seed + 1, "train"):
        reasoning = ex["answer"].rsplit("\n####", 1)[0].replace("\n", " ")
        lines.append(f"{ex['question']} {reasoning}")
    return "\n".join(lines) + "\n"


def pretraining_text(recipe: PretrainRecipe) -> str:
    """synthetic_arithmetic_text, copy_text and story_text lines, shuffled together."""
    lines = (synthetic_arithmetic_text(recipe.n_lines, recipe.seed).splitlines() +
             copy_text(recipe.n_copy, recipe.seed).splitlines() +
             story_text(recipe.n_stories, recipe.seed).splitlines())
    random.Random(recipe.seed).shuffle(lines)
    return "\n".join(lines) + "\n"


def pretraining_windows(text: str, tok: Tokenizer, seq_len: int) -> tuple[torch.Tensor, list[int]]:
    """The corpus as one token stream (BOS first) and the offsets at which lines start."""
    ids = [tok.bos_id] + tok.encode(text)
    newline = tok.encode("\n")[0]
    starts = [i + 1 for i, t in enumerate(ids[:-seq_len - 1]) if t == newline]
    return torch.tensor(ids), starts


def pretrain(recipe: PretrainRecipe = PretrainRecipe(), log_every: int = 50,
             progress: bool = True) -> tuple[Llama, list[float]]:
    """Train TOY_BASE from scratch on arithmetic text; returns the model and the loss per step (nats)."""
    torch.manual_seed(recipe.seed)
    tok, model = Tokenizer.byte_level(), Llama(LlamaConfig(**TOY_BASE))
    stream, starts = pretraining_windows(pretraining_text(recipe), tok, recipe.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                            betas=(0.9, 0.95))
    rng, losses, t0 = random.Random(recipe.seed), [], time.time()
    model.train()
    for step in range(recipe.steps):
        for g in opt.param_groups:
            g["lr"] = recipe.lr * _warmup_cosine(step, recipe.warmup, recipe.steps, floor=0.1)
        offsets = [rng.choice(starts) for _ in range(recipe.batch_size)]
        rows = torch.stack([stream[o:o + recipe.seq_len + 1] for o in offsets])  # (B, T+1)
        rows[:, 0] = tok.bos_id  # every window reads BOS, then whole lines
        _, loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress and (step % log_every == 0 or step == recipe.steps - 1):
            print(f"  pretrain step {step:4d}/{recipe.steps}  loss {losses[-1] / math.log(2):.3f} bits/byte"
                  f"  ({time.time() - t0:.0f}s)", flush=True)
    return model.eval(), losses


def _warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def toy_base(recipe: PretrainRecipe = PretrainRecipe(), root: Path | None = None,
             progress: bool = True) -> Path:
    """Path of the pretrained toy base (HF layout + byte-level tokenizer.model); trains it once."""
    final = (root or cache_dir()) / f"toy-base-{_key(TOY_BASE, asdict(recipe))}"
    if (final / "done.json").exists():
        return final

    def build(tmp: Path) -> None:
        if progress:
            print(f"pretraining the toy base model (cached afterwards in {final}) ...", flush=True)
        t0 = time.time()
        model, losses = pretrain(recipe, progress=progress)
        seconds = round(time.time() - t0, 1)
        model.save_pretrained(tmp)
        Tokenizer.byte_level().save(tmp / "tokenizer.model")
        probe = arithmetic_probe(model, Tokenizer.byte_level())
        prose = prose_probe(model, Tokenizer.byte_level())
        done = dict(recipe=asdict(recipe), pretrain_seconds=seconds, arithmetic_accuracy=probe,
                    prose_accuracy=prose,
                    first_loss_bits=losses[0] / math.log(2),
                    final_loss_bits=sum(losses[-10:]) / len(losses[-10:]) / math.log(2))
        (tmp / "done.json").write_text(json.dumps(done, indent=2))  # last: marks the folder complete
        if progress:
            print(f"  done in {seconds}s; facts right {probe:.0%}, prose problems solved {prose:.0%}",
                  flush=True)

    return _publish(build, final)


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
    prompts = [[tok.bos_id] + tok.encode(f"\n{q}") for q, _ in facts]
    outs = model.generate(prompts, max_new_tokens=4, stop_ids={newline})
    return sum(tok.decode(o).strip() == want for o, (_, want) in zip(outs, facts)) / n


@torch.no_grad()
def prose_probe(model: Llama, tok: Tokenizer, n: int = 100) -> float:
    """Fraction of test problems told as prose (question, then a space) whose greedy continuation's
    last number is the answer: what the base can do before it knows the GSM8K format."""
    from .data import answers_match, extract_gold, extract_prediction
    test = synthetic_gsm8k(n, seed=0, split="test")
    newline = tok.encode("\n")[0]
    outs = model.generate([[tok.bos_id] + tok.encode(f"\n{ex['question']} ") for ex in test],
                          max_new_tokens=120, stop_ids={newline})
    return sum(answers_match(extract_prediction(tok.decode(o)), extract_gold(ex["answer"]))
               for o, ex in zip(outs, test)) / n


# ----------------------------------------------------------------------------- the task

def toy_task(task: ToyTask = ToyTask(), root: Path | None = None) -> Path:
    """A folder with train.jsonl / test.jsonl of synthetic GSM8K-format problems (written once)."""
    final = (root or cache_dir()) / f"toy-gsm8k-{task.n_train}-{task.n_test}-{task.seed}"
    if (final / "done.json").exists():
        return final

    def build(tmp: Path) -> None:
        write_jsonl(synthetic_gsm8k(task.n_train, task.seed, "train"), tmp / "train.jsonl")
        write_jsonl(synthetic_gsm8k(task.n_test, task.seed, "test"), tmp / "test.jsonl")
        (tmp / "done.json").write_text(json.dumps(asdict(task)))

    return _publish(build, final)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Pretrain (or find in the cache) the toy base and write the toy task.")
    p.add_argument("--steps", type=int, default=PretrainRecipe.steps)
    p.add_argument("--cache", type=Path, default=None, help=f"cache folder (default {cache_dir()})")
    args = p.parse_args(argv)
    base = toy_base(PretrainRecipe(steps=args.steps), args.cache)
    print(f"base: {base}\n{(base / 'done.json').read_text()}")
    print(f"task: {toy_task(root=args.cache)}")


if __name__ == "__main__":
    main()
