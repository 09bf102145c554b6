"""Depthwise conv + SyncBatchNorm + activation across processes (design.md §5).

The fused op's passes with the cross-process reductions in between, as in inplace_abn:

  forward:  dw_stats (local mean, M2, count) -> all_gather -> Chan merge -> dw_forward
  backward: dw_backward_reduce (local sum_g, sum_g_yc against the global mean)
            -> all_reduce(sum) -> dw_backward with the global coefficients

dbn_weight / dbn_bias are the local sums, as torch's SyncBatchNorm returns them (DDP
then averages parameter gradients). A Python autograd.Function rather than a custom op:
collectives are not traceable inside an opaque op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..backends import remember_backend, runs_forward_backend, select
from .bn_math import COMPOSITE, as_dtype, update_running, vector_math
from .depthwise import OP
from .geometry import ConvGeometry, acc_dtype, dense, memory_format_of


def _global_stats(mean, var, count: int, group):
    """Merge per-rank (count, mean, M2) with Chan's formula; returns mean, biased var, count."""
    local = torch.cat([mean.new_tensor([float(count)]), mean, var * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    stacked = torch.stack(gathered)
    counts = stacked[:, :1]
    c = mean.shape[0]
    means, m2s = stacked[:, 1:1 + c], stacked[:, 1 + c:]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - global_mean) ** 2).sum(0)
    return global_mean, m2 / total, int(total.item())


class SyncDepthwiseConvBNAct(torch.autograd.Function):
    """Outputs (out, mean, var, total count). `running` is (running_mean, running_var,
    momentum) or None, updated inside forward with the global statistics, as
    SyncBatchNorm does (see ops/depthwise.py's _DepthwiseFn on activation checkpointing)."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, geo: ConvGeometry, eps, act, group, running):
        remember_backend(ctx)
        x = dense(x)
        prims = select(OP, x)
        c = x.shape[1]
        count = x.shape[0] * geo.out_h * geo.out_w
        acc = acc_dtype(x.dtype)
        if count > 0:
            mean, var = prims.dw_stats(x, weight, *geo)
        else:
            mean, var = x.new_zeros(c, dtype=acc), x.new_zeros(c, dtype=acc)
        mean, var, total = _global_stats(mean, var, count, group)
        if total > 0:
            update_running(COMPOSITE, running, mean, var, total)
        _, scale, shift = vector_math(prims).bn_affine(mean, var, bn_weight, bn_bias, eps)
        out = prims.dw_forward(x, weight, scale, shift, *geo, act)
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var)
        ctx.args = (geo, eps, act, group, total)
        ctx.mark_non_differentiable(mean, var)
        return out.contiguous(memory_format=memory_format_of(x)), mean, var, total

    @staticmethod
    @runs_forward_backend
    def backward(ctx, dy, _dmean, _dvar, _dtotal):
        x, weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
        geo, eps, act, group, total = ctx.args
        prims = select(OP, x)
        dy = dy.contiguous(memory_format=memory_format_of(x))
        bn = vector_math(prims)
        invstd, scale, shift = bn.bn_affine(mean, var, bn_weight, bn_bias, eps)
        sum_g, sum_g_yc = prims.dw_backward_reduce(
            dy, x, weight, scale, shift, mean, geo.stride, geo.pad_top, geo.pad_left, act
        )
        global_sums = torch.stack([sum_g, sum_g_yc])
        dist.all_reduce(global_sums, group=group)
        coef_b, coef_c, _ = bn.bn_backward_coefs(scale, invstd, global_sums[0],
                                                 global_sums[1], total, True)
        dx, dweight = prims.dw_backward(
            dy, x, weight, scale, shift, mean, coef_b, coef_c,
            geo.stride, geo.pad_top, geo.pad_left, act,
        )
        dgamma = as_dtype(sum_g_yc * invstd, bn_weight.dtype)  # local sums, as SyncBatchNorm
        return dx, dweight, dgamma, as_dtype(sum_g, bn_bias.dtype), None, None, None, None, None
