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
SE-scaled y instead, as before.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backends import select
from ..ops.depthwise import depthwise_conv_bn_act
from ..ops.eager import plain_eager
from ..ops.squeeze_excite import OP as SE_OP
from ..ops.squeeze_excite import excite_gate
from .batchnorm import bn_call_args
from .conv_bn_act import ACTS_INPLACE, conv_bn_act, is_same_conv
from .eval_fold import folded_conv_bn
from .gemm_conv import gated_gemm_conv1x1, gemm_conv_eligible

# Switch for in-process A/B measurements (benchmarks); the unfused order is always correct.
ENABLED = True


def eval_tail_applies(x: Tensor, *modules: nn.Module) -> bool:
    """Whether the block's depthwise -> SE -> projection may run as dw_se_project: CPU,
    plain eager tensors, no autocast, every BatchNorm in eval with running statistics, and
    no autograd graph through x or the modules' parameters."""
    if not ENABLED or x.device.type != "cpu" or type(x) is not Tensor or torch.is_autocast_enabled("cpu"):
        return False
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, nn.BatchNorm2d) and (sub.training or sub.running_mean is None):
                return False
    if torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for m in modules for p in m.parameters())):
        return False
    return plain_eager(x)


def dw_se_project(x: Tensor, depthwise: tuple, se: tuple, projection: tuple) -> Tensor:
    """The tail for (conv_dw, bn, act), (conv_reduce, conv_expand, act), (conv, bn, act);
    callers check eval_tail_applies first."""
    dw_conv, dw_bn, dw_act = depthwise
    padding = "same" if is_same_conv(dw_conv) else dw_conv.padding[0]
    y, sums = depthwise_conv_bn_act(x, dw_conv.weight, dw_bn.weight, dw_bn.bias,
                                    stride=dw_conv.stride[0], padding=padding, act=dw_act,
                                    return_pool_sums=True, **bn_call_args(dw_bn))
    reduce, expand, se_act = se
    gate = excite_gate(sums, y.shape[2] * y.shape[3], reduce.weight, reduce.bias,
                       expand.weight, expand.bias, se_act)
    conv, bn, act = projection
    if gemm_conv_eligible(y, conv.weight, conv.stride, conv.padding, conv.groups) \
            and y.shape[2] * y.shape[3] >= conv.out_channels:
        weight, bias = folded_conv_bn(conv, bn)
        return ACTS_INPLACE[act](gated_gemm_conv1x1(y, weight, bias, gate))
    return conv_bn_act(select(SE_OP, y).se_scale(y, gate), conv, bn, act)
