"""Evaluate a base model, or a base model with an adapter, on GSM8K-format data.

Two numbers, the same ones `minipeft.finetune` reports before and after training:

* cross-entropy on the answer tokens of the test set, in bits per token (nats / ln 2), with the prompt
  masked exactly as in training (minipeft.data.encode_example);
* accuracy: batched greedy decoding with the KV cache (Llama.generate), stopped at EOS/<|eot_id|>
  and cut after the `#### N` line; the number after `####` (else the last number) must equal the gold
  answer (minipeft.data.extract_prediction / answers_match). Every prediction is written down.

    python -m minipeft.evaluate                                  # the toy base on the toy task
    python -m minipeft.evaluate --adapter runs/lora              # the run's base + its adapter
    python -m minipeft.evaluate --checkpoint ~/models/Llama-3.2-1B --data data/gsm8k [--adapter RUN]
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
from .data import (Example, answers_match, attention_segments, collate, encode_example, encode_prompt, extract_gold,
                   extract_prediction, load_split)
from .llama import Llama, LlamaConfig
from .safetensors_io import atomic_write
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


def load_task(data: str | None = None, limit: int = 0) -> tuple[list[dict], list[dict], str]:
    """(train, test, description): `data`/{train,test}.jsonl, or the synthetic toy task; the first
    `limit` examples of each split when limit > 0."""
    if limit < 0:
        raise ValueError(f"--limit {limit}: must be >= 0 (0: all)")
    if not data:
        from .toy import toy_task
        data = str(toy_task())
    train, test = _load_split(data, "train"), _load_split(data, "test")
    if limit:
        train, test = train[:limit], test[:limit]
    return train, test, data


def _load_split(data: str, split: str) -> list[dict]:
    """load_split, with a non-UTF-8 byte named by file and line, and an empty split refused."""
    path = Path(data).expanduser() / f"{split}.jsonl"
    try:
        examples = load_split(Path(data).expanduser(), split)
    except UnicodeDecodeError:
        read_utf8(path)  # raises, naming the file, line and column of the first bad byte
        raise
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty or blank)")
    return examples


def encode_all(tok: Tokenizer, examples: Sequence[dict], fmt: str, max_len: int) -> list[Example]:
    return [encode_example(tok, ex, fmt, max_len) for ex in examples]


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
            batch_size: int = 32, max_new_tokens: int = 256) -> list[dict]:
    """Greedy answers for `examples`, one record each: question, gold, generated, prediction, correct."""
    was_training, device = model.training, model.embed_tokens.weight.device
    model.eval()
    prompts = [encode_prompt(tok, ex["question"], fmt) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less left padding
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        with autocast(device):
            outs = model.generate([prompts[i] for i in chunk], max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids)
        texts.update((i, cut_after_answer(tok.decode(o))) for i, o in zip(chunk, outs))
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
             batch_size: int = 32, max_new_tokens: int = 256, predictions: str | Path | None = None) -> dict:
    """{"test_bpt", "accuracy", "n"} on `test`; the predictions go to `predictions` if given."""
    t0 = time.time()
    bpt = bits_per_token(model, encode_all(tok, test, fmt, max_len), batch_size, tok.pad_id)
    records = predict(model, tok, test, fmt, batch_size, max_new_tokens)
    if predictions is not None:
        write_predictions(records, predictions)
    return dict(test_bpt=bpt, accuracy=accuracy(records), n=len(records), seconds=time.time() - t0)


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
    p.add_argument("--max-len", type=int, default=None, help="tokens per example; when not given: the run's, else 512")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", help="where to write predictions.jsonl; when not given: not written")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag, value, low in (("--limit", args.limit, 0), ("--max-len", args.max_len, 2),
                                 ("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1)):
            if value is not None and value < low:
                raise ValueError(f"{flag} {value}: must be >= {low}")
        result = run_evaluation(args)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def run_evaluation(args: argparse.Namespace) -> dict:
    run = {}
    if args.adapter and not Path(args.adapter).expanduser().exists():
        raise FileNotFoundError(f"{args.adapter}: --adapter folder does not exist")
    if args.adapter and (Path(args.adapter) / "config.json").exists():  # a finetune run: reuse its settings
        run = json.loads((Path(args.adapter) / "config.json").read_text()).get("train", {})
    device = pick_device(args.device)
    checkpoint = args.checkpoint or run.get("checkpoint")
    model, tok, base = load_base(checkpoint, None if args.checkpoint else run.get("preset"), device)
    if args.adapter:
        load_adapter(model, adapter_dir(args.adapter))
    _, test, data = load_task(args.data or run.get("data"), 0)
    test = test[:args.limit] if args.limit else test
    fmt, max_len = args.format or run.get("format", "plain"), args.max_len or run.get("max_len", 512)
    result = evaluate(model, tok, test, fmt, max_len, args.batch_size, args.max_new_tokens, args.out)
    return dict(base=base, adapter=args.adapter, data=data, **result)


if __name__ == "__main__":
    sys.exit(main())
