"""Triton backend of drop-connect + residual add (math in effnet_kernels/ops/drop_connect.py).

  _dc_forward_kernel   out[i] = shortcut[i] + x[i] * scale[i // S]
  _dc_backward_kernel  dx[i]  = dy[i] * scale[i // S]
i runs over the flat memory of dense tensors that share one format (NCHW or channels_last:
the batch dimension is outermost in both), S = numel / N elements per sample. Offsets are
int64 (tensors may exceed 2^31 elements). Math runs in scale's dtype (float32, or float64 for
float64 tensors); results are rounded once to the tensor dtype.
Plain launchers (no wrap_triton): they also run on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.geometry import memory_format_of

# One flat 1-D grid: tiny samples (S of a few elements) and huge ones cost the same per element.
# NOTE: not yet swept on a GPU; 1024 elements x 4 warps = 8 floats per thread (two 16 B accesses).
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _dc_forward_kernel(x_ptr, s_ptr, scale_ptr, out_ptr,  # x, s, out: numel; scale: N
                       numel, S, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    scale = tl.load(scale_ptr + offs // S, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(scale.dtype)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(scale.dtype)
    tl.store(out_ptr + offs, (s + x * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dc_backward_kernel(dy_ptr, scale_ptr, dx_ptr,  # dy, dx: numel; scale: N
                        numel, S, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    scale = tl.load(scale_ptr + offs // S, mask=mask, other=0.0)
    # A dropped sample (scale 0) never reads dy: its gradient is a plain zero fill.
    dy = tl.load(dy_ptr + offs, mask=mask & (scale != 0.0), other=0.0).to(scale.dtype)
    tl.store(dx_ptr + offs, (dy * scale).to(dx_ptr.dtype.element_ty), mask=mask)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format_of(t))


def _launch(kernel, *tensors, out, scale):
    numel = out.numel()
    if numel == 0:
        return out
    grid = (triton.cdiv(numel, BLOCK),)
    kernel[grid](*tensors, scale, out, numel, numel // out.shape[0], BLOCK=BLOCK,
                 num_warps=NUM_WARPS)
    return out


def dc_forward(x: torch.Tensor, shortcut: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """shortcut + x * scale[n]; x and shortcut dense in the same memory format."""
    return _launch(_dc_forward_kernel, x, shortcut, out=_empty_like(x), scale=scale)


def dc_backward(dy: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dy * scale[n]; dy dense (NCHW or channels_last)."""
    return _launch(_dc_backward_kernel, dy, out=_empty_like(dy), scale=scale)
