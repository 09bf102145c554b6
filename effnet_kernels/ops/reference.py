"""Plain-PyTorch reference: the definition of correctness, and the fallback backend.

Two layers live here.

1. Op-level truth (`depthwise_conv_bn_act`): the exact composition of PyTorch ops
   that each fused op must reproduce. Tests compare every backend against it.

2. Backend primitives (`dw_stats`, `dw_forward`, `dw_backward_reduce`, `dw_backward`):
   the small contract that every backend (cpu, cuda, triton, reference) implements
   and that `effnet_kernels.ops.depthwise` composes into the fused op. Notation, per
   channel c, with y = depthwise_conv(x, weight) and M = N * out_h * out_w:

     dw_stats            -> mean[c] = sum(y) / M,  var[c] = sum((y - mean)^2) / M
     dw_forward          -> out = act(y * scale[c] + shift[c])
     dw_backward_reduce  -> g = dy * act'(y * scale + shift)
                            sum_g[c] = sum(g),  sum_g_yc[c] = sum(g * (y - mean[c]))
     dw_backward         -> dyc = scale * g + coef_b + coef_c * (y - mean)   (grad of y)
                            dx = conv_transpose(dyc, weight),  dweight = corr(x, dyc)

   Statistics, scale, shift, mean and coefficients are float32 (float64 for float64
   inputs); outputs keep x's dtype and memory format. Geometry arguments are
   (stride, pad_top, pad_left, out_h, out_w), see `ops/geometry.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import act_code, act_grad, apply_act
from .geometry import acc_dtype, conv_geometry, memory_format_of


def depthwise_conv_bn_act(
    x, weight, bn_weight, bn_bias, running_mean, running_var, *,
    stride=1, padding=None, training=False, momentum=0.1, eps=1e-5, act="silu",
):
    """act(batch_norm(conv2d(x, weight, groups=C))) with PyTorch's own ops."""
    k = weight.shape[-1]
    geo = conv_geometry(x.shape[-2], x.shape[-1], k, stride, padding)
    y = depthwise_conv(x, weight, *geo)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return apply_act(y, act_code(act))


def depthwise_conv(x, weight, stride, pad_top, pad_left, out_h, out_w):
    """Depthwise conv with explicit top/left padding; bottom/right follow from out size."""
    h, w = x.shape[-2:]
    k = weight.shape[-1]
    pad_bottom = (out_h - 1) * stride + k - h - pad_top
    pad_right = (out_w - 1) * stride + k - w - pad_left
    if pad_top == pad_bottom and pad_left == pad_right and pad_top >= 0 and pad_left >= 0:
        return F.conv2d(x, weight, None, stride, (pad_top, pad_left), 1, x.shape[1])
    xp = F.pad(x, (pad_left, pad_right, pad_top, pad_bottom))
    return F.conv2d(xp, weight, None, stride, 0, 1, x.shape[1])


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _conv_acc(x, weight, geometry):
    acc = acc_dtype(x.dtype)
    return depthwise_conv(x.to(acc), weight.to(acc), *geometry)


def dw_stats(x, weight, stride, pad_top, pad_left, out_h, out_w):
    y = _conv_acc(x, weight, (stride, pad_top, pad_left, out_h, out_w))
    mean = y.mean(dim=(0, 2, 3))
    var = y.var(dim=(0, 2, 3), unbiased=False)
    return mean, var


def dw_forward(x, weight, scale, shift, stride, pad_top, pad_left, out_h, out_w, act):
    y = _conv_acc(x, weight, (stride, pad_top, pad_left, out_h, out_w))
    out = apply_act(y * _per_channel(scale) + _per_channel(shift), act)
    return out.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def _grad_of_act_input(dy, y, scale, shift, act):
    z = y * _per_channel(scale) + _per_channel(shift)
    return dy.to(y.dtype) * act_grad(z, act)


def dw_backward_reduce(dy, x, weight, scale, shift, mean, stride, pad_top, pad_left, act):
    geometry = (stride, pad_top, pad_left, dy.shape[2], dy.shape[3])
    y = _conv_acc(x, weight, geometry)
    g = _grad_of_act_input(dy, y, scale, shift, act)
    sum_g = g.sum(dim=(0, 2, 3))
    sum_g_yc = (g * (y - _per_channel(mean))).sum(dim=(0, 2, 3))
    return sum_g, sum_g_yc


def dw_backward(
    dy, x, weight, scale, shift, mean, coef_b, coef_c, stride, pad_top, pad_left, act
):
    h, w = x.shape[-2:]
    k = weight.shape[-1]
    pads = (pad_left, (dy.shape[3] - 1) * stride + k - w - pad_left,
            pad_top, (dy.shape[2] - 1) * stride + k - h - pad_top)
    acc = acc_dtype(x.dtype)
    xp = F.pad(x.to(acc), pads)
    wa = weight.to(acc)
    y = F.conv2d(xp, wa, None, stride, 0, 1, x.shape[1])
    g = _grad_of_act_input(dy, y, scale, shift, act)
    dyc = (
        g * _per_channel(scale)
        + _per_channel(coef_b)
        + _per_channel(coef_c) * (y - _per_channel(mean))
    )
    dxp = torch.nn.grad.conv2d_input(xp.shape, wa, dyc, stride, 0, 1, x.shape[1])
    dweight = torch.nn.grad.conv2d_weight(xp, wa.shape, dyc, stride, 0, 1, x.shape[1])
    dx = F.pad(dxp, tuple(-p for p in pads))
    return dx.to(x.dtype).contiguous(memory_format=memory_format_of(x)), dweight.to(weight.dtype)


# ---------------------------------------------------------------------------------------
# Squeeze-and-excitation (effnet_kernels.ops.squeeze_excite)
#
# Op-level truth `squeeze_excite`, then the four backend primitives. Sums, gate and dmean
# are (N, C) in the accumulation dtype; outputs keep x's dtype and memory format.
# ---------------------------------------------------------------------------------------


def squeeze_excite(x, reduce_weight, reduce_bias, expand_weight, expand_bias, *, act="silu",
                   pooled=None):
    """x * sigmoid(conv_expand(act(conv_reduce(avg_pool(x))))) with PyTorch's own ops.

    `pooled` is accepted for signature parity and ignored: by contract it equals
    x.sum((2, 3)), so the truth pools x itself."""
    dt = x.dtype
    s = F.adaptive_avg_pool2d(x, 1)
    rb = None if reduce_bias is None else reduce_bias.to(dt)
    eb = None if expand_bias is None else expand_bias.to(dt)
    h = apply_act(F.conv2d(s, reduce_weight.to(dt), rb), act_code(act))
    return x * torch.sigmoid(F.conv2d(h, expand_weight.to(dt), eb))


def se_pool(x):
    return x.to(acc_dtype(x.dtype)).sum(dim=(2, 3))


def se_scale(x, gate):
    out = x.to(gate.dtype) * gate[:, :, None, None]
    return out.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def se_pool_dy_x(dy, x):
    acc = acc_dtype(x.dtype)
    return (dy.to(acc) * x.to(acc)).sum(dim=(2, 3))


def se_backward_dx(dy, gate, dmean):
    dx = dy.to(gate.dtype) * gate[:, :, None, None] + dmean[:, :, None, None]
    return dx.to(dy.dtype).contiguous(memory_format=memory_format_of(dy))


# ---------------------------------------------------------------------------------------------
# Drop-connect + residual add (design.md §2; op module effnet_kernels/ops/drop_connect.py)
#
#   drop_connect_add  op-level truth: shortcut + x * mask[n] / (1 - p), mask ~ Bernoulli(1 - p)
#   dc_forward        primitive: out = shortcut + x * scale[n]  (x, shortcut share one format)
#   dc_backward       primitive: dx = dy * scale[n]              (dshortcut = dy, no primitive)
# scale has N entries in the accumulation dtype; math runs in that dtype.
# ---------------------------------------------------------------------------------------------


def drop_connect_add(x, shortcut, p, *, training, generator=None):
    """timm's drop_path followed by the residual add, with torch ops only.

    The mask is drawn exactly as the fused op draws it (float32 Bernoulli of N values), so the
    same generator state gives the same mask."""
    if not training or p == 0.0:
        return shortcut + x
    keep = 1.0 - p
    mask = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    mask.bernoulli_(keep, generator=generator)
    scale = mask.to(acc_dtype(x.dtype)) / keep
    return dc_forward(x, shortcut, scale)


def _per_sample(scale, t):
    return scale.view((-1,) + (1,) * (t.dim() - 1))


def dc_forward(x, shortcut, scale):
    acc = scale.dtype
    out = shortcut.to(acc) + x.to(acc) * _per_sample(scale, x)
    return out.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def dc_backward(dy, scale):
    dx = dy.to(scale.dtype) * _per_sample(scale, dy)
    return dx.to(dy.dtype).contiguous(memory_format=memory_format_of(dy))
