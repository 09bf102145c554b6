"""BatchNorm + activation on their own (no conv to fuse them with) as the fused kernels'
passes: the norm of timm's stem and head in a converted model (models/timm_norm.py).

  training  forward: one statistics pass and one act(y * scale + shift) pass
            (nn/pointwise.py bn_act_forward); backward: one reduction pass and one pass
            writing dL/dy (bn_act_backward). Saves y (the input, which BatchNorm2d saves
            too) and the per-channel mean / biased var; updates the running statistics
            inside forward, as F.batch_norm does.
  eval      act(y * scale + shift) in one pass, BN taken from the running statistics.

Unfused, BatchNorm2d + SiLU make two passes in eval and about six in training. Calls these
passes cannot take (traced, autocast, half dtypes, SyncBatchNorm, a graph through an eval
BN) return None and the caller runs the module's own forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..backends import remember_backend, runs_forward_backend, select
from ..ops.activations import act_code
from ..ops.bn_math import as_dtype, running_stats, update_running, vector_math
from ..ops.depthwise import OP as DEPTHWISE_OP
from ..ops.depthwise import depthwise_conv_bn_act
from ..ops.eager import plain_eager, records_graph
from ..ops.geometry import is_dense
from .batchnorm import bn_call_args, sync_group
from .pointwise import bn_act_backward, bn_act_forward, bn_param_grads, unit_kernel

_DTYPES = (torch.float32, torch.float64)


class BNActTrain(torch.autograd.Function):
    """act(batch_norm(y)) with batch statistics; `running` is (running_mean, running_var,
    momentum) or None."""

    @staticmethod
    def forward(ctx, y, gamma, beta, eps, code, running):
        remember_backend(ctx)
        out, mean, var = bn_act_forward(y, gamma, beta, eps, code, overwrite_y=False)
        update_running(vector_math(select(DEPTHWISE_OP, y)), running, mean, var,
                       y.numel() // y.shape[1])
        ctx.save_for_backward(y, gamma, beta, mean, var)
        ctx.eps, ctx.code = eps, code
        return out

    @staticmethod
    @runs_forward_backend
    @once_differentiable  # the primitives record no graph: double backward raises
    def backward(ctx, dout):
        y, gamma, beta, mean, var = ctx.saved_tensors
        dy, dgamma, sum_g = bn_act_backward(dout, y, gamma, beta, mean, var, ctx.eps, ctx.code)
        return (as_dtype(dy, y.dtype), *bn_param_grads(ctx, gamma, beta, dgamma, sum_g, 1),
                None, None, None)


def bn_act(y: Tensor, bn: nn.Module, act: str) -> Tensor | None:
    """act(bn(y)) with BatchNorm2d's bookkeeping through the fused passes, or None where
    they do not serve this call (the caller then runs the module itself)."""
    if not (y.dim() == 4 and y.dtype in _DTYPES and y.numel() > 0 and plain_eager(y)
            and not torch.is_autocast_enabled(y.device.type) and is_dense(y)):
        return None
    if bn.weight is not None and bn.weight.dtype != torch.float32 and bn.weight.dtype != y.dtype:
        return None
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if use_batch_stats:
        if y.numel() // y.shape[1] <= 1 or sync_group(bn) is not None:
            return None  # BatchNorm2d raises its own error / SyncBatchNorm syncs
        args = bn_call_args(bn)  # counts the batch: no return None after this
        running = running_stats(args["running_mean"], args["running_var"], args["momentum"])
        return BNActTrain.apply(y, bn.weight, bn.bias, args["eps"], act_code(act), running)
    if records_graph(y, bn.weight, bn.bias):
        return None
    # The depthwise op's eval pass with a unit kernel: act(y * scale + shift).
    return depthwise_conv_bn_act(y, unit_kernel(y), bn.weight, bn.bias, bn.running_mean,
                                 bn.running_var, padding=0, training=False, eps=bn.eps, act=act)
