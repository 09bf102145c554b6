"""The training conv + BatchNorm + act of nn/pointwise.py as a torch.library custom op pair,
for traced calls (torch.compile, torch.export), so a compiled converted model keeps the
fused passes (the tiled 1x1 GEMMs with their BN epilogues, the Gram route) instead of
inductor's conv and BN.

  conv_bn_act_train_fwd(x, weight, gamma, beta, ..., backend) -> (out, mean, var, y, mu, gram)
  conv_bn_act_train_bwd(dout, x, weight, gamma, beta, mean, var, y, mu, gram, ..., backend)
                                                      -> (dx, dweight, dgamma, dbeta)

out = act(batch_norm(conv2d(x, weight), batch statistics)); mean and biased var are the
per-channel batch statistics. y (the conv output), mu and gram (x's mean and centered Gram
matrix, float64) are what the forward keeps for backward on the route it takes
(pointwise.train_plan); a tensor the route does not keep is returned with no elements,
since a custom op cannot return None. The fake implementations take the same route
decision from the tensors' metadata. Which route serves a call also depends on the backend
(effnet_kernels.use_backend): the backend forced when the call was traced is an argument
of both ops, so the real and fake implementations decide under the same one, and
torch.compile recompiles when a different backend is forced. dx / dweight come back with
no elements where the autograd formula does not need them. The running statistics are
updated by the caller with plain torch ops (an autograd-registered custom op must be
functional), as the depthwise op's traced path does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import forced_backend, remember_backend, runs_forward_backend, use_backend
from ..ops.bn_math import COMPOSITE, running_stats, update_running
from ..ops.geometry import acc_dtype, conv_geometry, memory_format_of
from .pointwise import bn_param_grads, train_backward, train_forward, train_plan


def _geo(stride: int, padding: int, groups: int):
    return [stride, stride], [padding, padding], groups


def _none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _nothing(x: Tensor) -> Tensor:
    return x.new_empty((0,))


def _out_shape(x: Tensor, weight: Tensor, stride: int, padding: int) -> list[int]:
    geo = conv_geometry(x.shape[2], x.shape[3], weight.shape[-1], stride, padding)
    return [x.shape[0], weight.shape[0], geo.out_h, geo.out_w]


@torch.library.custom_op("effnet_kernels::conv_bn_act_train_fwd", mutates_args=())
def conv_bn_act_train_fwd(
    x: Tensor, weight: Tensor, gamma: Tensor | None, beta: Tensor | None,
    stride: int, padding: int, groups: int, eps: float, act: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fmt = memory_format_of(x)
    with use_backend(backend):
        out, mean, var, y, moments = train_forward(x, weight, gamma, beta,
                                                   _geo(stride, padding, groups), eps, act)
    kept = _nothing(x) if y is None else y.contiguous(memory_format=fmt)
    mu, gram = moments if moments is not None else (_nothing(mean), _nothing(mean))
    return out.contiguous(memory_format=fmt), mean, var, kept, mu, gram


@conv_bn_act_train_fwd.register_fake
def _(x, weight, gamma, beta, stride, padding, groups, eps, act, backend):
    fmt = memory_format_of(x)
    shape = _out_shape(x, weight, stride, padding)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    acc = acc_dtype(x.dtype)
    mean = x.new_empty((shape[1],), dtype=acc)
    with use_backend(backend):
        _, keep, gram = train_plan(x, weight, _geo(stride, padding, groups))
    kept = torch.empty_like(out) if keep else _nothing(x)
    if gram:
        cin = x.shape[1]
        f64 = torch.float64
        return out, mean, torch.empty_like(mean), kept, x.new_empty((cin,), dtype=f64), \
            x.new_empty((cin, cin), dtype=f64)
    return out, mean, torch.empty_like(mean), kept, _nothing(mean), _nothing(mean)


@torch.library.custom_op("effnet_kernels::conv_bn_act_train_bwd", mutates_args=())
def conv_bn_act_train_bwd(
    dout: Tensor, x: Tensor, weight: Tensor, gamma: Tensor | None, beta: Tensor | None,
    mean: Tensor, var: Tensor, y: Tensor, mu: Tensor, gram: Tensor,
    stride: int, padding: int, groups: int, eps: float, act: int, backend: str,
    need_dx: bool, need_dweight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    moments = None if mu.numel() == 0 else (mu, gram)
    with use_backend(backend):
        dx, dweight, dgamma, dbeta = train_backward(
            dout, x, weight, gamma, beta, mean, var, _none_if_empty(y), moments,
            _geo(stride, padding, groups), eps, act, (need_dx, need_dweight))
    dx = _nothing(x) if dx is None else dx.contiguous(memory_format=memory_format_of(x))
    dweight = _nothing(weight) if dweight is None else dweight.contiguous()
    return dx, dweight, dgamma, dbeta


@conv_bn_act_train_bwd.register_fake
def _(dout, x, weight, gamma, beta, mean, var, y, mu, gram, stride, padding, groups, eps,
      act, backend, need_dx, need_dweight):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device,
                     memory_format=memory_format_of(x)) if need_dx else _nothing(x)
    dweight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) \
        if need_dweight else _nothing(weight)
    return dx, dweight, torch.empty_like(mean), torch.empty_like(mean)


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    x, weight, gamma, beta, stride, padding, groups, eps, act, backend = inputs
    _, mean, var, y, mu, gram = output
    ctx.mark_non_differentiable(mean, var, y, mu, gram)
    ctx.save_for_backward(x, weight, gamma, beta, mean, var, y, mu, gram)
    ctx.args = (stride, padding, groups, eps, act, backend)


@runs_forward_backend
def _backward(ctx, dout, *_):
    x, weight, gamma, beta, mean, var, y, mu, gram = ctx.saved_tensors
    need_dx, need_dweight = ctx.needs_input_grad[:2]
    dx, dweight, dgamma, dbeta = conv_bn_act_train_bwd(
        dout, x, weight, gamma, beta, mean, var, y, mu, gram, *ctx.args, need_dx,
        need_dweight)
    return (dx if need_dx else None, dweight if need_dweight else None,
            *bn_param_grads(ctx, gamma, beta, dgamma, dbeta, 2)) + (None,) * 6


conv_bn_act_train_fwd.register_autograd(_backward, setup_context=_setup_context)


def conv_bn_act_train_traced(x: Tensor, weight: Tensor, gamma: Tensor | None,
                             beta: Tensor | None, running_mean: Tensor | None,
                             running_var: Tensor | None, *, stride: int, padding: int,
                             groups: int, momentum: float, eps: float, act: int) -> Tensor:
    """pointwise.conv_bn_act_train for traced calls: the custom op, the running statistics
    updated in plain torch ops."""
    out, mean, var, _, _, _ = conv_bn_act_train_fwd(x, weight, gamma, beta, stride, padding,
                                                    groups, eps, act, forced_backend())
    update_running(COMPOSITE, running_stats(running_mean, running_var, momentum), mean, var,
                   out.numel() // out.shape[1])
    return out
