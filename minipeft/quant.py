"""A frozen 4-bit NF4 or 8-bit base under LoRA: QLoRA's NF4 and LLM.int8(), from scratch, in torch only.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314):

  * NormalFloat (NF4), eq. 4: the 2^k levels are midpoints of quantiles of N(0, 1),
        q_i = 1/2 (Q_X(i / (2^k + 1)) + Q_X((i + 1) / (2^k + 1))),
    built asymmetrically so that zero is exact: 2^(k-1) levels for the negative half and 2^(k-1) + 1
    for the positive half, the two zeros merged into one; then divided by the largest so they span
    [-1, 1]. The quantile endpoints sit at `NF4_OFFSET` instead of 0 and 1 (whose quantiles are
    infinite), as in bitsandbytes' `create_normal_map`; `nf4_levels()` reproduces bitsandbytes'
    published 16 values to 1e-7 (tests/test_quant.py).
  * Block-wise absmax: each block of 64 weights is divided by its largest |w| (its "constant") and
    each value is stored as the index of the nearest level: 4 bits, two per byte.
  * Double quantisation: the fp32 constants (32 bits / 64 weights = 0.5 bits per weight) are
    themselves quantised, minus their mean, to 8 bits in blocks of 256 with an fp32 constant each:
    8/64 + 32/(64 * 256) = 0.127 bits per weight (the paper's figure). The paper quantises them to
    FP8; here a plain int8 absmax code (the constants are positive and smooth, so the difference is
    small; measured in README). Where it is not small: one block far larger than the rest sets the
    int8 step of the 255 other constants in its group of 256, which then round to about the mean.
    Measured (tests/test_reliability_io.py, a 1024 x 1024 N(0, 0.02) weight, one block of 64 scaled
    x1000): those 255 blocks' relative RMS error goes from 0.091 to 0.193 (2.1x; 4.5x the squared
    error; x100: 1.9x, x10: 1.03x); the outlier block, every other group, and NF4 without double
    quantisation are unchanged. FP8's exponent would keep their relative precision; an outlier that
    large is rare in trained weights and costs one group, 256 x 64 = 16,384 weights.
  * Compute: the base stays frozen; forward dequantises the weight to the compute dtype (bf16) on
    the fly, and backward dequantises it again instead of keeping it (`_DequantLinearFn`), so the
    dense weight lives only for one matmul at a time.

Two 8-bit bases share one storage, bitsandbytes' `Linear8bitLt` with `has_fp16_weights=False`: int8
codes with one absmax scale per output row (vector-wise, the same codes and scales as bitsandbytes').

  * `Int8Linear` ("int8"): weight-only. Forward dequantises W to the compute dtype; the activations are
    not quantised and there is no outlier split. A baseline, not LLM.int8().
  * `LLMInt8Linear` ("llm_int8"): LLM.int8() (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix
    Multiplication for Transformers at Scale", arXiv:2208.07339, section 3). Per forward, the outlier
    feature dimensions O = {h : |X_sh| >= alpha for some row s} (alpha = 6.0, as the paper and
    bitsandbytes) are computed in the compute dtype, the rest as an int8 x int8 product with
    vector-wise scales, int32 accumulation (`torch._int_mm`), dequantised by the outer product:
        X W^T  ~=  X[:, O] W[:, O]^T  +  (c_x c_w^T / 127^2) * (Xq[:, ~O] Wq[:, ~O]^T)     (sec. 3.2, 3.3)
    with c_x the row-wise absmax of X[:, ~O], c_w the absmax of each output row of W, Xq = round(127 X / c_x).
    W[:, O] is the dequantised int8 columns (no fp16 copy is kept, as `has_fp16_weights=False`).
    Backward: the gradient w.r.t. the input is grad_y @ W with W dequantised, as bitsandbytes' does (a
    straight-through estimate through the activation rounding; the base itself gets no gradient).
    One detail differs from bitsandbytes 0.50: it zeroes only the entries >= alpha before the row absmax,
    so a sub-threshold value of an outlier column still sets c_x; here c_x is the absmax of X[:, ~O]
    (measured against its CPU Linear8bitLt in docs/performance.md, `bench_quant.py --sections bitsandbytes`).

Every kind is an nn.Linear subclass whose `weight` is a read-only dequantised view, so every
Linear-wrapper method (LoRA, DoRA, (IA)^3, ...) wraps it unchanged; merging into it is refused
(peft.merge), as there is no 4/8-bit weight to add B A to: dequantise with `dequantize_model` first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NF4_OFFSET = 0.9677083  # (1 - 1/(2*15) + 1 - 1/(2*16)) / 2: bitsandbytes' endpoint for the 4-bit quantiles
NF4_BLOCK = 64          # weights per absmax constant (QLoRA)
DQ_BLOCK = 256          # constants per second-level constant (double quantisation)


def nf4_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels (fp32, ascending, exactly one 0, min -1, max 1), eq. 4 of arXiv:2305.14314."""
    ppf = lambda p: torch.special.ndtri(p)  # noqa: E731  the quantile function Q_X of N(0, 1)
    positive = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])    # 8 levels > 0
    negative = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])   # 7 levels < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


NF4 = nf4_levels()


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    flat = w.reshape(-1)
    if flat.numel() % block:
        raise ValueError(f"quantize: {flat.numel()} values is not a multiple of the block size {block}")
    return flat.view(-1, block)  # (n_blocks, block)


def quantize_absmax_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes round(127 x / absmax) per block of `block` values, and the fp32 absmax per block."""
    b = _blocks(x.float(), block)
    scale = b.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (n_blocks,)
    return torch.round(b * (127 / scale[:, None])).to(torch.int8), scale


def quantize_nf4(w: torch.Tensor, block: int = NF4_BLOCK, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """w -> {"codes": uint8 (numel/2,) two 4-bit level indices per byte, and the constants}:
    without double quantisation "absmax" fp32 (numel/block,); with it "absmax_q" int8, "absmax_scale"
    fp32 (one per DQ_BLOCK constants) and "absmax_mean" fp32 ()."""
    b = _blocks(w.detach().float(), block)
    absmax = b.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (n_blocks,)
    normed = b / absmax[:, None]                                             # in [-1, 1]
    levels = NF4.to(w.device)
    codes = torch.bucketize(normed, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).view(-1)  # nearest level
    out = {"codes": codes[0::2] << 4 | codes[1::2]}                          # (numel / 2,) uint8
    if not double_quant:
        return dict(out, absmax=absmax)
    mean = absmax.mean()
    centred = F.pad(absmax - mean, (0, -absmax.numel() % DQ_BLOCK))  # a last partial block padded with 0
    q, scale = quantize_absmax_int8(centred, DQ_BLOCK)
    return dict(out, absmax_q=q.view(-1)[:absmax.numel()], absmax_scale=scale, absmax_mean=mean)


def dequantize_nf4(state: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype = torch.float32,
                   block: int = NF4_BLOCK, levels: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of quantize_nf4 (up to the rounding): a (shape) tensor of `dtype`. `levels`: the NF4
    table already on the codes' device (NF4Linear's buffer); None copies `NF4` there (a host-to-device
    copy per call on a GPU)."""
    if "absmax" in state:
        absmax = state["absmax"]
    else:
        q = state["absmax_q"].float()
        scale = state["absmax_scale"].repeat_interleave(DQ_BLOCK)[:q.numel()]  # each constant's own scale
        absmax = q * (scale / 127) + state["absmax_mean"]
    packed = state["codes"]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1, block).long()  # (n_blocks, block)
    levels = NF4.to(packed.device) if levels is None else levels.float()
    w = levels[codes] * absmax[:, None]
    return w.view(shape).to(dtype)


class _DequantLinearFn(torch.autograd.Function):
    """y = layer.product(x) ~= x W^T; backward dequantises W again instead of keeping it, so that autograd
    keeps the small quantised state, not the dense weight (QLoRA's memory saving needs this: plain
    F.linear would keep every layer's dequantised W alive until backward)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.product(x)

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.layer.dequantize(grad_y.dtype)
        return grad_y @ w, None  # the base is frozen: no weight gradient


class QuantLinear(nn.Linear):
    """Shared by NF4Linear and Int8Linear: a frozen, bias-free Linear stored quantised. `weight` is a
    read-only dequantised copy (in `dtype`, the original weight's) so wrappers that read it still work."""
    quantized = True

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no dense weight Parameter is ever allocated
        if linear.bias is not None:
            raise ValueError("quantize: Linear layers with a bias are not supported (Llama has none)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantize(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _DequantLinearFn.apply(x, self)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T in x's dtype, W dequantised to it (weight-only quantisation)."""
        return F.linear(x, self.dequantize(x.dtype))

    def nbytes(self) -> int:
        """Bytes of the stored weight and its constants (the state dict: not NF4's shared table)."""
        return sum(b.numel() * b.element_size() for b in self.state_dict().values())


class NF4Linear(QuantLinear):
    """A frozen NF4 Linear (block 64, double-quantised constants)."""

    def __init__(self, linear: nn.Linear, double_quant: bool = True):
        super().__init__(linear)
        for k, v in quantize_nf4(linear.weight, double_quant=double_quant).items():
            self.register_buffer(k, v)
        # the 16 levels as a buffer: .to(device) moves them once, instead of a host-to-device copy
        # at every dequantise (2 per layer and step: 224 per step of Llama-3.2-1B on a GPU)
        self.register_buffer("levels", NF4.to(linear.weight.device), persistent=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        state = {k: b for k, b in self.named_buffers() if k != "levels"}
        return dequantize_nf4(state, torch.Size((self.out_features, self.in_features)), dtype,
                              levels=self.levels)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, block={NF4_BLOCK}"


class Int8Linear(QuantLinear):
    """A frozen int8 Linear, weight-only: one absmax scale per output row (Linear8bitLt's storage), W
    dequantised to the compute dtype per matmul; activations unquantised, no outlier split."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        q, scale = quantize_absmax_int8(linear.weight.detach(), linear.in_features)
        self.register_buffer("codes", q)        # (out, in) int8
        self.register_buffer("row_scale", scale)  # (out,) fp32

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes.float() * (self.row_scale[:, None] / 127)).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 row-wise"


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (n, k) int8 @ b (m, k)^T int8 -> (n, m) int32, exactly: torch._int_mm where it takes the shapes
    (its CUDA kernel has size and alignment rules), else in fp64, exact while 127^2 k < 2^53."""
    try:
        return torch._int_mm(a, b.t())
    except (RuntimeError, AttributeError):
        return (a.double() @ b.double().t()).to(torch.int32)


def llm_int8_matmul(x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor,
                    threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8()'s x W^T (arXiv:2208.07339, sec. 3.2-3.3) for W = codes * row_scale / 127: the outlier
    feature dimensions of x (a |value| >= threshold in any row) in x's dtype, the rest int8 x int8."""
    x2 = x.reshape(-1, x.shape[-1])                                     # (n, in)
    outlier = (x2.abs() >= threshold).any(0)                            # (in,) the set O of sec. 3.3
    rest = x2.float().masked_fill(outlier, 0.0)                         # X[:, ~O]
    c_x = rest.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)  # (n,) row-wise absmax
    xq = torch.round(rest * (127 / c_x[:, None])).to(torch.int8)       # (n, in), zero on O
    y = int8_matmul(xq, codes).float() * (c_x[:, None] * row_scale[None, :] / 127**2)  # (n, out)
    if outlier.any():  # the decomposition: X[:, O] W[:, O]^T in the compute dtype
        w_o = (codes[:, outlier].float() * (row_scale[:, None] / 127)).to(x.dtype)  # (out, |O|)
        y = y + x2[:, outlier] @ w_o.t()
    return y.to(x.dtype).view(*x.shape[:-1], codes.shape[0])


class LLMInt8Linear(Int8Linear):
    """LLM.int8() on Int8Linear's storage: forward is the mixed-precision decomposition (llm_int8_matmul),
    backward the input gradient through the dequantised W (as bitsandbytes' MatMul8bitLt). threshold=inf:
    no decomposition (every feature int8: plain vector-wise int8 of W and X)."""

    def __init__(self, linear: nn.Linear, threshold: float = 6.0):
        super().__init__(linear)
        self.threshold = threshold

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return llm_int8_matmul(x, self.codes, self.row_scale, self.threshold)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", LLM.int8() threshold={self.threshold}"


QUANTIZERS = {"nf4": NF4Linear, "int8": Int8Linear, "llm_int8": LLMInt8Linear}


def quantize_model(model: nn.Module, kind: str = "nf4") -> list[str]:
    """Replace every nn.Linear of the decoder blocks (not lm_head, which may be tied to the embedding,
    nor anything a PEFT method added) by its frozen quantised form; returns the names replaced."""
    if kind not in QUANTIZERS:
        raise ValueError(f"quantize: unknown kind {kind!r}; choose one of {sorted(QUANTIZERS)}")
    if any(hasattr(m, "peft_method") for m in model.modules()):
        raise ValueError("quantize: the model already carries PEFT modules; quantise the base first, "
                         "then apply the method (as QLoRA does)")
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("layers.")]
    for name in names:  # every layer checked before any is replaced: never a half-quantised model
        check_quantizable(name, model.get_submodule(name), kind)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, QUANTIZERS[kind](getattr(owner, child)))
    return names


def check_quantizable(name: str, linear: nn.Linear, kind: str) -> None:
    """What the quantised Linear layers need of a Linear, refused naming the layer: no bias, a floating
    weight, and (nf4) a whole number of blocks."""
    if linear.bias is not None:
        raise ValueError(f"quantize: {name} has a bias; quantised Linear layers have none (Llama's have none)")
    if not linear.weight.is_floating_point():
        raise ValueError(f"quantize: {name} has a {linear.weight.dtype} weight; expected a floating-point one")
    if kind == "nf4" and linear.weight.numel() % NF4_BLOCK:
        raise ValueError(f"quantize: {name}: its weight {tuple(linear.weight.shape)} has {linear.weight.numel()} "
                         f"values, not a multiple of the NF4 block size {NF4_BLOCK}; nothing was quantised")


def dequantize_model(model: nn.Module) -> list[str]:
    """Put plain nn.Linear modules (in the original dtype) back for every QuantLinear: the bf16 model
    to merge adapters into and save (it carries the quantisation error, not the original weights)."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner, q = model.get_submodule(parent), model.get_submodule(name)
        plain = nn.Linear(q.in_features, q.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(q.weight, requires_grad=False)
        setattr(owner, child, plain)
    return names
