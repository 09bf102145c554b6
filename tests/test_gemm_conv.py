"""The 1x1 conv as a GEMM into cached memory (nn/gemm_conv.py): exact conv2d semantics
forward and backward, the eligibility rules, and its two users (training conv + BN + act,
and the eval conv + act of large outputs in MBConv)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effnet_kernels
from effnet_kernels._ext import ext_module
from effnet_kernels.nn import conv_bn_act as conv_bn_act_module
from effnet_kernels.nn import eval_conv
from effnet_kernels.nn.gemm_conv import gemm_conv1x1, gemm_conv1x1_backward, gemm_conv_eligible
from effnet_kernels.nn.pointwise import ConvBNActTrain

pytestmark = pytest.mark.skipif(ext_module() is None, reason="compiled extension not built")
CL = torch.channels_last


def _inputs(dtype, n=3, cin=5, cout=7, h=6, w=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen).to(dtype).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, 1, 1, generator=gen).to(dtype)
    bias = torch.randn(cout, generator=gen).to(dtype)
    return x, weight, bias


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_and_backward_match_conv2d(dtype, with_bias):
    x, weight, bias = _inputs(dtype)
    bias = bias if with_bias else None
    y = gemm_conv1x1(x, weight, bias)
    ref_x, ref_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.conv2d(ref_x, ref_w, bias)
    torch.testing.assert_close(y, ref.detach())
    assert y.is_contiguous(memory_format=CL)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    dx, dweight = gemm_conv1x1_backward(dy, x, weight, True, True)
    torch.testing.assert_close(dx, ref_x.grad)
    torch.testing.assert_close(dweight, ref_w.grad)
    assert dx.is_contiguous(memory_format=CL) and dweight.shape == weight.shape
    assert gemm_conv1x1_backward(dy, x, weight, False, False) == (None, None)


def test_bfloat16_close_to_float32():
    x, weight, bias = _inputs(torch.float32)
    got = gemm_conv1x1(x.bfloat16(), weight.bfloat16(), bias.bfloat16()).float()
    torch.testing.assert_close(got, F.conv2d(x, weight, bias), atol=0.1, rtol=0.02)


def test_eligibility():
    x, weight, _ = _inputs(torch.float32)
    assert gemm_conv_eligible(x, weight, (1, 1), (0, 0), 1)
    assert not gemm_conv_eligible(x.contiguous(), weight, (1, 1), (0, 0), 1)  # NCHW
    assert not gemm_conv_eligible(x, weight, (2, 2), (0, 0), 1)
    assert not gemm_conv_eligible(x, weight, (1, 1), (1, 1), 1)
    assert not gemm_conv_eligible(x, torch.randn(7, 5, 3, 3), (1, 1), (0, 0), 1)
    assert not gemm_conv_eligible(x, weight.double(), (1, 1), (0, 0), 1)
    assert not gemm_conv_eligible(x[:0], weight, (1, 1), (0, 0), 1)  # empty batch


def test_large_outputs_come_from_the_cache():
    x, weight, _ = _inputs(torch.float32, n=2, cin=4, cout=64, h=32, w=32)  # 512 KiB out
    gemm_conv1x1(x, weight)  # a freed block of this size is now cached
    hits = effnet_kernels.cpu_cache_info()["hits"]
    gemm_conv1x1(x, weight)
    assert effnet_kernels.cpu_cache_info()["hits"] > hits


def test_training_conv_bn_act_gradcheck_channels_last():
    x, weight, _ = _inputs(torch.float64, n=2, cin=3, cout=4, h=3, w=3)
    x.requires_grad_()
    weight.requires_grad_()
    gamma = torch.rand(4, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    geo = ([1, 1], [0, 0], 1)
    assert gemm_conv_eligible(x, weight, *geo)
    assert torch.autograd.gradcheck(
        lambda *a: ConvBNActTrain.apply(*a, geo, 1e-5, "silu", None)[0], (x, weight, gamma, beta))


def test_eval_large_output_path_matches_onednn(monkeypatch):
    """The blocks' eval conv + act takes the GEMM path above the size limit (forced to 0
    here) and gives the same result as the fused oneDNN conv it replaces."""
    gen = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(6, 10, 1, bias=False).double()
    bn = torch.nn.BatchNorm2d(10).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(10, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(10, generator=gen, dtype=torch.float64) + 0.5)
    x = torch.randn(2, 6, 5, 5, generator=gen, dtype=torch.float64).contiguous(memory_format=CL)
    ref = F.silu(bn(conv(x)))
    conv, bn, x = conv.float(), bn.float(), x.float()
    with torch.no_grad():
        default = conv_bn_act_module.conv_bn_act(x, conv, bn, "silu")
        monkeypatch.setattr(eval_conv, "_GLIBC_MMAP_MAX", 0)
        forced = conv_bn_act_module.conv_bn_act(x, conv, bn, "silu")
    torch.testing.assert_close(forced, ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(default, ref.float(), atol=1e-5, rtol=1e-5)
    assert forced.is_contiguous(memory_format=CL)
