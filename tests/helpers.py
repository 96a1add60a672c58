"""Helpers shared by the test files: the tiny model and a checkpoint and GSM8K folder made from it, the
KV-cache equivalence check, a guard against a hung open() and a folder's bytes."""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import torch

from minipeft.data import synthetic_gsm8k, write_jsonl
from minipeft.llama import PRESETS, Llama, LlamaConfig
from minipeft.tokenizer import Tokenizer


def tiny(seed: int = 0, **overrides) -> Llama:
    """The "tiny" preset (fields overridable; derived ones recomputed), seeded, in eval mode."""
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**{**PRESETS["tiny"], **overrides})).eval()


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """path as a Hugging Face checkpoint folder: the tiny model (seeded) and the byte-level tokenizer."""
    tiny(seed).save_pretrained(path)
    Tokenizer.byte_level().save(path / "tokenizer.model")
    return path


def gsm8k_folder(path: Path, train: int, test: int) -> Path:
    """path as a GSM8K-format data folder: `train` and `test` synthetic examples (seed 0)."""
    write_jsonl(synthetic_gsm8k(train, seed=0), path / "train.jsonl")
    write_jsonl(synthetic_gsm8k(test, seed=0, split="test"), path / "test.jsonl")
    return path


def assert_cached_decoding_equals_full_forward(m: Llama, idx: torch.Tensor) -> None:
    """idx (2, >= 11): a 6-token prefill then 5 one-token steps through the KV cache give the full
    forward's logits, and batched cached `generate` equals greedy decoding without the cache."""
    full = m(idx[:, :11])
    m.setup_kv_cache(2, 16)
    steps = [m(idx[:, :6], cache_start=0)] + [m(idx[:, t:t + 1], cache_start=t) for t in range(6, 11)]
    m.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    prompts = [idx[0, :7].tolist(), idx[1, :4].tolist()]
    for prompt, generated in zip(prompts, m.generate(prompts, max_new_tokens=5)):
        seq = list(prompt)
        for _ in range(5):  # greedy without the cache
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert generated == seq[len(prompt):]


def assert_merge_is_exact(model, idx) -> None:
    """merge() keeps the function (to fp32 rounding) and unmerge() restores every base weight bit for bit."""
    from minipeft import peft
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("base.weight")}
    out = model(idx)
    peft.merge(model)
    torch.testing.assert_close(model(idx), out, rtol=1e-5, atol=1e-5)
    peft.unmerge(model)
    assert before and all(torch.equal(model.state_dict()[k], w) for k, w in before.items())


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    """Fail instead of hanging: SIGALRM interrupts a blocked open() of a FIFO and raises here."""
    def alarm(signum, frame):
        raise TimeoutError(f"hung for {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
