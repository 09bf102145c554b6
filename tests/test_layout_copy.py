"""NCHW <-> channels_last copies (csrc/cpu/layout_copy.cpp, `_C.cpu.copy_layout`, used by
the depthwise op's layout conversions and by ops.geometry.copy_in_format): bitwise what
Tensor.copy_ gives, in both directions, for every element size and for the shapes where
the two layouts coincide; other copies fall back to Tensor.copy_; argument errors; and the
gradient through copy_in_format."""

from __future__ import annotations

import pytest
import torch

from effnet_kernels._ext import ext_module
from effnet_kernels.ops.geometry import copy_in_format

EXT = ext_module()
pytestmark = pytest.mark.skipif(EXT is None, reason="needs the compiled extension")
CL = torch.channels_last
SHAPES = [(3, 17, 9, 11), (2, 40, 7, 1), (2, 1, 4, 4), (2, 5, 1, 1), (0, 4, 3, 3),
          (1, 33, 33, 33)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int16, torch.int32,
          torch.int64]


def _random(shape, dtype):
    """Random values; 4-byte integers cover every bit pattern (NaN and denormal payloads
    included, as the float transpose moves them)."""
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.int32:
        return torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("to_cl", [True, False])
def test_matches_tensor_copy(shape, dtype, to_cl):
    src_fmt, dst_fmt = (torch.contiguous_format, CL) if to_cl else (CL, torch.contiguous_format)
    src = _random(shape, dtype).contiguous(memory_format=src_fmt)
    dst = torch.empty(shape, dtype=dtype).contiguous(memory_format=dst_fmt)
    out = EXT.cpu.copy_layout(dst, src)
    assert out.data_ptr() == dst.data_ptr()
    assert dst.is_contiguous(memory_format=dst_fmt)
    assert torch.equal(dst, src)


def test_other_copies_fall_back():
    base = _random((2, 6, 5, 5), torch.float32)
    for src in (base[:, ::2], base.permute(0, 1, 3, 2), base.contiguous(memory_format=CL)):
        dst = torch.empty(src.shape).contiguous(memory_format=CL)
        EXT.cpu.copy_layout(dst, src)
        assert torch.equal(dst, src)


@pytest.mark.parametrize("dst,message", [
    (torch.empty(2, 3, 4, 5), "dst must have src's shape"),
    (torch.empty(2, 3, 4, 4, dtype=torch.float64), "dst must have src's dtype"),
])
def test_errors(dst, message):
    with pytest.raises(RuntimeError, match=message):
        EXT.cpu.copy_layout(dst, torch.zeros(2, 3, 4, 4))


def test_overlapping_tensors_are_refused():
    base = torch.zeros(2 * 3 * 4 * 4 + 8)
    src = base[:96].view(2, 3, 4, 4)
    dst = base[8:].as_strided((2, 3, 4, 4), (48, 1, 12, 3))
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        EXT.cpu.copy_layout(dst, src)


@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format])
def test_copy_in_format_gradient(fmt):
    other = torch.contiguous_format if fmt == CL else CL
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64).contiguous(memory_format=other)
    x.requires_grad_()
    y = copy_in_format(x, fmt)
    assert y.is_contiguous(memory_format=fmt) and torch.equal(y, x)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(dx, dy)
    assert torch.autograd.gradcheck(lambda t: copy_in_format(t, fmt), (x,))
