"""The training loss without the (B, T, vocab) logits: mean cross-entropy of `h @ W.T`, chunk by chunk.

Llama 3's head has 128,256 outputs: the plain path's fp32 logits for 4096 tokens are 2.1 GB, plus their
log-softmax and its gradient. `linear_cross_entropy` never holds more than one chunk of them (used by
`Llama.forward(..., return_logits=False)`, i.e. by training and by evaluation of the loss).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value are left out of the loss (prompt tokens, padding)


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of `h @ weight.T` against `targets`, computed chunk by chunk.

    The plain path keeps fp32 logits (B*T x vocab: 2.1 GB for 4096 tokens of Llama 3's 128,256-word
    vocabulary) plus their log-softmax and its gradient. Here each chunk of `chunk` tokens makes its
    logits, its loss, and at once the gradients w.r.t. its hidden states (and the head weight, if it
    trains): d loss / d logits = softmax - onehot (divided by the token count), then d/dh = that @ W.
    Only those (N, dim) gradients are kept for backward, which just scales them. Same FLOPs, no
    recomputation; the idea of fused linear cross-entropy kernels (e.g. Liger-Kernel, arXiv:2410.10989).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):  # h (N, dim), weight (V, dim), targets (N,)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        n_valid = (targets != IGNORE_INDEX).sum()
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, h.shape[0], chunk):
            h_c, t_c = h[s:s + chunk], targets[s:s + chunk]
            logits = F.linear(h_c, weight)  # (n, V), in the autocast dtype under autocast
            low = logits.dtype
            logits = logits.float()
            valid = t_c != IGNORE_INDEX
            safe_t = torch.where(valid, t_c, 0)
            picked = logits.gather(1, safe_t[:, None])[:, 0]  # (n,) the target's logit
            top = logits.amax(dim=-1, keepdim=True)
            e = logits.sub_(top).exp_()  # exp(logits - max), in place: one pass for loss and gradient
            total = e.sum(dim=-1)
            loss += ((top[:, 0] + total.log() - picked) * valid).sum()  # log-sum-exp - target logit
            if want_h or want_w:
                g = e.div_(total[:, None])  # softmax
                g[torch.arange(len(t_c), device=g.device), safe_t] -= 1.0
                g.mul_((valid / n_valid)[:, None])  # ignored rows get no gradient; mean over valid
                g = g.to(low)
                if want_h:
                    grad_h[s:s + chunk] = (g @ weight).to(h.dtype)
                if want_w:
                    grad_w += (g.t() @ h_c).float()
        ctx.save_for_backward(grad_h, grad_w)
        return loss / n_valid  # 0/0 = nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype), None, None)


# fp32 logits per chunk, by device. On a GPU each chunk's matmul reads the whole head weight (525 MB in bf16
# for Llama 3) and does one FLOP per byte of it per token: an H100 (989 TFLOP/s, 3.35 TB/s) needs ~300
# tokens a chunk not to wait on memory, so 2**26 (523 tokens of a 128,256-word vocabulary). On a CPU,
# memory runs short first: 2**23 (65 tokens; 262 of a 32,000-word vocabulary). bench.py's 4 x 256-token step at vocabulary 32,000 fitted one 2**25 chunk
# (nothing chunked); 2**23 cut its peak from 432 to 352 MiB (one run each, bench.py's memory child).
CHUNK_ELEMENTS = {"cuda": 2**26, "cpu": 2**23}


def outside_compiled_graphs(fn):
    """fn, run eagerly where torch.compile traces it (torch.compiler.disable): traced, a Python loop over
    chunks would pin the batch's shape, one recompile per new length. Made on the first traced call:
    made at import, torch.compiler.disable imports torch._dynamo, seconds at every start."""
    disabled = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)
    return wrapper


@outside_compiled_graphs
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_elements: int | None = None) -> torch.Tensor:
    """F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-100) without materialising
    all the logits: chunks of about `chunk_elements` fp32 logits (default: CHUNK_ELEMENTS by device)."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS.get(h.device.type, CHUNK_ELEMENTS["cpu"])
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if not torch.is_grad_enabled():  # evaluation: no gradients to prepare
        h, weight = h.detach(), weight.detach()
    return LinearCrossEntropy.apply(h, weight, targets, max(1, chunk_elements // weight.shape[0]))
