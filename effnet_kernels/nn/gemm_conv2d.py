"""GemmConv2d: an nn.Conv2d whose 1x1 calls on channels_last CPU tensors run as GEMMs
(nn/gemm_conv.py), for convs that convert() leaves as modules of their own: timm's head
conv, whose norm is its sibling (models/stem_head.py).

In NHWC memory, with rows r = (n, h, w) of x viewed as an (N*H*W, Cin) matrix:
  forward   y[r, co] = sum_ci x[r, ci] * W[co, ci] (+ b[co])     one GEMM into the output cache
  backward  dx = dy W   (N*H*W, Cin),   dW = dy^T x   (Cout, Cin),   db = sum_r dy[r]
Saves x and W, as conv2d does. Under create_graph the backward is written in
differentiable ops, so double backward works as it does through conv2d.

Why: PyTorch runs a 1x1 conv on channels_last CPU tensors through oneDNN, whose backward
is slow for the head's shapes: B0's head (320 -> 1280 channels) forward + backward took
2.72 ms against 0.90 ms as GEMMs at batch 4 x 5x5, 4.76 against 3.03 ms at batch 8 x 7x7.

The class changes in place (`to_gemm_conv` / `from_gemm_conv`): the module stays the
same object, with its Parameters, hooks and state_dict keys, and stays an nn.Conv2d for
code that finds convs by class. Calls the GEMMs do not serve (other shapes or layouts,
dtypes other than float32 / float64, autocast, traced or transformed calls) run
nn.Conv2d's own forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backends import remember_backend, runs_forward_backend
from ..ops.eager import plain_eager, records_graph
from .class_swap import swap_class
from .gemm_conv import gemm_conv1x1, gemm_conv1x1_backward, gemm_conv_eligible

_DTYPES = (torch.float32, torch.float64)


class Conv1x1Gemm(torch.autograd.Function):
    """conv2d(x, weight, bias) of a 1x1, stride-1, ungrouped conv on channels_last x."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        remember_backend(ctx)
        ctx.save_for_backward(x, weight)
        return gemm_conv1x1(x, weight, bias)

    @staticmethod
    @runs_forward_backend
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_dx, need_dweight, need_dbias = ctx.needs_input_grad
        dbias = dy.sum((0, 2, 3)) if need_dbias else None
        if torch.is_grad_enabled():  # create_graph: the same products, recorded
            cout, cin = weight.shape[:2]
            dx = torch.einsum("nohw,oi->nihw", dy, weight.reshape(cout, cin)) if need_dx else None
            dweight = (torch.einsum("nohw,nihw->oi", dy, x).reshape(weight.shape)
                       if need_dweight else None)
            return dx, dweight, dbias
        dx, dweight = gemm_conv1x1_backward(dy, x, weight, need_dx, need_dweight)
        return dx, dweight, dbias


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d computing its 1x1 channels_last CPU calls as GEMMs."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.gemm_serves(x):
            return super().forward(x)
        if records_graph(x, self.weight, self.bias):
            return Conv1x1Gemm.apply(x, self.weight, self.bias)
        # Eval and no_grad calls: the weight packed once while it is unchanged.
        return gemm_conv1x1(x, self.weight, self.bias, None if self.training else self)

    def gemm_serves(self, x: Tensor) -> bool:
        weight, bias = self.weight, self.bias
        # plain_eager first: traced calls (torch.compile, export) must not look further
        return (plain_eager(x, weight, bias) and x.dtype in _DTYPES
                and (bias is None or bias.dtype == x.dtype)
                and not torch.is_autocast_enabled("cpu")
                and gemm_conv_eligible(x, weight, self.stride, self.padding, self.groups))


def gemm_convertible(conv: nn.Module) -> bool:
    """Whether conv is exactly an nn.Conv2d that GemmConv2d can serve (1x1, stride 1, no
    padding, ungrouped)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1)


def to_gemm_conv(conv: nn.Module) -> bool:
    """Make a gemm_convertible nn.Conv2d a GemmConv2d in place; False for any other module."""
    return gemm_convertible(conv) and swap_class(conv, nn.Conv2d, GemmConv2d)


def from_gemm_conv(conv: nn.Module) -> bool:
    """Undo to_gemm_conv; False for any other module."""
    return swap_class(conv, GemmConv2d, nn.Conv2d)
