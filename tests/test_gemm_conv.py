"""The 1x1 conv as a GEMM into cached memory (nn/gemm_conv.py): exact conv2d semantics
forward and backward (both backward routes: torch.mm, and the extension's
pw_conv_backward from EXTENSION_GEMM_BACKWARD_MIN_ROWS pixel rows, with its argument errors
and thread-count independence), the eligibility rules, and its two users (training conv + BN + act,
and the eval conv + act of large outputs in MBConv)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effnet_kernels
from effnet_kernels._ext import ext_module
from effnet_kernels.nn import conv_bn_act as conv_bn_act_module
from effnet_kernels.nn import eval_conv
from effnet_kernels.nn.gemm_conv import (
    EXTENSION_GEMM_BACKWARD_MIN_ROWS,
    gemm_conv1x1,
    gemm_conv1x1_backward,
    gemm_conv_eligible,
)
from effnet_kernels.nn.pointwise import ConvBNActTrain
from effnet_kernels.testing import parity

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


# (n, cin, cout, h, w) around EXTENSION_GEMM_BACKWARD_MIN_ROWS: 96 rows stay on
# torch.mm; 162 rows (Cin and Cout tails), 392 rows of B0's head width (dW partials in 5
# groups) and 2048 rows (16 groups) run pw_conv_backward.
BACKWARD_CASES = [(2, 24, 40, 6, 8), (2, 37, 70, 9, 9), (8, 320, 1280, 7, 7), (2, 16, 96, 32, 32)]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: "x".join(map(str, c)))
def test_backward_routes_match_float64(case, monkeypatch):
    """dx and dweight against float64 under the parity rule, on the route the row count
    picks (the extension's pw_conv_backward from EXTENSION_GEMM_BACKWARD_MIN_ROWS rows),
    each gradient alone as well."""
    n, cin, cout, h, w = case
    calls = []
    native = ext_module().cpu.pw_conv_backward
    monkeypatch.setattr(ext_module().cpu, "pw_conv_backward",
                        lambda *a: calls.append(a[3:]) or native(*a))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, cin, h, w, generator=gen).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5
    dy = torch.randn(n, cout, h, w, generator=gen).contiguous(memory_format=CL)
    dx, dweight = gemm_conv1x1_backward(dy, x, weight, True, True)
    on_extension = n * h * w >= EXTENSION_GEMM_BACKWARD_MIN_ROWS
    assert calls == ([(True, True)] if on_extension else [])
    truth = [t.grad for t in _conv2d_grads(x.double(), weight.double(), dy.double())]
    same = [t.grad for t in _conv2d_grads(x, weight, dy)]
    for name, got, ref32, ref64 in zip(("dx", "dweight"), (dx, dweight), same, truth):
        result = parity(name, got, ref32, ref64, torch.float32)
        assert result.ok, str(result)
    assert dx.is_contiguous(memory_format=CL) and dweight.shape == weight.shape
    only_dx, none = gemm_conv1x1_backward(dy, x, weight, True, False)
    none2, only_dw = gemm_conv1x1_backward(dy, x, weight, False, True)
    assert none is None and none2 is None
    assert torch.equal(only_dx, dx) and torch.equal(only_dw, dweight)


def test_backward_does_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 96, 12, 12, generator=gen).contiguous(memory_format=CL)
    weight = torch.randn(200, 96, 1, 1, generator=gen)
    dy = torch.randn(4, 200, 12, 12, generator=gen).contiguous(memory_format=CL)
    threads, got = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            got.append(ext_module().cpu.pw_conv_backward(dy, x, weight.view(200, 96), True, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*got))


def test_pw_conv_backward_names_bad_arguments():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=CL)
    w = torch.randn(6, 8)
    dy = torch.randn(2, 6, 4, 4).contiguous(memory_format=CL)
    run = ext_module().cpu.pw_conv_backward
    cases = [((dy, x.contiguous(), w), "x must be contiguous in channels_last"),
             ((dy.contiguous(), x, w), "dy must be contiguous in channels_last"),
             ((dy[:, :5], x, w), r"dy must be a cpu \(2, 6, 4, 4\)"),
             ((dy, x, torch.randn(6, 7)), r"weight must be \(Cout, 8\)"),
             ((dy, x.double(), w), "x must have dtype"),
             ((dy, x, w.t()), "weight must be contiguous")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            run(*args, True, True)


@pytest.mark.parametrize("shape", [(4, 37, 70, 5, 7), (3, 16, 96, 1, 1), (2, 8, 12, 0, 3)],
                         ids=["tails", "one_pixel", "no_pixels"])
def test_per_sample_weight_grads_match_float64(shape):
    """M[n] = dy_n^T x_n against float64 bmm under the parity rule (zeros without pixels)."""
    n, cin, cout, h, w = shape
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(n, cin, h, w, generator=gen).contiguous(memory_format=CL)
    dy = torch.randn(n, cout, h, w, generator=gen).contiguous(memory_format=CL)

    def bmm(dy, x):
        return torch.bmm(dy.permute(0, 2, 3, 1).reshape(n, h * w, cout).transpose(1, 2),
                         x.permute(0, 2, 3, 1).reshape(n, h * w, cin))
    got = ext_module().cpu.pw_weight_grad_per_sample(dy, x)
    assert got.shape == (n, cout, cin)
    result = parity("M", got, bmm(dy, x), bmm(dy.double(), x.double()), torch.float32)
    assert result.ok, str(result)


def test_per_sample_weight_grads_name_bad_arguments():
    run = ext_module().cpu.pw_weight_grad_per_sample
    x = torch.randn(4, 6, 2, 2).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match=r"dy must be a cpu \(4, 5, 2, 2\)"):
        run(torch.randn(3, 5, 2, 2).contiguous(memory_format=CL), x)
    with pytest.raises(RuntimeError, match="x must be contiguous in channels_last"):
        run(torch.randn(4, 5, 2, 2).contiguous(memory_format=CL), x.contiguous())
    with pytest.raises(RuntimeError, match="x must have dtype"):
        run(torch.randn(4, 5, 2, 2).contiguous(memory_format=CL), x.double())


def _conv2d_grads(x, weight, dy):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    F.conv2d(x, weight).backward(dy)
    return x, weight


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
