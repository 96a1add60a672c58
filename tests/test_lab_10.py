"""Lab 10's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "10_sparse_finetuning"


FORWARD = '''        moved = x[..., cols] * self.values                          # (..., k)
        delta = x.new_zeros(*x.shape[:-1], self.base.out_features)  # (..., out)
        return self.base(x) + delta.index_add(-1, rows, moved)      # (..., out)'''
DENSE_FORWARD = '''        dense = torch.zeros(self.base.weight.numel()).index_add(0, self.indices, self.values)
        return self.base(x) + x @ dense.view_as(self.base.weight).T'''


@pytest.mark.parametrize("plant, hint", [
    pytest.param([(FORWARD, DENSE_FORWARD)], "dense tensor of the weight's size", id="dense-delta-W"),
    pytest.param([("self.indices // n_in, self.indices % n_in",
                   "self.indices % self.base.out_features, self.indices // self.base.out_features")],
                 "wrong entries", id="scatter-column-major"),
    pytest.param([("self.indices // n_in, self.indices % n_in", "self.indices % n_in, self.indices // n_in")],
                 "out of range.*swapped", id="scatter-rows-columns-swapped"),
    pytest.param([("nn.Parameter(torch.zeros(len(indices)))",
                   "nn.Parameter(torch.zeros(len(indices)), requires_grad=False)")], "not trainable",
                 id="phi-frozen"),
    pytest.param([('self.register_buffer("indices", indices)', "self.indices = indices")], "buffer",
                 id="eta-not-a-buffer"),
    pytest.param([("nn.Parameter(torch.zeros(len(indices)))", "nn.Parameter(torch.full((len(indices),), 123.0))")],
                 "must start at zero", id="phi-init-123"),
    pytest.param([("delta.index_add(-1, rows, moved)", "delta.index_add(-1, rows, moved).detach()")],
                 "got no gradient", id="phi-detached"),
    pytest.param([("return (G[:, rows] * X[:, cols]).sum(0)", "return (G.T @ X).flatten()[indices]")],
                 "dense tensor of the weight's size", id="grad-dense-GtX"),
    pytest.param([("return (G[:, rows] * X[:, cols]).sum(0)", "return (G[:, rows] * X[:, cols]).mean(0)")],
                 "x the true one", id="grad-mean"),
    pytest.param([("rows, cols = indices // in_features, indices % in_features",
                   "rows, cols = indices % G.shape[1], indices // G.shape[1]")], "r_i = eta_i // in",
                 id="grad-wrong-index"),
    pytest.param([("rows, cols = indices // in_features, indices % in_features",
                   "cols, rows = indices // in_features, indices % in_features")], "out of range.*swapped",
                 id="grad-rows-columns-swapped"),
    pytest.param([("values.abs().topk(n, largest=False)", "values.abs().topk(n)")], "LARGEST", id="swap-largest"),
    pytest.param([("values.abs().topk(n, largest=False)", "values.topk(n, largest=False)")], "by sign",
                 id="swap-signed"),
    pytest.param([("indices[out], values[out] = grow, 0.0", "indices[out], values[out] = grow, 0.5")],
                 "phi = 0", id="swap-grown-not-zero"),
    pytest.param([("return indices[order], values[order]", "return indices[order], values")],
                 "does not follow", id="swap-phi-not-permuted"),
    pytest.param([("return indices[order], values[order]", "return indices, values")], "sorted",
                 id="swap-not-sorted"),
    pytest.param([("sm3_bytes = 4 * cfg_1b.n_layers", "sm3_bytes = cfg_1b.n_layers")], "entries",
                 id="ex1-entries-not-bytes"),
    pytest.param([("v_out = cfg_1b.n_kv_heads * cfg_1b.head_dim", "v_out = cfg_1b.n_heads * cfg_1b.head_dim")],
                 "is not it", id="ex1-v-width"),
    pytest.param([('    score[indices] = -float("inf")', "    pass")], "already in eta", id="ex2-grows-inside"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
