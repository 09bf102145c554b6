"""Drop-connect (stochastic depth) fused with the residual add, as torch.library custom ops.

    out = shortcut + x * scale[n],   scale[n] = mask[n] / (1 - p),   mask ~ Bernoulli(1 - p)

The per-sample mask is drawn here in Python with torch (from `generator` or the default
generator of x's device), outside the custom op: the same seed gives the same mask on every
backend, and torch.compile traces the RNG call itself. Kernels only see `scale`, a vector of
N values in the accumulation dtype (float32; float64 for float64 inputs).

Two opaque ops:
  dc_fwd(x, shortcut, scale) -> out   one pass: read x and shortcut, write out
  dc_bwd(dy, scale)          -> dx    one pass: dx = dy * scale[n]
The gradient of shortcut is dy itself. It is returned by the autograd formula (plain Python,
outside any custom op), so it costs nothing: no copy, and no output aliasing an input of a
custom op (which torch.library forbids). Saved for backward: scale only (design.md §4).

Layout: in NCHW and in channels_last the batch dimension is outermost, so sample n owns the
contiguous block [n * S, (n + 1) * S) of S = numel / N elements in both formats. Kernels
therefore work on flat memory; x, shortcut and out only need to share one memory format.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor

from .._ext import ext_module
from ..backends import forced_backend, register_impl, remember_backend, runs_forward_backend, select
from . import reference
from .bn_math import as_dtype
from .checks import check_bool_arg, check_real_arg, check_same_dtype, check_tensor
from .eager import onnx_exporting, plain_eager
from .geometry import acc_dtype, dense_format, is_dense

OP = "drop_connect_add"

register_impl(OP, "reference", lambda: reference)
register_impl(OP, "cpu", lambda: ext_module().cpu)
register_impl(OP, "cuda", lambda: ext_module().cuda)
register_impl(OP, "triton", lambda: importlib.import_module("effnet_kernels.triton.drop_connect"))


def _same_format(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return t.contiguous(memory_format=fmt) if t.dim() == 4 else t.contiguous()


@torch.library.custom_op("effnet_kernels::dc_fwd", mutates_args=())
def dc_fwd(x: Tensor, shortcut: Tensor, scale: Tensor) -> Tensor:
    """shortcut + x * scale[n]; the output has x's memory format."""
    fmt = dense_format(x)
    x, shortcut = _same_format(x, fmt), _same_format(shortcut, fmt)
    return select(OP, x).dc_forward(x, shortcut, scale)


@dc_fwd.register_fake
def _(x, shortcut, scale):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))


@torch.library.custom_op("effnet_kernels::dc_bwd", mutates_args=())
def dc_bwd(dy: Tensor, scale: Tensor) -> Tensor:
    """dy * scale[n]; the output has dy's memory format."""
    dy = _same_format(dy, dense_format(dy))
    return select(OP, dy).dc_backward(dy, scale)


@dc_bwd.register_fake
def _(dy, scale):
    return torch.empty(dy.shape, dtype=dy.dtype, device=dy.device, memory_format=dense_format(dy))


def _fwd_setup_context(ctx, inputs, output):
    remember_backend(ctx)
    x, _, scale = inputs
    ctx.save_for_backward(scale)
    ctx.fmt = dense_format(x)


@runs_forward_backend
def _fwd_backward(ctx, dy):
    (scale,) = ctx.saved_tensors
    dx = dc_bwd(_same_format(dy, ctx.fmt), scale) if ctx.needs_input_grad[0] else None
    return dx, dy, None


dc_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _bwd_setup_context(ctx, inputs, output):
    remember_backend(ctx)
    ctx.save_for_backward(inputs[1])


@runs_forward_backend
def _bwd_backward(ctx, ddx):
    # dc_bwd is linear in dy: its own backward is itself (double backward support).
    (scale,) = ctx.saved_tensors
    return dc_bwd(ddx, scale), None


dc_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


# ---- eager fast path -------------------------------------------------------------------
# The custom-op route costs tens of microseconds of Python dispatch per call (custom_op's
# autograd wrapper + redispatch), more than the kernels themselves on EfficientNet's small
# residual tensors. Plain eager calls therefore take an autograd.Function that calls the
# same primitives directly; anything being traced takes the custom ops, which are what
# compile sees (ops/eager.py). Where the backend's primitives also offer the whole op as
# one C++ autograd node (cpu: dc_add_train, csrc/cpu/drop_connect_autograd.cpp), eager calls
# take that instead: its backward never enters Python. All routes share the primitives and
# the mask draw, and are tested against the reference.
EAGER_FAST_PATH = True
# Eager calls take the backend's C++ autograd node where it has one (dc_add_train);
# False keeps them on the Python autograd.Function (tests run both).
NATIVE_AUTOGRAD_NODE = True


class _DropConnectAddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shortcut, scale):
        remember_backend(ctx)
        fmt = dense_format(x)
        prims = select(OP, x)
        ctx.save_for_backward(scale)
        ctx.fmt, ctx.prims = fmt, prims
        return prims.dc_forward(_same_format(x, fmt), _same_format(shortcut, fmt), scale)

    @staticmethod
    @runs_forward_backend
    def backward(ctx, dy):
        (scale,) = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dy_fmt = _same_format(dy, ctx.fmt)
            # create_graph=True (grad mode on here): take the differentiable custom op.
            dx = dc_bwd(dy_fmt, scale) if torch.is_grad_enabled() else ctx.prims.dc_backward(dy_fmt, scale)
        return dx, dy, None


def _check_inputs(x, shortcut, p, training, generator) -> tuple[float, bool]:
    check_tensor("x", x)
    check_tensor("shortcut", shortcut)
    if x.dim() < 1:
        raise ValueError(f"x must have a leading batch dimension (ndim >= 1), got shape {tuple(x.shape)}")
    if shortcut.shape != x.shape:
        raise ValueError(
            f"shortcut must have the same shape as x {tuple(x.shape)}, got {tuple(shortcut.shape)}"
        )
    check_same_dtype("shortcut", shortcut, "x", x)
    if shortcut.device != x.device:
        raise ValueError(f"shortcut must be on {x.device} like x, got {shortcut.device}")
    training = check_bool_arg("training", training)
    p = check_real_arg("p", p, "a float in [0, 1)")
    if not (0.0 <= p < 1.0) or math.isnan(p):
        raise ValueError(f"p must be in [0, 1), got {p}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(
                f"generator must be a {x.device.type} generator like x's device, "
                f"got a {generator.device.type} generator"
            )
    return p, training


def drop_scale(n: int, p: float, device, dtype, generator=None) -> Tensor:
    """scale[n] = mask[n] / (1 - p) with mask ~ Bernoulli(1 - p), in the accumulation dtype.

    The mask is always drawn in float32 so that one seed gives one mask for every dtype."""
    keep = 1.0 - p
    mask = torch.empty(n, dtype=torch.float32, device=device).bernoulli_(keep, generator=generator)
    return as_dtype(mask, acc_dtype(dtype)).div_(keep)


def drop_connect_add(
    x: Tensor, shortcut: Tensor, p: float, *, training: bool, generator: torch.Generator | None = None
) -> Tensor:
    """shortcut + x * mask[n] / (1 - p), mask ~ Bernoulli(1 - p) per sample (timm drop_path).

    Eval (training=False) or p == 0 gives exactly `shortcut + x` (one plain add: there is
    nothing to fuse). The output keeps x's memory format (NCHW or channels_last); a shortcut
    in another format is converted to x's. Same semantics as
    `effnet_kernels.ops.reference.drop_connect_add`.
    """
    p, training = _check_inputs(x, shortcut, p, training, generator)
    if not training or p == 0.0:
        if not torch.compiler.is_compiling() and forced_backend() != "auto":
            select(OP, x)  # the plain add runs no kernel, but a forced backend must serve x
        if x.stride() == shortcut.stride() and is_dense(x):
            return torch.add(x, shortcut)  # the common eval case: one add, nothing to convert
        fmt = dense_format(x)
        return torch.add(x, _same_format(shortcut, fmt)).contiguous(memory_format=fmt)
    if onnx_exporting():  # ONNX has no node for the fused op: export its math
        return reference.drop_connect_add(x, shortcut, p, training=True, generator=generator)
    eager = EAGER_FAST_PATH and plain_eager(x, shortcut)
    if eager and NATIVE_AUTOGRAD_NODE:
        native_node = getattr(select(OP, x), "dc_add_train", None)
        if native_node is not None:  # draws the mask itself and picks the format in C++
            return native_node(x, shortcut, p, generator)
    scale = drop_scale(x.shape[0], p, x.device, x.dtype, generator)
    return _DropConnectAddFn.apply(x, shortcut, scale) if eager else dc_fwd(x, shortcut, scale)
