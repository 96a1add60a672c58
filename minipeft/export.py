"""Export a fine-tuned model: base + adapter folded into one plain checkpoint (and its tokenizer).

    .venv/bin/python -m minipeft.export --adapter runs/toy/lora --out merged/         # a run: its own base
    .venv/bin/python -m minipeft.export --checkpoint ~/models/Llama-3.2-1B --adapter ADAPTER_DIR --out merged/

The adapter is applied to the base, folded into the weights by `peft.merge_and_unload` (a plain
`Llama` again: no wrapper modules, no `.base.` keys), and written with `save_pretrained` in the
Hugging Face layout, in the base checkpoint's own dtype, with the base's tokenizer files copied next
to it. The folder loads with `Llama.from_pretrained` (and transformers' LlamaForCausalLM) and gives
the adapted model's logits up to float rounding. Methods that cannot be folded (prefix/prompt tuning,
LLaMA-Adapter, (IA)^3++'s QK skip-norm, BitFit's new biases) are refused with the reason before
anything is written.

A finetune run folder brings its settings (runs.MODEL_FIELDS): its base checkpoint, unless --checkpoint
or --toy names another; a quantised base (--quantize nf4, QLoRA) is quantised and dequantised again
before the merge, so the adapter is folded into the weights it was trained against, quantisation error
included (LLM.int8()'s mixed-precision matmul has no weight form: its dequantised weights are the
nearest). A run trained with sparse attention (--attention strided/fixed) is refused unless
--dense-attention: a checkpoint has no field for the pattern (transformers and Llama.from_pretrained
attend densely), so the merged model computes the run's function only on sequences of at most one
block (sparse_block tokens), where the patterns are dense; minipeft_export.json records the pattern.
A --preset run has no checkpoint to export.
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
from .runs import adapter_dir, run_settings
from .llama import Llama
from .peft import merge_and_unload
from .quant import dequantize_model, quantize_model
from .safetensors_io import atomic_write

# what a Hugging Face checkpoint folder may hold besides the weights and config.json
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def export(checkpoint: str | Path | None, adapter: str | Path, out: str | Path,
           dtype: torch.dtype | None = None, dense_attention: bool = False) -> Path:
    """Fold `adapter` into the base at `checkpoint` and write the merged checkpoint + tokenizer to `out`.

    `checkpoint` None: a finetune run's own base (the toy base for a toy run). `dtype`: of the written
    weights (default: the checkpoint's own). `out` must not exist or be empty. `dense_attention`: export
    a run trained with sparse attention anyway (see the module's docstring)."""
    run = run_settings(adapter)  # a finetune run folder: its base, quantisation and attention carry over
    if run.get("preset"):
        raise ValueError(f"{adapter}: the run trained on --preset {run['preset']} (random weights): there is no "
                         "checkpoint folder to fold its adapter into")
    sparse = {k: run[k] for k in ("attention", "sparse_block", "sparse_summary") if k in run}
    if sparse.get("attention", "dense") != "dense" and not dense_attention:
        block = sparse.get("sparse_block")
        raise ValueError(f"{adapter}: the run trained with --attention {sparse['attention']} (sparse_block {block}); "
                         "a checkpoint has no field for the pattern, so the merged model attends densely: the run's "
                         f"function only up to {block} tokens. Add --dense-attention to export it so")
    if checkpoint is None:
        if not run:
            raise ValueError(f"{adapter}: not a finetune run folder, so it names no base: give --checkpoint or --toy")
        checkpoint = run.get("checkpoint") or toy_base()
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; choose a new folder for the merged checkpoint")
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: checkpoint folder does not exist")
    tokenizer = [checkpoint / f for f in TOKENIZER_FILES if (checkpoint / f).is_file()]
    if not any(f.name in ("tokenizer.model", "tokenizer.json") for f in tokenizer):
        raise FileNotFoundError(f"{checkpoint}: no tokenizer.model or tokenizer.json to ship with the merged model")
    model = Llama.from_pretrained(checkpoint, dtype=dtype)
    if run.get("quantize"):  # QLoRA: the adapter learnt against the quantised weights, not the originals
        quantize_model(model, run["quantize"])
        dequantize_model(model)
    source = adapter_dir(Path(adapter).expanduser())  # a run folder (holding adapter/) or an adapter folder
    load_adapter(model, source)
    merge_and_unload(model)  # refuses, with the reason, before anything is written
    model.save_pretrained(out)
    for f in tokenizer:
        with atomic_write(out / f.name) as dst, open(f, "rb") as src:
            shutil.copyfileobj(src, dst)
    with atomic_write(out / "minipeft_export.json", "w") as f:
        json.dump(dict(base=str(checkpoint), adapter=str(source), quantize=run.get("quantize"),
                       trained_attention=sparse or None), f, indent=2)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minipeft.export",
                                description="Fold an adapter into its base model and write a plain checkpoint "
                                            "(Hugging Face layout) with the tokenizer next to it.",
                                epilog="example: .venv/bin/python -m minipeft.export --toy --adapter runs/toy/lora "
                                       "--out merged/")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--checkpoint", help="the base model's folder (HF or Meta layout, tokenizer inside); "
                                           "default: the run's own base")
    base.add_argument("--toy", action="store_true", help="the toy base (data/toy_base)")
    p.add_argument("--adapter", required=True, help="a finetune run folder, or an adapter folder")
    p.add_argument("--out", required=True, help="new folder for the merged checkpoint")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="dtype of the written weights (default: the base checkpoint's)")
    p.add_argument("--dense-attention", action="store_true",
                   help="export a run trained with sparse attention anyway: the checkpoint attends densely")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        checkpoint = toy_base() if args.toy else args.checkpoint  # None: the run's own base
        out = export(checkpoint, args.adapter, args.out, getattr(torch, args.dtype) if args.dtype else None,
                     args.dense_attention)
    except (ValueError, KeyError, OSError, NotImplementedError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (adapter {args.adapter} merged into its base; both named in minipeft_export.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
