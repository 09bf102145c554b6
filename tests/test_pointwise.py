"""Parity of the training-mode 1x1 conv + BN + act (nn/pointwise.py) on every backend.

The BN + activation around PyTorch's conv runs on the depthwise op's primitives with a
unit 1x1 kernel; output, every gradient and both running statistics are compared with
a float64 eager conv -> batch_norm -> act, within a few times PyTorch's float32 error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from act_cases import ACTS, act_spread
from backend_params import backend_device_pairs, require_backend

from effnet_kernels import use_backend
from effnet_kernels.nn.pointwise import ConvBNActTrain, conv_bn_act_train
from effnet_kernels.testing import parity

OP = "depthwise_conv_bn_act"
CASES = [  # (N, Cin, Cout, H, W, kernel, stride, padding)
    (2, 5, 12, 7, 9, 1, 1, 0),
    (3, 8, 3, 6, 5, 1, 1, 0),
    (1, 4, 6, 9, 8, 3, 2, 1),
    (2, 64, 80, 5, 4, 1, 1, 0),  # KEEP_Y_MIN_MACS: y is kept, not recomputed
]


def _eager(x, w, g, b, rm, rv, case, act):
    _, _, _, _, _, _, stride, padding = case
    y = F.batch_norm(F.conv2d(x, w, None, stride, padding), rm, rv, g, b, True, 0.1, 1e-3)
    return ACTS[act](y)


def _run(fn, inputs, dy, dtype, fmt):
    x, w, g, b, rm, rv = (t.clone().to(dtype) for t in inputs)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    w, g, b = (t.requires_grad_() for t in (w, g, b))
    out = fn(x, w, g, b, rm, rv)
    out.backward(dy.to(dtype).contiguous(memory_format=fmt))
    return {"out": out, "dx": x.grad, "dweight": w.grad, "dgamma": g.grad, "dbeta": b.grad,
            "running_mean": rm, "running_var": rv}


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("fmt_name", ["nchw", "nhwc"])
def test_conv_bn_act_train_parity(backend, device, case, act, fmt_name):
    require_backend(OP, backend, device, torch.float32)
    fmt = torch.channels_last if fmt_name == "nhwc" else torch.contiguous_format
    n, cin, cout, h, w_, k, stride, padding = case
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(n, cin, h, w_, generator=gen) + 0.5,
              torch.randn(cout, cin, k, k, generator=gen) * 0.5,
              (torch.rand(cout, generator=gen) + 0.5) * act_spread(act),
              torch.randn(cout, generator=gen),
              torch.randn(cout, generator=gen), torch.rand(cout, generator=gen) + 0.5]
    inputs = [t.to(device) for t in inputs]
    oh, ow = (h + 2 * padding - k) // stride + 1, (w_ + 2 * padding - k) // stride + 1
    dy = torch.randn(n, cout, oh, ow, generator=gen).to(device)

    def eager(*a):
        return _eager(*a, case, act)

    def fused(x, w, g, b, rm, rv):
        return conv_bn_act_train(x, w, g, b, rm, rv, stride=stride, padding=padding, groups=1,
                                 momentum=0.1, eps=1e-3, act=act)

    truth = _run(eager, inputs, dy, torch.float64, fmt)
    same = _run(eager, inputs, dy, torch.float32, fmt)
    with use_backend(backend):
        got = _run(fused, inputs, dy, torch.float32, fmt)
    failures = [str(p) for key in truth
                if not (p := parity(key, got[key], same[key], truth[key], torch.float32)).ok]
    assert not failures, "; ".join(failures)
    assert got["out"].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("cin,cout,k,keeps", [(8, 48, 1, False), (64, 96, 1, True),
                                              (96, 16, 1, True), (3, 32, 3, True)])
def test_conv_output_kept_only_where_recomputing_is_costly(cin, cout, k, keeps):
    """y is saved for backward where the conv costs >= KEEP_Y_MIN_MACS multiply-adds per
    output element, runs through oneDNN (k > 1, on CPU) or y is smaller than x; otherwise
    only x is saved and y recomputed."""
    from effnet_kernels.nn.pointwise import KEEP_Y_MIN_MACS

    assert (cin * k * k >= KEEP_Y_MIN_MACS or cout < cin or k > 1) == keeps
    x = torch.randn(2, cin, 4, 4).requires_grad_()
    w = torch.randn(cout, cin, k, k).requires_grad_()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t,
                                                  lambda t: t):
        out = conv_bn_act_train(x, w, None, None, None, None, stride=1, padding=k // 2,
                                groups=1, momentum=0.1, eps=1e-5, act="silu")
    assert (torch.Size([2, cout, 4, 4]) in shapes) == keeps
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_conv_bn_act_train_without_affine_and_grad_flags():
    """gamma/beta None (affine=False) and an input that needs no gradient."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=gen)
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64, generator=gen).requires_grad_()
    out = conv_bn_act_train(x, w, None, None, None, None, stride=1, padding=0, groups=1,
                            momentum=0.1, eps=1e-5, act="silu")
    ref = F.silu(F.batch_norm(F.conv2d(x, w), None, None, None, None, True, 0.1, 1e-5))
    torch.testing.assert_close(out, ref)
    (dw,) = torch.autograd.grad(out.square().sum(), w)
    (dw_ref,) = torch.autograd.grad(ref.square().sum(), w)
    torch.testing.assert_close(dw, dw_ref)
    geo = ([1, 1], [0, 0], 1)
    assert torch.autograd.gradcheck(
        lambda w_: ConvBNActTrain.apply(x, w_, None, None, geo, 1e-5, "relu", None)[0], (w,))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fmt_name", ["nchw", "nhwc"])
def test_kept_intermediates_match_recomputation_bitwise(case, dtype, fmt_name, monkeypatch):
    """The cpu route (act pass in place over y, g kept for the last backward pass) gives
    exactly the results of the route that writes a new output and evaluates act' twice."""
    from effnet_kernels.nn import pointwise
    from effnet_kernels.ops import depthwise as dw_ops

    require_backend(OP, "cpu", "cpu", dtype)
    monkeypatch.setattr(pointwise, "TILED", False)  # the tiles keep neither y nor g
    fmt = torch.channels_last if fmt_name == "nhwc" else torch.contiguous_format
    n, cin, cout, h, w_, k, stride, padding = case
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(n, cin, h, w_, generator=gen), torch.randn(cout, cin, k, k, generator=gen),
              torch.rand(cout, generator=gen) + 0.5, torch.randn(cout, generator=gen),
              torch.zeros(cout), torch.ones(cout)]
    oh, ow = (h + 2 * padding - k) // stride + 1, (w_ + 2 * padding - k) // stride + 1
    dy = torch.randn(n, cout, oh, ow, generator=gen)

    def fused(x, w, g, b, rm, rv):
        return conv_bn_act_train(x, w, g, b, rm, rv, stride=stride, padding=padding, groups=1,
                                 momentum=0.1, eps=1e-3, act="silu")

    got = {}
    for keep in (True, False):
        monkeypatch.setattr(dw_ops, "KEEP_INTERMEDIATES", keep)
        with use_backend("cpu"):
            got[keep] = _run(fused, inputs, dy, dtype, fmt)
    for key, value in got[True].items():
        assert torch.equal(value, got[False][key]), key


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_double_backward_raises_instead_of_a_wrong_answer(fmt):
    """The backward's primitives record no graph: a second derivative raises."""
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(12, 4, 1, 1).requires_grad_()
    out = conv_bn_act_train(x, w, None, None, None, None, stride=1, padding=0, groups=1,
                            momentum=0.1, eps=1e-5, act="silu")
    (dx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()
