"""Summed cross-entropy of a linear output head, with its gradients computed in the forward, chunk by chunk.

    loss_sum = linear_cross_entropy_sum(hidden, weight, bias, targets, chunk_size, compute_dtype, softcap)
    # hidden (n, H) supervised positions, weight (V, H), bias (V,) or None, targets (n,) -> loss_sum ()

Why the gradients come out of the forward: a sharding engine (DeepSpeed ZeRO-3, FSDP2) holds the head's
full weight only while the head runs. Recomputing logits in backward (activation checkpointing) reads
the weight again after the engine has partitioned it: ZeRO-3 then multiplies by an empty tensor. Here
each chunk's logits exist once, in the forward, and are turned at once into the chunk's loss and its
gradients (the "fused linear cross-entropy" idea, in plain torch):

    logits = h @ W.T (+ b)                [matmul 1, compute dtype; softcap then CE in fp32]
    g      = softmax(logits) - onehot     (times the softcap's derivative)
    dh     = g @ W                        [matmul 2]
    dW    += g.T @ h                      [matmul 3, accumulated in fp32]

backward only multiplies the saved dh, dW, db by the incoming scalar: no weight access, no matmul, no
collective after the forward. That is three vocab-sized matmuls per chunk instead of four (forward,
recompute, two in backward).

Memory, beyond the inputs: one chunk's logits and gradient (about 2 x chunk x V x 4 bytes, plus the
chunk in the compute dtype) while the forward runs, and, when the head is trained, dW: V x H x 4 bytes
in fp32 while accumulating, then kept in the weight's dtype from the forward to the backward (the size
of the head's gradient, which the backward would allocate anyway, only earlier). A frozen head (LoRA,
prompt tuning) has no dW. dh is n x H in the hidden dtype.
"""
from __future__ import annotations

import torch


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, compute_dtype, softcap):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        need_any = need_hidden or need_weight or need_bias
        # Autocast off: the dtypes are chosen here (matmuls in the compute dtype, softmax in fp32).
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.float() if bias is not None else None
            loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
            grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_bias else None
            for start in range(0, targets.numel(), chunk_size):
                h = hidden[start : start + chunk_size].to(compute_dtype)
                t = targets[start : start + chunk_size]
                logits = (h @ w.t()).float()
                if b is not None:
                    logits += b
                if softcap is not None:
                    capped = torch.tanh(logits / softcap)
                    logits = capped * softcap
                lse = torch.logsumexp(logits, dim=-1)
                loss_sum += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not need_any:
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(t.numel(), device=t.device), t] -= 1.0
                if softcap is not None:
                    grad *= 1.0 - capped * capped
                    del capped
                g = grad.to(compute_dtype)
                if need_hidden:
                    grad_hidden[start : start + chunk_size] = (g @ w).to(hidden.dtype)
                if need_weight:
                    grad_weight += (g.t() @ h).float()
                if need_bias:
                    grad_bias += grad.sum(0)
                del logits, grad, g
        ctx.grads = (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
        )
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # used once: a second backward through this graph is an error
        if grads is None:
            raise RuntimeError("linear_cross_entropy_sum: backward ran twice through the same forward")
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return scaled[0], scaled[1], scaled[2], None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, chunk_size: int, compute_dtype: torch.dtype,
                             softcap: float | None = None) -> torch.Tensor:
    """sum_i CE(softcap(hidden[i] @ weight.T + bias), targets[i]) in fp32; gradients prepared in the forward.

    hidden: (n, H); weight: (V, H); bias: (V,) or None; targets: (n,) class ids, none ignored.
    compute_dtype: the matmuls' dtype (the autocast dtype when autocast is on, else the weight's).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy_sum: hidden {tuple(hidden.shape)} and targets "
                         f"{tuple(targets.shape)}; expected (n, H) and (n,)")
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, chunk_size, compute_dtype, softcap)
