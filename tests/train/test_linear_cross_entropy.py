"""sft.train.linear_cross_entropy: loss and gradients equal autograd's, and the backward touches no weight."""
import pytest
import torch
import torch.nn.functional as F

from sft.train.linear_cross_entropy import linear_cross_entropy_sum


def reference(hidden, weight, bias, targets, softcap, dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


def leaves(seed=0, with_bias=True):
    torch.manual_seed(seed)
    hidden = torch.randn(11, 8, requires_grad=True)
    weight = torch.randn(37, 8, requires_grad=True)
    bias = torch.randn(37, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 37, (11,))
    return hidden, weight, bias, targets


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_equals_autograd_loss_and_gradients(softcap, with_bias, chunk_size):
    inputs = leaves(with_bias=with_bias)
    expected = reference(*inputs, softcap, torch.float32)
    expected_grads = torch.autograd.grad(expected * 0.5, [t for t in inputs[:3] if t is not None])
    ours = linear_cross_entropy_sum(*inputs, chunk_size, torch.float32, softcap)
    our_grads = torch.autograd.grad(ours * 0.5, [t for t in inputs[:3] if t is not None])  # scaled by grad_output
    torch.testing.assert_close(ours, expected)
    for a, b in zip(our_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_compute_dtype_matches_autocast():
    inputs = leaves(with_bias=False)
    expected = reference(*inputs, None, torch.bfloat16)
    ours = linear_cross_entropy_sum(*inputs, 4, torch.bfloat16)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-3)
    ours.backward()
    assert inputs[1].grad.dtype == torch.float32 and inputs[1].grad.abs().sum() > 0


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_computes_only_the_loss():
    hidden, weight, bias, targets = leaves()
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    linear_cross_entropy_sum(hidden, weight, bias, targets, 4, torch.float32).backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, bias, targets, 4, torch.float32)
    torch.testing.assert_close(loss, reference(hidden, weight, bias, targets, None, torch.float32))


def test_backward_does_not_read_the_weight():
    """As under ZeRO-3: the weight is emptied after the forward; the backward must not need it."""
    hidden, weight, bias, targets = leaves(with_bias=False)
    expected = torch.autograd.grad(reference(hidden, weight, None, targets, None, torch.float32), [hidden, weight])
    ours = linear_cross_entropy_sum(hidden, weight, None, targets, 4, torch.float32)
    saved = weight.data
    weight.data = torch.empty(0)  # what a ZeRO-3 partition leaves in the parameter
    got = torch.autograd.grad(ours, [hidden, weight])
    weight.data = saved
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_rejected():
    hidden, weight, bias, targets = leaves()
    with pytest.raises(ValueError, match=r"expected \(n, H\) and \(n,\)"):
        linear_cross_entropy_sum(hidden, weight, bias, targets[:3], 4, torch.float32)
