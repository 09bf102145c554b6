"""Convolution geometry shared by every backend: padding modes and output sizes.

A depthwise convolution here is described by (stride, pad_top, pad_left, out_h, out_w).
Input pixels outside [0, H) x [0, W) read as zero, so the bottom/right padding is
implied by the output size. That covers symmetric integer padding and TensorFlow's
asymmetric SAME padding (extra pixel at the bottom/right) with one code path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._ext import ext_module


class ConvGeometry(NamedTuple):
    stride: int
    pad_top: int
    pad_left: int
    out_h: int
    out_w: int


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, out


def conv_geometry(
    h: int, w: int, kernel: int, stride: int, padding: int | str | None
) -> ConvGeometry:
    """Output size and top/left padding for a k x k convolution of an h x w image."""
    if padding == "same":
        pad_top, out_h = _same_pad(h, kernel, stride)
        pad_left, out_w = _same_pad(w, kernel, stride)
        return ConvGeometry(stride, pad_top, pad_left, out_h, out_w)
    pad = kernel // 2 if padding is None else int(padding)
    out_h = (h + 2 * pad - kernel) // stride + 1
    out_w = (w + 2 * pad - kernel) // stride + 1
    return ConvGeometry(stride, pad, pad, out_h, out_w)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out NHWC (and not also NCHW-contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last
    ):
        return torch.channels_last
    return torch.contiguous_format


def is_dense(x: torch.Tensor) -> bool:
    """Whether x is dense in NCHW or in channels_last."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _densify_format(x: torch.Tensor) -> torch.memory_format:
    """The format dense() copies a non-dense x into: channels_last where the channel
    stride is 1 (a channel slice of an NHWC tensor), else NCHW."""
    return torch.channels_last if x.dim() == 4 and x.stride(1) == 1 else torch.contiguous_format


def dense(x: torch.Tensor) -> torch.Tensor:
    """x made dense in its own memory format (NCHW or channels_last)."""
    return x if is_dense(x) else x.contiguous(memory_format=_densify_format(x))


def copy_in_format(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """t in memory format fmt (t itself where it already is), through autograd. A CPU copy
    goes into the extension's output cache (an activation above glibc's mmap threshold
    copied by .contiguous() lands on fresh pages every call) and a dense NCHW <->
    channels_last copy runs as the extension's tiled transpose (csrc/cpu/layout_copy.cpp)."""
    if t.is_contiguous(memory_format=fmt):
        return t
    ext = ext_module() if t.device.type == "cpu" else None
    if ext is None:
        return t.contiguous(memory_format=fmt)
    if torch.is_grad_enabled() and t.requires_grad:
        return _LayoutCopy.apply(t, fmt == torch.channels_last)
    return _layout_copy(ext, t, fmt == torch.channels_last)


def _layout_copy(ext, t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return ext.cpu.copy_layout(ext.cpu.empty_cached(list(t.shape), t, channels_last), t)


class _LayoutCopy(torch.autograd.Function):
    """copy_in_format's copy on CPU; the gradient passes through in the layout it comes
    in, as Tensor.copy_'s does."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, channels_last: bool) -> torch.Tensor:
        return _layout_copy(ext_module(), t, channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def dense_format(x: torch.Tensor) -> torch.memory_format:
    """memory_format_of(dense(x)) without the copy: the format of the outputs the kernels
    write for x, which a fake kernel must predict for non-dense inputs too."""
    if is_dense(x):
        return memory_format_of(x)
    return memory_format_of(torch.empty(x.shape, device="meta", memory_format=_densify_format(x)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64, float32 for every other float type."""
    return torch.float64 if dtype == torch.float64 else torch.float32
