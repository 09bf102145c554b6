"""A 1x1 conv on channels_last CPU tensors as one GEMM whose output comes from the CPU
output cache (csrc/cpu/output_cache.cpp).

In NHWC memory a 1x1, stride-1, ungrouped conv is exactly a matrix product:
  y[(n, h, w), co] = sum_ci x[(n, h, w), ci] * weight[co, ci]        (+ bias[co])
so x viewed as (N*H*W, Cin) times weight^T (Cin, Cout) writes y's (N*H*W, Cout) rows in
place, with no layout conversion. Backward is two more products:
  dx = dy @ weight        (N*H*W, Cin)        dweight = dy^T @ x        (Cout, Cin)

Why not F.conv2d: its output is a fresh ATen allocation. Above glibc's largest mmap
threshold (32 MiB, e.g. B0's first expand output at batch 8: 8x96x112x112 fp32) every
such allocation is new pages, page-faulted and zeroed by the kernel on first write:
measured 24 ms for a conv whose GEMM takes 4 ms. torch.mm(out=) into a cached block
avoids that. The GEMM itself is ATen's (MKL / oneDNN), or for float32 convs of
EXTENSION_GEMM_MIN_ROWS pixel rows or more the extension's (pw_conv_act, below; the
backward's from EXTENSION_GEMM_BACKWARD_MIN_ROWS, pw_conv_backward).

Eval conv + activation (`gemm_conv1x1_act`): for float32 the compiled extension runs the
GEMM tile by tile and applies bias + act to each tile while it is in cache
(csrc/cpu/pointwise_conv.cpp), so the activation is not a second pass over the output;
other dtypes take the GEMM above and an in-place activation.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor

from .._ext import ext_built, ext_module
from ..ops.activations import act_code, apply_act_

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@functools.cache
def _epilogue_gemm_built() -> bool:
    """Whether the extension and the BLAS sgemm its epilogue GEMM calls are there (once)."""
    ext = ext_module()
    return ext is not None and ext.cpu.pw_conv_available()


def epilogue_gemm_serves(x: Tensor) -> bool:
    return x.dtype == torch.float32 and _epilogue_gemm_built()


def gemm_conv_eligible(x: Tensor, weight: Tensor, stride, padding, groups: int) -> bool:
    """Whether conv2d(x, weight) is a plain channels_last GEMM this module can run."""
    return type(x) is Tensor and gemm_conv_layout(x, weight, stride, padding, groups)


def gemm_conv_layout(x: Tensor, weight: Tensor, stride, padding, groups: int) -> bool:
    """gemm_conv_eligible from the tensors' metadata only (any Tensor type: the fake
    implementations of custom ops decide with it what the real ones will do)."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in _DTYPES
            and weight.dtype == x.dtype and weight.shape[2:] == (1, 1) and groups == 1
            and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and x.numel() > 0
            and x.is_contiguous(memory_format=torch.channels_last) and ext_built())


# NCHW eval 1x1 convs with at least this many pixels per image run as one GEMM per image
# (pw_conv_act_planar); below it oneDNN's NCHW conv was as fast or faster. B0, batch 8,
# conv + bias + SiLU, interleaved: 16->96 at 112x112 32.3 ms oneDNN vs 5.0 ms GEMM,
# 24->144 at 56x56 14.7 vs 2.1, 144->24 at 56x56 2.3 vs 1.7, 240->40 at 28x28 0.73 vs
# 0.82, 672->192 at 7x7 0.36 vs 0.77.
PLANAR_MIN_PIXELS = 40 * 40
# Switch for in-process A/B measurements: False leaves every NCHW eval 1x1 conv to oneDNN.
PLANAR_GEMM = True


def planar_gemm_eligible(x: Tensor, weight: Tensor, stride, padding, groups: int) -> bool:
    """Whether eval conv2d(x, weight) + act runs as pw_conv_act_planar: a float32 NCHW
    1x1 stride-1 conv with PLANAR_MIN_PIXELS pixels or more per image."""
    return (PLANAR_GEMM and type(x) is Tensor and x.device.type == "cpu" and x.dim() == 4
            and x.dtype == torch.float32 and weight.dtype == x.dtype
            and weight.shape[2:] == (1, 1) and groups == 1 and tuple(stride) == (1, 1)
            and tuple(padding) == (0, 0) and x.numel() > 0 and x.is_contiguous()
            and x.shape[2] * x.shape[3] >= PLANAR_MIN_PIXELS and epilogue_gemm_serves(x))


def planar_conv1x1_act(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    """act(conv2d(x, weight, bias)) for a planar_gemm_eligible call; NCHW output, no
    autograd."""
    return ext_module().cpu.pw_conv_act_planar(x, weight, bias, act_code(act))


def _rows(t: Tensor) -> Tensor:
    """(N, C, H, W) channels_last -> its (N*H*W, C) row-major view."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def sample_rows(t: Tensor) -> Tensor:
    """(N, C, H, W) channels_last -> its per-sample (N, H*W, C) row-major view."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).view(n, h * w, c)


def _cached_like(x: Tensor, channels: int) -> Tensor:
    n, _, h, w = x.shape
    return ext_module().cpu.empty_cached([n, channels, h, w], x, True)


# float32 convs of at least this many pixel rows run on the extension's GEMM (pw_conv_act
# with the identity act: the native packed GEMM where the GEMM policy picks it) instead of
# torch.mm; it packs the weight per call, which fewer rows do not repay. B0's head conv
# (320 -> 1280) on AMD EPYC, 2 threads: 98 rows 0.48-0.50 ms torch.mm vs 0.44-0.53
# native, 196 rows 0.90-0.97 vs 0.62-0.74, 392 rows (batch 8) 1.69-1.72 vs 1.07-1.19.
EXTENSION_GEMM_MIN_ROWS = 128


def gemm_conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                 packs_for: object | None = None) -> Tensor:
    """conv2d(x, weight, bias) for a gemm_conv_eligible call; channels_last output.
    No autograd: callers run it inside an autograd.Function or without a graph.
    packs_for: the module owning weight, for eval calls of a weight that does not change
    between them: float32 calls then take the extension's GEMM at any row count, on the
    weight packed once and kept with the module while it is unchanged (packed_weight)."""
    packed = None
    if packs_for is not None and epilogue_gemm_serves(x):
        packed = packed_weight(packs_for, weight)
    if packed is not None or (x.shape[0] * x.shape[2] * x.shape[3] >= EXTENSION_GEMM_MIN_ROWS
                              and epilogue_gemm_serves(x)):
        return ext_module().cpu.pw_conv_act(x, weight, bias, act_code("identity"), packed)
    cout = weight.shape[0]
    y = _cached_like(x, cout)
    w_t = weight.reshape(cout, -1).t()
    if bias is None:
        torch.mm(_rows(x), w_t, out=_rows(y))
    else:
        torch.addmm(bias, _rows(x), w_t, out=_rows(y))
    return y


# module -> (weight, version, data pointer, its PackedWeight): gemm_conv1x1's kept packs;
# an entry goes with its module.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed_weight(owner: object, weight: Tensor):
    """owner's weight packed for the extension's GEMM (csrc/cpu/packed_weight.h), made
    once and again whenever the weight is another tensor or changed; None for an inference
    tensor (no version counter to watch) or a weight that is not contiguous float32."""
    if weight.is_inference() or weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    entry = _PACKED.get(owner)
    version, ptr = weight._version, weight.data_ptr()
    if entry is None or entry[0] is not weight or entry[1] != version or entry[2] != ptr:
        entry = _PACKED[owner] = (weight, version, ptr, ext_module().cpu.pack_weight(weight))
    return entry[3]


def clear_packs() -> None:
    """Forget every kept pack (see effnet_kernels.clear_eval_cache)."""
    _PACKED.clear()


def gated_gemm_conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None,
                       gate: Tensor) -> Tensor:
    """conv2d(x * gate[n, c], weight, bias) without scaling x: per sample n the gate goes
    into the weight, y_n = x_n @ (weight * gate[n])^T (+ bias), one batched GEMM. Reads x
    once instead of twice (scale pass + conv); the gated weights cost N * Cout * Cin, so
    it pays when H * W exceeds Cout. gemm_conv_eligible calls only; gate is (N, Cin) in
    any float dtype (applied in float32, or float64 for float64 x). No autograd."""
    n, cin = x.shape[:2]
    cout = weight.shape[0]
    y = _cached_like(x, cout)
    gated = weight.reshape(1, cout, cin) * gate.reshape(n, 1, cin)
    x_rows, y_rows = sample_rows(x), sample_rows(y)
    gated_t = gated.to(x.dtype).transpose(1, 2)
    if bias is None:
        torch.bmm(x_rows, gated_t, out=y_rows)
    else:
        torch.baddbmm(bias.reshape(1, 1, cout), x_rows, gated_t, out=y_rows)
    return y


def gemm_conv1x1_act(x: Tensor, weight: Tensor, bias: Tensor | None, act: str,
                     gate: Tensor | None = None, packs_for: object | None = None) -> Tensor:
    """act(conv2d(x, weight, bias)), or with gate (N, Cin) act(conv2d(x * gate[n, c], ...))
    as in gated_gemm_conv1x1, for a gemm_conv_eligible call; channels_last output, no
    autograd. float32: one pass with the activation as a GEMM epilogue; packs_for as in
    gemm_conv1x1 (ungated calls)."""
    if epilogue_gemm_serves(x):
        packed = None
        if gate is not None:
            cout, cin = weight.shape[:2]
            weight = weight.reshape(1, cout, cin) * gate.reshape(-1, 1, cin).to(weight.dtype)
        elif packs_for is not None:
            packed = packed_weight(packs_for, weight)
        return ext_module().cpu.pw_conv_act(x, weight, bias, act_code(act), packed)
    y = gemm_conv1x1(x, weight, bias) if gate is None else gated_gemm_conv1x1(x, weight, bias, gate)
    return apply_act_(y, act)


# float32 backward calls of at least this many pixel rows run on the extension
# (pw_conv_backward: row tiles, dx and dW partials per tile on the GEMM policy's route)
# instead of two torch.mm. Below it the per-group dW partials (up to 8 MB for the head)
# and per-tile weight reads cost more than they save. B0's head conv (320 -> 1280) on AMD
# EPYC, 2 threads, dx + dW: 98 rows 0.77 ms torch.mm vs 0.85, 196 rows 1.46 vs 1.14,
# 392 rows 2.74 vs 1.53; the 7x7 1152 -> 192 projection 1.73 vs 1.06.
EXTENSION_GEMM_BACKWARD_MIN_ROWS = 160


def gemm_conv1x1_backward(dy: Tensor, x: Tensor, weight: Tensor, need_dx: bool,
                          need_dweight: bool) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dweight) of gemm_conv1x1 for the gradient dy of its output."""
    cout = weight.shape[0]
    dy = dy.contiguous(memory_format=torch.channels_last)
    w2d = weight.reshape(cout, -1)
    if x.shape[0] * x.shape[2] * x.shape[3] >= EXTENSION_GEMM_BACKWARD_MIN_ROWS \
            and epilogue_gemm_serves(x) and dy.dtype == torch.float32:
        dx, dweight = ext_module().cpu.pw_conv_backward(dy, x, w2d.contiguous(), need_dx,
                                                        need_dweight)
        return dx, None if dweight is None else dweight.view(weight.shape)
    dy_rows = _rows(dy)
    dx = dweight = None
    if need_dx:
        dx = _cached_like(x, x.shape[1])
        torch.mm(dy_rows, w2d, out=_rows(dx))
    if need_dweight:
        dweight = torch.mm(dy_rows.t(), _rows(x)).view(weight.shape)
    return dx, dweight
