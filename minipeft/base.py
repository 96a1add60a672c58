"""The base model a job starts from, and the device it runs on.

    model, tok, name = load_base(checkpoint)          # a Hugging Face or Meta checkpoint folder
    model, tok, name = load_base(preset="llama-3.2-1b")  # random weights of a preset (GPU checks)
    model, tok, name = load_base()                    # the shipped toy base (data/toy_base/, minipeft/toy.py)
    model, tok, name = load_run_base(run_settings)    # a finetune run's base, as the run trained on it

Weights are bf16 on CUDA and fp32 on CPU; `autocast(device)` is the matching compute precision.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from .llama import Llama, LlamaConfig
from .quant import quantize_model
from .tokenizer import Tokenizer

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "toy_base"  # the toy base every machine loads
WEIGHTS = "model.safetensors"


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
              device: torch.device = torch.device("cpu"), progress: bool = True,
              seed: int | None = None, dtype: torch.dtype | None = None) -> tuple[Llama, Tokenizer, str]:
    """(model, tokenizer, description). A checkpoint folder (HF or Meta layout, tokenizer in the same
    folder), or a preset with random weights and the byte-level tokenizer, or (neither) the toy base.
    Weights are `dtype`, by default bf16 on CUDA and fp32 on CPU. `seed`: a preset's weights are drawn after
    torch.manual_seed(seed), as finetune draws them (the same seed gives the same weights on the same
    kind of device: CUDA and the CPU draw different numbers); None: from the global generator as it is."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if checkpoint and preset:
        raise ValueError("give --checkpoint or --preset, not both")
    if preset:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device):
            model = Llama(LlamaConfig.from_name(preset)).to(dtype)
        return model.eval(), Tokenizer.byte_level(), f"preset {preset} (random weights)"
    if not checkpoint:
        checkpoint = str(toy_base(progress=progress))
    path = Path(checkpoint).expanduser()
    model = Llama.from_pretrained(path, dtype=dtype, device=device)
    tok = Tokenizer.from_file(path)
    tok.check_model_vocab(model.config.vocab_size, str(path))  # ids past the embedding fail only later
    return model, tok, str(path)


def load_run_base(run: dict, device: torch.device = torch.device("cpu"), checkpoint: str | None = None,
                  progress: bool = True, dtype: torch.dtype | None = None) -> tuple[Llama, Tokenizer, str]:
    """The base model a finetune run trained on, computing what it computed then, so that the run's
    adapter gives the run's own figures. `run`: the `train` settings of its config.json (runs.run_settings;
    {} for none: the toy base). Its checkpoint, or `checkpoint` instead; or its preset's random weights
    drawn from its seed; its attention pattern (attention, sparse_block, sparse_summary); its quantised
    base (quantize: QLoRA's NF4, int8). runs.MODEL_FIELDS lists these settings; every other setting of a
    run leaves the function alone (export applies them itself, in the checkpoint's dtype)."""
    preset = None if checkpoint else run.get("preset")
    model, tok, name = load_base(checkpoint or run.get("checkpoint"), preset, device, progress, seed=run.get("seed", 0),
                                 dtype=dtype)
    sparse = {k: run[k] for k in ("attention", "sparse_block", "sparse_summary") if k in run}
    if sparse.get("attention", "dense") != "dense":
        model.config = dataclasses.replace(model.config, **sparse)
    if run.get("quantize"):  # before any adapter: finetune quantises the base, then applies the method
        quantize_model(model, run["quantize"])
    return model, tok, name


def toy_base(progress: bool = True) -> Path:
    """The folder of the shipped toy base (HF layout + byte-level tokenizer.model); no training."""
    if not (SHIPPED / WEIGHTS).exists():
        raise FileNotFoundError(f"{SHIPPED / WEIGHTS} is missing: the toy base ships with the checkout "
                                "(git checkout data/toy_base), or rebuild it with "
                                f"`.venv/bin/python -m minipeft.toy --rebuild --out {SHIPPED}` (~40 min on 2 cores)")
    return SHIPPED
