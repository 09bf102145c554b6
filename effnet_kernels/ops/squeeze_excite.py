"""Squeeze-and-excitation as torch.library custom ops (design.md §2, §4).

    s = mean_hw(x)                 (N, C)   pooled mean (or pooled / HW when given)
    h = s @ Wr^T + br              (N, Cr)  conv_reduce, a 1x1 conv on a 1x1 image
    a = act(h)
    z = a @ We^T + be              (N, C)   conv_expand
    gate = sigmoid(z)
    out = x * gate[n, c]

Forward: one read of x for the sums (skipped when the caller passes `pooled`), the MLP on
(N, C) in plain torch (it is tiny), one fused scale pass. Backward: one pass reducing
dgate = sum_hw(dy * x), the MLP backward in torch, one pass dx = dy * gate + ds / HW.
Saved for backward: x and the small vectors (pooled mean, reduce-conv output h, gate).

Backend primitives (reference, cpu, cuda, triton), acc = float32 (float64 for float64 x):
    se_pool(x)                        -> (N, C) acc: sum over H x W of x
    se_scale(x, gate)                 -> x * gate[n, c], x's dtype and memory format
    se_pool_dy_x(dy, x)               -> (N, C) acc: sum over H x W of dy * x
    se_backward_dx(dy, gate, dmean)   -> dy * gate[n, c] + dmean[n, c], dy's dtype/format
gate and dmean are (N, C) acc-dtype contiguous; x and dy are dense NCHW or channels_last
with the same format.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ext import ext_module
from ..backends import register_impl, remember_backend, runs_forward_backend, select
from . import reference
from .activations import act_code, apply_act, by_code
from .bn_math import as_dtype
from .checks import check_device, check_tensor
from .eager import autocast_enabled_for, onnx_exporting, plain_eager, records_graph
from .geometry import acc_dtype, dense, dense_format, memory_format_of
from .second_order import first_order_only, reject_forward_ad

OP = "squeeze_excite"


def _compiled(device: str):
    """The compiled primitives; a clear error when _C predates this op's kernels."""
    prims = getattr(ext_module(), device, None)
    if not hasattr(prims, "se_pool"):
        raise RuntimeError(
            f"effnet_kernels._C has no {device} squeeze_excite kernels (built before they were "
            "added?): rebuild with `pip install --no-build-isolation -e .`"
        )
    return prims


register_impl(OP, "reference", lambda: reference)
register_impl(OP, "cpu", lambda: _compiled("cpu"))
register_impl(OP, "cuda", lambda: _compiled("cuda"))
register_impl(OP, "triton", lambda: importlib.import_module("effnet_kernels.triton.squeeze_excite"))


def excite_mlp(mean, rw, rb, ew, eb, act):
    """(h, gate) of the excitation MLP, in mean's (accumulation) dtype."""
    acc = mean.dtype
    h = F.linear(mean, as_dtype(rw, acc).flatten(1), as_dtype(rb, acc))
    gate = torch.sigmoid(F.linear(apply_act(h, act), as_dtype(ew, acc).flatten(1),
                                  as_dtype(eb, acc)))
    return h, gate


def excite_gate(sums: Tensor, pixels: int, reduce_weight: Tensor, reduce_bias: Tensor | None,
                expand_weight: Tensor, expand_bias: Tensor | None, act: str) -> Tensor:
    """The (N, C) gate sigmoid(conv_expand(act(conv_reduce(sums / pixels)))) from the pooled
    sums (e.g. the depthwise op's pool epilogue), in sums' dtype. No autograd bookkeeping:
    for callers that record no graph."""
    return excite_mlp(sums / pixels, reduce_weight, bias_or_zeros(reduce_bias, reduce_weight),
                expand_weight, bias_or_zeros(expand_bias, expand_weight), act_code(act))[1]


def bias_or_zeros(bias: Tensor | None, weight: Tensor) -> Tensor:
    """A 1x1 conv's bias, zeros (weight's dtype) for None."""
    return weight.new_zeros(weight.shape[:1]) if bias is None else bias


def _act_backward(da, h, act):
    """da * act'(h), one ATen op (each small op costs ~5-10 us of dispatch)."""
    return by_code(act).backward(da, h)


@torch.library.custom_op("effnet_kernels::se_fwd", mutates_args=())
def se_fwd(
    x: Tensor, reduce_weight: Tensor, reduce_bias: Tensor, expand_weight: Tensor,
    expand_bias: Tensor, pooled: Tensor | None, act: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, mean, h, gate); the (N, C) / (N, Cr) acc-dtype vectors are saved for
    backward (pooled mean, pre-activation of the reduce conv, sigmoid gate)."""
    return _forward(x, reduce_weight, reduce_bias, expand_weight, expand_bias, pooled, act)


def _forward(x, reduce_weight, reduce_bias, expand_weight, expand_bias, pooled, act):
    x = dense(x)
    prims = select(OP, x)
    if hasattr(prims, "se_forward"):  # cpu: the same steps in one compiled call
        out, mean, h, gate = prims.se_forward(x, reduce_weight, reduce_bias, expand_weight,
                                              expand_bias, pooled, act)
        return out.contiguous(memory_format=memory_format_of(x)), mean, h, gate
    acc = acc_dtype(x.dtype)
    sums = prims.se_pool(x) if pooled is None else as_dtype(pooled, acc)
    mean = sums / (x.shape[2] * x.shape[3])
    h, gate = excite_mlp(mean, reduce_weight, reduce_bias, expand_weight, expand_bias, act)
    out = prims.se_scale(x, gate)
    return out.contiguous(memory_format=memory_format_of(x)), mean, h, gate


@se_fwd.register_fake
def _(x, reduce_weight, reduce_bias, expand_weight, expand_bias, pooled, act):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))
    acc = acc_dtype(x.dtype)
    n, c = x.shape[:2]
    cr = reduce_weight.shape[0]
    return (out, x.new_empty((n, c), dtype=acc), x.new_empty((n, cr), dtype=acc),
            x.new_empty((n, c), dtype=acc))


@torch.library.custom_op("effnet_kernels::se_bwd", mutates_args=())
def se_bwd(
    dy: Tensor, x: Tensor, mean: Tensor, h: Tensor, gate: Tensor, reduce_weight: Tensor,
    reduce_bias: Tensor, expand_weight: Tensor, expand_bias: Tensor, act: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dreduce_weight, dreduce_bias, dexpand_weight, dexpand_bias)."""
    return _backward_math(dy, x, mean, h, gate, reduce_weight, reduce_bias, expand_weight,
                          expand_bias, act)


def _backward_math(dy, x, mean, h, gate, reduce_weight, reduce_bias, expand_weight,
                   expand_bias, act):
    x = dense(x)
    dy = dy.contiguous(memory_format=memory_format_of(x))
    prims = select(OP, x)
    if hasattr(prims, "se_backward"):  # cpu: the same steps in one compiled call
        dx, *weight_grads = prims.se_backward(dy, x, mean, h, gate, reduce_weight, reduce_bias,
                                              expand_weight, expand_bias, act)
        return (dx.contiguous(memory_format=memory_format_of(x)), *weight_grads)
    dgate = prims.se_pool_dy_x(dy, x)                           # (N, C) sum_hw dy * x
    dmean, *weight_grads = mlp_backward(dgate, mean, h, gate, reduce_weight, reduce_bias,
                                        expand_weight, expand_bias, act,
                                        x.shape[2] * x.shape[3])
    dx = prims.se_backward_dx(dy, gate, dmean)
    return (dx.contiguous(memory_format=memory_format_of(x)), *weight_grads)


def mlp_backward(dgate: Tensor, mean: Tensor, h: Tensor, gate: Tensor, reduce_weight: Tensor,
                 reduce_bias: Tensor, expand_weight: Tensor, expand_bias: Tensor, act: int,
                 pixels: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The excitation MLP's backward from dL/dgate (N, C): (dL/dx_pixel, dreduce_weight,
    dreduce_bias, dexpand_weight, dexpand_bias), where dL/dx_pixel (N, C) = dL/dmean / pixels
    is what each pixel of x gets through the pooled mean; weight grads in their dtypes."""
    acc = mean.dtype
    rw, ew = as_dtype(reduce_weight, acc).flatten(1), as_dtype(expand_weight, acc).flatten(1)
    dz = torch.ops.aten.sigmoid_backward(dgate, gate)           # dgate * gate * (1 - gate)
    dh = _act_backward(dz @ ew, h, act)                         # (N, Cr)
    dmean = (dh @ rw).div_(pixels)                              # d mean / d x = 1 / HW
    return (
        dmean,
        as_dtype((dh.t() @ mean).view_as(reduce_weight), reduce_weight.dtype),
        as_dtype(dh.sum(0), reduce_bias.dtype),
        as_dtype((dz.t() @ apply_act(h, act)).view_as(expand_weight), expand_weight.dtype),
        as_dtype(dz.sum(0), expand_bias.dtype),
    )


@se_bwd.register_fake
def _(dy, x, mean, h, gate, reduce_weight, reduce_bias, expand_weight, expand_bias, act):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))
    return (dx, torch.empty_like(reduce_weight), torch.empty_like(reduce_bias),
            torch.empty_like(expand_weight), torch.empty_like(expand_bias))


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    x, rw, rb, ew, eb, _, act = inputs
    _, mean, h, gate = output
    ctx.mark_non_differentiable(mean, h, gate)
    ctx.save_for_backward(x, mean, h, gate, rw, rb, ew, eb)
    ctx.act = act


@runs_forward_backend
def _backward(ctx, dy, _dmean, _dh, _dgate):
    grads = se_bwd(dy, *ctx.saved_tensors, ctx.act)
    # pooled is only a precomputed sum of x: its gradient already flows through dx.
    return grads + (None, None)


se_fwd.register_autograd(_backward, setup_context=_setup_context)
first_order_only(se_bwd, "squeeze_excite")


# Eager fast path (ops/eager.py): the same math without the custom-op dispatch.
EAGER_FAST_PATH = True


class _SqueezeExciteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rw, rb, ew, eb, pooled, act):
        remember_backend(ctx)
        out, mean, h, gate = _forward(x, rw, rb, ew, eb, pooled, act)
        ctx.save_for_backward(x, mean, h, gate, rw, rb, ew, eb)
        ctx.act = act
        return out

    @staticmethod
    @runs_forward_backend
    def backward(ctx, dy):
        # create_graph=True (grad mode on here): take the custom op, whose gradients
        # then raise a clear error if differentiated again (ops/second_order.py).
        bwd = se_bwd if torch.is_grad_enabled() else _backward_math
        return (*bwd(dy, *ctx.saved_tensors, ctx.act), None, None)


def _check_param(name, t, shape, x):
    check_tensor(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    check_device(name, t, x)


def _check_inputs(x, reduce_weight, reduce_bias, expand_weight, expand_bias, pooled):
    check_tensor("x", x, ndim=4)
    check_tensor("reduce_weight", reduce_weight, ndim=4)
    n, c, h, w = x.shape
    cr = reduce_weight.shape[0]
    if h * w == 0:
        raise ValueError(f"x must have a non-empty spatial size, got shape {tuple(x.shape)}")
    if cr < 1:
        raise ValueError(
            f"reduce_weight must have at least one output channel, got {tuple(reduce_weight.shape)}"
        )
    _check_param("reduce_weight", reduce_weight, (cr, c, 1, 1), x)
    _check_param("expand_weight", expand_weight, (c, cr, 1, 1), x)
    _check_param("reduce_bias", reduce_bias, (cr,), x)
    _check_param("expand_bias", expand_bias, (c,), x)
    if pooled is not None:
        check_tensor("pooled", pooled, dtypes=(torch.float32, torch.float64))
        if tuple(pooled.shape) != (n, c):
            raise ValueError(f"pooled must have shape (N, C) = {(n, c)}, got {tuple(pooled.shape)}")
        check_device("pooled", pooled, x)


def squeeze_excite(
    x: Tensor, reduce_weight: Tensor, reduce_bias: Tensor | None, expand_weight: Tensor,
    expand_bias: Tensor | None, *, act: str = "silu", pooled: Tensor | None = None,
) -> Tensor:
    """x * sigmoid(conv_expand(act(conv_reduce(mean_hw(x))))) in two fused passes.

    Weights are shaped like timm's `se.conv_reduce` (Cr, C, 1, 1) / (Cr,) and
    `se.conv_expand` (C, Cr, 1, 1) / (C,), in x's dtype or float32 (the MLP runs in float32,
    float64 for float64 x). A None bias means zeros. `pooled`, when given, must be the
    (N, C) float32 sums of x over H x W (e.g. emitted by the producing kernel); it replaces
    the pooling read and receives no gradient (its gradient flows through x).
    act: "silu", "relu", "relu6" or "identity". Same semantics as `reference.squeeze_excite`.
    Under autocast, x keeps its dtype and the MLP still runs in float32.
    """
    if autocast_enabled_for(x):
        with torch.autocast(x.device.type, enabled=False):
            return squeeze_excite(x, reduce_weight, reduce_bias, expand_weight, expand_bias,
                                  act=act, pooled=pooled)
    if isinstance(reduce_weight, Tensor):
        reduce_bias = bias_or_zeros(reduce_bias, reduce_weight)
    if isinstance(expand_weight, Tensor):
        expand_bias = bias_or_zeros(expand_bias, expand_weight)
    _check_inputs(x, reduce_weight, reduce_bias, expand_weight, expand_bias, pooled)
    reject_forward_ad("squeeze_excite", x, reduce_weight, reduce_bias, expand_weight,
                      expand_bias)
    code = act_code(act)
    if onnx_exporting():  # ONNX has no node for the fused op: export its math
        return reference.squeeze_excite(x, reduce_weight, reduce_bias, expand_weight,
                                        expand_bias, act=act)
    if EAGER_FAST_PATH and plain_eager(x, reduce_weight, reduce_bias, expand_weight,
                                       expand_bias, pooled):
        if not records_graph(x, reduce_weight, reduce_bias, expand_weight, expand_bias):
            return _forward(x, reduce_weight, reduce_bias, expand_weight, expand_bias, pooled,
                            code)[0]
        return _SqueezeExciteFn.apply(x, reduce_weight, reduce_bias, expand_weight, expand_bias,
                                      pooled, code)
    out, _, _, _ = se_fwd(x, reduce_weight, reduce_bias, expand_weight, expand_bias, pooled, code)
    return out
