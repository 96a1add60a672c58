"""Lab 08's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "08_nf4_quantisation"
HALF = "half = 2 ** (k - 1)\n"
ABSMAX = "absmax = b.abs().amax(1)  "
PACK = "codes[0::2] << 4 | codes[1::2]"
UNPACK = "torch.stack([packed >> 4, packed & 0xF], dim=1)"
SCALE = "(NF4[codes] * absmax[:, None]).reshape(shape)"
O = "outlier = (x.abs() >= threshold).any(0) "
REST = "rest = x.masked_fill(outlier, 0.0) "
CX = "c_x = rest.abs().amax(1) "
CW = "c_w = w.abs().amax(1) "
XQ = "x_q = torch.round(127 * rest / c_x[:, None])"
DEQ = "torch.outer(c_x, c_w).double() / 127**2"


@pytest.mark.parametrize("plant, hint", [
    # build 1: the levels
    pytest.param([("levels = torch.cat([negative, zero, positive]).sort().values",
                   "levels = Q(torch.linspace(1 - delta, delta, 2 * half, dtype=f64))")],
                 "symmetric and has no exact 0", id="levels-symmetric-no-zero"),
    pytest.param([("-Q(torch.linspace(delta, 0.5, half, dtype=f64)", "-Q(torch.linspace(delta, 0.5, half + 1, dtype=f64)"),
                  ("positive = Q(torch.linspace(delta, 0.5, half + 1,", "positive = Q(torch.linspace(delta, 0.5, half,")],
                 "the other way round", id="levels-halves-swapped"),
    pytest.param([("return levels / levels.max()", "return levels")], "want 1: divide by the largest",
                 id="levels-not-normalised"),
    pytest.param([("dtype=f64)[:-1])   # 8 levels", "dtype=f64))   # 8 levels")], "share ONE zero",
                 id="levels-two-zeros"),
    pytest.param([(HALF, HALF + "    delta = NF4_OFFSET\n")], "delta is ignored", id="levels-delta-ignored"),
    pytest.param([(HALF, HALF + "    delta = 1.0\n")], "inf or nan", id="levels-infinite-ends"),
    pytest.param([(HALF, "half = 8\n")], "k is ignored", id="levels-k-ignored"),
    # build 2: quantise and pack
    pytest.param([(ABSMAX, "absmax = w.abs().max()  "), ("(b / absmax[:, None])", "(b / absmax)")],
                 "one absmax for the whole tensor", id="absmax-per-tensor"),
    pytest.param([(ABSMAX, "absmax = w.abs().max().expand(b.shape[0])  ")], "the largest \\|w\\| of the whole tensor",
                 id="absmax-per-tensor-repeated"),
    pytest.param([(ABSMAX, "absmax = b.amax(1)  ")], "the largest w of each block, not the largest \\|w\\|",
                 id="absmax-signed"),
    pytest.param([(PACK, "codes[1::2] << 4 | codes[0::2]")], "wrong order", id="pack-order"),
    pytest.param([(PACK + ", absmax", "codes, absmax")], "two 4-bit codes per byte", id="not-packed"),
    pytest.param([(".sub(NF4).abs()", ".sub(torch.linspace(-1, 1, 16)).abs()")], "nearest NF4 level",
                 id="codes-uniform-grid"),
    pytest.param([("b = w.reshape(-1, block)  ", "b = w.reshape(-1, 64)  ")], "block is ignored",
                 id="quantize-block-ignored"),
    pytest.param([("b = w.reshape(-1, block)  ", "b = w.T.reshape(-1, block)  ")], "down the columns",
                 id="blocks-down-columns"),
    # build 3: unpack and scale
    pytest.param([(UNPACK, "torch.stack([packed & 0xF, packed >> 4], dim=1)")], "unpacked in the wrong order",
                 id="unpack-order"),
    pytest.param([(SCALE, "(NF4[codes] * absmax.max()).reshape(shape)")], "its own constant",
                 id="dequantize-per-tensor"),
    pytest.param([(SCALE, "NF4[codes].reshape(shape)")], "levels alone", id="dequantize-no-absmax"),
    pytest.param([("codes = codes.reshape(-1, block).long()", "codes = codes.reshape(-1, 64).long()")],
                 "block used", id="dequantize-block-ignored"),
    # build 4: LLM.int8()'s decomposition
    pytest.param([(O, "outlier = (x.abs() >= threshold).any(1) "),
                  ("x[:, outlier] @ w[:, outlier].T", "(x * outlier[:, None]) @ w.T"),
                  (REST, "rest = x.masked_fill(outlier[:, None], 0.0) ")],
                 "wrong axis", id="llm-int8-outlier-rows"),
    pytest.param([(O, "outlier = (x.abs() >= threshold).any(1) "),
                  ("x[:, outlier] @ w[:, outlier].T", "(x * outlier[:, None]) @ w.T"),
                  (REST, "rest = x.masked_fill(outlier[:, None], 0.0) "),
                  (CX, "c_x = rest.abs().amax(1).clamp_min(1e-9) ")],
                 "wrong axis", id="llm-int8-outlier-rows-clamped"),
    pytest.param([(O, "outlier = (x.abs() > threshold).any(0) ")], "exactly at the threshold", id="llm-int8-strict"),
    pytest.param([(O, "outlier = (x.abs() >= 6.0).any(0) ")], "threshold is ignored", id="llm-int8-threshold-ignored"),
    pytest.param([(REST, "rest = x ")], "counted twice", id="llm-int8-outliers-in-int8-too"),
    pytest.param([(REST, "rest = x "), ("x[:, outlier] @ w[:, outlier].T + ", "")], "no decomposition",
                 id="llm-int8-no-decomposition"),
    pytest.param([(CX, "c_x = x.abs().amax(1) ")], "row absmax of x includes the outlier",
                 id="llm-int8-absmax-with-outliers"),
    pytest.param([(CX, "c_x = rest.abs().max().expand(x.shape[0]) ")], "one scale for all of x",
                 id="llm-int8-x-per-tensor"),
    pytest.param([(CW, "c_w = w.abs().max().expand(w.shape[0]) ")], "one scale for all of w",
                 id="llm-int8-w-per-tensor"),
    pytest.param([(DEQ, "torch.outer(c_x, c_w).double()")], "not divided by 127\\^2", id="llm-int8-no-127-squared"),
    pytest.param([(DEQ, "torch.outer(c_x, c_w).double() / 127")], "divided by 127, not 127\\^2",
                 id="llm-int8-127-once"),
    pytest.param([(XQ, "x_q = (127 * rest / c_x[:, None]).trunc()")], "truncated", id="llm-int8-truncated"),
    # exercises
    pytest.param([("bits_block128 = 4 + 8 / 128 + 32 / (128 * 256)", "bits_block128 = 4 + 32 / 128")],
                 "with fp32 constants", id="ex1-no-double-quant"),
    pytest.param([("bits_block128 = 4 + 8 / 128 + 32 / (128 * 256)", "bits_block128 = 4 + 8 / 64 + 32 / (64 * 256)")],
                 "blocks of 64", id="ex1-block-64"),
    pytest.param([("return normal_float_levels(k, delta)", "return normal_float_levels(k)")], "NF4's end point",
                 id="ex2-delta-of-nf4"),
    pytest.param([("math.erf(60 / 254 / math.sqrt(2))", "math.erf(60 / 127 / math.sqrt(2))")], "one whole step",
                 id="ex3-whole-step"),
    pytest.param([("math.erf(60 / 254 / math.sqrt(2))", "1 - math.erf(60 / 254 / math.sqrt(2))")], "does NOT round",
                 id="ex3-complement"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
