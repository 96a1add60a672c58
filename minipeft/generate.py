"""Text in, text out: `generate_text` and the `python -m minipeft.generate` command.

`Llama.generate` works on token lists and stops only at the `stop_ids` it is given. `generate_text`
does the rest a user expects: it encodes each prompt (plain text after BOS, or with `chat=True` the
Llama 3 chat format ending in an open assistant header), stops at the tokenizer's stop tokens
(<|end_of_text|>, <|eom_id|>, <|eot_id|>), and decodes the answers.

    .venv/bin/python -m minipeft.generate "Question: What is 2 + 3?\\nAnswer:"     # the toy base
    .venv/bin/python -m minipeft.generate --adapter runs/toy/lora "Question: ...\\nAnswer:"  # a run's base + adapter
    .venv/bin/python -m minipeft.generate --checkpoint ~/models/Llama-3.2-1B-Instruct --chat "Why is the sky blue?"

A shell passes `\\n` in a quoted prompt as a backslash and an n; the command line turns `\\n`, `\\t`
and `\\\\` into a newline, a tab and one backslash (`decode_escapes`), as the prompt templates need.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

import torch

from .llama import Llama
from .tokenizer import Tokenizer


def check_prompts(prompts: Sequence[str]) -> None:
    """A list of strings; a single str or a flat token list is the usual slip, named as such."""
    if isinstance(prompts, str):
        raise TypeError(f"generate_text: prompts must be a list of strings, got one str ({prompts[:40]!r}); "
                        "pass [prompt]")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError(f"generate_text: prompts must be a non-empty list of strings, got {type(prompts).__name__}")
    if all(isinstance(p, int) for p in prompts):
        raise TypeError("generate_text: prompts is a flat list of ints (one prompt's token ids?); it takes text, "
                        "a list of strings. For token ids use model.generate([ids]).")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"generate_text: every prompt must be a str; got {bad[0]} "
                        "(for token ids use model.generate(list_of_token_lists))")


@torch.no_grad()
def generate_text(model: Llama, tok: Tokenizer, prompts: list[str], max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, chat: bool = False,
                  generator: torch.Generator | None = None) -> list[str]:
    """The continuation of each prompt, as text (the prompt itself not included).

    chat=False: the prompt is plain text after <|begin_of_text|> (base models). chat=True: it is the
    user message of a Llama 3 chat (Instruct models). Generation stops at the tokenizer's stop ids
    (not included) or after max_new_tokens; temperature 0 is greedy, else top-p sampling."""
    check_prompts(prompts)
    if chat:
        ids = [tok.encode_dialog_prompt([{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [tok.encode(p, bos=True) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        outs = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              stop_ids=tok.stop_ids, generator=generator)
    finally:
        model.train(was_training)
    return [tok.decode(o) for o in outs]


ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def decode_escapes(text: str) -> str:
    """The command line's prompt with `\\n`, `\\t` and `\\\\` made a newline, a tab and one backslash;
    any other backslash stays as it is (a shell gives `\\n` in quotes as two characters)."""
    return re.sub(r"\\([nt\\])", lambda m: ESCAPES[m.group(1)], text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minipeft.generate",
                                description="Answer prompts with a base model, or a base model + adapter.",
                                epilog="example: .venv/bin/python -m minipeft.generate --adapter runs/toy/lora "
                                       '"Question: What is 2 + 3?\\nAnswer:"')
    p.add_argument("prompts", nargs="+", help="one or more prompts (each its own answer); \\n, \\t and \\\\ in "
                                              "them become a newline, a tab and a backslash")
    p.add_argument("--checkpoint", default=None,
                   help="HF or Meta checkpoint folder (default: the run's base, else the toy base)")
    p.add_argument("--adapter", default=None, help="a finetune run folder (runs/toy/lora), or an adapter folder")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the Llama 3 chat format (default: on "
                                                        "for a run trained with --format chat, else off)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="(default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = [decode_escapes(p) for p in args.prompts]
    try:
        answers = run_generation(args, prompts)
    except (ValueError, KeyError, OSError, NotImplementedError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for prompt, answer in zip(prompts, answers):
        print(answer if len(prompts) == 1 else f"### {prompt}\n{answer}\n")
    return 0


def run_generation(args: argparse.Namespace, prompts: list[str]) -> list[str]:
    from .adapters import load_adapter
    from .base import load_run_base, pick_device
    from .runs import adapter_dir, run_settings

    run = run_settings(args.adapter)  # a finetune run: reuse its base
    source = adapter_dir(args.adapter) if args.adapter else None  # before the base loads: a wrong folder fails fast
    device = pick_device(args.device)
    # the run's base as it trained on it: its preset's seeded weights, attention pattern, quantisation
    model, tok, _ = load_run_base(run, device, args.checkpoint)
    if source:
        load_adapter(model, source)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return generate_text(model, tok, prompts, args.max_new_tokens, args.temperature, args.top_p,
                         chat=args.chat or run.get("format") == "chat", generator=generator)


if __name__ == "__main__":
    sys.exit(main())
