"""Checks of lab 08 (NF4, QLoRA's 4-bit NormalFloat): the NormalFloat levels, block-wise absmax quantisation
packed two codes per byte and its inverse, exercises (bits per weight, k-bit NormalFloat).

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). The weights they
quantise are their own: normal draws whose blocks have different scales (so one absmax per tensor shows)
and whose largest |w| is sometimes negative (so max(w) instead of max |w| shows).
"""
from __future__ import annotations

import math

import torch

from ..quant import DQ_BLOCK, NF4, NF4_BLOCK, NF4_OFFSET, dequantize_nf4, quantize_nf4
from . import expect


def delta_k(k: int) -> float:
    """The end-point probability of k-bit NormalFloat: 1/2 ((1 - 1/(2 (2^k - 1))) + (1 - 1/(2 2^k)))."""
    return 0.5 * ((1 - 1 / (2 * (2 ** k - 1))) + (1 - 1 / (2 * 2 ** k)))


def _reference_levels(k: int, delta: float) -> torch.Tensor:
    """k-bit NormalFloat (float64): 2^(k-1) levels > 0 and 2^(k-1) - 1 < 0 from equal probability steps
    between delta and 1/2, one shared 0, divided by the largest."""
    Q = torch.special.ndtri
    positive = Q(torch.linspace(delta, 0.5, 2 ** (k - 1) + 1, dtype=torch.float64)[:-1])
    negative = -Q(torch.linspace(delta, 0.5, 2 ** (k - 1), dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return levels / levels.max()


def _weights(rows: int = 16, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Normal weights whose blocks of 64 have scales from 0.005 to 0.08 (one absmax per tensor would show)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float32) * 0.02
    scales = torch.exp(torch.empty(rows * cols // 16).uniform_(math.log(0.25), math.log(4.0), generator=g))
    return (w.view(-1, 16) * scales[:, None]).view(rows, cols)


def _as_levels(levels, what: str) -> torch.Tensor:
    expect(isinstance(levels, torch.Tensor), f"{what} should return a tensor, got {type(levels).__name__}")
    return levels.detach().to(torch.float64).flatten()


def _diagnose_levels(levels: torch.Tensor, k: int, what: str) -> None:
    """The structure of k-bit NormalFloat: 2^k finite ascending levels, one exact 0, 2^(k-1) above it and
    2^(k-1) - 1 below, spanning [-1, 1]."""
    n, half = 2 ** k, 2 ** (k - 1)
    expect(not (levels.numel() == n + 1 and int((levels == 0).sum()) == 2),
           f"{what} has {n + 1} levels, two of them 0: the two halves share ONE zero (drop each half's "
           "Q(1/2) = 0 and add a single 0)")
    expect(levels.numel() == n, f"{what} has {levels.numel()} levels, want 2^k = {n}")
    expect(bool(torch.isfinite(levels).all()),
           f"{what} has a level that is inf or nan: the quantiles of probability 0 and 1 are infinite, so "
           "the end points sit at delta and 1 - delta (each half from delta to 1/2)")
    expect(bool((levels.diff() >= 0).all()), f"{what} is not in ascending order (sort the levels)")
    zeros = int((levels == 0).sum())
    symmetric = torch.allclose(levels, -levels.flip(0), atol=1e-9)
    expect(zeros > 0 or not symmetric,
           f"{what} is symmetric and has no exact 0 ({n} equal-probability levels over both halves): zeros in "
           f"the weights would all be moved. Build the two halves separately, {half} levels above 0 and "
           f"{half - 1} below, plus one shared exact 0")
    expect(zeros <= 1, f"{what} has {zeros} levels at 0: the two halves share ONE zero")
    expect(zeros == 1, f"{what} has no level exactly 0: padding and exact zeros in the weights would move; "
                       "put one exact 0 between the halves")
    expect(bool((levels.diff() > 0).all()), f"{what} has two equal levels: every level must be distinct")
    above, below = int((levels > 0).sum()), int((levels < 0).sum())
    expect(not (above == half - 1 and below == half),
           f"{what} has {below} levels below 0 and {above} above: the other way round (the paper gives the "
           f"positive half 2^(k-1) = {half} levels and the negative half {half - 1})")
    expect(above == half and below == half - 1,
           f"{what} has {below} levels below 0 and {above} above, want {half - 1} and {half}")
    expect(abs(levels.max().item() - 1) < 1e-6,
           f"{what}'s largest level is {levels.max().item():.4g}, want 1: divide by the largest level so that "
           "the grid spans [-1, 1] (block-wise absmax maps every block into that range)")
    expect(abs(levels.min().item() + 1) < 1e-6,
           f"{what}'s smallest level is {levels.min().item():.4g}, want -1: both halves start from the same "
           "end point delta, so the most negative level is -Q(delta) / Q(delta) = -1")


def check_normal_float_levels(normal_float_levels) -> str:
    """normal_float_levels(k=4, delta=NF4_OFFSET): k-bit NormalFloat, eq. 4 with an exact zero."""
    levels = _as_levels(normal_float_levels(), "normal_float_levels()")
    _diagnose_levels(levels, 4, "normal_float_levels()")
    worst = (levels - NF4.double()).abs().max().item()
    expect(worst < 1e-6, f"the levels have the right shape but differ from NF4 by up to {worst:.2e}: each half "
                         "takes the quantiles Q(p) at equal probability steps from delta to 1/2, the last "
                         "step (p = 1/2, Q = 0) being the shared zero")
    same = _as_levels(normal_float_levels(4, NF4_OFFSET), "normal_float_levels(4, NF4_OFFSET)")
    expect(torch.allclose(same, levels), "normal_float_levels(4, NF4_OFFSET) differs from normal_float_levels()")
    other = _as_levels(normal_float_levels(4, 0.95), "normal_float_levels(4, 0.95)")
    expect(not torch.allclose(other, levels), "normal_float_levels(4, 0.95) gives NF4 again: the argument delta "
                                              "is ignored (NF4_OFFSET used inside?)")
    expect(torch.allclose(other, _reference_levels(4, 0.95), atol=1e-6),
           "with delta = 0.95 the levels differ from eq. 4's: use delta as the end point of both halves")
    three = _as_levels(normal_float_levels(3, delta_k(3)), "normal_float_levels(3, ...)")
    expect(three.numel() != 16, "normal_float_levels(3, ...) gives 16 levels: the argument k is ignored")
    _diagnose_levels(three, 3, "normal_float_levels(3, ...)")
    expect(torch.allclose(three, _reference_levels(3, delta_k(3)), atol=1e-6),
           "k = 3 gives the right structure but other values: 2^(k-1) + 1 equal probability points from delta "
           "to 1/2 for the positive half, 2^(k-1) for the negative one")
    return f"NF4 to {worst:.1e}, one exact 0, 8 levels above it and 7 below; k and delta honoured"


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=1).flatten()


def check_quantize(my_quantize) -> str:
    """my_quantize(w, block=64) -> (packed uint8 (numel/2,), absmax fp32 (numel/block,)), as quantize_nf4."""
    w = _weights()
    for block in (NF4_BLOCK, 32):
        got = my_quantize(w) if block == NF4_BLOCK else my_quantize(w, block)
        expect(isinstance(got, (tuple, list)) and len(got) == 2, "return a pair (packed codes, absmax)")
        packed, absmax = got
        expect(isinstance(packed, torch.Tensor) and isinstance(absmax, torch.Tensor), "return two tensors")
        state = quantize_nf4(w, block=block, double_quant=False)
        n_blocks = w.numel() // block
        absmax = absmax.detach()
        expect(absmax.numel() != 1, "one absmax for the whole tensor: block-wise absmax keeps one constant per "
                                    f"block of {block} weights, so an outlier only coarsens its own block")
        expect(not (block == 32 and absmax.numel() == w.numel() // NF4_BLOCK),
               f"with block = 32 you return {absmax.numel()} constants, the count for blocks of 64: the argument "
               "block is ignored")
        expect(absmax.numel() == n_blocks, f"{absmax.numel()} absmax constants, want one per block of {block}: "
                                           f"{w.numel()} / {block} = {n_blocks}")
        absmax = absmax.flatten()
        expect(not torch.allclose(absmax, w.abs().max().expand_as(absmax)),
               "every block got the same absmax, the largest |w| of the whole tensor: block-wise absmax keeps "
               f"one constant per block of {block} weights, its own largest |w|")
        expect(not torch.allclose(absmax, w.reshape(-1, block).amax(1)),
               "absmax is the largest w of each block, not the largest |w| (a block whose extreme is negative "
               "then maps outside [-1, 1])")
        expect(not torch.allclose(absmax, w.T.reshape(-1, block).abs().amax(1)),
               f"the blocks run down the columns: a block is {block} consecutive weights of w.reshape(-1)")
        expect(torch.allclose(absmax.float(), state["absmax"]),
               f"absmax differs from each block's max |w| (blocks of {block} consecutive weights of "
               "w.reshape(-1))")
        expect(packed.dtype == torch.uint8, f"the packed codes are {packed.dtype}, want torch.uint8 (one byte "
                                            "holds two 4-bit codes)")
        expect(packed.numel() != w.numel(), f"{packed.numel()} codes for {w.numel()} weights: pack two 4-bit "
                                            "codes per byte (numel / 2 bytes)")
        expect(packed.numel() == w.numel() // 2, f"{packed.numel()} bytes, want numel / 2 = {w.numel() // 2}")
        packed = packed.flatten()
        if torch.equal(packed, state["codes"]):
            continue
        codes, want = _unpack(packed), _unpack(state["codes"])
        swapped = torch.stack([want[1::2], want[0::2]], dim=1).flatten()
        expect(not torch.equal(codes, swapped),
               "the two codes of each byte are in the wrong order: the FIRST weight of each pair goes in the "
               "high nibble (bits 4-7), the second in the low nibble")
        expect(int(packed.max()) > 15 or int(want.max()) <= 15,
               "every byte is below 16: the high nibble is empty (shift the first code left by 4 bits)")
        wrong = (codes != want).float().mean().item()
        raise AssertionError(f"{wrong:.0%} of the codes are not the index of the nearest NF4 level to "
                             "w / absmax of its block")
    return (f"the same packed codes and absmax as quantize_nf4 for blocks of 64 and 32 ({w.numel() // 2} bytes "
            f"+ {w.numel() // NF4_BLOCK} constants for {w.numel()} weights)")


def check_dequantize(my_dequantize) -> str:
    """my_dequantize(packed, absmax, shape, block=64) -> w_hat (shape), as dequantize_nf4."""
    w = _weights(seed=1)
    worst = 0.0
    for block in (NF4_BLOCK, 32):
        state = quantize_nf4(w, block=block, double_quant=False)
        args = (state["codes"].clone(), state["absmax"].clone(), w.shape)
        try:
            got = my_dequantize(*args) if block == NF4_BLOCK else my_dequantize(*args, block)
        except Exception as e:
            if block == NF4_BLOCK:
                raise
            raise AssertionError(f"with block = 32 your code raised {type(e).__name__}: {e} (is the argument "
                                 "block used?)") from None
        want = dequantize_nf4(state, w.shape, block=block)
        expect(isinstance(got, torch.Tensor), f"return a tensor, got {type(got).__name__}")
        expect(tuple(got.shape) == tuple(w.shape), f"the result has shape {tuple(got.shape)}, want the weight's "
                                                   f"{tuple(w.shape)}")
        got = got.detach().float()
        if torch.allclose(got, want, rtol=1e-6, atol=1e-9):
            worst = max(worst, (got - want).abs().max().item())
            continue
        codes = _unpack(state["codes"]).long().view(-1, block)
        swapped = torch.stack([codes.flatten()[1::2], codes.flatten()[0::2]], dim=1).view(-1, block)
        expect(not torch.allclose(got, (NF4[swapped] * state["absmax"][:, None]).view(w.shape)),
               "the codes are unpacked in the wrong order: the high nibble (packed >> 4) holds the FIRST code "
               "of the pair, the low nibble (packed & 0xF) the second")
        expect(not torch.allclose(got, NF4[codes].view(w.shape)),
               "the result is the levels alone, in [-1, 1]: multiply each by its block's absmax")
        expect(not torch.allclose(got, (NF4[codes] * state["absmax"].max()).view(w.shape)),
               "every weight is scaled by the largest absmax: each block by its own constant")
        worst = (got - want).abs().max().item()
        raise AssertionError(f"the weights differ from dequantize_nf4 by up to {worst:.2e}: "
                             "w_hat_j = NF4[c_j] * absmax of block(j), in the weights' order")
    return f"the same weights as dequantize_nf4 for blocks of 64 and 32 (largest difference {worst:.1e})"


def _bits_per_weight(state: dict, numel: int) -> float:
    return sum(t.numel() * t.element_size() * 8 for t in state.values()) / numel


def exercise_1(bits_block128) -> str:
    """Bits per weight of NF4 with double quantisation in blocks of 128."""
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    measured = _bits_per_weight(quantize_nf4(w, block=128), w.numel())
    expect(isinstance(bits_block128, (int, float)), f"give a number, got {type(bits_block128).__name__}")
    close = lambda x: abs(bits_block128 - x) < 1e-4  # noqa: E731
    if close(measured):
        return f"quantize_nf4 stores {measured:.4f} bits per weight in blocks of 128"
    expect(not close(4 + 32 / 128), "that is with fp32 constants: double quantisation stores each constant in "
                                    "8 bits, plus one fp32 constant per 256 of them")
    expect(not close(4 + 8 / 64 + 32 / (64 * DQ_BLOCK)), "that is the figure for blocks of 64")
    expect(not close(4 + 8 / 128), "the second-level constants cost bits too: one fp32 per 256 first-level "
                                   "constants")
    expect(not close(8 / 128 + 32 / (128 * DQ_BLOCK)), "that is the constants' share alone: the 4-bit codes "
                                                       "cost 4 bits per weight on top")
    raise AssertionError(f"{bits_block128} is not it: 4 bits of code per weight, plus the first-level constants "
                         "(8 bits per block) and the second-level ones (32 bits per 256 constants), per weight")


def _reconstruction_error(w: torch.Tensor, grid: torch.Tensor, block: int = NF4_BLOCK) -> float:
    b = w.reshape(-1, block)
    m = b.abs().amax(1, keepdim=True)
    w_hat = grid[(b / m).unsqueeze(-1).sub(grid).abs().argmin(-1)] * m
    return ((b - w_hat).norm() / b.norm()).item()


def exercise_2(nf_levels) -> str:
    """nf_levels(k): k-bit NormalFloat with delta_k; NF4 for k = 4; then NF3 against int3."""
    four = _as_levels(nf_levels(4), "nf_levels(4)")
    _diagnose_levels(four, 4, "nf_levels(4)")
    expect(torch.allclose(four, NF4.double(), atol=1e-6), "nf_levels(4) is not NF4: for k = 4, delta_k is "
                                                          "bitsandbytes' 0.9677")
    three = _as_levels(nf_levels(3), "nf_levels(3)")
    _diagnose_levels(three, 3, "nf_levels(3)")
    expect(not torch.allclose(three, _reference_levels(3, NF4_OFFSET), atol=1e-6),
           "nf_levels(3) uses NF4's end point 0.9677: delta_k depends on k (the formula in the exercise)")
    expect(torch.allclose(three, _reference_levels(3, delta_k(3)), atol=1e-6),
           "nf_levels(3) has the right structure but other values: check delta_k for k = 3")
    expect(nf_levels(3).dtype == torch.float64, "return the levels as float64 (the exercise's convention)")
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    e_nf3, e_int3 = _reconstruction_error(w, three.float()), _reconstruction_error(w, torch.arange(-3, 4) / 3)
    return f"3 bits, blocks of 64: NF3 {e_nf3:.4f} vs int3 {e_int3:.4f} relative RMS error"
