"""Checks of lab 10 (sparse fine-tuning): the student's sparse layer, dL/dphi by hand, one SpIEL swap, exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). The checks build their
own inputs and leave the notebook's random state as they found it. `_fresh_big_tensors` (private to this
lab) runs a piece of code under a torch dispatch mode and lists every tensor it creates with at least as
many entries as the weight: that is how a dense ΔW (or a dense G^T X) is caught, in forward or backward.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .. import peft
from ..adapters import apply_method
from ..llama import Llama, LlamaConfig
from ..methods import spiel
from ..methods.sparse_ft import SparseFTConfig, SparseLinear
from . import Wrong, check_build, expect, make_base


class _BigTensors(TorchDispatchMode):
    """Records (op, shape) of every tensor an op creates (not a view of an input) with >= `limit` entries."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.numel() >= self.limit
                    and t.untyped_storage().data_ptr() not in inputs):
                self.seen.append((str(func).removeprefix("aten.").removesuffix(".default"), tuple(t.shape)))
        return out


def _fresh_big_tensors(run, limit: int) -> list[tuple[str, tuple]]:
    with _BigTensors(limit) as mode:
        run()
    return mode.seen


N_IN, N_OUT, K = 256, 48, 100  # a non-square weight, so a swapped row/column shows


def _setup(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(N_IN, N_OUT, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(N_OUT, N_IN, generator=g) / math.sqrt(N_IN))
    base.requires_grad_(False)
    indices = torch.randperm(N_OUT * N_IN, generator=g)[:K].sort().values
    return base, indices


def _dense(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """scatter(eta, phi) as a dense (out, in) matrix: for the checks only."""
    return torch.zeros(N_OUT * N_IN).index_put((indices,), values).view(N_OUT, N_IN)


def _in_range(fn, *args):
    """fn(*args), with an index out of range turned into a hint (rows and columns swapped?)."""
    try:
        return fn(*args)
    except (IndexError, RuntimeError) as e:
        if "out of bounds" not in str(e) and "out of range" not in str(e):
            raise
        raise Wrong(f"an index is out of range ({e}): with an (out, in) weight, row r_i = eta_i // in is < out "
                    "and column c_i = eta_i % in is < in; rows index the output, columns the input "
                    "(swapped?)") from None


def _where_hint(probe: torch.Tensor, indices: torch.Tensor, what: str) -> str:
    found = set(torch.nonzero(probe.abs().flatten() > 1e-6).flatten().tolist())
    if found != set(indices.tolist()):
        return (f"{what} lands on the wrong entries ({len(found - set(indices.tolist()))} of {len(found)} off eta): "
                "flat position p of an (out, in) weight is row p // in, column p % in (row-major, as "
                "W.flatten() numbers them)")
    return f"{what} is on the right entries but has the wrong values: entry i adds phi_i * x[c_i] to output r_i"


def check_my_sparse_linear(MySparseLinear) -> str:
    """MySparseLinear(base, indices): base(x) + scatter(eta, phi) x, phi trainable from 0, never a dense ΔW."""
    base, indices = _setup()
    layer = MySparseLinear(base, indices.clone())
    values = getattr(layer, "values", None)
    expect(isinstance(values, torch.Tensor), "store phi as `self.values`, an nn.Parameter of k numbers")
    expect(isinstance(values, nn.Parameter) and values.requires_grad,
           "phi (`self.values`) is not trainable: make it an nn.Parameter (requires_grad stays True); phi is "
           "the one tensor of the method that trains")
    expect(tuple(values.shape) == (K,), f"phi has shape {tuple(values.shape)}; want one value per position of eta: ({K},)")
    buffers = dict(layer.named_buffers())
    expect("indices" in buffers and torch.equal(buffers["indices"], indices),
           "keep eta as a buffer, self.register_buffer('indices', indices): saved with the model, moved by "
           ".to(), never trained")
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    expect(trainable == ["values"], f"trainable tensors {trainable}: only phi trains (the base stays frozen)")
    expect(torch.count_nonzero(values) == 0,
           "phi must start at zero, so the layer starts as the base layer (W' = W + scatter(eta, 0) = W)")
    x = torch.randn(5, N_IN)
    expect(torch.equal(_in_range(layer, x), base(x)), "at init (phi = 0) the layer must return base(x) exactly")
    with torch.no_grad():
        values.copy_(torch.randn(K))
    y = layer(x)
    expect(tuple(y.shape) == (5, N_OUT), f"for x of shape (5, {N_IN}) the output has shape {tuple(y.shape)}, "
                                         f"want (5, {N_OUT})")
    with torch.no_grad():
        eye = torch.eye(N_IN)
        probe = (layer(eye) - base(eye)).T  # your scatter(eta, phi) as a matrix: (out, in)
    want = _dense(indices, values.detach())
    expect(torch.allclose(probe, want, atol=1e-5), _where_hint(probe, indices, "your update"))
    x3 = torch.randn(2, 3, N_IN)
    y3 = layer(x3)
    expect(tuple(y3.shape) == (2, 3, N_OUT) and torch.allclose(y3, base(x3) + x3 @ want.T, atol=1e-5),
           f"for x of shape (2, 3, {N_IN}) (batch, tokens, in) want (2, 3, {N_OUT}): index the last dimension "
           "(x[..., c_i]) and add into the last dimension of the output")
    x_grad = torch.randn(5, N_IN, requires_grad=True)

    def forward_backward():
        out = layer(x_grad)
        (out * torch.ones_like(out)).sum().backward()

    big = _fresh_big_tensors(forward_backward, N_OUT * N_IN)
    expect(not big, big and f"your layer builds a dense tensor of the weight's size ({big[0][0]} -> {big[0][1]}): "
                    "scatter(eta, phi) must never exist densely (memory O(k), not O(out x in)); gather the k input "
                    "columns x[..., c_i], scale them by phi and index_add them into the output columns r_i")
    expect(values.grad is not None and torch.count_nonzero(values.grad) > 0,
           "phi got no gradient through your forward (a .detach() or torch.no_grad() too many?)")
    # in a model, against minipeft's sparse_ft on the same eta (noise on phi): same logits, same gradients
    tiny = make_base(0)
    idx = torch.randint(0, tiny.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = ("v_proj", "down_proj")
    theirs = apply_method(copy.deepcopy(tiny), "sparse_ft", density=0.05, targets=targets)
    mine = copy.deepcopy(tiny)
    peft.inject(mine, targets, lambda name, linear: MySparseLinear(linear, theirs.get_submodule(name).indices.clone()))
    return check_build(mine, theirs, idx)


def check_phi_grad(my_phi_grad) -> str:
    """my_phi_grad(G, X, indices, in_features) -> dL/dphi (k,), = sparse_ft's, without the dense G^T X."""
    base, indices = _setup(1)
    g = torch.Generator().manual_seed(2)
    X, G = torch.randn(7, N_IN, generator=g), torch.randn(7, N_OUT, generator=g)
    layer = SparseLinear(base, SparseFTConfig(density=K / (N_IN * N_OUT)), torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.indices.copy_(indices)
    layer(X).backward(G)
    grad = None

    def run():
        nonlocal grad
        grad = _in_range(my_phi_grad, G, X, indices, N_IN)

    big = _fresh_big_tensors(run, N_OUT * N_IN)
    expect(not big, big and f"you formed a dense tensor of the weight's size ({big[0][0]} -> {big[0][1]}), G^T X or the "
                    "like: read only the k columns G[:, r_i] and X[:, c_i] (k products of columns, O(N k))")
    expect(isinstance(grad, torch.Tensor) and tuple(grad.shape) == (K,),
           f"return one number per entry of eta, shape ({K},); got "
           f"{tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    want = layer.values.grad
    if not torch.allclose(grad, want, rtol=1e-4, atol=1e-5):
        ratio = (grad * want).sum() / (want * want).sum()
        expect(not torch.allclose(grad, ratio * want, rtol=1e-4, atol=1e-5),
               f"your gradient is {ratio:.4g} x the true one: sum over the N rows (L sums them), no mean, no scale")
        expect(False, "your gradient differs from dL/dphi: entry i is sum_n G[n, r_i] X[n, c_i], with "
                      "r_i = eta_i // in (the output row) and c_i = eta_i % in (the input column)")
    return f"dL/dphi = sparse_ft's backward on {K} entries, no tensor of the weight's size formed"


def check_swap(my_swap) -> str:
    """my_swap(indices, values, grow, n) -> (new eta sorted, new phi): as spiel.swap under SpIEL-MA."""
    torch.manual_seed(0)
    base = nn.Linear(64, 32, bias=False)
    config = spiel.SpIELConfig(density=0.1, growth="momentum")
    m = spiel.SpIELLinear(base, config, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        m.values.copy_(torch.randn(len(m.values), generator=g))
        m.row_acc.copy_(torch.rand(32, generator=g))
        m.col_acc.copy_(torch.rand(64, generator=g))
    n = 20
    grow = spiel._grow_by_momentum(m, n)
    eta0, phi0 = m.indices.clone(), m.values.detach().clone()
    result = my_swap(eta0.clone(), phi0.clone(), grow.clone(), n)
    expect(isinstance(result, (tuple, list)) and len(result) == 2, "return two tensors: (new indices, new values)")
    eta, phi = (torch.as_tensor(t).detach() for t in result)
    spiel.swap(m, n)
    want_eta, want_phi = m.indices, m.values.detach()
    k = len(eta0)
    expect(len(eta) == k and len(phi) == k, f"k must stay {k}: got {len(eta)} positions and {len(phi)} values "
                                            "(drop n, grow n)")
    kept = set(eta.tolist()) & set(eta0.tolist())
    dropped = set(eta0.tolist()) - kept
    by_size = phi0.abs().argsort()
    smallest = set(eta0[by_size[:n]].tolist())
    signed = set(eta0[phi0.argsort()[:n]].tolist())
    if dropped != smallest:
        expect(dropped != set(eta0[by_size[-n:]].tolist()),
               "you dropped the entries with the LARGEST |phi|: drop the smallest, they moved least from the "
               "pretrained value (dropping them changes the function least)")
        expect(dropped != signed, "you dropped the smallest phi by sign (the most negative): rank by |phi|, a large "
                                  "negative change matters as much as a positive one")
        expect(False, f"the {n} dropped entries are not the {n} with the smallest |phi|")
    expect(set(eta.tolist()) == set(want_eta.tolist()), "the grown positions are not `grow`: put exactly those n "
                                                        "positions into the freed slots")
    expect(torch.equal(eta, eta.sort().values), "return eta sorted (sparse_ft's convention), with phi permuted "
                                                "the same way")
    if not torch.equal(phi, want_phi):
        expect(not torch.equal(phi.sort().values, want_phi.sort().values),
               "eta is right but phi does not follow it: after sorting eta, permute phi with the same order so "
               "that each value stays with its position")
        expect(torch.all(phi[torch.isin(eta, grow)] == 0),
               "a grown entry must start at phi = 0, so that growing does not change the function")
        expect(False, "the entries you keep must keep their phi (only the dropped ones go)")
    return f"the same eta and phi as spiel.swap ({n} of {k} entries swapped)"


def exercise_1(sm3_bytes) -> str:
    """SM3's accumulators (fp32) for SpIEL-MA on q_proj and v_proj of Llama-3.2-1B, in bytes."""
    with torch.device("meta"):
        model = apply_method(Llama(LlamaConfig.from_name("llama-3.2-1b")), "spiel", density=0.001,
                             targets=("q_proj", "v_proj"), growth="momentum")
    want = 4 * sum(m.row_acc.numel() + m.col_acc.numel() for m in model.modules()
                   if isinstance(m, spiel.SpIELLinear))
    expect(isinstance(sm3_bytes, (int, float)), f"give a number of bytes, got {type(sm3_bytes).__name__}")
    expect(sm3_bytes != want // 4, f"{sm3_bytes:,} counts the accumulators' entries: each is an fp32 (4 bytes)")
    expect(sm3_bytes == want, f"{sm3_bytes:,} is not it: one accumulator per row (out) and one per column (in) of "
                              "each targeted weight, not per entry; q_proj and v_proj differ in their out")
    return f"SM3 accumulators: {want:,} bytes"


def exercise_2(grow_by_momentum) -> str:
    """grow_by_momentum(row_acc, col_acc, indices, n): the n positions outside eta with the largest row_i col_j."""
    model = apply_method(make_base(0), "spiel", density=0.05, targets=("up_proj",), growth="momentum", chunk=256)
    m = model.layers[0].mlp.up_proj
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        m.row_acc.copy_(torch.rand(m.row_acc.shape, generator=g))
        m.col_acc.copy_(torch.rand(m.col_acc.shape, generator=g))
    mine = grow_by_momentum(m.row_acc.clone(), m.col_acc.clone(), m.indices.clone(), 25)
    expect(isinstance(mine, torch.Tensor) and mine.numel() == 25,
           f"return the 25 flat positions as a tensor; got {mine if not isinstance(mine, torch.Tensor) else mine.shape}")
    mine = mine.flatten().long()
    expect(not torch.isin(mine, m.indices).any(), "some positions you grow are already in eta: score them -inf "
                                                  "before taking the top n")
    want = spiel._grow_by_momentum(m, 25)
    expect(torch.equal(mine.sort().values, want.sort().values),
           "not the n largest row_acc[i] * col_acc[j] outside eta: the score of flat position p is row_acc[p // in] "
           "* col_acc[p % in] (an outer product, flattened row-major)")
    return "the same 25 positions as minipeft's block-by-block search"
