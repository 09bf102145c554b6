"""Eval tail of a block with squeeze-excite, on CPU, when no autograd graph is recorded:

    y    = act(BN(depthwise_conv(x)))       fused op; its kernel also emits the SE pool
    sums = sum over pixels of y  (N, C)     (the pool epilogue: no extra pass over y)
    gate = sigmoid(W_e act(W_r sums / HW))  the tiny SE MLP
    out  = act(BN(conv1x1(y * gate)))       with BN folded into the conv (nn/eval_fold.py)
         = act(y_n @ (W * gate[n])^T + b)   per sample n: the gate scales the projection's
                                            weights instead of y (nn/gemm_conv.py)

The unfused order writes y, reads it for the pool, reads it again and writes a scaled copy,
and reads that for the projection; here y is written once and read once. The gated weights
cost N * Cout * Cin, so where H * W < Cout (late 7x7 stages) the projection runs on the
SE-scaled y instead, as before. Whole blocks on float32 channels_last input take
nn/eval_plan.py first (the same primitives with the per-call preparation done once); this
route serves the other dtypes and layouts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import select
from ..ops.eager import plain_eager
from ..ops.squeeze_excite import OP as SE_OP
from ..ops.squeeze_excite import excite_gate
from .conv_bn_act import conv_bn_act, dw_bn_act
from .eval_fold import folded_conv_bn
from .gemm_conv import gemm_conv1x1_act, gemm_conv_eligible

# Switch for in-process A/B measurements (benchmarks); the unfused order is always correct.
ENABLED = True


def eval_tail_applies(x: Tensor, depthwise: tuple, se: tuple, projection: tuple) -> bool:
    """Whether dw_se_project may run these parts: CPU, plain eager tensors, no autocast,
    both BatchNorms in eval with running statistics, and no autograd graph through x or the
    parts' parameters."""
    if not ENABLED or x.device.type != "cpu" or type(x) is not Tensor or torch.is_autocast_enabled("cpu"):
        return False
    if any(bn.training or bn.running_mean is None for bn in (depthwise[1], projection[1])):
        return False
    modules = (*depthwise[:2], *se[:2], *projection[:2])
    if torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for m in modules for p in m.parameters())):
        return False
    return plain_eager(x)


def dw_se_project(x: Tensor, depthwise: tuple, se: tuple, projection: tuple) -> Tensor:
    """The tail for (conv_dw, bn, act), (conv_reduce, conv_expand, act), (conv, bn, act);
    callers (nn/mbconv.py dw_se_projection) check eval_tail_applies first."""
    y, sums = dw_bn_act(x, *depthwise, return_pool_sums=True)
    reduce, expand, se_act = se
    gate = excite_gate(sums, y.shape[2] * y.shape[3], reduce.weight, reduce.bias,
                       expand.weight, expand.bias, se_act)
    conv, bn, act = projection
    if gemm_conv_eligible(y, conv.weight, conv.stride, conv.padding, conv.groups) \
            and y.shape[2] * y.shape[3] >= conv.out_channels:
        weight, bias = folded_conv_bn(conv, bn)
        return gemm_conv1x1_act(y, weight, bias, act, gate)
    return conv_bn_act(select(SE_OP, y).se_scale(y, gate), conv, bn, act)
