"""Text in, text out: `generate_text` and the `python -m minipeft.generate` command.

`Llama.generate` works on token lists and stops only at the `stop_ids` it is given. `generate_text`
does the rest a user expects: it encodes each prompt (plain text after BOS, or with `chat=True` the
Llama 3 chat format ending in an open assistant header), stops at the tokenizer's stop tokens
(<|end_of_text|>, <|eom_id|>, <|eot_id|>), and decodes the answers.

    python -m minipeft.generate "Question: 2 + 3 =\\nAnswer:"                  # the toy base
    python -m minipeft.generate --checkpoint ~/models/Llama-3.2-1B-Instruct --chat "Why is the sky blue?"
    python -m minipeft.generate --adapter runs/lora "Question: ..."           # the run's base + adapter
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
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


def main(argv: list[str] | None = None) -> int:
    from .adapters import load_adapter
    from .evaluate import adapter_dir, load_base, pick_device

    p = argparse.ArgumentParser(prog="python -m minipeft.generate",
                                description="Answer prompts with a base model, or a base model + adapter.")
    p.add_argument("prompts", nargs="+", help="one or more prompts (each its own answer)")
    p.add_argument("--checkpoint", default=None,
                   help="HF or Meta checkpoint folder (default: the run's base, else the toy base)")
    p.add_argument("--adapter", default=None, help="a finetune run folder, or an adapter folder")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the Llama 3 chat format (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="(default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    args = p.parse_args(argv)
    run = {}
    if args.adapter and (Path(args.adapter) / "config.json").exists():  # a finetune run: reuse its base
        run = json.loads((Path(args.adapter) / "config.json").read_text()).get("train", {})
    device = pick_device(args.device)
    model, tok, _ = load_base(args.checkpoint or run.get("checkpoint"),
                              None if args.checkpoint else run.get("preset"), device, progress=True)
    if args.adapter:
        load_adapter(model, adapter_dir(args.adapter))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    answers = generate_text(model, tok, args.prompts, args.max_new_tokens, args.temperature, args.top_p,
                            chat=args.chat, generator=generator)
    for prompt, answer in zip(args.prompts, answers):
        print(answer if len(args.prompts) == 1 else f"### {prompt}\n{answer}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
