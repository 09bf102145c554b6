"""The memoized eval conv + BN fold (nn/eval_fold.py): reused while nothing changed, and
recomputed after every kind of change a user makes between eval calls (optimizer steps,
training-mode running-statistics updates, load_state_dict, dtype casts), so a converted
model's eval output always matches the original's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from model_cases import assert_eval_parity, batch, randomize_bn
from torch import nn

import effnet_kernels
from effnet_kernels.nn.eval_fold import fold_conv_bn, folded_conv_bn

timm = pytest.importorskip("timm")


def _pair(bias: bool = False):
    conv = nn.Conv2d(6, 10, 1, bias=bias)
    bn = randomize_bn(nn.BatchNorm2d(10)).eval()
    return conv, bn


def _assert_fold_equal(conv, bn):
    with torch.no_grad():  # no graph through the weights: the memoized route
        w, b = folded_conv_bn(conv, bn)
        w_ref, b_ref = fold_conv_bn(conv, bn)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
    torch.testing.assert_close(b, b_ref, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_fold_matches_conv_then_bn(bias):
    conv, bn = _pair(bias)
    x = torch.randn(2, 6, 5, 5)
    w, b = folded_conv_bn(conv, bn)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, w, b), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_memo_reused_until_a_source_changes():
    conv, bn = _pair()
    with torch.no_grad():
        first = folded_conv_bn(conv, bn)
        assert folded_conv_bn(conv, bn)[0] is first[0]  # nothing changed: the same tensors
        conv.weight.mul_(2)  # an optimizer step
    _assert_fold_equal(conv, bn)
    with torch.no_grad():
        bn.running_var.add_(1)
    _assert_fold_equal(conv, bn)
    bn.load_state_dict(randomize_bn(nn.BatchNorm2d(10)).state_dict())
    _assert_fold_equal(conv, bn)
    bn.weight = nn.Parameter(torch.rand(10))  # a new object with a fresh version counter
    _assert_fold_equal(conv, bn)
    conv.double(), bn.double()  # .data swap: new storage, same objects
    with torch.no_grad():
        assert folded_conv_bn(conv, bn)[0].dtype == torch.float64
    _assert_fold_equal(conv, bn)


def test_weights_requiring_grad_fold_inline_with_autograd():
    conv, bn = _pair()
    with torch.enable_grad():
        w, _ = folded_conv_bn(conv, bn)
    assert w.requires_grad  # differentiable w.r.t. the conv weight, not a memo
    w.sum().backward()
    assert conv.weight.grad is not None


def test_converted_model_eval_tracks_training():
    """eval -> train steps (optimizer + running statistics) -> eval: each eval of the fused
    model matches an unfused model loaded with its current state_dict."""
    fused = randomize_bn(timm.create_model("efficientnet_b0", num_classes=10))
    effnet_kernels.convert(fused)
    x, y = batch(4, 32)
    opt = torch.optim.SGD(fused.parameters(), lr=1e-2)
    for _ in range(3):
        plain = timm.create_model("efficientnet_b0", num_classes=10)
        plain.load_state_dict(fused.state_dict())
        assert_eval_parity(fused, plain, x)
        fused.train()
        opt.zero_grad()
        F.cross_entropy(fused(x), y).backward()
        opt.step()


def test_inference_mode_then_frozen_backbone_gradients():
    """A memo built under inference_mode holds ordinary tensors: a later eval call that
    differentiates w.r.t. the input only (frozen weights) can save them for backward."""
    original = randomize_bn(timm.create_model("efficientnet_b0", num_classes=10)).eval()
    fused = copy.deepcopy(original)
    effnet_kernels.convert(fused)
    for model in (fused, original):
        model.requires_grad_(False)
    x = batch(2, 32)[0]
    with torch.inference_mode():
        fused(x)
    xg = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(fused(xg).square().sum(), xg)
    (dx_ref,) = torch.autograd.grad(original(xg).square().sum(), xg)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
