"""Checks of lab 08 (NF4, QLoRA's 4-bit NormalFloat; LLM.int8()): the NormalFloat levels, block-wise absmax
quantisation packed two codes per byte and its inverse, LLM.int8()'s mixed-precision decomposition, exercises
(bits per weight, k-bit NormalFloat, what row-wise int8 rounds to zero next to an outlier).

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). The weights they
quantise are their own: normal draws whose blocks have different scales (so one absmax per tensor shows)
and whose largest |w| is sometimes negative (so max(w) instead of max |w| shows). LLM.int8()'s inputs
have outlier feature dimensions that are below the threshold in some rows, one value exactly at it, and
no value near a rounding tie (so any correct order of operations gives the same int8 codes).
"""
from __future__ import annotations

import math

import torch

from ..quant import DQ_BLOCK, NF4, NF4_BLOCK, NF4_OFFSET, LLMInt8Linear, dequantize_nf4, quantize_nf4
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


# ----------------------------------------------------------------------------- LLM.int8()

def _grid_weight(out: int, d: int, seed: int) -> torch.Tensor:
    """A weight already on the int8 row-wise grid: codes times a power of two per row (2^-9 .. 2^-12), each
    row's absmax at code 127, so that 127 w / c_w gives the codes back exactly and the dequantised columns
    are w itself."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-126, 127, (out, d), generator=g)
    codes[:, 0] = 127
    return codes.float() * 2.0 ** -torch.randint(9, 13, (out, 1), generator=g).float()


def _activations(outliers: bool, threshold: float = 6.0, seed: int = 0, medium: float = 0.0) -> torch.Tensor:
    """(48, 96) N(0, 1) values; with outliers, feature dimensions 5, 40, 77 at ~2.5 x threshold (below it in
    rows 0-3, where they still exceed the rest of the row), one value exactly at the threshold, and
    feature 20 at +-`medium` (an outlier at 6 but not at 20). Every 127 x / (row absmax of the non-outlier
    features) is kept >= 0.05 from a rounding tie."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 96, generator=g).clamp(-0.95 * threshold, 0.95 * threshold)
    if outliers:
        x[:, [5, 40, 77]] = torch.randn(48, 3, generator=g) * 2.5 * threshold
        x[:4, [5, 40, 77]] = torch.tensor([0.75, -0.83, 0.92]) * threshold
        x[10, 60] = threshold
        x[:, 20] += medium * torch.sign(x[:, 20])
    big = (x.abs() >= threshold).any(0)
    c = x.masked_fill(big, 0).abs().amax(1, keepdim=True)
    q = 127 * x / c
    off = q - q.floor() - 0.5                                   # distance to the tie at floor + 1/2
    nudged = torch.where(off.abs() < 0.05, q.floor() + 0.5 + 0.05 * torch.where(off < 0, -1.0, 1.0), q)
    return torch.where(big, x, nudged * c / 127)


def _reference(x, w, threshold=6.0, rows=False, split=True, twice=False, absmax_of_all=False, strict=False,
               x_per_tensor=False, w_per_tensor=False, divide=127 ** 2, rnd=torch.round) -> torch.Tensor:
    """LLM.int8() in float64, with the typical mistakes as switches (the check's diagnoses)."""
    x, w = x.double(), w.double()
    big = (x.abs() > threshold) if strict else (x.abs() >= threshold)
    if rows:  # outlier tokens in full precision, the other rows int8 (the threshold on the wrong axis)
        y = _reference(x, w, float("inf"))
        y[big.any(1)] = x[big.any(1)] @ w.T
        return y
    cols = big.any(0) if split else torch.zeros(x.shape[1], dtype=torch.bool)
    rest = x if twice else x.masked_fill(cols, 0)
    c_x = (x if absmax_of_all else rest).abs().amax(1, keepdim=True)             # (n, 1)
    c_w = w.abs().amax(1, keepdim=True)                                          # (o, 1)
    c_x = c_x.max().expand_as(c_x) if x_per_tensor else c_x
    c_w = c_w.max().expand_as(c_w) if w_per_tensor else c_w
    x_q, w_q = rnd(127 * rest / c_x), rnd(127 * w / c_w)
    return x[:, cols] @ w[:, cols].T + (x_q @ w_q.T) * (c_x @ c_w.T) / divide


MISTAKES = [  # (switches, hint): the first that matches a wrong build is named
    (dict(rows=True), "the threshold is on the wrong axis: O is a set of feature dimensions (columns of x, "
                      "any row over the threshold), not of tokens (rows)"),
    (dict(split=False), "no decomposition: the outlier columns went through int8 with the rest (their rows' "
                        "absmax then coarsens every other value); compute x[:, O] w[:, O]^T apart, in full precision"),
    (dict(twice=True), "the outlier columns are counted twice: in the full-precision part AND in the int8 "
                       "product; zero them in x before the int8 quantisation"),
    (dict(absmax_of_all=True), "the row absmax of x includes the outlier columns: take it over what goes "
                               "through int8 (x with the outlier columns zeroed)"),
    (dict(x_per_tensor=True), "one scale for all of x (per tensor): vector-wise quantisation keeps one absmax "
                              "per row of x (per token)"),
    (dict(w_per_tensor=True), "one scale for all of w (per tensor): vector-wise quantisation keeps one absmax "
                              "per output (row of w, the paper's column of W)"),
    (dict(x_per_tensor=True, w_per_tensor=True), "one scale per tensor for x and w: vector-wise quantisation "
                                                 "keeps one absmax per row of x and one per row of w"),
    (dict(divide=1), "the int8 product is not divided by 127^2: each factor's codes are 127 x / c, so "
                     "dequantising is c_x c_w^T / (127 * 127)"),
    (dict(divide=127), "the int8 product is divided by 127, not 127^2: both factors were scaled by 127"),
    (dict(strict=True), "a value exactly at the threshold is not an outlier in your build: O takes |x| >= "
                        "threshold (the paper's alpha, bitsandbytes' test)"),
    (dict(rnd=torch.trunc), "the codes are truncated toward 0: round 127 x / c to the nearest integer"),
]


def _diagnose(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, threshold: float, what: str) -> None:
    want = LLMInt8Linear(_linear(w), threshold)(x).double()
    expect(isinstance(got, torch.Tensor), f"{what}: return a tensor, got {type(got).__name__}")
    expect(tuple(got.shape) == tuple(want.shape), f"{what}: the result has shape {tuple(got.shape)}, want "
                                                  f"(tokens, outputs) = {tuple(want.shape)} (x @ w.T)")
    got, tol = got.detach().double(), 1e-4 * want.abs().max().item()
    expect(bool(torch.isfinite(got).all()), f"{what}: the result has NaN or inf: a scale of 0 (0 / 0)? Only the "
                                            "outlier feature dimensions (columns of x) leave the int8 part, never "
                                            "whole tokens (rows): is the threshold on the wrong axis?")
    if (got - want).abs().max() <= tol:
        return
    for switches, hint in MISTAKES:  # a wrong build matches its mistake up to a few codes rounded otherwise
        mistake = _reference(x, w, threshold, **switches)
        if (got - mistake).abs().max() <= max(tol, 0.1 * (mistake - want).abs().max().item()):
            raise AssertionError(f"{what}: {hint}")
    fp = x.double() @ w.double().T
    expect((got - fp).abs().max() > tol, f"{what}: the result is x @ w.T in full precision: quantise the "
                                         "non-outlier part of x and w to int8 codes")
    raise AssertionError(f"{what}: differs from LLM.int8() by up to {(got - want).abs().max().item():.2e} "
                         f"(largest |y| {want.abs().max().item():.2f})")


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    return lin


def check_llm_int8(my_llm_int8) -> str:
    """my_llm_int8(x (n, h), w (o, h), threshold=6.0) -> (n, o): LLM.int8() = LLMInt8Linear's forward."""
    w = _grid_weight(32, 96, seed=1)
    _diagnose(my_llm_int8(_activations(False), w), _activations(False), w, 6.0, "without outliers")
    x = _activations(True)
    _diagnose(my_llm_int8(x, w), x, w, 6.0, "with outlier features")
    x20 = _activations(True, threshold=20.0, seed=1, medium=10.0)
    try:
        got = my_llm_int8(x20, w, 20.0)
    except TypeError as e:
        raise AssertionError(f"my_llm_int8(x, w, 20.0) raised TypeError: {e} (take the threshold as the third "
                             "argument)") from None
    at_6 = _reference(x20, w, 6.0)
    expect(not isinstance(got, torch.Tensor) or got.shape != at_6.shape
           or (got.double() - at_6).abs().max() > 0.1 * (at_6 - _reference(x20, w, 20.0)).abs().max(),
           "with threshold = 20 you give the result for 6: the argument threshold is ignored")
    _diagnose(got, x20, w, 20.0, "with threshold = 20")
    n_out = int((x.abs() >= 6).any(0).sum())
    return (f"= LLMInt8Linear without outliers (plain vector-wise int8) and with {n_out} outlier features of "
            f"{x.shape[1]}, and at threshold 20")


def exercise_3(rounded_to_zero) -> str:
    """The share of N(0, 1) values that row-wise int8 rounds to 0 when the row's absmax is an outlier of 60."""
    expect(isinstance(rounded_to_zero, (int, float)), f"give a number, got {type(rounded_to_zero).__name__}")
    expect(0 <= rounded_to_zero <= 1, f"{rounded_to_zero} is not a fraction between 0 and 1 (a percentage?)")
    share = lambda half_width: math.erf(half_width / math.sqrt(2))  # noqa: E731  P(|z| < half_width)
    want, tol = share(0.5 * 60 / 127), 0.015
    if abs(rounded_to_zero - want) < tol:
        return (f"{want:.3f} of the row rounds to code 0 (step 60/127 = {60 / 127:.3f}); with the outlier "
                f"apart, the absmax of 4095 N(0, 1) draws (~3.5) gives {share(0.5 * 3.5 / 127):.3f}")
    expect(abs(rounded_to_zero - share(60 / 127)) > tol, "that is the share within one whole step of 0: a value "
                                                         "rounds to code 0 when |127 x / c| < 1/2")
    expect(abs(rounded_to_zero - (1 - want)) > tol, "that is the share that does NOT round to 0")
    expect(abs(rounded_to_zero - share(0.5 * 60 / 127) / 2) > tol, "count both signs: |x| < c / 254")
    raise AssertionError(f"{rounded_to_zero} is not it: a value x rounds to code 0 when |127 x / 60| < 1/2; "
                         "what share of N(0, 1) is that?")
