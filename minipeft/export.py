"""Export a fine-tuned model: base + adapter folded into one plain checkpoint (and its tokenizer).

    .venv/bin/python -m minipeft.export --toy --adapter runs/toy/lora --out merged/    # the toy base
    .venv/bin/python -m minipeft.export --checkpoint ~/models/Llama-3.2-1B --adapter runs/Llama-3.2-1B/lora --out merged/

The adapter is applied to the base, folded into the weights by `peft.merge_and_unload` (a plain
`Llama` again: no wrapper modules, no `.base.` keys), and written with `save_pretrained` in the
Hugging Face layout, in the base checkpoint's own dtype, with the base's tokenizer files copied next
to it. The folder loads with `Llama.from_pretrained` (and transformers' LlamaForCausalLM) and gives
the adapted model's logits up to float rounding. Methods that cannot be folded (prefix/prompt tuning,
LLaMA-Adapter, (IA)^3++'s QK skip-norm, BitFit's new biases) are refused with the reason before
anything is written.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from .adapters import load_adapter
from .base import toy_base
from .runs import adapter_dir
from .llama import Llama
from .peft import merge_and_unload
from .safetensors_io import atomic_write

# what a Hugging Face checkpoint folder may hold besides the weights and config.json
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def export(checkpoint: str | Path, adapter: str | Path, out: str | Path,
           dtype: torch.dtype | None = None) -> Path:
    """Fold `adapter` into the base at `checkpoint` and write the merged checkpoint + tokenizer to `out`.

    `dtype`: of the written weights (default: the checkpoint's own). `out` must not exist or be empty."""
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; choose a new folder for the merged checkpoint")
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: checkpoint folder does not exist")
    tokenizer = [checkpoint / f for f in TOKENIZER_FILES if (checkpoint / f).is_file()]
    if not any(f.name in ("tokenizer.model", "tokenizer.json") for f in tokenizer):
        raise FileNotFoundError(f"{checkpoint}: no tokenizer.model or tokenizer.json to ship with the merged model")
    model = Llama.from_pretrained(checkpoint, dtype=dtype)
    source = adapter_dir(Path(adapter).expanduser())  # a run folder (holding adapter/) or an adapter folder
    load_adapter(model, source)
    merge_and_unload(model)  # refuses, with the reason, before anything is written
    model.save_pretrained(out)
    for f in tokenizer:
        with atomic_write(out / f.name) as dst, open(f, "rb") as src:
            shutil.copyfileobj(src, dst)
    with atomic_write(out / "minipeft_export.json", "w") as f:
        json.dump(dict(base=str(checkpoint), adapter=str(source)), f, indent=2)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minipeft.export",
                                description="Fold an adapter into its base model and write a plain checkpoint "
                                            "(Hugging Face layout) with the tokenizer next to it.",
                                epilog="example: .venv/bin/python -m minipeft.export --toy --adapter runs/toy/lora "
                                       "--out merged/")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--checkpoint", help="the base model's folder (HF or Meta layout, tokenizer inside)")
    base.add_argument("--toy", action="store_true", help="the toy base (built and cached on first use)")
    p.add_argument("--adapter", required=True, help="a finetune run folder, or an adapter folder")
    p.add_argument("--out", required=True, help="new folder for the merged checkpoint")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="dtype of the written weights (default: the base checkpoint's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.toy:
            checkpoint = toy_base()
        else:
            checkpoint = args.checkpoint
        out = export(checkpoint, args.adapter, args.out, getattr(torch, args.dtype) if args.dtype else None)
    except (ValueError, KeyError, OSError, NotImplementedError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (base {checkpoint} + adapter {args.adapter}, merged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
