"""Lab 08's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught, namespace, run_checks

LAB = "08_nf4_quantisation"
HALF = "half = 2 ** (k - 1)\n"
ABSMAX = "absmax = b.abs().amax(1)  "
PACK = "codes[0::2] << 4 | codes[1::2]"
UNPACK = "torch.stack([packed >> 4, packed & 0xF], dim=1)"
SCALE = "(NF4[codes] * absmax[:, None]).reshape(shape)"


def test_solution_passes_and_stubs_are_not_built():
    assert {it.status for it in run_checks(LAB, namespace(LAB)).values()} == {"passed"}
    shipped = run_checks(LAB, namespace(LAB, solution=False))
    assert {it.status for label, it in shipped.items()} == {"not built", "not done"}


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
    # exercises
    pytest.param([("bits_block128 = 4 + 8 / 128 + 32 / (128 * 256)", "bits_block128 = 4 + 32 / 128")],
                 "with fp32 constants", id="ex1-no-double-quant"),
    pytest.param([("bits_block128 = 4 + 8 / 128 + 32 / (128 * 256)", "bits_block128 = 4 + 8 / 64 + 32 / (64 * 256)")],
                 "blocks of 64", id="ex1-block-64"),
    pytest.param([("return normal_float_levels(k, delta)", "return normal_float_levels(k)")], "NF4's end point",
                 id="ex2-delta-of-nf4"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
