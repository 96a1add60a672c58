"""Evaluate a base model, or a base model with an adapter, on GSM8K-format data or another task: the
command line over minipeft/scoring.py.

Two numbers, the same ones `minipeft.finetune` reports before and after training:

* cross-entropy on the answer tokens of the test set, in bits per token (nats / ln 2), with the prompt
  masked exactly as in training (minipeft.data.encode_example);
* accuracy: batched greedy decoding with the KV cache (Llama.generate), stopped at EOS/<|eot_id|>
  and cut at the stop strings (lm-eval's `until`); the number after `####` (else the last number) must
  equal the gold answer (minipeft.data.extract_prediction / answers_match). Every prediction is written down.

GSM8K also prints lm-evaluation-harness's two figures of the same generations, strict_match and
flexible_extract (minipeft.data.gsm8k_scores; docs/lm-eval.md): the numbers published GSM8K scores are.
The prompt is the fine-tuning one, zero-shot, unless `--shots K` (lm-eval's gsm8k prompt with K training
examples per question, drawn as lm-eval draws them) or `--gsm8k-style` (lm-eval's task: gsm8k 5-shot,
gsm8k_cot and gsm8k_cot_llama 8-shot, `--format chat` for the chat form) says otherwise.

    .venv/bin/python -m minipeft.evaluate                              # the toy base on the toy task
    .venv/bin/python -m minipeft.evaluate --adapter runs/toy/lora      # the run's base + its adapter
    .venv/bin/python -m minipeft.evaluate --checkpoint ~/models/Llama-3.2-1B --data data/gsm8k [--adapter RUN]
    .venv/bin/python -m minipeft.evaluate --shots 5                    # lm-eval's gsm8k prompt, 5 shots
    .venv/bin/python -m minipeft.evaluate --gsm8k-style gsm8k_cot_llama --format chat  # Meta's 8-shot chat

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
import json
import sys

from .adapters import load_adapter
from .base import load_run_base, pick_device
from .data import GSM8K_STYLES
from .runs import adapter_dir, run_settings
from .scoring import evaluate
from .tasks import TASKS, get_task, gsm8k_shots, load_examples, load_test_set


# ----------------------------------------------------------------------------- command line

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
    p.add_argument("--shots", type=int, default=None,
                   help="k solved examples before each question: mmlu, arc_challenge (not given: 0); gsm8k: lm-eval's "
                        "k training examples per question (not given: --gsm8k-style's number, else 0)")
    p.add_argument("--gsm8k-style", choices=GSM8K_STYLES, default=None,
                   help="gsm8k: lm-eval's prompt, stop strings and strict-match regex of this task (gsm8k 5-shot; "
                        "gsm8k_cot, gsm8k_cot_llama 8-shot); when not given: the fine-tuning prompt, scored as gsm8k")
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


def run_evaluation(args: argparse.Namespace) -> dict:
    run = run_settings(args.adapter)  # a finetune run: reuse its settings
    source = adapter_dir(args.adapter) if args.adapter else None  # before the base loads: a wrong folder fails fast
    task = args.task or run.get("task", "gsm8k")
    if args.gsm8k_style and task != "gsm8k":
        raise ValueError(f"--gsm8k-style {args.gsm8k_style}: only for --task gsm8k (this is --task {task})")
    shots = gsm8k_shots(args.gsm8k_style, args.shots) if task == "gsm8k" else args.shots or 0
    device = pick_device(args.device)
    # the run's base as it trained on it: its preset's seeded weights, attention pattern, quantisation
    model, tok, base = load_run_base(run, device, args.checkpoint)
    if source:
        load_adapter(model, source)
    test, data = load_test_set(args.data or run.get("data"), task, args.limit)
    needs_pool = shots and get_task(task).shots_split and args.gsm8k_style in (None, "gsm8k")  # CoT: fixed exemplars
    pool = load_examples(data, get_task(task).shots_split, task) if needs_pool else []
    fmt, max_len = args.format or run.get("format", "plain"), args.max_len or run.get("max_len", 512)
    result = evaluate(model, tok, test, fmt, max_len, args.batch_size, args.max_new_tokens, args.out, task=task,
                      shots=shots, shot_pool=pool, stride=args.stride, progress=not args.quiet,
                      gsm8k_style=args.gsm8k_style)
    return dict(base=base, adapter=args.adapter, task=task, data=data, **result)


if __name__ == "__main__":
    sys.exit(main())
