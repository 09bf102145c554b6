"""Training-mode conv + BatchNorm + activation that saves only the conv input.

Plain autograd would save the conv output y (for BN) and the BN output z (for the
activation): two tensors of the conv's output size. For MBConv's 1x1 expand conv those
are the widest tensors of the block, while its input is 1/6 of that width. Following
design.md §4 this function saves x, the weight and the per-channel mean / inverse std,
and recomputes y = conv(x) in backward (one extra conv, no extra memory).

BN math (per channel, M = N*H*W, xhat = (y - mean) * invstd, z = gamma * xhat + beta):
  g      = dout * act'(z)
  dgamma = sum(g * xhat),  dbeta = sum(g)
  dy     = gamma * invstd * (g - dbeta / M - xhat * dgamma / M)
dx and dweight then come from aten.convolution_backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.depthwise import update_running_stats

_ACTS = {"silu": F.silu, "relu": F.relu, "identity": lambda t: t}


def _act_grad(z: Tensor, act: str) -> Tensor | None:
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if act == "relu":
        return (z > 0).to(z.dtype)
    return None


def _conv(x, weight, geo):
    stride, padding, groups = geo
    return F.conv2d(x, weight, None, stride, padding, 1, groups)


class ConvBNActTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gamma, beta, geo, eps, act):
        y = _conv(x, weight, geo)
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if gamma is None else gamma * invstd
        shift = -mean * scale if beta is None else beta - mean * scale
        out = _ACTS[act](y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
        ctx.save_for_backward(x, weight, gamma, beta, mean, invstd)
        ctx.geo, ctx.act = geo, act
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, dout, _dmean, _dvar):
        x, weight, gamma, beta, mean, invstd = ctx.saved_tensors
        y = _conv(x, weight, ctx.geo)
        xhat = (y - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        g = dout
        if ctx.act != "identity":
            z = xhat if gamma is None else xhat * gamma.view(1, -1, 1, 1)
            z = z if beta is None else z + beta.view(1, -1, 1, 1)
            g = dout * _act_grad(z, ctx.act)
        m = y.numel() // y.shape[1]
        sum_g = g.sum((0, 2, 3))
        sum_gx = (g * xhat).sum((0, 2, 3))
        scale = invstd if gamma is None else gamma * invstd
        dy = (g - (sum_g / m).view(1, -1, 1, 1) - xhat * (sum_gx / m).view(1, -1, 1, 1))
        dy = dy * scale.view(1, -1, 1, 1)
        stride, padding, groups = ctx.geo
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy, x, weight, None, stride, padding, [1, 1], False, [0, 0], groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        dgamma = sum_gx if gamma is not None and ctx.needs_input_grad[2] else None
        dbeta = sum_g if beta is not None and ctx.needs_input_grad[3] else None
        return dx, dw, dgamma, dbeta, None, None, None


def conv_bn_act_train(x: Tensor, weight: Tensor, gamma: Tensor | None, beta: Tensor | None,
                      running_mean: Tensor | None, running_var: Tensor | None, *,
                      stride: int, padding: int, groups: int, momentum: float, eps: float,
                      act: str) -> Tensor:
    """act(batch_norm(conv2d(x, weight), training=True)), saving only x for backward;
    updates the running statistics in place like F.batch_norm."""
    geo = ([stride, stride], [padding, padding], groups)
    out, mean, var = ConvBNActTrain.apply(x, weight, gamma, beta, geo, eps, act)
    if running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, out.numel() // out.shape[1],
                             momentum)
    return out
