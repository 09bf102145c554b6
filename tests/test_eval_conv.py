"""Eval conv + bias + act in one pass (nn/eval_conv.py): the custom op that traced calls
take (opcheck on the GEMM and oneDNN routes, NCHW on both, bfloat16, with and without
bias), its result against conv2d -> act, and a compiled eval call of conv_bn_act taking it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from act_cases import ACTS, act_spread
from torch import nn

from effnet_kernels._ext import ext_module
from effnet_kernels.nn import conv_bn_act as cba
from effnet_kernels.nn import eval_conv
from effnet_kernels.testing import parity

pytestmark = pytest.mark.skipif(ext_module() is None or not eval_conv.ONEDNN_AVAILABLE,
                                reason="needs the compiled extension and oneDNN")
CL = torch.channels_last

# (N, Cin, Cout, H, W, k, stride, format, dtype)
CASES = {
    "gemm_1x1": (2, 16, 24, 7, 5, 1, 1, CL, torch.float32),
    "onednn_3x3_s2": (2, 3, 8, 9, 9, 3, 2, CL, torch.float32),
    "nchw_1x1": (2, 16, 24, 7, 5, 1, 1, torch.contiguous_format, torch.float32),
    "nchw_1x1_gemm": (2, 16, 24, 40, 41, 1, 1, torch.contiguous_format, torch.float32),
    "bfloat16_1x1": (2, 16, 24, 7, 5, 1, 1, CL, torch.bfloat16),
}


def _case(name, bias=True, seed=0):
    n, cin, cout, h, w, k, s, fmt, dtype = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=fmt)
    weight = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=g) if bias else None
    return x, weight, b, ([s, s], [k // 2, k // 2], [1, 1], 1), dtype


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_conv_then_act(name, bias, act):
    x, weight, b, (stride, padding, dilation, groups), dtype = _case(name, bias)
    x = x * act_spread(act)
    args = (x.to(dtype), weight.to(dtype), None if b is None else b.to(dtype))
    got = eval_conv.conv_act_eval(*args, stride, padding, dilation, groups, act)
    same = ACTS[act](F.conv2d(*args, stride, padding, dilation, groups))
    truth = ACTS[act](F.conv2d(x.double(), weight.double(),
                               None if b is None else b.double(), stride, padding))
    assert got.is_contiguous(memory_format=CASES[name][7])
    assert parity("out", got, same, truth, dtype).ok
    torch.library.opcheck(eval_conv.conv_act_eval,
                          (*args, stride, padding, dilation, groups, act))


def test_compiled_eval_call_takes_the_op(monkeypatch):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=CL)
    calls = []
    real = cba.conv_act_eval
    monkeypatch.setattr(cba, "conv_act_eval", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: cba.conv_bn_act(t, conv, bn, "silu"),
                             backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
        same = F.silu(bn(conv(x)))
        truth = F.silu(bn.double()(conv.double()(x.double())))
    torch._dynamo.reset()
    assert calls, "the traced eval call did not take the custom op"
    assert parity("out", got, same, truth, torch.float32).ok


def test_nchw_1x1_routes(monkeypatch):
    """An NCHW float32 1x1 conv runs as one GEMM per image from PLANAR_MIN_PIXELS pixels
    per image on (oneDNN below it), and its result matches conv2d -> act."""
    from effnet_kernels.nn import gemm_conv

    calls = []
    real = gemm_conv.planar_conv1x1_act
    monkeypatch.setattr(eval_conv, "planar_conv1x1_act", lambda *a: calls.append(1) or real(*a))
    for name, expect in (("nchw_1x1_gemm", True), ("nchw_1x1", False)):
        calls.clear()
        x, weight, b, (stride, padding, dilation, groups), _ = _case(name)
        got = eval_conv.eval_conv_act(x, weight, b, stride, padding, dilation, groups, "silu")
        assert bool(calls) == expect, name
        assert got.is_contiguous()
        truth = F.silu(F.conv2d(x.double(), weight.double(), b.double()))
        assert parity("out", got, F.silu(F.conv2d(x, weight, b)), truth, torch.float32).ok
