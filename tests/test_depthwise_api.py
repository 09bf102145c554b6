"""The depthwise op's contract beyond parity: bad input, edge cases, gradcheck, opcheck,
torch.compile / torch.export, the nn module and the backend registry."""

from __future__ import annotations

import copy

import pytest
import torch
from backend_params import require_backend
from torch import nn

import effnet_kernels as ek
from effnet_kernels.functional import depthwise_conv_bn_act
from effnet_kernels.nn import DepthwiseConvBNAct
from effnet_kernels.ops import depthwise, reference

OP = "depthwise_conv_bn_act"
GRAD_BACKENDS = ["cpu", "reference", "triton"]


def inputs(n=2, c=4, h=7, w=7, k=3, dtype=torch.float32):
    return (torch.randn(n, c, h, w, dtype=dtype), torch.randn(c, 1, k, k, dtype=dtype),
            torch.rand(c) + 0.5, torch.randn(c), torch.zeros(c), torch.ones(c))


BAD_INPUTS = [
    (lambda a: (a[0][0],) + a[1:], {}, "x must be 4-D"),
    (lambda a: (a[0], a[1][:, :, :2, :2]) + a[2:], {}, "kernel size must be one of"),
    (lambda a: (a[0], torch.randn(4, 1, 2, 2)) + a[2:], {}, "kernel size must be one of"),
    (lambda a: (a[0], torch.randn(4, 1, 9, 9)) + a[2:], {}, "kernel size must be one of"),
    (lambda a: (a[0], torch.randn(4, 2, 3, 3)) + a[2:], {}, "weight must have shape"),
    (lambda a: (a[0], torch.randn(5, 1, 3, 3)) + a[2:], {}, "weight must have shape"),
    (lambda a: (a[0], a[1].double()) + a[2:], {}, "weight must have the same dtype as x"),
    (lambda a: (a[0].int(),) + a[1:], {}, "x must have dtype in"),
    (lambda a: a[:2] + (torch.ones(3),) + a[3:], {}, r"bn_weight must have shape \(4,\)"),
    (lambda a: a[:4] + (torch.zeros(5),) + a[5:], {}, r"running_mean must have shape \(4,\)"),
    (lambda a: a, {"stride": 3}, "stride must be one of"),
    (lambda a: a, {"padding": 2}, r"padding must be None, 'same' or an int in \[0, 1\]"),
    (lambda a: a, {"padding": "valid"}, "padding must be None"),
    (lambda a: a, {"act": "gelu"}, "act must be one of"),
    (lambda a: a, {"eps": 0.0}, "eps must be positive"),
    (lambda a: a[:4] + (None, None), {"training": False}, "running_mean and running_var are required"),
    (lambda a: (torch.randn(1, 4, 1, 1),) + a[1:], {"training": True, "padding": 1},
     "Expected more than 1 value per channel when training"),
    (lambda a: (torch.randn(1, 4, 2, 2),) + a[1:], {"padding": 0}, "too small for kernel size"),
    (lambda a: (a[0], a[1].to("meta")) + a[2:], {}, "weight must be on cpu"),
]


@pytest.mark.parametrize("make,kwargs,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_raises_clear_error(make, kwargs, message):
    args = make(inputs())
    with pytest.raises((ValueError, TypeError), match=message):
        depthwise_conv_bn_act(*args, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(backend, training):
    require_backend(OP, backend, "cpu", torch.float32)
    x, w, g, b, rm, rv = inputs(n=0)
    x.requires_grad_()
    with ek.use_backend(backend):
        y = depthwise_conv_bn_act(x, w, g, b, rm, rv, training=training, stride=2)
        y.sum().backward()
    assert y.shape == (0, 4, 4, 4)
    assert x.grad.shape == x.shape
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_contiguous_input(backend):
    require_backend(OP, backend, "cpu", torch.float32)
    big = torch.randn(2, 8, 9, 20)
    x = big[:, ::2, :, 3:12]  # strided in C and W: neither NCHW- nor NHWC-dense
    _, w, g, b, rm, rv = inputs(c=4)
    with ek.use_backend(backend):
        y = depthwise_conv_bn_act(x, w, g, b, rm.clone(), rv.clone(), training=True)
    expected = reference.depthwise_conv_bn_act(x.contiguous(), w, g, b, rm.clone(), rv.clone(),
                                               training=True)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


GRADCHECK_CASES = [
    (torch.contiguous_format, None, 1, True),
    (torch.channels_last, "same", 2, True),
    (torch.channels_last, 0, 2, False),
    (torch.contiguous_format, "same", 1, False),
]


@pytest.mark.parametrize("fmt,padding,stride,training", GRADCHECK_CASES)
@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_gradcheck_float64(backend, fmt, padding, stride, training):
    require_backend(OP, backend, "cpu", torch.float64)
    x, w, g, b, rm, rv = (t.double() for t in inputs(n=2, c=2, h=5, w=4))
    x = x.contiguous(memory_format=fmt)
    for t in (x, w, g, b):
        t.requires_grad_()

    def fn(x, w, g, b):
        return depthwise_conv_bn_act(x, w, g, b, rm.clone(), rv.clone(), training=training,
                                     stride=stride, padding=padding)

    # Triton runs in its CPU interpreter here, where the full numerical Jacobian (two
    # forwards per input element) took 20-90 s per case: its fast mode checks v^T J u for
    # random u and v instead (two forwards), which a wrong gradient fails unless its error
    # happens to be orthogonal to both random vectors.
    with ek.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, w, g, b), eps=1e-6, atol=1e-5,
                                        fast_mode=backend == "triton")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend, training):
    require_backend(OP, backend, "cpu", torch.float32)
    x, w, g, b, rm, rv = inputs()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w.requires_grad_()
    g.requires_grad_()
    b.requires_grad_()
    fwd_args = (x, w, g, b, rm, rv, 2, 0, 0, 4, 4, training, 1e-3, 2)
    with ek.use_backend(backend):
        torch.library.opcheck(depthwise.dw_bn_act_fwd, fwd_args)
        out, mean, var = depthwise.dw_bn_act_fwd(*fwd_args)
        dy = torch.randn_like(out)
        bwd_args = (dy, x.detach(), w.detach(), g.detach(), b.detach(), mean, var, 2, 0, 0,
                    training, 1e-3, 2)
        torch.library.opcheck(depthwise.dw_bn_act_bwd, bwd_args)


def small_model():
    return nn.Sequential(nn.Conv2d(3, 8, 1), DepthwiseConvBNAct(8, 3, 2), nn.Conv2d(8, 4, 1))


def test_torch_compile_fullgraph_matches_eager():
    model = small_model()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 10, 10)
    for mode in (True, False):
        model.train(mode)
        compiled.train(mode)
        expected = model(x)
        got = compiled(x)
        torch.testing.assert_close(got, expected)
        if mode:
            got.sum().backward()
            expected.sum().backward()
    for p, q in zip(model.parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad)
    torch.testing.assert_close(compiled._orig_mod[1].bn.running_mean, model[1].bn.running_mean)


def test_torch_export_sees_one_op():
    model = small_model().eval()
    exported = torch.export.export(model, (torch.randn(2, 3, 10, 10),))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert sum("dw_bn_act_fwd" in t for t in targets) == 1
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(exported.module()(x), model(x))


def test_module_state_dict_matches_conv_bn_pair():
    conv = nn.Conv2d(6, 6, 5, 2, 2, groups=6, bias=False)
    bn = nn.BatchNorm2d(6, eps=1e-3, momentum=0.01)
    pair = nn.Sequential(conv, bn, nn.SiLU())
    fused = DepthwiseConvBNAct.from_modules(conv, bn, nn.SiLU())
    assert fused.conv.weight is conv.weight and fused.bn.running_mean is bn.running_mean
    fresh = DepthwiseConvBNAct(6, 5, 2)
    fresh.load_state_dict({k.replace("0.", "conv.", 1).replace("1.", "bn.", 1): v
                           for k, v in pair.state_dict().items()}, strict=True)
    x = torch.randn(2, 6, 11, 11)
    reference_model = copy.deepcopy(pair).train()
    torch.testing.assert_close(fused.train()(x), reference_model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, reference_model[1].running_var)
    assert int(bn.num_batches_tracked) == int(reference_model[1].num_batches_tracked) == 1


def test_module_momentum_none_is_cumulative_average():
    conv = nn.Conv2d(4, 4, 3, 1, 1, groups=4, bias=False)
    bn = nn.BatchNorm2d(4, momentum=None)
    ref_bn = copy.deepcopy(bn)
    fused = DepthwiseConvBNAct.from_modules(conv, bn)
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5)
        fused(x)
        ref_bn(conv(x))
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


def test_from_modules_rejects_unfusable():
    with pytest.raises(ValueError, match="depthwise"):
        DepthwiseConvBNAct.from_modules(nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="cannot be fused"):
        DepthwiseConvBNAct.from_modules(nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4),
                                        nn.GELU())


def test_registry_forced_backend_explains_why():
    x, *rest = inputs()
    with ek.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        depthwise_conv_bn_act(x, *rest)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        with ek.use_backend("tpu"):
            pass


def test_env_var_forces_backend(monkeypatch):
    x, *rest = inputs()
    monkeypatch.setenv("EFFNET_KERNELS_BACKEND", "reference")
    assert ek.backends.select_name(OP, x.device, x.dtype) == "reference"
    monkeypatch.setenv("EFFNET_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="EFFNET_KERNELS_BACKEND must be 'auto' or one of"):
        depthwise_conv_bn_act(x, *rest)


def test_build_info_and_available_backends():
    info = ek.build_info()
    assert {"cpu_ext", "cuda_compiled", "torch", "triton"} <= set(info)
    assert "reference" in ek.available_backends()
    assert ek.available_backends("cpu")[-1] == "reference"


def test_autocast_casts_like_eager_conv():
    x, w, g, b, rm, rv = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise_conv_bn_act(x, w, g, b, rm.clone(), rv.clone(), training=True)
        expected = reference.depthwise_conv_bn_act(x, w, g, b, rm.clone(), rv.clone(), training=True)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_stash_primitives_reject_what_they_cannot_keep():
    """The cpu primitives that keep y or g need float storage and their own layout."""
    from effnet_kernels._ext import ext_module

    if ext_module() is None:
        pytest.skip("compiled extension not built")
    cpu = ext_module().cpu
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    w = torch.randn(4, 1, 3, 3, dtype=torch.bfloat16)
    vec = torch.ones(4)
    with pytest.raises(RuntimeError, match="needs float32 or float64 x"):
        cpu.dw_stats_stash(x, w, 1, 1, 1, 6, 6)
    with pytest.raises(RuntimeError, match="needs float32 or float64 x"):
        cpu.dw_backward_reduce_stash(x, x, w, vec, vec, vec, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="y must be the channels_last tensor"):
        cpu.dw_affine_act_(torch.randn(2, 4, 6, 6), vec, vec, 2)
    x32, w32 = x.float(), w.float()
    with pytest.raises(RuntimeError, match="y must be the channels_last Float tensor of shape"):
        cpu.dw_backward(x32, x32, w32, vec, vec, vec, vec, vec, 1, 1, 1, 0,
                        y=torch.randn(2, 4, 5, 5))
    with pytest.raises(RuntimeError, match="scale must have 4 elements"):
        cpu.dw_affine_act_(torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last),
                           torch.ones(3), vec, 2)
