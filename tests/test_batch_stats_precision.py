"""Batch statistics in float32 on channels whose mean is thousands of times their spread.

The inputs are dyadic (x = 2^e + j/16, weights in {1/2, 1, 2}) so that every product
and partial sum of the conv is exact in float32: y is the same on every backend and in
PyTorch, and the float64 variance of it is the truth. What is left is the statistics
themselves: the running variance after a step (momentum 1: the batch's unbiased variance;
momentum 0.1: PyTorch's blend) must stay within a few times PyTorch's own error on the same
y, plus a floor of 1e-6 relative. Before the corrected two-pass row moments and the
double-precision merge of the row means (csrc/cpu/depthwise_passes.h, chan_merge), the cpu
backend was 4e-5 - 8e-5 off at a mean/spread of 1e4, and the C++ running update
(running + m * (batch - running)) lost the batch variance's digits at momentum 1. The
depthwise case and the running update run on every backend and device of the machine (on a
GPU, cuda keeps sums about a sampled shift per chunk and triton two-pass moments per pixel
tile, both merged in double)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backend_params import backend_device_pairs, require_backend

from effnet_kernels import use_backend
from effnet_kernels._ext import ext_module
from effnet_kernels.backends import select
from effnet_kernels.functional import depthwise_conv_bn_act
from effnet_kernels.nn.pointwise import conv_bn_act_train
from effnet_kernels.ops.bn_math import vector_math

FACTOR, FLOOR = 4.0, 1e-6
CL = torch.channels_last


def _dyadic(shape, base, gen):
    return base + torch.randint(-64, 65, shape, generator=gen).float() / 16


def _weights(shape, gen):
    # Positive weights: the conv output's mean is thousands of times its spread.
    choices = torch.tensor([0.5, 1.0, 2.0])
    return choices[torch.randint(0, 3, shape, generator=gen)]


def _relative_error(running_var, truth):
    return ((running_var.double() - truth) / truth).abs().max().item()


def _torch_running_var(y, momentum):
    c = y.shape[1]
    rm, rv = torch.zeros(c, device=y.device), torch.ones(c, device=y.device)
    F.batch_norm(y, rm, rv, None, None, True, momentum, 1e-5)
    return rv


def _truth(y, momentum):
    return momentum * y.double().var(dim=(0, 2, 3)) + (1 - momentum)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("momentum", [1.0, 0.1])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_depthwise_running_var_on_large_means(backend, device, momentum, kernel,
                                              memory_format, size):
    require_backend("depthwise_conv_bn_act", backend, device, torch.float32)
    if size == "large" and device == "cpu":
        pytest.skip("the large case (GPU kernels' long per-thread sums) runs on a GPU")
    gen = torch.Generator().manual_seed(kernel)
    interpreted = backend == "triton" and device == "cpu"
    shape = {"small": (4, 16, 8, 8) if interpreted else (4, 24, 28, 28),
             "large": (32, 24, 112, 112)}[size]
    # |y| < 2^16 with a resolution of 2^-6 for k3 (9 taps), 2^15 and 2^-5 for k1: exact.
    x = _dyadic(shape, 2.0 ** 14 if kernel == 1 else 2.0 ** 12, gen)
    x = x.contiguous(memory_format=memory_format)
    w = _weights((shape[1], 1, kernel, kernel), gen) / (1 if kernel == 1 else 2)
    y = F.conv2d(x.double(), w.double(), padding=kernel // 2, groups=shape[1])
    assert torch.equal(y.float().double(), y), "inputs must make the conv exact in float32"
    rm, rv = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)
    with use_backend(backend):
        depthwise_conv_bn_act(x.to(device), w.to(device), None, None, rm, rv, training=True,
                              momentum=momentum, act="identity")
    truth = _truth(y, momentum)
    # The yardstick is PyTorch's error on the CPU; the reference backend on a GPU is
    # PyTorch's BatchNorm there and is held to that device's own error.
    yardstick_device = device if backend == "reference" else "cpu"
    torch_var = _torch_running_var(y.float().to(yardstick_device), momentum).cpu()
    torch_error = _relative_error(torch_var, truth)
    error = _relative_error(rv.cpu(), truth)
    assert error <= FACTOR * torch_error + FLOOR, (error, torch_error)


@pytest.mark.skipif(ext_module() is None or not hasattr(ext_module().cpu, "pw_bn_stats"),
                    reason="compiled extension with the tiled pointwise kernels not available")
@pytest.mark.parametrize("momentum", [1.0, 0.1])
@pytest.mark.parametrize("cin", [2, 64])  # y recomputed / kept (nn/pointwise.py)
def test_pointwise_running_var_on_large_means(momentum, cin):
    gen = torch.Generator().manual_seed(cin)
    cout = 96
    # |y| <= 2 * 64 * (2^12 + 4) < 2^19 with a resolution of 2^-5: exact.
    x = _dyadic((2, cin, 24, 24), 2.0 ** 12, gen).contiguous(memory_format=CL)
    w = _weights((cout, cin, 1, 1), gen)
    y = F.conv2d(x.double(), w.double())
    assert torch.equal(y.float().double(), y), "inputs must make the conv exact in float32"
    rm, rv = torch.zeros(cout), torch.ones(cout)
    conv_bn_act_train(x, w, None, None, rm, rv, stride=1, padding=0, groups=1,
                      momentum=momentum, eps=1e-5, act="identity")
    truth = _truth(y, momentum)
    torch_error = _relative_error(_torch_running_var(y.float(), momentum), truth)
    error = _relative_error(rv, truth)
    assert error <= FACTOR * torch_error + FLOOR, (error, torch_error)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_running_update_keeps_a_small_batch_variance(backend, device):
    """The running update (1 - m) * running + m * batch keeps the batch's digits when the
    batch values are far below the running ones (exactly the batch's at momentum 1)."""
    require_backend("depthwise_conv_bn_act", backend, device, torch.float32)
    with use_backend(backend):
        bn = vector_math(select("depthwise_conv_bn_act", torch.zeros(1, device=device)))
    mean = torch.tensor([1e-3, -2e-5, 5.0, 0.0], device=device)
    var = torch.tensor([1e-3, 3e-4, 7e-6, 1.0], device=device)
    count = 10
    for momentum in (1.0, 0.75):
        rm = torch.full((4,), 1e4, device=device)
        rv = torch.full((4,), 1e4, device=device)
        bn.bn_update_running(rm, rv, mean, var, momentum, count)
        unbiased = var.double() * count / (count - 1)
        torch.testing.assert_close(rv.double(), momentum * unbiased + (1 - momentum) * 1e4,
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(rm.double(), momentum * mean.double() + (1 - momentum) * 1e4,
                                   rtol=1e-6, atol=0)
