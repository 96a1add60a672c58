"""The base model a job starts from, and the device it runs on.

    model, tok, name = load_base(checkpoint)          # a Hugging Face or Meta checkpoint folder
    model, tok, name = load_base(preset="llama-3.2-1b")  # random weights of a preset (GPU checks)
    model, tok, name = load_base()                    # the shipped toy base (data/toy_base/, minipeft/toy.py)

Weights are bf16 on CUDA and fp32 on CPU; `autocast(device)` is the matching compute precision.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .llama import Llama, LlamaConfig
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
        checkpoint = str(toy_base(progress=progress))
    path = Path(checkpoint).expanduser()
    model = Llama.from_pretrained(path, dtype=dtype, device=device)
    tok = Tokenizer.from_file(path)
    tok.check_model_vocab(model.config.vocab_size, str(path))  # ids past the embedding fail only later
    return model, tok, str(path)


def toy_base(progress: bool = True) -> Path:
    """The folder of the shipped toy base (HF layout + byte-level tokenizer.model); no training."""
    if not (SHIPPED / WEIGHTS).exists():
        raise FileNotFoundError(f"{SHIPPED / WEIGHTS} is missing: the toy base ships with the checkout "
                                "(git checkout data/toy_base), or rebuild it with "
                                f"`python -m minipeft.toy --rebuild --out {SHIPPED}` (~40 min on 2 cores)")
    return SHIPPED
