"""The training tail of nn/train_tail.py for traced calls (torch.compile, torch.export):
the gated projection conv + BatchNorm + act as a custom op pair, so a compiled converted
model keeps the SE gate folded into the projection's weights.

  gated_conv_bn_act_fwd(y, gate, weight, gamma, beta, eps, act) -> (out, mean, var, p)
      p   = conv1x1(y * gate[n, c])       per-sample GEMMs, the gate in the weights
      out = act(batch_norm(p))            batch statistics (mean, biased var)
  gated_conv_bn_act_bwd(dout, y, gate, weight, gamma, beta, mean, var, p, eps, act)
      -> (dy, dgate, dweight, dgamma, dbeta), with dp = dL/dp and M_n = dp_n^T @ y_n:
      dy_n = dp_n @ (W * gate[n]),   dgate[n] = sum_o W * M_n,   dW = sum_n M_n * gate[n]

y is channels_last (N, C, H, W), gate (N, C) in the accumulation dtype, p is kept for
backward (it is narrow). Unlike the eager autograd.Function, which takes the SE's pooled
sums and runs the excitation MLP and its backward itself, the op takes the gate: the
traced graph computes the pool and the MLP in plain torch ops and autograd carries dgate
back through them (the pool's gradient becomes one broadcast add onto dy, which inductor
fuses). The running statistics are updated by the caller with plain torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import remember_backend, runs_forward_backend
from ..ops.activations import act_code
from ..ops.bn_math import COMPOSITE, running_stats, update_running
from ..ops.eager import traced_cpu_call
from ..ops.geometry import acc_dtype
from ..ops.squeeze_excite import bias_or_zeros, excite_mlp
from .batchnorm import bn_call_args
from .pointwise import bn_param_grads
from .train_tail import (
    gated_input_grad,
    gated_projection_forward,
    gated_projection_grads,
    tail_shapes_fit,
)

CL = torch.channels_last
# Switch for in-process A/B measurements and tests: traced training tails take the custom
# op (True) or the SE op followed by the projection's conv + BN + act (False).
TRACED_OP = True


@torch.library.custom_op("effnet_kernels::gated_conv_bn_act_fwd", mutates_args=())
def gated_conv_bn_act_fwd(y: Tensor, gate: Tensor, weight: Tensor, gamma: Tensor | None,
                          beta: Tensor | None, eps: float,
                          act: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, mean, var, p = gated_projection_forward(y, gate, weight, gamma, beta, eps, act)
    return out.contiguous(memory_format=CL), mean, var, p.contiguous(memory_format=CL)


@gated_conv_bn_act_fwd.register_fake
def _(y, gate, weight, gamma, beta, eps, act):
    n, _, h, w = y.shape
    out = torch.empty((n, weight.shape[0], h, w), dtype=y.dtype, device=y.device,
                      memory_format=CL)
    mean = y.new_empty((weight.shape[0],), dtype=acc_dtype(y.dtype))
    return out, mean, torch.empty_like(mean), torch.empty_like(out)


@torch.library.custom_op("effnet_kernels::gated_conv_bn_act_bwd", mutates_args=())
def gated_conv_bn_act_bwd(dout: Tensor, y: Tensor, gate: Tensor, weight: Tensor,
                          gamma: Tensor | None, beta: Tensor | None, mean: Tensor, var: Tensor,
                          p: Tensor, eps: float,
                          act: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dp, dgate, dweight, dgamma, dbeta = gated_projection_grads(
        dout, y, gate, weight, gamma, beta, mean, var, p, eps, act)
    dy = gated_input_grad(dp, gate, weight, torch.zeros_like(gate))
    return dy.contiguous(memory_format=CL), dgate, dweight.contiguous(), dgamma, dbeta


@gated_conv_bn_act_bwd.register_fake
def _(dout, y, gate, weight, gamma, beta, mean, var, p, eps, act):
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=CL)
    dweight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    return dy, torch.empty_like(gate), dweight, torch.empty_like(mean), torch.empty_like(mean)


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    y, gate, weight, gamma, beta, eps, act = inputs
    _, mean, var, p = output
    ctx.mark_non_differentiable(mean, var, p)
    ctx.save_for_backward(y, gate, weight, gamma, beta, mean, var, p)
    ctx.args = (eps, act)


@runs_forward_backend
def _backward(ctx, dout, *_):
    y, gate, weight, gamma, beta, mean, var, p = ctx.saved_tensors
    dy, dgate, dweight, dgamma, dbeta = gated_conv_bn_act_bwd(
        dout, y, gate, weight, gamma, beta, mean, var, p, *ctx.args)
    need = ctx.needs_input_grad
    return (dy if need[0] else None, dgate if need[1] else None,
            dweight if need[2] else None,
            *bn_param_grads(ctx, gamma, beta, dgamma, dbeta, 3), None, None)


gated_conv_bn_act_fwd.register_autograd(_backward, setup_context=_setup_context)


def traced_tail_applies(y: Tensor, projection: tuple) -> bool:
    """Whether a traced call runs the training tail as the custom op: a traced CPU call
    (ops/eager.py) with the shapes and modules the eager tail takes."""
    return TRACED_OP and traced_cpu_call(y) and tail_shapes_fit(y, projection)


def se_projection_traced(y: Tensor, se: tuple, projection: tuple) -> Tensor:
    """act(BN(conv1x1(y * gate))) with gate the SE of y, for (conv_reduce, conv_expand,
    act) and (conv, bn, act): the pool and the excitation MLP in torch ops, the gated
    projection + BN + act as the custom op; BatchNorm2d's bookkeeping."""
    reduce, expand, se_act = se
    conv, bn, act = projection
    mean = y.mean(dim=(2, 3), dtype=acc_dtype(y.dtype))
    _, gate = excite_mlp(mean, reduce.weight, bias_or_zeros(reduce.bias, reduce.weight),
                         expand.weight, bias_or_zeros(expand.bias, expand.weight),
                         act_code(se_act))
    args = bn_call_args(bn)
    out, bn_mean, bn_var, _ = gated_conv_bn_act_fwd(y, gate, conv.weight, bn.weight, bn.bias,
                                                    args["eps"], act_code(act))
    update_running(COMPOSITE, running_stats(args["running_mean"], args["running_var"],
                                            args["momentum"]), bn_mean, bn_var,
                   out.numel() // out.shape[1])
    return out

