"""The CPU depthwise eval forward on NCHW tensors (csrc/cpu/depthwise_planar.h).

dw_forward and dw_forward_pool read an NCHW x and write an NCHW out through the planar
row kernels (input rows transposed into a channels_last cache, output rows transposed
back) instead of converting both tensors. The conv arithmetic is the channels_last
kernels', so the results must equal the converting route (`_C.cpu.dw_set_planar(False)`)
bitwise: output and pool sums, every kernel size, stride, padding and act, rows narrow
enough to be transposed several at a time and wide ones, channel counts off a multiple
of 8, every storage dtype, any thread count. Parity of the NCHW op with the reference
runs in test_depthwise_parity.py (its NCHW eval cases take this route).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from effnet_kernels._ext import ext_module

EXT = ext_module()
pytestmark = pytest.mark.skipif(EXT is None, reason="compiled extension not available")
ACTS = (0, 1, 2)  # identity, relu, silu


@contextlib.contextmanager
def planar(enabled: bool):
    before = EXT.cpu.dw_set_planar(enabled)
    try:
        yield
    finally:
        EXT.cpu.dw_set_planar(before)


def _geometry(h, w, k, stride, same):
    """(pad_top, pad_left, out_h, out_w): symmetric padding, or TensorFlow's SAME."""
    if same:
        out_h, out_w = -(-h // stride), -(-w // stride)
        pad_top = max((out_h - 1) * stride + k - h, 0) // 2
        pad_left = max((out_w - 1) * stride + k - w, 0) // 2
        return pad_top, pad_left, out_h, out_w
    p = k // 2
    return p, p, (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1


def _inputs(shape, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(shape, generator=gen).to(dtype)
    weight = (torch.randn(c, 1, k, k, generator=gen) / k).to(dtype)
    scale = (torch.rand(c, generator=gen) + 0.5).to(acc)
    shift = torch.randn(c, generator=gen).to(acc)
    return x, weight, scale, shift


def _both_routes(x, weight, scale, shift, geo, act):
    """{planar: (out, pooled, out of dw_forward)} for the NCHW x."""
    got = {}
    for enabled in (True, False):
        with planar(enabled):
            out, pooled = EXT.cpu.dw_forward_pool(x, weight, scale, shift, *geo, act)
            plain = EXT.cpu.dw_forward(x, weight, scale, shift, *geo, act)
        got[enabled] = (out, pooled, plain)
    return got


# (N, C, H, W): 1-pixel, 7- and 14-pixel rows (transposed several rows at a time), odd
# widths, C = 1, 5, 19 (off a multiple of 8) and 32, and a 112-wide row (one at a time).
SHAPES = [(1, 1, 1, 1), (2, 5, 7, 7), (3, 19, 14, 14), (2, 32, 9, 13), (1, 8, 12, 40),
          (2, 24, 5, 112)]
GEOMETRIES = [(k, s, same) for k, s, same in itertools.product((1, 3, 5, 7), (1, 2), (False, True))
              if not (k == 1 and same)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k,stride,same", GEOMETRIES, ids=lambda v: str(v))
def test_float32_equals_converting_route_bitwise(shape, k, stride, same):
    x, weight, scale, shift = _inputs(shape, k, torch.float32)
    geo = (stride, *_geometry(shape[2], shape[3], k, stride, same))
    for act in ACTS:
        got = _both_routes(x, weight, scale, shift, geo, act)
        out = got[True][0]
        assert out.is_contiguous() and out.shape == (*shape[:2], *geo[3:])
        for a, b in zip(got[True], got[False]):
            assert torch.equal(a, b), act


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2), (7, 1)])
def test_other_dtypes_equal_converting_route_bitwise(dtype, k, stride):
    shape = (2, 19, 14, 11)
    x, weight, scale, shift = _inputs(shape, k, dtype)
    geo = (stride, *_geometry(shape[2], shape[3], k, stride, False))
    got = _both_routes(x, weight, scale, shift, geo, 2)
    assert got[True][0].dtype == dtype and got[True][0].is_contiguous()
    for a, b in zip(got[True], got[False]):
        assert torch.equal(a, b)


def test_results_do_not_depend_on_the_thread_count():
    """Threads split the output rows; the row blocks that are transposed together end at
    a thread's last row, so every split must give the same bits."""
    x, weight, scale, shift = _inputs((3, 21, 14, 9), 5, torch.float32)
    geo = (1, *_geometry(14, 9, 5, 1, False))
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append(EXT.cpu.dw_forward_pool(x, weight, scale, shift, *geo, 2))
    finally:
        torch.set_num_threads(before)
    for out, pooled in got[1:]:
        assert torch.equal(out, got[0][0]) and torch.equal(pooled, got[0][1])


def test_empty_batch_and_channels_last_input():
    x, weight, scale, shift = _inputs((0, 6, 5, 5), 3, torch.float32)
    out, pooled = EXT.cpu.dw_forward_pool(x, weight, scale, shift, 1, 1, 1, 5, 5, 2)
    assert out.shape == (0, 6, 5, 5) and pooled.shape == (0, 6)
    x, weight, scale, shift = _inputs((2, 6, 5, 5), 3, torch.float32)
    cl = x.contiguous(memory_format=torch.channels_last)
    out = EXT.cpu.dw_forward(cl, weight, scale, shift, 1, 1, 1, 5, 5, 2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, EXT.cpu.dw_forward(x, weight, scale, shift, 1, 1, 1, 5, 5, 2))


def test_set_planar_returns_previous_setting():
    before = EXT.cpu.dw_set_planar(False)
    try:
        assert EXT.cpu.dw_set_planar(True) is False
        assert EXT.cpu.dw_set_planar(True) is True
    finally:
        EXT.cpu.dw_set_planar(before)
