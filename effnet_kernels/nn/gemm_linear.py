"""GemmLinear: an nn.Linear whose eval CPU calls run on the extension's GEMM with the
weight packed once, for the classifier of a converted EfficientNet.

    y[n, o] = sum_i x[n, i] * W[o, i] + b[o]

is a 1x1 conv of x viewed as (N, Cin, 1, 1) (one pixel per sample: NCHW and channels_last
are the same memory), so it runs as pw_conv_act with the identity act on the weight packed
for the native GEMM (csrc/cpu/packed_weight.h), kept per module while the weight is
unchanged (nn/gemm_conv.py, packed_weight). B0's classifier (1280 -> 1000) on AMD EPYC, 2
threads, warm: batch 1 73 -> 50 us, batch 8 284 -> 79 us (MKL's sgemm against the packed
GEMM, which reads W^T panels that fit the few rows).

Serves eval-mode calls that record no autograd graph, on plain contiguous (N, Cin)
float32 CPU tensors with N > 0, outside autocast and tracing; every other call (training,
grad through the weights, other dtypes or shapes, empty batches) is nn.Linear's own
forward. The class changes in place (to_gemm_linear / from_gemm_linear), as GemmConv2d's
does: the same module object, its Parameters, hooks and state_dict keys, still an
nn.Linear.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._ext import ext_module
from ..ops.activations import act_code
from ..ops.eager import plain_eager, records_graph
from .class_swap import swap_class
from .gemm_conv import epilogue_gemm_serves, packed_weight

# Switch for in-process A/B measurements (benchmarks/bench_switches.py --switch classifier):
# False leaves every call to nn.Linear.
ENABLED = True


class GemmLinear(nn.Linear):
    """nn.Linear computing its eval CPU float32 calls on the packed GEMM."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.gemm_serves(x):
            return super().forward(x)
        n, cin = x.shape
        weight = self.weight
        packed = packed_weight(self, weight)
        out = ext_module().cpu.pw_conv_act(x.view(n, cin, 1, 1),
                                           weight.view(self.out_features, cin, 1, 1),
                                           self.bias, act_code("identity"), packed)
        return out.view(n, self.out_features)

    def gemm_serves(self, x: Tensor) -> bool:
        weight, bias = self.weight, self.bias
        return (ENABLED and not self.training and plain_eager(x, weight, bias)
                and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
                and x.shape[0] > 0 and x.is_contiguous() and weight.dtype == torch.float32
                and weight.is_contiguous() and (bias is None or bias.dtype == torch.float32)
                and not torch.is_autocast_enabled("cpu")
                and not records_graph(x, weight, bias) and epilogue_gemm_serves(x))


def to_gemm_linear(linear: nn.Module) -> bool:
    """Make exactly an nn.Linear a GemmLinear in place; False for any other module."""
    return swap_class(linear, nn.Linear, GemmLinear)


def from_gemm_linear(linear: nn.Module) -> bool:
    """Undo to_gemm_linear; False for any other module."""
    return swap_class(linear, GemmLinear, nn.Linear)
