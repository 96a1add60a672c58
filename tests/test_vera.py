"""VeRA (arXiv:2310.11454) as Tied-LoRA with trainable="vu": the update Λ_b B Λ_d A by hand, the
init, and what differs (documented in minipeft/methods/tied_lora.py)."""

import torch

from minipeft import peft
from minipeft.adapters import apply_method
from helpers import tiny

IDX = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))


def vu_model(r=4, alpha=0.4):
    m = tiny()
    apply_method(m, "tied_lora", r=r, alpha=alpha, trainable="vu", targets=("q_proj", "v_proj"))
    return m


def test_vu_is_veras_update_with_b_v_and_d_su():
    """ΔW_i = Λ_b B Λ_d A with b = v_i and d = s u_i, for every layer, and only v, u train."""
    m = vu_model()
    s = 0.4 / 4
    g = torch.Generator().manual_seed(2)
    trainable = {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"v", "u"}
    shared = m.peft_shared["tied_lora__q_proj"]
    assert not shared["A"].requires_grad and not shared["B"].requires_grad
    for i in range(2):
        q = m.layers[i].self_attn.q_proj
        with torch.no_grad():
            q.v.copy_(torch.randn(q.v.shape, generator=g))
            q.u.copy_(torch.randn(q.u.shape, generator=g))
        b, d = q.v.detach(), s * q.u.detach()
        A, B = shared["A"], shared["B"]
        torch.testing.assert_close(q.delta_weight(), torch.diag(b) @ B @ torch.diag(d) @ A)
        assert q.shared is m.layers[0].self_attn.q_proj.shared  # A, B shared across layers


def test_vu_init_matches_veras_b_zero_and_d_init_when_alpha_is_d_init_times_r():
    m, ref = vu_model(r=4, alpha=0.1 * 4), tiny()
    assert torch.equal(m(IDX), ref(IDX))  # b = 0: the model starts unchanged
    q = m.layers[0].self_attn.q_proj
    assert torch.all(q.v == 0)
    torch.testing.assert_close(q.scale * q.u, torch.full((4,), 0.1))  # d_init = 0.1, VeRA's default in PEFT
    # the one difference in the random factors: U(-1/sqrt(fan_in), +), not VeRA's U(-sqrt(6/fan_in), +)
    A = m.peft_shared["tied_lora__q_proj"]["A"]
    assert A.abs().max() <= 64 ** -0.5 < (6 / 64) ** 0.5
    assert peft.count_parameters(m)[0] == 2 * (64 + 4) + 2 * (32 + 4)  # 2 layers x (out + r) per target
