"""The training conv + BN + act as a custom op pair for traced calls (nn/pointwise_op.py):
opcheck of both ops on every route (tiled with y kept, tiled on the Gram route, tiled
two-pass, GEMM then BN passes, a 3x3 conv, NCHW, float64, no BN affine), and the traced
call (torch.compile fullgraph) against conv2d -> batch_norm -> act under the parity rule
for the output, every gradient and the running statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from effnet_kernels import use_backend
from effnet_kernels._ext import ext_module
from effnet_kernels.nn import conv_bn_act as cba
from effnet_kernels.nn import pointwise
from effnet_kernels.nn.activations import ACT_FUNCTIONS
from effnet_kernels.nn.pointwise_op import conv_bn_act_train_bwd, conv_bn_act_train_fwd
from effnet_kernels.testing import parity

pytestmark = pytest.mark.skipif(ext_module() is None, reason="the compiled extension is not built")
CL = torch.channels_last

# (N, Cin, Cout, H, W, k, stride, format, dtype, route the forward takes on cpu)
CASES = {
    "tiled_keep": (2, 64, 80, 5, 4, 1, 1, CL, torch.float32, (True, True, False)),
    "tiled_gram": (2, 8, 24, 16, 16, 1, 1, CL, torch.float32, (True, False, True)),
    "tiled_two_pass": (2, 5, 12, 7, 9, 1, 1, CL, torch.float32, (True, False, False)),
    "narrowing": (3, 40, 24, 8, 8, 1, 1, CL, torch.float32, (False, True, False)),
    "stem_3x3": (2, 3, 16, 9, 9, 3, 2, CL, torch.float32, (False, True, False)),
    "nchw": (2, 6, 10, 5, 5, 1, 1, torch.contiguous_format, torch.float32, (False, False, False)),
    "float64": (2, 6, 10, 5, 5, 1, 1, CL, torch.float64, (False, False, False)),
}


def _tensors(case, affine=True, seed=0):
    n, cin, cout, h, w, k, _, fmt, dtype, _ = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, cin, h, w, generator=g) + 0.5).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dtype)
    gamma = (torch.rand(cout, generator=g) + 0.5) if affine else None
    beta = torch.randn(cout, generator=g) if affine else None
    return x, weight, gamma, beta


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck_on_every_route(name, affine):
    case = CASES[name]
    x, weight, gamma, beta = _tensors(case, affine)
    k, stride = case[5], case[6]
    geo = ([stride] * 2, [k // 2] * 2, 1)
    tiles, keep, gram = pointwise.train_plan(x, weight, geo)
    assert (tiles is not None, keep, gram) == case[-1]
    args = (x.requires_grad_(), weight.requires_grad_(),
            *(t.requires_grad_() if t is not None else None for t in (gamma, beta)),
            stride, k // 2, 1, 1e-3, 2, "cpu")
    with use_backend("cpu"):
        torch.library.opcheck(conv_bn_act_train_fwd, args)
        out, mean, var, y, mu, gram_matrix = conv_bn_act_train_fwd(*args)
        assert (y.numel() > 0, mu.numel() > 0) == (keep, gram)
        dout = torch.randn_like(out)
        detached = [t.detach() if t is not None else None for t in args[:4]]
        for need_dx, need_dweight in ((True, True), (False, True), (True, False)):
            torch.library.opcheck(conv_bn_act_train_bwd, (
                dout, *detached, mean, var, y, mu, gram_matrix, *args[4:], need_dx,
                need_dweight))


def _module(case):
    _, cin, cout, _, _, k, stride, _, dtype, _ = case
    torch.manual_seed(1)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False).to(dtype)
    bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.2).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return conv, bn


def _train_call(conv, bn, x, dout, act, traced):
    x = x.detach().clone().requires_grad_()

    def fused(inp):
        return cba.conv_bn_act(inp, conv, bn, act)

    if traced:
        torch._dynamo.reset()
        fused = torch.compile(fused, backend="aot_eager", fullgraph=True)
    out = fused(x) if traced is not None else ACT_FUNCTIONS[act](bn(conv(x)))
    out.backward(dout)
    return {"out": out.detach(), "dx": x.grad, "dweight": conv.weight.grad,
            "dgamma": bn.weight.grad, "dbeta": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var}


@pytest.mark.parametrize("act", ["silu", "identity"])
@pytest.mark.parametrize("name", ["tiled_keep", "tiled_gram", "narrowing", "stem_3x3", "nchw"])
def test_compiled_call_takes_the_op_and_matches(name, act, monkeypatch):
    case = CASES[name]
    x = _tensors(case)[0]
    conv, bn = _module(case)
    dout_shape = conv(x).shape
    dout = torch.randn(dout_shape, generator=torch.Generator().manual_seed(2))
    dout = dout.to(x.dtype).contiguous(memory_format=case[7])
    calls = []
    real = cba.conv_bn_act_train_traced
    monkeypatch.setattr(cba, "conv_bn_act_train_traced",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with use_backend("cpu"):
        got = _train_call(copy.deepcopy(conv), copy.deepcopy(bn), x, dout, act, True)
    assert calls, "the traced call did not take the custom op"
    same = _train_call(copy.deepcopy(conv), copy.deepcopy(bn), x, dout, act, None)
    truth = _train_call(copy.deepcopy(conv).double(), copy.deepcopy(bn).double(), x.double(),
                        dout.double(), act, None)
    failures = [str(p) for key in truth
                if not (p := parity(key, got[key], same[key], truth[key], x.dtype)).ok]
    assert not failures, "\n".join(failures)


def test_compiled_call_follows_the_forced_backend():
    """Compiled under auto (the cpu tiles, Gram route), then called under a forced
    reference backend: torch.compile recompiles and the call takes the reference route."""
    case = CASES["tiled_gram"]
    x = _tensors(case)[0]
    conv, bn = _module(case)
    dout = torch.randn(conv(x).shape).contiguous(memory_format=CL)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: cba.conv_bn_act(t, conv, bn, "silu"),
                             backend="aot_eager", fullgraph=True)
    got = {}
    for backend in ("auto", "reference", "auto"):
        inp = x.detach().clone().requires_grad_()
        with use_backend(backend):
            out = compiled(inp)
            out.backward(dout)
        got.setdefault(backend, []).append((out.detach(), inp.grad))
    torch._dynamo.reset()
    truth = _train_call(copy.deepcopy(conv).double(), copy.deepcopy(bn).double(), x.double(),
                        dout.double(), "silu", None)
    same = _train_call(copy.deepcopy(conv), copy.deepcopy(bn), x, dout, "silu", None)
    for runs in got.values():
        for out, dx in runs:
            assert parity("out", out, same["out"], truth["out"], torch.float32).ok
            assert parity("dx", dx, same["dx"], truth["dx"], torch.float32).ok


def test_switch_off_takes_plain_ops(monkeypatch):
    case = CASES["tiled_gram"]
    x = _tensors(case)[0]
    conv, bn = _module(case)
    monkeypatch.setattr(cba, "TRACED_OP", False)
    monkeypatch.setattr(cba, "conv_bn_act_train_traced",
                        lambda *a, **k: pytest.fail("the custom op was taken"))
    dout = torch.randn(conv(x).shape).contiguous(memory_format=CL)
    got = _train_call(conv, bn, x, dout, "silu", True)
    assert got["out"].shape == dout.shape
