"""Evaluate a base model, or a base model with an adapter, on GSM8K-format data or another task.

Two numbers, the same ones `minipeft.finetune` reports before and after training:

* cross-entropy on the answer tokens of the test set, in bits per token (nats / ln 2), with the prompt
  masked exactly as in training (minipeft.data.encode_example);
* accuracy: batched greedy decoding with the KV cache (Llama.generate), stopped at EOS/<|eot_id|>
  and cut after the `#### N` line; the number after `####` (else the last number) must equal the gold
  answer (minipeft.data.extract_prediction / answers_match). Every prediction is written down.

    .venv/bin/python -m minipeft.evaluate                              # the toy base on the toy task
    .venv/bin/python -m minipeft.evaluate --adapter runs/toy/lora      # the run's base + its adapter
    .venv/bin/python -m minipeft.evaluate --checkpoint ~/models/Llama-3.2-1B --data data/gsm8k [--adapter RUN]

Other tasks (minipeft/tasks.py), with `--task`:

* mmlu, arc_challenge: the log-likelihood of each answer letter after the prompt (`continuation_logprobs`),
  the highest is the prediction (accuracy, overall and per MMLU category); bits/token of the gold letter;
  for ARC also acc_norm (choice texts, log-likelihood / characters) and acc_text (the raw choice-text
  log-likelihood); `--shots K` for k-shot prompts.
* dolly: bits per response token and perplexity (2 ** bits).
* text: sliding-window perplexity (`sliding_window_nll`, window --max-len, --stride), and bits/token.

    .venv/bin/python -m minipeft.evaluate --task mmlu --checkpoint ~/models/Llama-3.2-1B --data data/mmlu --shots 5
    .venv/bin/python -m minipeft.evaluate --task text --data wiki.test.raw --max-len 1024 --stride 512
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .adapters import CONFIG_FILE, load_adapter
from .data import (Example, answers_match, attention_segments, collate, encode_prompt, extract_gold,
                   extract_prediction, load_split)  # load_split: toy.task_probe imports it from here
from .llama import IGNORE_INDEX, Llama, LlamaConfig
from .safetensors_io import atomic_write
from .tasks import (TASKS, arc_text_prompt, check_train_split, encode_answer, encode_text_prompt, get_task, mc_prompt,
                    subject_category, toy_folder)
from .tokenizer import Tokenizer, read_utf8

LN2 = math.log(2)


# ----------------------------------------------------------------------------- models and data

def pick_device(name: str = "auto") -> torch.device:
    """"auto" (CUDA if there is one, else the CPU) or a device name this machine has; else a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r}: not a device name (auto, cpu, cuda, cuda:1, mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ValueError(f"--device {name!r}: {device.type} is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_base(checkpoint: str | None = None, preset: str | None = None,
              device: torch.device = torch.device("cpu"), progress: bool = True) -> tuple[Llama, Tokenizer, str]:
    """(model, tokenizer, description). A checkpoint folder (HF or Meta layout, tokenizer in the same
    folder), or a preset with random weights and the byte-level tokenizer, or (neither) the toy base.
    Weights are bf16 on CUDA and fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if checkpoint and preset:
        raise ValueError("give --checkpoint or --preset, not both")
    if preset:
        with torch.device(device):
            model = Llama(LlamaConfig.from_name(preset)).to(dtype)
        return model.eval(), Tokenizer.byte_level(), f"preset {preset} (random weights)"
    if not checkpoint:
        from .toy import toy_base
        checkpoint = str(toy_base(progress=progress))
    path = Path(checkpoint).expanduser()
    model = Llama.from_pretrained(path, dtype=dtype, device=device)
    tok = Tokenizer.from_file(path)
    tok.check_model_vocab(model.config.vocab_size, str(path))  # ids past the embedding fail only later
    return model, tok, str(path)


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


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def bits_per_token(model: Llama, encoded: Sequence[Example], batch_size: int = 32,
                   pad_id: int = 0) -> float:
    """Mean cross-entropy over every answer token of `encoded`, in bits (batches sorted by length);
    NaN when there is no answer token at all (every answer cut off by max_len)."""
    was_training, device = model.training, model.embed_tokens.weight.device
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate([encoded[i] for i in order[start:start + batch_size]], pad_id)
        seg = attention_segments(batch[1], batch[2])  # None: right-padded rows need no mask
        idx, targets, seg = (None if t is None else t.to(device) for t in (batch[0], batch[1], seg))
        n = int((targets != -100).sum())
        if n == 0:  # every answer cut off by max_len
            continue
        with autocast(device):
            _, loss = model(idx, targets, segment_ids=seg, return_logits=False)
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / count / LN2 if count else float("nan")  # no answer token: undefined, not 0


def cut_after_answer(text: str) -> str:
    """Keep a generation up to the end of its `#### N` line (the model may go on rambling)."""
    head, sep, tail = text.partition("####")
    return head + sep + tail.split("\n", 1)[0] if sep else text


@torch.no_grad()
def predict(model: Llama, tok: Tokenizer, examples: Sequence[dict], fmt: str = "plain",
            batch_size: int = 32, max_new_tokens: int = 256, progress: bool = False) -> list[dict]:
    """Greedy answers for `examples`, one record each: question, gold, generated, prediction, correct."""
    was_training, device = model.training, model.embed_tokens.weight.device
    model.eval()
    prompts = [encode_prompt(tok, ex["question"], fmt) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less left padding
    texts: dict[int, str] = {}
    bar = Progress(len(prompts), "generate", progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        with autocast(device):
            outs = model.generate([prompts[i] for i in chunk], max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids)
        texts.update((i, cut_after_answer(tok.decode(o))) for i, o in zip(chunk, outs))
        bar.update(len(chunk), sum(map(len, outs)))
    bar.close()
    model.train(was_training)
    records = []
    for i, ex in enumerate(examples):
        gold, pred = extract_gold(ex["answer"]), extract_prediction(texts[i])
        records.append(dict(question=ex["question"], gold=gold, generated=texts[i], prediction=pred,
                            correct=answers_match(pred, gold)))
    return records


def accuracy(records: Sequence[dict]) -> float:
    return sum(r["correct"] for r in records) / max(len(records), 1)


def write_predictions(records: Sequence[dict], path: str | Path) -> None:
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def evaluate(model: Llama, tok: Tokenizer, test: Sequence[dict], fmt: str = "plain", max_len: int = 512,
             batch_size: int = 32, max_new_tokens: int = 256, predictions: str | Path | None = None,
             task: str = "gsm8k", shots: int = 0, shot_pool: Sequence[dict] = (), stride: int = 0,
             progress: bool = False) -> dict:
    """{"test_bpt", "accuracy", "n", "seconds", ...} of `task` on `test`; the per-example records go to
    `predictions` if given. accuracy is NaN for the tasks without one (dolly, text)."""
    t0, kind = time.time(), get_task(task).kind
    if kind == "generate":
        bpt = bits_per_token(model, encode_all(tok, test, fmt, max_len, task), batch_size, tok.pad_id)
        records = predict(model, tok, test, fmt, batch_size, max_new_tokens, progress)
        result = dict(test_bpt=bpt, accuracy=accuracy(records))
    elif kind == "choice":
        result, records = evaluate_choices(model, tok, test, fmt, max_len, batch_size, shots, shot_pool,
                                           get_task(task).choice_text, progress)
    elif kind == "response":
        bpt, records = bits_per_token(model, encode_all(tok, test, fmt, max_len, task), batch_size, tok.pad_id), []
        result = dict(test_bpt=bpt, perplexity=2 ** bpt, accuracy=float("nan"))
    else:  # "text"
        stride = stride or max(1, max_len // 2)
        nll, count = 0.0, 0
        for ex in test:
            n, c = sliding_window_nll(model, tok.encode(ex["text"], bos=True), max_len, stride, batch_size, progress)
            nll, count = nll + n, count + c
        records = []
        result = dict(test_bpt=nll / count / LN2, perplexity=math.exp(nll / count), accuracy=float("nan"),
                      tokens=count, window=max_len, stride=stride)
    if predictions is not None:
        write_predictions(records, predictions)
    return dict(result, n=len(test), seconds=time.time() - t0)


# ----------------------------------------------------------------------------- log-likelihood scoring

@torch.no_grad()
def continuation_logprobs(model: Llama, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 32,
                          pad_id: int = 0, progress: bool = False) -> list[float]:
    """log p(continuation | context) in nats, summed over the continuation's tokens, for each request
    (context ids, continuation ids). Requests with the same context + continuation[:-1] share one
    forward row, since only their last token differs: the four answer letters of a question cost one
    forward, not four (with a byte-level tokenizer " A" is two tokens, " " then "A": still one row).
    The positions that predict the continuation are marked as answer positions (`answer_mask`), as
    training's answer-only targets mark them, so methods that act on the answer only (infix tuning) score
    the continuation as they trained on it."""
    if any(not ctx or not cont for ctx, cont in requests):
        raise ValueError("continuation_logprobs: every request needs a non-empty context and continuation")
    was_training, device = model.training, model.embed_tokens.weight.device
    model.eval()
    rows: dict[tuple, list[int]] = {}  # row tokens -> the requests it scores
    for r, (ctx, cont) in enumerate(requests):
        rows.setdefault(tuple(ctx + cont[:-1]), []).append(r)
    answer_from = {key: min(len(requests[r][0]) for r in rs) - 1 for key, rs in rows.items()}  # first predicting one
    keys = sorted(rows, key=len)
    out = [0.0] * len(requests)
    bar = Progress(len(keys), "score", progress)
    for start in range(0, len(keys), batch_size):
        batch = keys[start:start + batch_size]
        idx = torch.full((len(batch), len(batch[-1])), pad_id, dtype=torch.long)  # (B, T), right-padded
        answer = torch.zeros_like(idx, dtype=torch.bool)  # (B, T): the positions that predict a continuation token
        for b, key in enumerate(batch):
            idx[b, :len(key)] = torch.tensor(key)
            answer[b, answer_from[key]:len(key)] = True
        with autocast(device):
            logits = model(idx.to(device), answer_mask=answer.to(device))  # (B, T, vocab); causal: pads change nothing
        for b, key in enumerate(batch):
            for r in rows[key]:
                ctx, cont = requests[r]
                span = logits[b, len(ctx) - 1:len(ctx) - 1 + len(cont)].float().log_softmax(-1)  # (len(cont), V)
                out[r] = span.gather(1, torch.tensor(cont, device=device)[:, None]).sum().item()
        bar.update(len(batch), sum(map(len, batch)))
    bar.close()
    model.train(was_training)
    return out


def evaluate_choices(model: Llama, tok: Tokenizer, test: Sequence[dict], fmt: str = "plain", max_len: int = 512,
                     batch_size: int = 32, shots: int = 0, shot_pool: Sequence[dict] = (),
                     choice_text: bool = False, progress: bool = False) -> tuple[dict, list[dict]]:
    """Multiple choice by answer-letter log-likelihood: accuracy (overall and per category when the
    questions have subjects), bits/token of the gold letter; with `choice_text` also acc_norm and acc_text."""
    requests, spans, kept = [], [], []
    for ex in test:
        solved, ctx = _shots_that_fit(tok, ex, fmt, shots, shot_pool, max_len)
        letters = [(ctx, encode_answer(tok, label, fmt, end=False)) for label in ex["labels"]]
        texts = []
        if choice_text:  # lm-eval-harness's arc_challenge: " {choice}" after "Question: ...\nAnswer:", same shots
            text_ctx = encode_text_prompt(tok, arc_text_prompt(ex, solved), fmt)
            texts = [(text_ctx, encode_answer(tok, c, fmt, end=False)) for c in ex["choices"]]
        spans.append((len(requests), len(letters), len(texts)))
        requests += letters + texts
        kept.append(len(solved))
    scores = continuation_logprobs(model, requests, batch_size, tok.pad_id, progress)
    records, nll, n_tokens = [], 0.0, 0
    for ex, (start, k, m), n_shots in zip(test, spans, kept):
        letter = scores[start:start + k]
        pred = max(range(k), key=letter.__getitem__)  # ties: the first, as numpy.argmax
        nll, n_tokens = nll - letter[ex["answer"]], n_tokens + len(requests[start + ex["answer"]][1])
        rec = dict(where=ex.get("where"), subject=ex.get("subject"), gold=ex["labels"][ex["answer"]],
                   prediction=ex["labels"][pred], correct=pred == ex["answer"], letter_logprobs=letter, shots=n_shots)
        if m:
            text = scores[start + k:start + k + m]
            norm = [s / len(c) for s, c in zip(text, ex["choices"])]  # per character of the choice text
            rec.update(correct_norm=max(range(m), key=norm.__getitem__) == ex["answer"],
                       correct_text=max(range(m), key=text.__getitem__) == ex["answer"])
        records.append(rec)
    result = dict(test_bpt=nll / max(n_tokens, 1) / LN2, accuracy=accuracy(records))
    if shots:  # how many solved examples the prompts really held: fewer when the pool or max_len ran out
        result.update(shots=shots, shots_mean=sum(kept) / max(len(kept), 1),
                      questions_with_fewer_shots=sum(k < shots for k in kept))
    if choice_text:
        result.update(acc_norm=sum(r["correct_norm"] for r in records) / max(len(records), 1),
                      acc_text=sum(r["correct_text"] for r in records) / max(len(records), 1))
    if any(ex.get("subject") for ex in test):
        by_category: dict[str, list[bool]] = {}
        for r in records:
            by_category.setdefault(subject_category(r["subject"]), []).append(r["correct"])
        result["categories"] = {c: sum(v) / len(v) for c, v in sorted(by_category.items())}
    return result, records


def _shots_that_fit(tok: Tokenizer, ex: dict, fmt: str, shots: int, pool: Sequence[dict],
                    max_len: int) -> tuple[list[dict], list[int]]:
    """(solved examples, letter prompt ids): the first `shots` of `pool` with ex's subject (never the question
    itself), in file order as lm-eval-harness's first_n sampler takes MMLU's dev questions; the last dropped
    while the letter prompt has max_len tokens or more (the MMLU paper's evaluate.py drops them past its
    2048-token context). The choice-text prompt (acc_norm) takes the same shots; it is the shorter of the two,
    one choice text per shot against four options."""
    same = [p for p in pool if p.get("subject") == ex.get("subject") and p["question"] != ex["question"]]
    k = min(shots, len(same))
    while True:
        ids = encode_text_prompt(tok, mc_prompt(ex, same[:k]), fmt)
        if k == 0 or len(ids) < max_len:
            return same[:k], ids
        k -= 1


@torch.no_grad()
def sliding_window_nll(model: Llama, ids: Sequence[int], window: int, stride: int, batch_size: int = 8,
                       progress: bool = False) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens scored) of ids[1:] given the earlier tokens, by the
    standard sliding window (Hugging Face's perplexity guide): windows of `window` tokens start every
    `stride` tokens; each scores only the tokens the previous window did not reach (its last `stride`),
    with the window's earlier tokens as context. Every token after the first is scored exactly once;
    when the text fits one window this is the full-context log-likelihood."""
    if not 1 <= stride <= window - 1:
        raise ValueError(f"--stride {stride}: must be in [1, window - 1 = {window - 1}] (every token scored once)")
    if window > model.config.max_seq_len:
        raise ValueError(f"window {window} is longer than the model's max_seq_len {model.config.max_seq_len}")
    n, windows, prev_end = len(ids), [], 1
    for begin in range(0, n - 1, stride):
        end = min(begin + window, n)
        windows.append((begin, end, prev_end))  # inputs ids[begin:end-1]; scored targets ids[prev_end:end]
        prev_end = end
        if end == n:
            break
    was_training, device = model.training, model.embed_tokens.weight.device
    model.eval()
    total, count = 0.0, 0
    bar = Progress(len(windows), "perplexity", progress)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        T = max(end - begin - 1 for begin, end, _ in chunk)
        idx = torch.zeros((len(chunk), T), dtype=torch.long)                 # (B, T)
        targets = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        # every token of a text is a training target (encode_text), so every position is an answer position
        # (infix tuning), the window's context included, not only the scored tokens
        answer = torch.zeros((len(chunk), T), dtype=torch.bool)                # (B, T)
        for b, (begin, end, first) in enumerate(chunk):
            idx[b, :end - begin - 1] = torch.tensor(ids[begin:end - 1])
            targets[b, first - begin - 1:end - begin - 1] = torch.tensor(ids[first:end])
            answer[b, :end - begin - 1] = True
        k = int((targets != IGNORE_INDEX).sum())
        with autocast(device):
            _, loss = model(idx.to(device), targets.to(device), return_logits=False, answer_mask=answer.to(device))
        total, count = total + loss.item() * k, count + k
        bar.update(len(chunk), sum(end - begin - 1 for begin, end, _ in chunk))
    bar.close()
    model.train(was_training)
    return total, count


class Progress:
    """Examples done and tokens/s: a tqdm bar, or (without tqdm) a plain line every 10 s; silent when off."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done, self.tokens, self.t0, self.last = 0, 0, time.time(), time.time()
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def update(self, n: int, tokens: int) -> None:
        self.done, self.tokens = self.done + n, self.tokens + tokens
        rate = self.tokens / max(time.time() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(tok_s=f"{rate:,.0f}")
        elif self.enabled and (time.time() - self.last >= 10 or self.done == self.total):
            self.last = time.time()
            print(f"{self.desc}: {self.done}/{self.total} done, {rate:,.0f} tokens/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- command line

def adapter_dir(path: str | Path) -> Path:
    """A run folder (holding adapter/) or an adapter folder itself."""
    path = Path(path)
    if (path / "adapter" / CONFIG_FILE).exists():
        return path / "adapter"
    if (path / CONFIG_FILE).exists() or (path / "adapter_config.json").exists():
        return path
    raise FileNotFoundError(f"{path}: neither a run folder with adapter/{CONFIG_FILE} nor an adapter folder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minipeft.evaluate",
                                description="Bits per answer token and accuracy of a base model or an adapter.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="HF or Meta checkpoint folder ; when not given: the run's base, else the toy base")
    p.add_argument("--adapter", help="a finetune run folder, or an adapter folder (minipeft or HF PEFT)")
    p.add_argument("--data", help="folder with test.jsonl ; when not given: the run's data, else the toy task")
    p.add_argument("--format", choices=("plain", "chat"), default=None,
                   help="prompt format; when not given: the run's, else plain")
    p.add_argument("--limit", type=int, default=0, help="first N test examples only (0: all)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per example (mmlu, arc_challenge: shots are dropped while the prompt reaches it); "
                        "when not given: the run's, else 512")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", help="where to write predictions.jsonl; when not given: not written")
    p.add_argument("--task", choices=tuple(TASKS), default=None, help="the task; when not given: the run's, else gsm8k")
    p.add_argument("--shots", type=int, default=0, help="k solved examples before each question (mmlu, arc_challenge)")
    p.add_argument("--stride", type=int, default=0, help="text: tokens between sliding windows (0: --max-len / 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag, value, low in (("--limit", args.limit, 0), ("--max-len", args.max_len, 2), ("--shots", args.shots, 0),
                                 ("--stride", args.stride, 0),
                                 ("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1)):
            if value is not None and value < low:
                raise ValueError(f"{flag} {value}: must be >= {low}")
        result = run_evaluation(args)
    except (ValueError, KeyError, OSError, NotImplementedError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def run_settings(adapter: str | None) -> dict:
    """The `train` settings of a finetune run folder given as --adapter ({} for an adapter folder or
    none), so evaluate and generate reuse the run's base, data and format."""
    if not adapter:
        return {}
    path = Path(adapter).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{adapter}: --adapter folder does not exist (finetune's runs are in "
                                "runs/toy/METHOD or runs/CHECKPOINT_NAME/METHOD)")
    if not (path / "config.json").is_file():
        return {}
    try:
        saved = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    train = saved.get("train") if isinstance(saved, dict) else None
    if not isinstance(train, dict):
        raise ValueError(f"{path / 'config.json'}: no 'train' section (an object with the run's settings)")
    return train


def run_evaluation(args: argparse.Namespace) -> dict:
    run = run_settings(args.adapter)  # a finetune run: reuse its settings
    source = adapter_dir(args.adapter) if args.adapter else None  # before the base loads: a wrong folder fails fast
    device = pick_device(args.device)
    checkpoint = args.checkpoint or run.get("checkpoint")
    model, tok, base = load_base(checkpoint, None if args.checkpoint else run.get("preset"), device)
    if source:
        load_adapter(model, source)
    task = args.task or run.get("task", "gsm8k")
    test, data = load_test_set(args.data or run.get("data"), task, args.limit)
    pool = load_examples(data, get_task(task).shots_split, task) if args.shots and get_task(task).shots_split else []
    fmt, max_len = args.format or run.get("format", "plain"), args.max_len or run.get("max_len", 512)
    result = evaluate(model, tok, test, fmt, max_len, args.batch_size, args.max_new_tokens, args.out, task=task,
                      shots=args.shots, shot_pool=pool, stride=args.stride, progress=not args.quiet)
    return dict(base=base, adapter=args.adapter, task=task, data=data, **result)


if __name__ == "__main__":
    sys.exit(main())
