"""Fused depthwise conv + BatchNorm + activation as torch.library custom ops.

Forward (training), design.md §5: one pass for the batch statistics of the conv output
y, then one pass computing act(y * scale + shift) with the conv recomputed.
Backward: one pass for the per-channel sums of g = dy * act'(z) and g * (y - mean), then
one pass for dx and dweight. The op saves x, mean and var only (design.md §4).

Backends whose primitives can keep an intermediate between two passes (cpu, float32 and
float64: `dw_stats_stash`, `dw_backward_reduce_stash`) skip a recomputation within one
call: the stats pass writes y into the output buffer and the second pass applies the
affine and act to it in place; the reduce pass keeps g and y, and the dx/dweight pass
takes g as its dy with the identity act and reads y instead of recomputing the conv
(k > 1; a unit kernel's y is one multiply). Nothing more is saved for backward (g and y
are workspace of the backward call), and the results are bitwise those of the
recomputing route.

Two opaque ops, `dw_bn_act_fwd` and `dw_bn_act_bwd`, so torch.compile and torch.export
see one node each; the autograd formula connecting them is registered once here. The
running statistics are updated by the caller (effnet_kernels.functional), because an
autograd-registered custom op must be functional.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from .._ext import ext_module
from ..backends import register_impl, remember_backend, runs_forward_backend, select
from . import reference
from .activations import act_code
from .bn_math import COMPOSITE, as_dtype, running_stats, vector_math
from .checks import (
    check_bool_arg,
    check_device,
    check_int_arg,
    check_real_arg,
    check_same_dtype,
    check_tensor,
    check_vector,
    is_int,
    is_real,
    type_name,
)
from .eager import autocast_enabled_for, onnx_exporting, plain_eager, records_graph
from .geometry import (
    acc_dtype,
    conv_geometry,
    copy_in_format,
    dense,
    dense_format,
    memory_format_of,
)
from .second_order import first_order_only, reject_forward_ad

OP = "depthwise_conv_bn_act"
KERNEL_SIZES = (1, 3, 5, 7)

register_impl(OP, "reference", lambda: reference)
register_impl(OP, "cpu", lambda: ext_module().cpu)
register_impl(OP, "cuda", lambda: ext_module().cuda)
register_impl(OP, "triton", lambda: importlib.import_module("effnet_kernels.triton.depthwise_bn_act"))


def affine_or_identity(bn_weight, bn_bias, x):
    """BN weight and bias for x's channels, ones / zeros (accumulation dtype) when None."""
    c, acc = x.shape[1], acc_dtype(x.dtype)
    bn_weight = x.new_ones(c, dtype=acc) if bn_weight is None else bn_weight
    bn_bias = x.new_zeros(c, dtype=acc) if bn_bias is None else bn_bias
    return bn_weight, bn_bias


@torch.library.custom_op("effnet_kernels::dw_bn_act_fwd", mutates_args=())
def dw_bn_act_fwd(
    x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor,
    running_mean: Tensor | None, running_var: Tensor | None,
    stride: int, pad_top: int, pad_left: int, out_h: int, out_w: int,
    training: bool, eps: float, act: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, mean, var): the batch mean/biased var in training, the running
    statistics (as a copy) in eval."""
    return _forward_math(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                         pad_top, pad_left, out_h, out_w, training, eps, act)[:3]


def _forward_math(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, pad_top,
                  pad_left, out_h, out_w, training, eps, act, pool=False):
    """(out, mean, var, pool sums or None); the sums come from the forward kernel's
    epilogue on backends that have one (dw_forward_pool), else from a reduction of out."""
    x = dense(x)
    acc = acc_dtype(x.dtype)
    c = x.shape[1]
    if x.shape[0] == 0 or c == 0:  # nothing to compute: no kernel launches
        out = _empty_out(x, out_h, out_w)
        return (out, x.new_zeros(c, dtype=acc), x.new_ones(c, dtype=acc),
                _pool_sums(out) if pool else None)
    prims = select(OP, x)
    y = None
    if training and keeps_intermediates(prims, x):
        mean, var, y = prims.dw_stats_stash(x, weight, stride, pad_top, pad_left, out_h, out_w)
    elif training:
        mean, var = prims.dw_stats(x, weight, stride, pad_top, pad_left, out_h, out_w)
    else:
        mean = running_mean.to(acc, copy=True)
        var = running_var.to(acc, copy=True)
    _, scale, shift = vector_math(prims).bn_affine(mean, var, bn_weight, bn_bias, eps)
    if y is not None:
        out, sums = _affine_act_in_place(prims, y, scale, shift, act, pool, memory_format_of(x))
    else:
        out, sums = _act_pass(prims, x, weight, scale, shift,
                              (stride, pad_top, pad_left, out_h, out_w), act, pool)
    return out, mean, var, sums


# False makes every backend recompute y and act' (the A/B switch of the stash route; the
# tests check that both routes agree bit for bit).
KEEP_INTERMEDIATES = True
# Whether the backward's reduction pass may also keep y for the dx/dweight pass (which then
# skips its conv), besides g. A/B switch; results are bitwise the same either way.
KEEP_Y_IN_BACKWARD = True
# 3x3 convs whose output is at least this large recompute y instead: writing y and reading
# it back from memory costs more than the 9 taps (B0 batch 8, interleaved A/B of the
# training call: x1.09 faster on 32x112x112 and on 96x112x112, x1.04 on 144x56x56; 5x5
# convs and outputs that stay in cache are faster keeping y, by up to x1.07).
KEEP_Y_MAX_BYTES_3X3 = 8 << 20


def backward_keeps_y(weight: Tensor, dy: Tensor) -> bool:
    """Whether a backward that keeps g (keeps_intermediates) keeps y too."""
    k = weight.shape[-1]
    if not KEEP_Y_IN_BACKWARD or k == 1:
        return False
    return k > 3 or dy.numel() * dy.element_size() < KEEP_Y_MAX_BYTES_3X3


def keeps_intermediates(prims, x: Tensor) -> bool:
    """Whether prims can keep y (forward) and g (backward) between two passes for x: a
    backend with the stash primitives, and float storage (y and g stay exact)."""
    return (KEEP_INTERMEDIATES and x.dtype in (torch.float32, torch.float64)
            and hasattr(prims, "dw_stats_stash"))


def _affine_act_in_place(prims, y, scale, shift, act, pool, fmt):
    """(out, pool sums or None): act(y * scale + shift) written over the kept y."""
    if pool:
        out, sums = prims.dw_affine_act_pool_(y, scale, shift, act)
    else:
        out, sums = prims.dw_affine_act_(y, scale, shift, act), None
    return copy_in_format(out, fmt), sums


def _empty_out(x, out_h, out_w):
    return torch.empty((*x.shape[:2], out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


def _act_pass(prims, x, weight, scale, shift, geo, act, pool):
    """(out, pool sums or None): out = act(conv * scale + shift) in x's memory format; the
    sums come from the kernel's epilogue where the backend has dw_forward_pool, else from a
    reduction of out."""
    fmt = memory_format_of(x)
    if pool and hasattr(prims, "dw_forward_pool"):
        out, sums = prims.dw_forward_pool(x, weight, scale, shift, *geo, act)
        return copy_in_format(out, fmt), sums
    out = copy_in_format(prims.dw_forward(x, weight, scale, shift, *geo, act), fmt)
    return out, (_pool_sums(out) if pool else None)


@dw_bn_act_fwd.register_fake
def _(x, weight, bn_weight, bn_bias, running_mean, running_var,
      stride, pad_top, pad_left, out_h, out_w, training, eps, act):
    n, c = x.shape[:2]
    out = torch.empty(
        (n, c, out_h, out_w), dtype=x.dtype, device=x.device,
        memory_format=dense_format(x),
    )
    acc = acc_dtype(x.dtype)
    return out, x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


@torch.library.custom_op("effnet_kernels::dw_bn_act_bwd", mutates_args=())
def dw_bn_act_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor,
    mean: Tensor, var: Tensor, stride: int, pad_top: int, pad_left: int,
    training: bool, eps: float, act: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbn_weight, dbn_bias)."""
    return _backward_math(dy, x, weight, bn_weight, bn_bias, mean, var, stride, pad_top,
                          pad_left, training, eps, act)


def _backward_math(dy, x, weight, bn_weight, bn_bias, mean, var, stride, pad_top, pad_left,
                   training, eps, act):
    x = dense(x)
    fmt = memory_format_of(x)
    if dy.numel() == 0:  # empty batch: zero gradients, no kernel launches
        return (torch.zeros_like(x, memory_format=fmt), torch.zeros_like(weight),
                torch.zeros_like(bn_weight), torch.zeros_like(bn_bias))
    dy = dy.contiguous(memory_format=fmt)
    prims = select(OP, x)
    bn = vector_math(prims)
    invstd, scale, shift = bn.bn_affine(mean, var, bn_weight, bn_bias, eps)
    count = dy.shape[0] * dy.shape[2] * dy.shape[3]
    kept_y = None
    if keeps_intermediates(prims, x):
        # g = dy * act'(z) is kept; g * identity' = g exactly, so the last pass skips act'.
        sum_g, sum_g_yc, dy, kept_y = prims.dw_backward_reduce_stash(
            dy, x, weight, scale, shift, mean, stride, pad_top, pad_left, act,
            keep_y=backward_keeps_y(weight, dy))
        act = act_code("identity")
    else:
        sum_g, sum_g_yc = prims.dw_backward_reduce(
            dy, x, weight, scale, shift, mean, stride, pad_top, pad_left, act
        )
    coef_b, coef_c, dgamma = bn.bn_backward_coefs(scale, invstd, sum_g, sum_g_yc, count,
                                                  training)
    dx, dweight = prims.dw_backward(
        dy, x, weight, scale, shift, mean, coef_b, coef_c, stride, pad_top, pad_left, act,
        **({} if kept_y is None else {"y": kept_y}))
    return (copy_in_format(dx, fmt), dweight, as_dtype(dgamma, bn_weight.dtype),
            as_dtype(sum_g, bn_bias.dtype))


@dw_bn_act_bwd.register_fake
def _(dy, x, weight, bn_weight, bn_bias, mean, var, stride, pad_top, pad_left,
      training, eps, act):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))
    return dx, torch.empty_like(weight), torch.empty_like(bn_weight), torch.empty_like(bn_bias)


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    x, weight, bn_weight, bn_bias, _, _, stride, pad_top, pad_left, _, _, training, eps, act = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var)
    ctx.args = (stride, pad_top, pad_left, training, eps, act)


@runs_forward_backend
def _backward(ctx, dy, _dmean, _dvar):
    x, weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    dx, dweight, dgamma, dbeta = dw_bn_act_bwd(
        dy, x, weight, bn_weight, bn_bias, mean, var, *ctx.args
    )
    return (dx, dweight, dgamma, dbeta) + (None,) * 10


dw_bn_act_fwd.register_autograd(_backward, setup_context=_setup_context)
first_order_only(dw_bn_act_bwd, "depthwise_conv_bn_act")


# Eager fast path (ops/eager.py): the same math without the custom-op dispatch, which
# costs a few hundred microseconds per training call, more than a tenth of the op on
# EfficientNet's 14x14 and 7x7 layers.
EAGER_FAST_PATH = True


class _DepthwiseFn(torch.autograd.Function):
    """Outputs (out, mean, var, pool sums); the sums are None unless `pool`.

    In training the running statistics are updated here, inside forward, as F.batch_norm
    updates them inside the op that saves its tensors: activation checkpointing that
    recomputes a segment only up to its last saved tensor (torch.utils.checkpoint's early
    stop) then repeats the update exactly where it repeats PyTorch's."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, geo, training,
                eps, act, pool, momentum):
        inputs = (x, weight, bn_weight, bn_bias, running_mean, running_var, *geo, training,
                  eps, act)
        out, mean, var, sums = _forward_math(*inputs, pool=pool)
        count = x.shape[0] * geo[3] * geo[4]
        if training and count > 0 and running_mean is not None and running_var is not None:
            vector_math(select(OP, x)).bn_update_running(running_mean, running_var, mean, var,
                                                         momentum, count)
        _setup_context(ctx, inputs, (out, mean, var))
        if sums is not None:
            ctx.mark_non_differentiable(sums)
        return out, mean, var, sums

    @staticmethod
    @runs_forward_backend
    def backward(ctx, dy, _dmean, _dvar, _dsums):
        # create_graph=True (grad mode on here): take the custom op, whose gradients
        # then raise a clear error if differentiated again (ops/second_order.py).
        bwd = dw_bn_act_bwd if torch.is_grad_enabled() else _backward_math
        return (*bwd(dy, *ctx.saved_tensors, *ctx.args), None, None, None, None, None, None,
                None, None)


def _check_padding(padding, kernel: int):
    if padding is None or padding == "same":
        return padding
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and padding[0] == padding[1]:
        padding = padding[0]
    if not is_int(padding) or not 0 <= padding <= kernel // 2:
        raise ValueError(
            f"padding must be None, 'same' or an int in [0, {kernel // 2}] for kernel size "
            f"{kernel}, got {padding!r}"
        )
    return int(padding)


def _check_inputs(x, weight, bn_weight, bn_bias, running_mean, running_var, training):
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_same_dtype("weight", weight, "x", x)
    check_device("weight", weight, x)
    c = x.shape[1]
    k = weight.shape[-1]
    if tuple(weight.shape) != (c, 1, k, k):
        raise ValueError(
            f"weight must have shape (C, 1, k, k) = ({c}, 1, k, k) for a depthwise conv of x "
            f"with C={c}, got {tuple(weight.shape)}"
        )
    if k not in KERNEL_SIZES:
        raise ValueError(f"kernel size must be one of {KERNEL_SIZES}, got {k}")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        check_vector(name, t, c, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be "
                         "None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")


def depthwise_conv_bn_act(
    x: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, *,
    stride: int = 1, padding: int | str | None = None, training: bool = False,
    momentum: float = 0.1, eps: float = 1e-5, act: str = "silu", process_group=None,
    return_pool_sums: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """act(batch_norm(conv2d(x, weight, groups=C))) in one fused op.

    Same semantics as `effnet_kernels.ops.reference.depthwise_conv_bn_act`: in training the
    batch statistics normalize and the running statistics are updated in place (unbiased
    variance, PyTorch's momentum convention; the nn module turns momentum=None into the
    cumulative-average factor, as BatchNorm2d does). padding: None (= k // 2), an int,
    or "same" (TensorFlow's asymmetric SAME). act: "silu", "relu", "relu6" or "identity".
    process_group: in training, normalize with statistics synchronized over this
    torch.distributed group (SyncBatchNorm semantics).
    return_pool_sums: return (out, sums) with sums[n, c] the sum of out[n, c] over its
    pixels (float32; float64 for float64 x), for squeeze-excite's pool. They carry no
    gradient. Where the backend's forward kernel emits them (cpu, eager calls) they cost
    no extra pass over out; elsewhere they are one reduction of out.
    """
    if autocast_enabled_for(x):
        # As eager autocast does for conv2d: input and weight in the autocast dtype.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    training = check_bool_arg("training", training)
    _check_inputs(x, weight, bn_weight, bn_bias, running_mean, running_var, training)
    reject_forward_ad("depthwise_conv_bn_act", x, weight, bn_weight, bn_bias)
    stride = check_int_arg("stride", stride, (1, 2))
    kernel = weight.shape[-1]
    padding = _check_padding(padding, kernel)
    code = act_code(act)
    eps = check_real_arg("eps", eps, "a positive float")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not is_real(momentum) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    momentum = float(momentum)
    if process_group is not None and not (torch.distributed.is_available() and isinstance(
            process_group, torch.distributed.ProcessGroup)):
        raise TypeError("process_group must be a torch.distributed ProcessGroup or None, got "
                        f"{type_name(process_group)}")
    geo = conv_geometry(x.shape[2], x.shape[3], kernel, stride, padding)
    if geo.out_h < 1 or geo.out_w < 1:
        raise ValueError(
            f"x spatial size {tuple(x.shape[2:])} is too small for kernel size {kernel} "
            f"with padding {padding!r}"
        )
    n, c = x.shape[:2]
    if training and n > 0 and n * geo.out_h * geo.out_w == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{torch.Size((n, c, geo.out_h, geo.out_w))}"
        )
    bn_weight, bn_bias = affine_or_identity(bn_weight, bn_bias, x)
    if onnx_exporting():  # ONNX has no node for the fused op: export its math
        out = reference.depthwise_conv_bn_act(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
            padding=padding, training=training, momentum=momentum, eps=eps, act=act)
        return (out, _pool_sums(out)) if return_pool_sums else out
    if training and process_group is not None:
        from .depthwise_sync import SyncDepthwiseConvBNAct

        out = SyncDepthwiseConvBNAct.apply(x, weight, bn_weight, bn_bias, geo, eps, code,
                                           process_group,
                                           running_stats(running_mean, running_var, momentum))[0]
        return (out, _pool_sums(out)) if return_pool_sums else out
    if EAGER_FAST_PATH and plain_eager(x, weight, bn_weight, bn_bias, running_mean,
                                         running_var):
        if not training and not records_graph(x, weight, bn_weight, bn_bias):
            out, sums = _eval_forward(x, weight, bn_weight, bn_bias, running_mean,
                                      running_var, geo, eps, code, return_pool_sums)
            return (out, sums) if return_pool_sums else out
        out, _, _, sums = _DepthwiseFn.apply(x, weight, bn_weight, bn_bias, running_mean,
                                             running_var, tuple(geo), training, eps, code,
                                             return_pool_sums, momentum)
        return (out, sums) if return_pool_sums else out
    # Traced by torch.compile / export: the custom op, running statistics in plain torch ops.
    out, mean, var = dw_bn_act_fwd(
        x, weight, bn_weight, bn_bias, running_mean, running_var, *geo, training, eps, code
    )
    count = n * geo.out_h * geo.out_w
    if training and count > 0 and running_mean is not None and running_var is not None:
        COMPOSITE.bn_update_running(running_mean, running_var, mean, var, momentum, count)
    return (out, _pool_sums(out)) if return_pool_sums else out


def pool_epilogue_available(x: Tensor) -> bool:
    """Whether an eager call on x gets return_pool_sums from the forward kernel itself
    (no extra pass): the serving backend has dw_forward_pool (cpu)."""
    return not torch.compiler.is_compiling() and hasattr(select(OP, x), "dw_forward_pool")


def _pool_sums(out: Tensor) -> Tensor:
    """(N, C) sums of out over its pixels, in the accumulation dtype, without gradient."""
    return out.detach().sum(dim=(2, 3), dtype=acc_dtype(out.dtype))


def _eval_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, geo, eps, act,
                  pool: bool):
    """Eval without an autograd graph: one affine call and one forward pass; no copies of
    the running statistics (nothing is saved). Returns (out, pool sums or None)."""
    x = dense(x)
    if x.shape[0] == 0 or x.shape[1] == 0:
        out = _empty_out(x, geo.out_h, geo.out_w)
        return out, (_pool_sums(out) if pool else None)
    prims = select(OP, x)
    acc = acc_dtype(x.dtype)
    _, scale, shift = vector_math(prims).bn_affine(
        as_dtype(running_mean, acc).contiguous(), as_dtype(running_var, acc).contiguous(),
        bn_weight, bn_bias, eps)
    return _act_pass(prims, x, weight, scale, shift, geo, act, pool)
