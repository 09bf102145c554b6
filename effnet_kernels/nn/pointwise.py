"""Training-mode conv + BatchNorm + activation that saves the conv input, not its output
(unless recomputing the output is costly).

Plain autograd would save the conv output y (for BN) and the BN output z (for the
activation): two tensors of the conv's output size. For MBConv's 1x1 expand conv those
are the widest tensors of the block, while its input is 1/6 of that width. Following
design.md §4 this function saves x, the weight and the per-channel mean / biased var,
and recomputes y = conv(x) in backward (one extra conv, no extra memory) where that conv
is cheap. It saves y as well instead where the conv's output is smaller than its input
(MBConv's projection: y costs less memory than x, which the weight gradient needs
anyway) or, on CPU, where recomputing costs many FLOPs per byte y would take (at least
KEEP_Y_MIN_MACS multiply-adds per element of y, Cin / groups * kh * kw; on B0 the expand
convs with 80-192 input channels and the head: 2/3 of the recomputed GEMM FLOPs, for
4 MB per image of kept y) or runs through oneDNN rather than a GEMM (k > 1: the stem,
1.6 MB per image).

A float32 1x1 conv on channels_last tensors on the cpu backend runs tiled
(csrc/cpu/pointwise_bn_train.cpp): each tile's GEMM output gets its BN work while it is in
cache (statistics; act(y * scale + shift); the backward reduction; dL/dy and its dx and
dweight GEMMs), and a y that is not kept is recomputed per tile instead of written, so
only out (forward) and dout (backward) of the conv's width go through memory. Where y is
recomputed (and the conv has at least GRAM_MIN_ROWS_PER_INPUT pixels per input channel)
the Gram route (csrc/cpu/pointwise_bn_gram.cpp) takes the batch statistics of y = x W^T
from x's mean and centered Gram matrix instead of a conv pass, and the backward reads
dout once: the terms of dL/dy that need the batch sums are linear in x, and are added on
the narrow side afterwards. Measured on B0's 16-40-channel expand convs: the training
step 5 % faster (benchmarks/bench_switches.py --switch pw_gram --mode train).

Otherwise the conv itself is PyTorch's; a 1x1 conv on channels_last CPU tensors runs as
one GEMM into the output cache (nn/gemm_conv.py). The BatchNorm + activation around it runs
on the depthwise op's backend primitives with a 1x1 unit kernel (depthwise_conv(y, 1) is
y): one statistics pass and one act(y * scale + shift) pass forward (in place over y where
y is not kept); one reduction pass and one pass writing dL/dy backward, each fused over the
whole channel vector, instead of the half-dozen elementwise passes of eager BatchNorm + SiLU.
On the cpu backend in float32/float64 the reduction keeps g = dout * act'(z) for the last
pass (ops/depthwise.py, keeps_intermediates), so act' is evaluated once. Where such a
float32 conv kept y (the projections, B0's 7x7 expands), its backward runs on the tiled
primitives all the same (TILED_KEPT_BACKWARD): dL/dy per tile in cache, then its GEMMs.

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
from torch.autograd.function import once_differentiable

from ..backends import remember_backend, runs_forward_backend, select
from ..ops.activations import act_code
from ..ops.bn_math import as_dtype, running_stats, update_running, vector_math
from ..ops.depthwise import OP as DEPTHWISE_OP
from ..ops.depthwise import keeps_intermediates
from ..ops.geometry import conv_geometry, memory_format_of
from .gemm_conv import (
    epilogue_gemm_serves,
    gemm_conv1x1,
    gemm_conv1x1_backward,
    gemm_conv_eligible,
    gemm_conv_layout,
)


def _conv(x, weight, geo):
    if gemm_conv_eligible(x, weight, *geo):  # 1x1 on channels_last CPU: gemm_conv.py
        return gemm_conv1x1(x, weight)
    stride, padding, groups = geo
    return F.conv2d(x, weight, None, stride, padding, 1, groups)


def _conv_backward(dy, x, weight, geo, need_dx, need_dweight):
    if gemm_conv_eligible(x, weight, *geo):
        return gemm_conv1x1_backward(dy, x, weight, need_dx, need_dweight)
    stride, padding, groups = geo
    dx, dweight, _ = torch.ops.aten.convolution_backward(
        dy, x, weight, None, stride, padding, [1, 1], False, [0, 0], groups,
        [need_dx, need_dweight, False])
    return dx, dweight


# Multiply-adds per output element from which the training conv keeps its output for
# backward instead of recomputing it (see the module docstring).
KEEP_Y_MIN_MACS = 64


def _keeps_output(x: Tensor, y_numel: int, weight: Tensor) -> bool:
    # The FLOPs-per-byte trade was measured on CPU only; GPUs keep recomputing the conv.
    # A k x k conv (k > 1: the stem) runs through oneDNN, whose recompute cost ~2 ms per
    # B0 training step at batch 8 x 224^2 for the 3-channel stem: kept as well.
    macs_per_output = weight.numel() // weight.shape[0] if weight.shape[0] else 0
    costly = x.device.type == "cpu" and (macs_per_output >= KEEP_Y_MIN_MACS
                                         or weight.shape[-1] > 1)
    return y_numel < x.numel() or costly


# (channels, dtype, device) -> the (C, 1, 1, 1) ones kernel: made once, read-only.
_UNIT_KERNELS: dict[tuple, Tensor] = {}


def unit_kernel(y: Tensor) -> Tensor:
    key = (y.shape[1], y.dtype, y.device)
    unit = _UNIT_KERNELS.get(key)
    if unit is None:
        with torch.inference_mode(False), torch.no_grad():
            unit = _UNIT_KERNELS[key] = torch.ones((y.shape[1], 1, 1, 1), dtype=y.dtype,
                                                   device=y.device)
    return unit


def bn_act_forward(y: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float,
                   code: int, overwrite_y: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(act(batch_norm(y)), mean, biased var) with batch statistics: one statistics pass
    and one affine + act pass, written over y when overwrite_y and the backend can."""
    prims, unit = select(DEPTHWISE_OP, y), unit_kernel(y)
    h, w = y.shape[2:]
    mean, var = prims.dw_stats(y, unit, 1, 0, 0, h, w)
    _, scale, shift = vector_math(prims).bn_affine(mean, var, gamma, beta, eps)
    if overwrite_y and keeps_intermediates(prims, y) and y.is_contiguous(
            memory_format=torch.channels_last):
        return prims.dw_affine_act_(y, scale, shift, code), mean, var
    return prims.dw_forward(y, unit, scale, shift, 1, 0, 0, h, w, code), mean, var


def bn_act_backward(dout: Tensor, y: Tensor, gamma: Tensor | None, beta: Tensor | None,
                    mean: Tensor, var: Tensor, eps: float,
                    code: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dy, dgamma, dbeta) in the accumulation dtype, for out = bn_act_forward(y, ...)
    and the gradient dout of out: one reduction pass and one pass writing dL/dy."""
    dout = dout.contiguous(memory_format=memory_format_of(y))
    prims, unit = select(DEPTHWISE_OP, y), unit_kernel(y)
    bn = vector_math(prims)
    invstd, scale, shift = bn.bn_affine(mean, var, gamma, beta, eps)
    if keeps_intermediates(prims, y):  # keep g = dout * act'(z); the last pass skips act'
        sum_g, sum_g_yc, dout, _ = prims.dw_backward_reduce_stash(
            dout, y, unit, scale, shift, mean, 1, 0, 0, code)
        code = act_code("identity")
    else:
        sum_g, sum_g_yc = prims.dw_backward_reduce(dout, y, unit, scale, shift, mean, 1, 0,
                                                   0, code)
    coef_b, coef_c, dgamma = bn.bn_backward_coefs(scale, invstd, sum_g, sum_g_yc,
                                                  y.numel() // y.shape[1], True)
    dy, _ = prims.dw_backward(dout, y, unit, scale, shift, mean, coef_b, coef_c, 1, 0, 0,
                              code)
    return dy, dgamma, sum_g


# Switch for in-process A/B measurements (benchmarks): the tiled primitives below, or the
# GEMM followed by the BN passes.
TILED = True


# Largest Cout * Cin of a tiled conv: each tile re-reads the weight (measured slower above
# it: B0's 7x7 expand convs and head).
TILED_MAX_WEIGHT = 1 << 17


def _tile_prims(x: Tensor, weight: Tensor, geo):
    """The backend's tiled conv + BN primitives (csrc/cpu/pointwise_bn_train.cpp) when they
    serve this conv, else None: a float32 channels_last 1x1 GEMM conv on the cpu backend
    that widens its input (Cout > Cin: the BN passes over y are what tiling saves; on
    narrowing projections the per-tile GEMMs measured slower than one GEMM) with a weight
    of at most TILED_MAX_WEIGHT values."""
    cout, cin = weight.shape[:2]
    if not TILED or cout <= cin or cout * cin > TILED_MAX_WEIGHT:
        return None
    return _any_tile_prims(x, weight, geo)


def _any_tile_prims(x: Tensor, weight: Tensor, geo):
    """The tiled primitives for any float32 channels_last 1x1 GEMM conv on the cpu backend
    (no shape limits), else None."""
    if x.dtype != torch.float32 or not gemm_conv_layout(x, weight, *geo) \
            or not epilogue_gemm_serves(x):
        return None
    prims = select(DEPTHWISE_OP, x)
    return prims if hasattr(prims, "pw_bn_stats") else None


# Switch for in-process A/B measurements (benchmarks): the backward of a conv that ran
# untiled forward but kept y (projections, the 7x7 expands) runs tiled as well: one
# reduction over dout and y, then per tile dL/dy in cache and its dx and dW GEMMs, instead
# of the BN passes writing dL/dy and two whole GEMMs. Only the forward's per-tile GEMMs
# measured slower there; the backward's, on the native GEMM, are 1.3-1.9x faster (B0's
# 7x7 and 14x14 projections and 7x7 expands at batch 8 on AMD EPYC, 2 threads).
TILED_KEPT_BACKWARD = True


# Switch for in-process A/B measurements (benchmarks): a recomputed y takes the Gram route
# (csrc/cpu/pointwise_bn_gram.cpp: statistics from x's second moments, a one-pass
# backward) where it has at least GRAM_MIN_ROWS_PER_INPUT pixels per input channel (the
# route's (Cout, Cin, Cin) products then cost little beside the conv's).
GRAM = True
GRAM_MIN_ROWS_PER_INPUT = 32


def _gram_route(prims, x: Tensor) -> bool:
    return GRAM and hasattr(prims, "pw_bn_stats_gram") and \
        x.numel() // x.shape[1] >= GRAM_MIN_ROWS_PER_INPUT * x.shape[1]


def train_plan(x: Tensor, weight: Tensor, geo) -> tuple[object | None, bool, bool]:
    """(tiled primitives or None, whether y is kept, whether the Gram route runs) of a
    training call, from the tensors' metadata only: ConvBNActTrain and the custom ops'
    fake implementations (nn/pointwise_op.py) decide alike."""
    tiles = _tile_prims(x, weight, geo)
    (stride, _), (padding, _), _ = geo
    out = conv_geometry(x.shape[2], x.shape[3], weight.shape[-1], stride, padding)
    keep = _keeps_output(x, x.shape[0] * weight.shape[0] * out.out_h * out.out_w, weight)
    return tiles, keep, tiles is not None and not keep and _gram_route(tiles, x)


def train_forward(x, weight, gamma, beta, geo, eps, code):
    """(out, mean, var, y if kept else None, (mu, gram) of the Gram route or None) of
    act(batch_norm(conv2d(x, weight))) with batch statistics."""
    tiles, keep, gram = train_plan(x, weight, geo)
    if tiles is not None:
        return _tiled_forward(tiles, x, weight, gamma, beta, eps, code, keep, gram)
    y = _conv(x, weight, geo)
    # Under autocast y may be in another dtype than x; the conv backward needs both in
    # one, so such a y is recomputed (in x's dtype) instead of kept.
    keep = keep and y.dtype == x.dtype
    # Unless kept, y is this call's own temporary: the act pass may overwrite it.
    out, mean, var = bn_act_forward(y, gamma, beta, eps, code, not keep)
    return out, mean, var, y if keep else None, None


def train_backward(dout, x, weight, gamma, beta, mean, var, y, moments, geo, eps, code,
                   needs):
    """(dx, dweight, dgamma, dbeta) in the accumulation dtype (None where `needs`, the
    (dx, dweight) flags, says so) for out = train_forward(...)[0] and its gradient dout."""
    tiles = _tile_prims(x, weight, geo)
    if tiles is None and TILED_KEPT_BACKWARD and y is not None:
        tiles = _any_tile_prims(x, weight, geo)
    if tiles is not None:
        return _tiled_backward(tiles, dout, x, weight, y, gamma, beta, mean, var, eps, code,
                               needs, moments)
    if y is None:
        y = _conv(x, weight, geo)
    dy, dgamma, sum_g = bn_act_backward(dout, y, gamma, beta, mean, var, eps, code)
    dx, dweight = _conv_backward(dy, x, weight, geo, *needs)
    return dx, dweight, dgamma, sum_g


def _tiled_forward(prims, x, weight, gamma, beta, eps, code, keep, gram):
    """(out, mean, var, y if kept else None, (mu, gram) of the Gram route or None) with
    the statistics taken on each GEMM tile in cache, or from x's mean mu and centered Gram
    matrix (no conv) where y is recomputed; a y that is not kept never goes through memory
    (out recomputes it)."""
    cout = weight.shape[0]
    w2d = weight.reshape(cout, -1).contiguous()
    moments = None
    if gram:
        mean, var, mu, gram_matrix = prims.pw_bn_stats_gram(x, w2d)
        y, moments = None, (mu, gram_matrix)
    else:
        mean, var, y = prims.pw_bn_stats(x, w2d, keep)
    _, scale, shift = vector_math(prims).bn_affine(mean, var, gamma, beta, eps)
    if keep:
        h, w = y.shape[2:]
        out = prims.dw_forward(y, unit_kernel(y), scale, shift, 1, 0, 0, h, w, code)
    else:
        out = prims.pw_bn_forward(x, w2d, scale, shift, code)
    return out, mean, var, y, moments


def _tiled_backward(prims, dout, x, weight, y, gamma, beta, mean, var, eps, code, needs,
                    moments):
    """(dx, dweight, dgamma, dbeta in float32): one reduction over dout (and y or its
    recomputed tiles), then per tile dy in cache and its two GEMMs (dx rows, dW partial);
    on the Gram route (moments = (mu, gram)) one pass over dout, then the batch-sum terms
    added on the narrow side."""
    cout = weight.shape[0]
    w2d = weight.reshape(cout, -1).contiguous()
    dout = dout.contiguous(memory_format=torch.channels_last)
    bn = vector_math(prims)
    invstd, scale, shift = bn.bn_affine(mean, var, gamma, beta, eps)
    count = x.numel() // x.shape[1]
    if moments is not None:
        sum_g, sum_g_yc, dx, dw_part = prims.pw_bn_backward_gram(
            dout, x, w2d, scale, shift, mean, code, needs[0], needs[1])
        coef_b, coef_c, dgamma = bn.bn_backward_coefs(scale, invstd, sum_g, sum_g_yc, count,
                                                      True)
        dweight = prims.pw_bn_gram_finish(x, dx, w2d, *moments, mean, coef_b, coef_c, dw_part)
    else:
        sum_g, sum_g_yc = prims.pw_bn_backward_reduce(dout, x, w2d, y, scale, shift, mean,
                                                      code)
        coef_b, coef_c, dgamma = bn.bn_backward_coefs(scale, invstd, sum_g, sum_g_yc, count,
                                                      True)
        dx, dweight = prims.pw_bn_backward(dout, x, w2d, y, scale, shift, mean, coef_b,
                                           coef_c, code, needs[0], needs[1])
    return dx, None if dweight is None else dweight.view_as(weight), dgamma, sum_g


class ConvBNActTrain(torch.autograd.Function):
    """Outputs (out, mean, var). `running` is (running_mean, running_var, momentum) or None;
    the running statistics are updated inside forward, as F.batch_norm updates them inside
    the op that saves its tensors (see ops/depthwise.py's _DepthwiseFn: activation
    checkpointing with early stop repeats the update where it repeats PyTorch's)."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, geo, eps, act, running):
        remember_backend(ctx)
        code = act_code(act)
        out, mean, var, y, moments = train_forward(x, weight, gamma, beta, geo, eps, code)
        update_running(vector_math(select(DEPTHWISE_OP, out)), running, mean, var,
                       out.numel() // out.shape[1])
        ctx.save_for_backward(x, weight, gamma, beta, mean, var, y, *(moments or (None, None)))
        ctx.geo, ctx.act, ctx.eps = geo, code, eps
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @runs_forward_backend
    @once_differentiable  # the primitives record no graph: double backward raises
    def backward(ctx, dout, _dmean, _dvar):
        x, weight, gamma, beta, mean, var, y, mu, gram = ctx.saved_tensors
        dx, dw, dgamma, sum_g = train_backward(dout, x, weight, gamma, beta, mean, var, y,
                                               None if mu is None else (mu, gram), ctx.geo,
                                               ctx.eps, ctx.act, ctx.needs_input_grad[:2])
        return (dx, dw, *bn_param_grads(ctx, gamma, beta, dgamma, sum_g, 2),
                None, None, None, None)


def bn_param_grads(ctx, gamma: Tensor | None, beta: Tensor | None, dgamma: Tensor,
                   sum_g: Tensor, first: int) -> tuple[Tensor | None, Tensor | None]:
    """(dgamma, dbeta) in the parameters' dtypes, None where not needed; gamma and beta
    are the Function's inputs number first and first + 1."""
    dgamma = as_dtype(dgamma, gamma.dtype) \
        if gamma is not None and ctx.needs_input_grad[first] else None
    dbeta = as_dtype(sum_g, beta.dtype) \
        if beta is not None and ctx.needs_input_grad[first + 1] else None
    return dgamma, dbeta


def conv_bn_act_train(x: Tensor, weight: Tensor, gamma: Tensor | None, beta: Tensor | None,
                      running_mean: Tensor | None, running_var: Tensor | None, *,
                      stride: int, padding: int, groups: int, momentum: float, eps: float,
                      act: str) -> Tensor:
    """act(batch_norm(conv2d(x, weight), training=True)), saving only x for backward;
    updates the running statistics in place like F.batch_norm."""
    geo = ([stride, stride], [padding, padding], groups)
    running = running_stats(running_mean, running_var, momentum)
    return ConvBNActTrain.apply(x, weight, gamma, beta, geo, eps, act, running)[0]
