"""Edge cases of the fused ops' contract found in review: output strides predicted for
non-dense inputs (fake kernels, torch.compile), strided running statistics in eval, the
running-statistics pair, second derivatives, argument types, the checks of
DepthwiseConvBNAct.from_modules, float16 running statistics past float16's range, and NaN
through the activations."""

from __future__ import annotations

import pytest
import torch
from backend_params import backend_device, require_backend
from torch import nn

import effnet_kernels as ek
from effnet_kernels.functional import depthwise_conv_bn_act, squeeze_excite
from effnet_kernels.nn import DepthwiseConvBNAct
from effnet_kernels.nn.activations import ACT_FUNCTIONS
from effnet_kernels.nn.conv_bn_act import SameConv2d
from effnet_kernels.ops import depthwise
from effnet_kernels.ops import squeeze_excite as se_ops

CL = torch.channels_last


def channel_slice(n=2, c=6, hw=5):
    """A channel slice of a channels_last tensor (what torch.split / chunk give): not
    dense, channel stride 1; the kernels make it dense as channels_last."""
    return torch.randn(n, c, hw, hw).contiguous(memory_format=CL)[:, 1:5]


def dw_params(c=4, k=3):
    return torch.randn(c, 1, k, k), torch.rand(c) + 0.5, torch.randn(c), torch.zeros(c), \
        torch.ones(c)


def se_params(c=4, cr=2):
    return torch.randn(cr, c, 1, 1), torch.randn(cr), torch.randn(c, cr, 1, 1), torch.randn(c)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fake_strides_of_a_channel_slice(backend, training):
    require_backend(depthwise.OP, backend, "cpu", torch.float32)
    x = channel_slice()
    w, g, b, rm, rv = dw_params()
    fwd_args = (x, w, g, b, rm, rv, 1, 1, 1, 5, 5, training, 1e-5, 2)
    with ek.use_backend(backend):
        torch.library.opcheck(depthwise.dw_bn_act_fwd, fwd_args)
        out, mean, var = depthwise.dw_bn_act_fwd(*fwd_args)
        assert out.is_contiguous(memory_format=CL)
        bwd_args = (torch.randn_like(out), x, w, g, b, mean, var, 1, 1, 1, training, 1e-5, 2)
        torch.library.opcheck(depthwise.dw_bn_act_bwd, bwd_args)
        rw, rb, ew, eb = se_params()
        torch.library.opcheck(se_ops.se_fwd, (x, rw, rb, ew, eb, None, 2))
        _, m, h, gate = se_ops.se_fwd(x, rw, rb, ew, eb, None, 2)
        torch.library.opcheck(se_ops.se_bwd, (torch.randn_like(x), x, m, h, gate, rw, rb, ew,
                                              eb, 2))


def test_compile_of_a_channel_slice():
    """Inductor checks the real output strides against the fake kernel's."""
    torch._dynamo.reset()
    x = channel_slice()
    w, g, b, rm, rv = dw_params()
    rw, rb, ew, eb = se_params()

    def block(x):
        y = depthwise_conv_bn_act(x, w, g, b, rm, rv)
        return squeeze_excite(y, rw, rb, ew, eb) * 2

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x))


def test_eval_with_strided_running_stats():
    x = torch.randn(2, 4, 6, 6)
    w, g, b, _, _ = dw_params()
    stats = torch.rand(4, 2) + 0.5  # running_mean and running_var as columns: stride 2
    rm, rv = stats[:, 0], stats[:, 1]
    expected = depthwise_conv_bn_act(x, w, g, b, rm.contiguous(), rv.contiguous())
    with torch.no_grad():
        torch.testing.assert_close(depthwise_conv_bn_act(x, w, g, b, rm, rv), expected)


@pytest.mark.parametrize("training", [True, False])
def test_running_stats_come_in_pairs(training):
    x = torch.randn(2, 4, 6, 6)
    w, g, b, rm, _ = dw_params()
    with pytest.raises(ValueError, match="running_mean and running_var must either both"):
        depthwise_conv_bn_act(x, w, g, b, rm, None, training=training)
    assert torch.equal(rm, torch.zeros(4))


@pytest.mark.parametrize("kw,error,match", [
    ({"training": None}, TypeError, "training must be a bool"),
    ({"training": 1}, TypeError, "training must be a bool"),
    ({"momentum": None}, ValueError, "momentum must be a float in"),
    ({"momentum": 1.5}, ValueError, "momentum must be a float in"),
    ({"eps": "1e-5"}, TypeError, "eps must be a positive float, got str"),
    ({"eps": None}, TypeError, "eps must be a positive float, got NoneType"),
    ({"eps": 0.0}, ValueError, "eps must be positive"),
    ({"training": torch.tensor(True)}, TypeError, "training must be a bool, got torch.Tensor"),
    ({"process_group": "world", "training": True}, TypeError,
     "process_group must be a torch.distributed ProcessGroup or None, got str"),
])
def test_argument_types(kw, error, match):
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(error, match=match):
        depthwise_conv_bn_act(x, *dw_params(), **kw)


def test_numpy_scalars_are_taken_as_python_numbers():
    """stride, padding, training, momentum, eps and p as NumPy scalars (what a config
    loaded with NumPy gives): the same results as the Python numbers."""
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 4, 6, 6)
    w, g, b, rm, rv = dw_params()
    rm2, rv2 = rm.clone(), rv.clone()
    want = depthwise_conv_bn_act(x, w, g, b, rm, rv, stride=2, padding=1, training=True,
                                 momentum=0.1, eps=1e-5)
    got = depthwise_conv_bn_act(x, w, g, b, rm2, rv2, stride=np.int64(2), padding=np.int64(1),
                                training=np.bool_(True), momentum=np.float32(0.1),
                                eps=np.float64(1e-5))
    assert torch.equal(got, want) and torch.equal(rm2, rm) and torch.equal(rv2, rv)
    gen, gen2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        ek.functional.drop_connect_add(x, x, np.float32(0.5), training=np.bool_(True), generator=gen2),
        ek.functional.drop_connect_add(x, x, float(np.float32(0.5)), training=True, generator=gen),
        rtol=0, atol=0)


def test_meta_tensors_get_the_registry_error():
    x = torch.randn(2, 4, 6, 6, device="meta")
    params = [t.to("meta") for t in dw_params()]
    with pytest.raises(RuntimeError, match="no backend can run depthwise_conv_bn_act on meta"):
        depthwise_conv_bn_act(x, *params)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_second_derivatives_raise_a_clear_error(backend):
    require_backend(depthwise.OP, backend, "cpu", torch.float64)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w, g, b, rm, rv = (t.double() for t in dw_params())
    w.requires_grad_()
    rw, rb, ew, eb = (t.double().requires_grad_() for t in se_params())
    with ek.use_backend(backend):
        for name, fn in (("depthwise_conv_bn_act",
                          lambda: depthwise_conv_bn_act(x, w, g, b, rm, rv, training=True)),
                         ("squeeze_excite", lambda: squeeze_excite(x, rw, rb, ew, eb))):
            (dx,) = torch.autograd.grad(fn().square().sum(), x, create_graph=True)
            with pytest.raises(NotImplementedError, match=f"{name} has no second derivative"):
                dx.sum().backward()


@pytest.mark.parametrize("conv,match", [
    (nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False, padding_mode="reflect"),
     "not a zero-padded Conv2d"),
    (nn.Conv2d(4, 4, 3, stride=(1, 2), padding=1, groups=4, bias=False), "square kernel"),
    (nn.Conv2d(4, 4, 3, padding=(1, 0), groups=4, bias=False), "square kernel"),
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False), "no dilation"),
    (nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), "must be depthwise"),
])
def test_from_modules_refuses_convs_it_cannot_compute(conv, match):
    with pytest.raises(ValueError, match=match):
        DepthwiseConvBNAct.from_modules(conv, nn.BatchNorm2d(4))


def test_from_modules_reads_tf_same_padding():
    conv = SameConv2d(4, 4, 3, 2, groups=4, bias=False)
    bn = nn.BatchNorm2d(4).eval()
    layer = DepthwiseConvBNAct.from_modules(conv, bn)
    assert layer.padding == "same"
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.silu(bn(conv(x))))


@pytest.mark.parametrize("where", ["after_the_block", "other_thread"])
def test_backward_runs_on_the_backend_of_its_forward(monkeypatch, where):
    """use_backend is a context variable: backward called after the block, or on another
    thread (the autograd engine's device threads on a GPU), must still run the backend
    the forward ran on."""
    import threading

    from effnet_kernels.ops import reference

    calls = []
    real = reference.dw_backward
    monkeypatch.setattr(reference, "dw_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w, g, b, rm, rv = dw_params()
    with ek.use_backend("reference"):
        loss = depthwise_conv_bn_act(x, w, g, b, rm, rv, training=True).square().sum()
    if where == "other_thread":
        worker = threading.Thread(target=loss.backward)
        worker.start()
        worker.join()
    else:
        loss.backward()
    assert calls and x.grad is not None


# Forward-mode AD loads torch's jvp decompositions, which call torch.jit.script (deprecated).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_forward_mode_ad_raises_a_clear_error():
    import torch.autograd.forward_ad as forward_ad
    import torch.func

    x, tangent = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    w, g, b, rm, rv = dw_params()
    rw, rb, ew, eb = se_params()
    for name, fn in (("depthwise_conv_bn_act", lambda t: depthwise_conv_bn_act(t, w, g, b, rm, rv)),
                     ("squeeze_excite", lambda t: squeeze_excite(t, rw, rb, ew, eb))):
        with pytest.raises(NotImplementedError, match=f"{name} has no forward-mode"):
            torch.func.jvp(fn, (x,), (tangent,))
        with forward_ad.dual_level(), \
                pytest.raises(NotImplementedError, match=f"{name} has no forward-mode"):
            fn(forward_ad.make_dual(x, tangent))
        with forward_ad.dual_level():  # a level without tangents on the inputs: runs
            fn(x)


EDGE_BACKENDS = ["reference", "cpu", "triton", "cuda"]


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.1])
def test_half_running_stats_take_a_batch_variance_beyond_their_range(backend, momentum):
    """A float16 running_var and a batch variance above float16's largest value (65504):
    blended in float and rounded once, as PyTorch does, instead of overflowing to inf (or
    NaN at momentum 0) when the batch value is cast first."""
    device = backend_device(backend)
    require_backend(depthwise.OP, backend, device, torch.float16)
    x = (torch.randn(2, 4, 8, 8) * 300).half().to(device)  # variance ~9e4
    w = torch.zeros(4, 1, 3, 3, dtype=torch.half, device=device)
    w[:, 0, 1, 1] = 1
    rm, rv = torch.zeros(4, dtype=torch.half, device=device), torch.ones(4, dtype=torch.half, device=device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with ek.use_backend(backend):
        depthwise_conv_bn_act(x, w, None, None, rm, rv, training=True, momentum=momentum,
                              act="identity")
    torch.nn.functional.batch_norm(x, rm_ref, rv_ref, training=True, momentum=momentum)
    assert torch.isfinite(rv).all(), rv
    torch.testing.assert_close(rm, rm_ref, rtol=2e-3, atol=1e-2)
    torch.testing.assert_close(rv, rv_ref, rtol=2e-3, atol=0)
    if momentum == 0.0:
        assert torch.equal(rv, torch.ones_like(rv)) and torch.equal(rm, torch.zeros_like(rm))


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("act", ["relu", "relu6", "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_passes_through_the_activation(backend, act, training):
    """A NaN in x reaches the output where PyTorch's composition puts it (eval: its pixel;
    training: its channel, through the batch statistics): relu and relu6 of NaN are NaN.
    The gradients are NaN at least wherever PyTorch's are, so a diverging run shows it: the
    kernels' dL/dy adds the batch terms coef_c * (y - mean), zero in eval, and 0 * NaN
    spreads NaN over the conv window around the NaN pixel in eval, where PyTorch's dx
    stays finite."""
    device = backend_device(backend)
    require_backend(depthwise.OP, backend, device, torch.float32)
    x = torch.randn(2, 4, 5, 5, device=device)
    x[0, 1, 2, 2] = float("nan")
    w, g, b, rm, rv = (t.to(device) for t in dw_params())
    dy = torch.randn(2, 4, 5, 5, device=device)

    def run(fn):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xs, ws)
        out.backward(dy)
        return out.detach(), xs.grad, ws.grad

    def composed(xs, ws):
        y = torch.nn.functional.conv2d(xs, ws, padding=1, groups=4)
        z = torch.nn.functional.batch_norm(y, rm.clone(), rv.clone(), g, b, training, 0.1, 1e-5)
        return ACT_FUNCTIONS[act](z)

    with ek.use_backend(backend):
        got = run(lambda xs, ws: depthwise_conv_bn_act(xs, ws, g, b, rm.clone(), rv.clone(),
                                                       training=training, act=act))
    expected = run(composed)
    assert torch.equal(torch.isnan(got[0]), torch.isnan(expected[0]))
    for name, a, e in zip(("dx", "dweight"), got[1:], expected[1:]):
        assert torch.isnan(a)[torch.isnan(e)].all(), (name, torch.isnan(a).sum(),
                                                      torch.isnan(e).sum())
