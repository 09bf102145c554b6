"""GemmConv2d (nn/gemm_conv2d.py; timm's head conv in a converted model): parity with
nn.Conv2d for the output and every gradient, float64 gradcheck and gradgradcheck, the
calls it leaves to nn.Conv2d, and the in-place class change."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from effnet_kernels._ext import ext_module
from effnet_kernels.nn.gemm_conv import EXTENSION_GEMM_MIN_ROWS
from effnet_kernels.nn.gemm_conv2d import (
    Conv1x1Gemm,
    GemmConv2d,
    from_gemm_conv,
    gemm_convertible,
    to_gemm_conv,
)
from effnet_kernels.testing import parity

CL = torch.channels_last
pytestmark = pytest.mark.skipif(ext_module() is None, reason="the compiled extension is not built")


def _conv(cin: int, cout: int, bias: bool, dtype=torch.float32, **kw) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, 1, bias=bias, **kw).to(dtype)


def _run(conv: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = conv(x)
    out.backward(dy)
    grads = {"out": out.detach(), "dx": x.grad, "dweight": conv.weight.grad}
    if conv.bias is not None:
        grads["dbias"] = conv.bias.grad
    return grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape,cout", [((4, 32, 5, 5), 128), ((2, 20, 7, 3), 36),
                                        ((3, 7, 1, 1), 5), ((3, 40, 7, 7), 70),
                                        ((4, 40, 7, 7), 70)])
def test_matches_conv2d_in_training(shape, cout, bias):
    """(4, 40, 7, 7) has enough pixel rows for the extension's backward as well."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).contiguous(memory_format=CL)
    dy = torch.randn(shape[0], cout, *shape[2:], generator=g).contiguous(memory_format=CL)
    base = _conv(shape[1], cout, bias)
    fused = copy.deepcopy(base)
    assert to_gemm_conv(fused) and isinstance(fused, nn.Conv2d)
    assert fused.gemm_serves(x)
    got = _run(fused, x, dy)
    same = _run(copy.deepcopy(base), x, dy)
    truth = _run(copy.deepcopy(base).double(), x.double(), dy.double())
    assert got["out"].is_contiguous(memory_format=CL)
    failures = [str(p) for k in truth
                if not (p := parity(k, got[k], same[k], truth[k], torch.float32)).ok]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_and_gradgradcheck_float64(bias):
    conv = _conv(6, 4, bias, torch.float64)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64).contiguous(memory_format=CL)
    x.requires_grad_()
    params = (conv.weight,) + ((conv.bias,) if bias else ())
    fn = lambda x, w, *b: Conv1x1Gemm.apply(x, w, b[0] if b else None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize("shape,cout", [((3, 16, 6, 6), 24), ((3, 40, 7, 7), 70)])
def test_eval_and_no_grad_calls_match_conv2d(shape, cout, monkeypatch):
    """Training-mode no_grad calls: torch.mm below EXTENSION_GEMM_MIN_ROWS pixel rows, the
    extension's GEMM (the native one where the policy picks it) from there on. Eval calls:
    the extension's GEMM at any row count on the weight packed once, packed again after
    the weight changes."""
    assert 3 * 6 * 6 < EXTENSION_GEMM_MIN_ROWS <= 3 * 7 * 7
    packs = []
    pack = ext_module().cpu.pack_weight
    monkeypatch.setattr(ext_module().cpu, "pack_weight", lambda w: packs.append(1) or pack(w))
    base = _conv(shape[1], cout, True)
    fused = copy.deepcopy(base)
    to_gemm_conv(fused)
    x = torch.randn(shape).contiguous(memory_format=CL)
    with torch.no_grad():
        got, same = fused(x), base(x)
        truth = copy.deepcopy(base).double()(x.double())
    assert parity("out", got, same, truth, torch.float32).ok and not packs
    with torch.inference_mode():
        assert parity("out", fused(x), same, truth, torch.float32).ok
    fused.eval()
    with torch.no_grad():
        for _ in range(3):
            assert parity("out", fused(x), same, truth, torch.float32).ok
        assert len(packs) == 1
        fused.weight.mul_(-0.5)  # an in-place write (an optimizer step): packed again
        base.weight.mul_(-0.5)
        same, truth = base(x), copy.deepcopy(base).double()(x.double())
        assert parity("out", fused(x), same, truth, torch.float32).ok and len(packs) == 2


@pytest.mark.parametrize("case", ["nchw", "bfloat16", "autocast"])
def test_calls_it_does_not_serve_run_conv2d(case):
    base = _conv(8, 12, False)
    fused = copy.deepcopy(base)
    to_gemm_conv(fused)
    x = torch.randn(2, 8, 5, 5)
    if case == "bfloat16":
        base, fused = base.bfloat16(), fused.bfloat16()
        x = x.bfloat16().contiguous(memory_format=CL)
    elif case != "autocast":
        assert not x.is_contiguous(memory_format=CL)
    else:
        x = x.contiguous(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        assert not fused.gemm_serves(x)
        torch.testing.assert_close(fused(x), base(x), rtol=0, atol=0)


def test_only_plain_1x1_convs_convert():
    assert gemm_convertible(nn.Conv2d(4, 8, 1))
    assert not gemm_convertible(nn.Conv2d(4, 8, 3, padding=1))
    assert not gemm_convertible(nn.Conv2d(4, 8, 1, stride=2))
    assert not gemm_convertible(nn.Conv2d(4, 8, 1, groups=2))
    assert not gemm_convertible(nn.Conv2d(4, 8, 1, padding=1))
    assert not to_gemm_conv(nn.Linear(4, 8))
    assert not from_gemm_conv(nn.Conv2d(4, 8, 1))


def test_class_change_keeps_the_module_and_pickles():
    conv = _conv(8, 16, True)
    weight, keys = conv.weight, list(conv.state_dict())
    assert to_gemm_conv(conv) and type(conv) is GemmConv2d
    assert conv.weight is weight and list(conv.state_dict()) == keys
    assert not to_gemm_conv(conv)  # already one
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is GemmConv2d
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=CL)
    torch.testing.assert_close(loaded(x), conv(x))
    assert from_gemm_conv(conv) and type(conv) is nn.Conv2d and conv.weight is weight


def test_empty_batch():
    conv = _conv(8, 16, False)
    to_gemm_conv(conv)
    x = torch.randn(0, 8, 3, 3).contiguous(memory_format=CL).requires_grad_()
    out = conv(x)
    assert out.shape == (0, 16, 3, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape
