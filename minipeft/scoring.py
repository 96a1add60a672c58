"""Scoring a model on a task: what `minipeft.finetune` reports before and after training and what
`minipeft.evaluate` prints.

* GSM8K (and its toy analogue): cross-entropy on the answer tokens in bits per token (nats / ln 2), the
  prompt masked exactly as in training (data.encode_example), and batched greedy decoding with the KV
  cache (Llama.generate), stopped at EOS/<|eot_id|> and cut at the style's stop strings (lm-eval's
  `until`), scored three ways: minipeft's accuracy (data.extract_prediction / answers_match on the text up
  to the `#### N` line) and lm-evaluation-harness's strict_match and flexible_extract (data.gsm8k_scores),
  the two figures published GSM8K numbers are. Zero-shot in the fine-tuning format by default; lm-eval's
  k-shot and chain-of-thought prompts with `style` / `shots` (tasks.gsm8k_prompts). Every prediction is
  written down.
* mmlu, arc_challenge: the log-likelihood of each answer letter after the prompt (`continuation_logprobs`);
  the highest is the prediction (accuracy, overall and per MMLU category); bits/token of the gold letter;
  for ARC also acc_norm (choice texts, log-likelihood / characters) and acc_text; k-shot prompts.
* dolly: bits per response token and perplexity (2 ** bits).
* text: sliding-window perplexity (`sliding_window_nll`), and bits/token.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .base import autocast
from .data import (GSM8K_UNTIL, Example, answers_match, attention_segments, collate, cut_at_stop, extract_gold,
                   extract_prediction, gsm8k_scores)
from .llama import IGNORE_INDEX, Llama
from .safetensors_io import atomic_write
from .tasks import (arc_text_prompt, encode_all, encode_answer, encode_text_prompt, get_task, gsm8k_prompts,
                    gsm8k_shots, mc_prompt, subject_category)
from .tokenizer import Tokenizer

LN2 = math.log(2)
# what finetune's summary.json before/after, its summary line and compare's table report of an evaluation
SUMMARY_KEYS = ("test_bpt", "accuracy", "strict_match", "flexible_extract")


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
            batch_size: int = 32, max_new_tokens: int = 256, progress: bool = False, style: str | None = None,
            shots: int = 0, shot_pool: Sequence[dict] = ()) -> list[dict]:
    """Greedy answers for `examples`, one record each: question, gold, generated (the text cut at the stop
    strings of `style`, "gsm8k" when None: what lm-eval scores), prediction and correct (minipeft's grading),
    strict_match / flexible_extract and what each filter extracted (data.gsm8k_scores), prompt_tokens.
    The prompts are tasks.gsm8k_prompts(fmt, style, shots, shot_pool), left-truncated to the model's
    max_seq_len - max_new_tokens tokens as lm-eval's Hugging Face model truncates them."""
    was_training, device = model.training, model.embed_tokens.weight.device
    model.eval()
    style_scored, room = style or "gsm8k", model.config.max_seq_len - max_new_tokens
    if room < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"max_seq_len {model.config.max_seq_len}")
    prompts = gsm8k_prompts(tok, examples, fmt, style, shots, shot_pool)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less left padding
    texts: dict[int, str] = {}
    bar = Progress(len(prompts), "generate", progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        with autocast(device):
            outs = model.generate([prompts[i][-room:] for i in chunk], max_new_tokens=max_new_tokens,
                                  stop_ids=tok.stop_ids)
        # lm-eval's HF model stops a batch at the stop strings; cutting afterwards gives the same text
        texts.update((i, cut_at_stop(tok.decode(o), GSM8K_UNTIL[style_scored])) for i, o in zip(chunk, outs))
        bar.update(len(chunk), sum(map(len, outs)))
    bar.close()
    model.train(was_training)
    records = []
    for i, ex in enumerate(examples):
        gold, pred = extract_gold(ex["answer"]), extract_prediction(cut_after_answer(texts[i]))
        records.append(dict(question=ex["question"], gold=gold, generated=texts[i], prediction=pred,
                            correct=answers_match(pred, gold), **gsm8k_scores(texts[i], ex["answer"], style_scored),
                            prompt_tokens=len(prompts[i])))
    return records


def accuracy(records: Sequence[dict], key: str = "correct") -> float:
    return sum(r[key] for r in records) / max(len(records), 1)


def summary_figures(result: dict) -> dict:
    """The SUMMARY_KEYS an evaluation has: what finetune's summary.json keeps as `before` and `after`."""
    return {key: result[key] for key in SUMMARY_KEYS if key in result}


def write_predictions(records: Sequence[dict], path: str | Path) -> None:
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def evaluate(model: Llama, tok: Tokenizer, test: Sequence[dict], fmt: str = "plain", max_len: int = 512,
             batch_size: int = 32, max_new_tokens: int = 256, predictions: str | Path | None = None,
             task: str = "gsm8k", shots: int | None = None, shot_pool: Sequence[dict] = (), stride: int = 0,
             progress: bool = False, gsm8k_style: str | None = None) -> dict:
    """{"test_bpt", "accuracy", "n", "seconds", ...} of `task` on `test`; the per-example records go to
    `predictions` if given. accuracy is NaN for the tasks without one (dolly, text). GSM8K also gives
    lm-eval's "strict_match" and "flexible_extract" (means over the questions), the `gsm8k_style` that
    scored them ("gsm8k" unless given), the shots (None: the style's own number, tasks.gsm8k_shots) and
    how many prompts were left-truncated; its bits/token is always the fine-tuning format's, zero-shot."""
    t0, kind = time.time(), get_task(task).kind
    if kind == "generate":
        bpt = bits_per_token(model, encode_all(tok, test, fmt, max_len, task), batch_size, tok.pad_id)
        shots = gsm8k_shots(gsm8k_style, shots)
        records = predict(model, tok, test, fmt, batch_size, max_new_tokens, progress, gsm8k_style, shots, shot_pool)
        room = model.config.max_seq_len - max_new_tokens
        result = dict(test_bpt=bpt, accuracy=accuracy(records), strict_match=accuracy(records, "strict_match"),
                      flexible_extract=accuracy(records, "flexible_extract"), gsm8k_style=gsm8k_style or "gsm8k",
                      shots=shots, prompts_truncated=sum(r["prompt_tokens"] > room for r in records))
    elif kind == "choice":
        result, records = evaluate_choices(model, tok, test, fmt, max_len, batch_size, shots or 0, shot_pool,
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
