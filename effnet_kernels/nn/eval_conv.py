"""Eval conv + bias + activation on CPU in one pass over the output (the BatchNorm already
folded into weight and bias, nn/eval_fold.py), and the same as a custom op for traced
calls, so a compiled converted model keeps it.

  float32 1x1 convs on channels_last x   a GEMM tile by tile with bias + act applied to
                                         each tile in cache (nn/gemm_conv.py)
  float32 1x1 convs on NCHW x, 28x28     the same with one GEMM per image (x[n] is a
  pixels or more                         (Cin, H*W) matrix) and column tiles
  float32 dense k x k convs with small   a direct conv on the native GEMM, bias + act on
  patches on channels_last x (the stem)  each output row in cache (patch_conv_act,
                                         csrc/cpu/patch_conv.cpp)
  other convs (k > 1, bfloat16)          one oneDNN conv with the act as its post-op

  effnet_kernels::conv_act_eval(x, weight, bias, stride, padding, dilation, groups, act)
                                         -> act(conv2d(x, weight, bias)) in x's memory format

Neither records an autograd graph: callers take them only where none is recorded
(inference, no_grad), and the custom op has no autograd formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ext import ext_module
from ..ops.activations import act_code
from ..ops.eager import plain_eager, records_graph, traced_cpu_call
from ..ops.geometry import conv_geometry, memory_format_of
from .gemm_conv import gemm_conv1x1_act, gemm_conv_eligible, planar_conv1x1_act, planar_gemm_eligible

# act name -> (oneDNN post-op, its scalars)
ONEDNN_ACTS = {"silu": ("swish", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]),
               "identity": ("none", [])}
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                    "_convolution_pointwise")
# Eval 1x1 convs run as a GEMM into cached memory with the act as an epilogue for float32;
# for other dtypes only when the output is above glibc's largest mmap threshold, where
# ATen's outputs are fresh pages on every call (page faults cost more than the conv).
_GLIBC_MMAP_MAX = 32 << 20

# Switch for in-process A/B measurements and tests: traced eval calls take the custom op
# (True) or F.conv2d + act (False).
TRACED_OP = True

# Switch for in-process A/B measurements and tests: float32 channels_last dense convs with
# at most PATCH_MAX_TAPS values per patch (B0's stem: 27) run patch_conv_act (True) or
# oneDNN (False). B0's stem, BN folded, SiLU, on AMD EPYC with 2 threads after a 64 MiB
# write (as inside a model): batch 1 0.23 ms against 0.49-0.62 for oneDNN's conv followed
# by the BN + SiLU pass and 0.41-0.64 for oneDNN with a SiLU post-op; batch 8 1.8-2.0 ms
# against 2.9 and 2.3-4.1. Larger patches were not measured against oneDNN.
PATCH_CONV = True
PATCH_MAX_TAPS = 64


def _conv_out_bytes(x: Tensor, weight: Tensor) -> int:
    """Output bytes of a stride-1 conv of x with weight."""
    return x.numel() // x.shape[1] * weight.shape[0] * x.element_size()


def eval_conv_act(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
                  groups: int, act: str, packs_for: object | None = None) -> Tensor:
    """act(conv2d(x, weight, bias)) in one pass, for a CPU tensor of a oneDNN dtype.
    packs_for: the module whose (memoized) weight this is, to keep it packed for the GEMM
    (nn/gemm_conv.py, packed_weight)."""
    if gemm_conv_eligible(x, weight, stride, padding, groups) and (
            x.dtype == torch.float32 or _conv_out_bytes(x, weight) > _GLIBC_MMAP_MAX):
        return gemm_conv1x1_act(x, weight, bias, act, packs_for=packs_for)
    if planar_gemm_eligible(x, weight, stride, padding, groups):
        return planar_conv1x1_act(x, weight, bias, act)
    if patch_conv_serves(x, weight, stride, padding, dilation, groups):
        geo = conv_geometry(x.shape[2], x.shape[3], weight.shape[2], stride[0], padding[0])
        return ext_module().cpu.patch_conv_act(x, weight, bias, *geo, act_code(act))
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, list(padding), list(stride), list(dilation), groups,
        *ONEDNN_ACTS[act], "")


def patch_conv_serves(x: Tensor, weight: Tensor, stride, padding, dilation,
                       groups: int) -> bool:
    """Whether patch_conv_act computes this conv: float32 channels_last x, a square kernel
    of more than one tap with equal strides and paddings, a small patch, an output of at
    least one pixel and the native GEMM."""
    k = weight.shape[2]
    if not (PATCH_CONV and not isinstance(padding, str) and x.dtype == torch.float32
            and weight.dtype == torch.float32 and groups == 1 and tuple(dilation) == (1, 1)
            and weight.shape[3] == k > 1 and weight.shape[1] * k * k <= PATCH_MAX_TAPS
            and stride[0] == stride[1] and padding[0] == padding[1] < k and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and min(x.shape[2:]) + 2 * padding[0] >= k):
        return False
    ext = ext_module()
    return ext is not None and ext.cpu.patch_conv_available()


def _cpu_onednn_call(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype in ONEDNN_DTYPES and ONEDNN_AVAILABLE
            and not records_graph(x, weight, bias))


def eager_eval_serves(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether an eager eval call takes eval_conv_act: CPU, a oneDNN dtype, no autograd
    graph to record, a plain tensor and no tracing."""
    return _cpu_onednn_call(x, weight, bias) and plain_eager(x)


def traced_eval_serves(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether a traced eval call takes the custom op: a traced CPU call (ops/eager.py)
    under the eager conditions."""
    return TRACED_OP and traced_cpu_call(x) and _cpu_onednn_call(x, weight, bias)


@torch.library.custom_op("effnet_kernels::conv_act_eval", mutates_args=())
def conv_act_eval(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, act: str) -> Tensor:
    out = eval_conv_act(x, weight, bias, stride, padding, dilation, groups, act)
    return out.contiguous(memory_format=memory_format_of(x))


@conv_act_eval.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, act):
    k = weight.shape[2:]
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    return torch.empty((x.shape[0], weight.shape[0], *size), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_of(x))
