"""Triton backend of squeeze-and-excitation (primitives: effnet_kernels/ops/squeeze_excite.py).

    se_pool(x)                       s[n, c] = sum_hw x
    se_pool_dy_x(dy, x)              s[n, c] = sum_hw dy * x
    se_scale(x, gate)                out = x * gate[n, c]
    se_backward_dx(dy, gate, dmean)  dx  = dy * gate[n, c] + dmean[n, c]

Layout: x is dense NCHW or channels_last, so the flattened pixel p = h * W + w sits at
p * stride(3) in both formats; tensors are addressed through (stride n, stride c, stride p),
and Triton specializes the stride that equals 1 (p for NCHW, c for channels_last), so tile
loads vectorize along the contiguous axis either way. Offsets are computed in int64.
Reductions: a program owns (image n, BLOCK_C channels, one chunk of pixels) and writes one
partial row; torch sums the (N, chunks, C) partials in a fixed order: deterministic, no
atomics. Accumulation dtype = that of the gate / partials buffer (float32, float64 for
float64 inputs).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops.geometry import acc_dtype, dense, memory_format_of

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Reduction chunk = this many BLOCK_P tiles: small in the interpreter so tests split images, enough
# programs to fill a GPU (e.g. 8 x 32 x 112 x 112 channels_last: 392 programs).
_CHUNK_TILES = 8 if _INTERPRET else 16


@triton.jit
def _se_reduce_kernel(
    a_ptr,     # (N, C, HW) strided (sn, sc, sp), any float dtype
    b_ptr,     # same layout as a (read only when DOT)
    part_ptr,  # (N, chunks, C) contiguous, acc dtype: per-chunk sums
    C, HW, chunk, chunks, sn, sc, sp,
    DOT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    n = tl.program_id(0)
    q = tl.program_id(1)
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = cc[None, :]
    base = n.to(tl.int64) * sn + c.to(tl.int64) * sc
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for s in range(0, chunk, BLOCK_P):
        local = s + tl.arange(0, BLOCK_P)[:, None]
        p = q * chunk + local
        m = (local < chunk) & (p < HW) & (c < C)
        off = base + p.to(tl.int64) * sp
        v = tl.load(a_ptr + off, mask=m, other=0.0).to(ACC)
        if DOT:
            v = v * tl.load(b_ptr + off, mask=m, other=0.0).to(ACC)
        acc += v
    out = part_ptr + (n.to(tl.int64) * chunks + q) * C + cc
    tl.store(out, tl.sum(acc, axis=0), mask=cc < C)


@triton.jit
def _se_affine_kernel(
    in_ptr,    # (N, C, HW) strided (sn, sc, sp)
    g_ptr,     # (N, C) contiguous, acc dtype
    b_ptr,     # (N, C) contiguous, acc dtype (read only when HAS_BIAS)
    out_ptr,   # same shape and strides as in
    C, HW, pblocks, sn, sc, sp,
    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC: tl.constexpr = g_ptr.dtype.element_ty
    n = tl.program_id(0) // pblocks
    p = (tl.program_id(0) % pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    cmask = c < C
    m = (p < HW) & cmask
    off = n.to(tl.int64) * sn + c.to(tl.int64) * sc + p.to(tl.int64) * sp
    nc = n.to(tl.int64) * C + c
    v = tl.load(in_ptr + off, mask=m, other=0.0).to(ACC) * tl.load(g_ptr + nc, mask=cmask)
    if HAS_BIAS:
        v += tl.load(b_ptr + nc, mask=cmask)
    tl.store(out_ptr + off, v.to(out_ptr.dtype.element_ty), mask=m)


def _tiles(x: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps): long along the contiguous axis of x's layout."""
    if _INTERPRET:  # fixed tiles: few programs (each costs ms in numpy); odd C/HW hit the masks
        return 16, 64, 1
    # NOTE: not yet swept on a GPU.
    if memory_format_of(x) == torch.channels_last:
        return 16, 128, 4
    return 256, 4, 4


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(sample, channel, pixel) strides of a dense x, from its memory format: what x's own
    strides give only for dims longer than 1 (a dense x with W == 1 may carry any
    stride(3)), and what the outputs allocated in that format share."""
    _, c, h, w = x.shape
    if memory_format_of(x) == torch.channels_last:
        return h * w * c, 1, c
    return c * h * w, h * w, 1


def _reduce(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    a = dense(a)
    n, c, h, w = a.shape
    hw = h * w
    acc = acc_dtype(a.dtype)
    if a.numel() == 0:
        return a.new_zeros((n, c), dtype=acc)
    if b is not None:  # dense in a's format: the same addressing (_strides)
        b = b.contiguous(memory_format=memory_format_of(a))
    block_p, block_c, warps = _tiles(a)
    chunk = triton.cdiv(min(hw, _CHUNK_TILES * block_p), block_p) * block_p
    chunks = triton.cdiv(hw, chunk)
    part = torch.empty((n, chunks, c), dtype=acc, device=a.device)
    grid = (n, chunks, triton.cdiv(c, block_c))
    _se_reduce_kernel[grid](
        a, a if b is None else b, part, c, hw, chunk, chunks, *_strides(a),
        DOT=b is not None, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps,
    )
    return part.sum(1)


def _affine(x: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x = dense(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    if x.numel() == 0:
        return out
    n, c, h, w = x.shape
    block_p, block_c, warps = _tiles(x)
    pblocks = triton.cdiv(h * w, block_p)
    grid = (n * pblocks, triton.cdiv(c, block_c))
    _se_affine_kernel[grid](
        x, g.contiguous(), g if bias is None else bias.contiguous(), out, c, h * w, pblocks,
        *_strides(x), HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=warps,
    )
    return out


def se_pool(x: torch.Tensor) -> torch.Tensor:
    return _reduce(x, None)


def se_pool_dy_x(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _reduce(x, dy)


def se_scale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return _affine(x, gate, None)


def se_backward_dx(dy: torch.Tensor, gate: torch.Tensor, dmean: torch.Tensor) -> torch.Tensor:
    return _affine(dy, gate, dmean)
