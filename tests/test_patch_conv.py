"""The CPU direct conv for small patches with bias + activation (csrc/cpu/patch_conv.cpp,
`_C.cpu.patch_conv_act`; the eval stem): parity with conv2d + act against float64 over
kernel sizes, strides, symmetric and TF SAME (asymmetric) padding, Cout around the
vector and panel widths and odd image sizes, independence from the thread count, the
8-lane (AVX2) copy, empty batches and its argument errors; and the eval route that takes
it (nn/eval_conv.py) against oneDNN's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from act_cases import ACTS, act_spread
from native_gemm import native_gemm_forced, native_gemm_possible  # noqa: F401

from effnet_kernels._ext import ext_module
from effnet_kernels.nn import eval_conv
from effnet_kernels.ops.activations import ACT_CODES
from effnet_kernels.ops.geometry import conv_geometry
from effnet_kernels.testing import assert_parity

EXT = ext_module()
pytestmark = [pytest.mark.skipif(not native_gemm_possible(),
                                 reason="the patch conv needs the native GEMM (AVX2 / AVX-512)"),
              pytest.mark.usefixtures("native_gemm_forced")]
CL = torch.channels_last


def _inputs(n, cin, h, w, cout, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
    return x, weight, torch.randn(cout, generator=gen)


def _reference(x, weight, bias, geo, act, dtype):
    """conv2d of x zero padded by (top, left) and whatever the output size needs below
    and right, then act."""
    k = weight.shape[-1]
    bottom = max(0, (geo.out_h - 1) * geo.stride + k - x.shape[2] - geo.pad_top)
    right = max(0, (geo.out_w - 1) * geo.stride + k - x.shape[3] - geo.pad_left)
    padded = F.pad(x.to(dtype), (geo.pad_left, right, geo.pad_top, bottom))
    y = F.conv2d(padded, weight.to(dtype), None if bias is None else bias.to(dtype), geo.stride)
    return ACTS[act](y[:, :, :geo.out_h, :geo.out_w])


def _check(x, weight, bias, geo, act, name):
    got = EXT.cpu.patch_conv_act(x, weight, bias, *geo, ACT_CODES[act])
    assert got.is_contiguous(memory_format=CL) and got.dtype == torch.float32
    assert got.shape == (x.shape[0], weight.shape[0], geo.out_h, geo.out_w)
    assert_parity(name, got, _reference(x, weight, bias, geo, act, torch.float32),
                  _reference(x, weight, bias, geo, act, torch.float64), torch.float32)
    return got


# (n, cin, h, w, cout, k, stride, padding): B0's stem at 224 and at odd sizes, Cout around
# the vector and panel widths (1, 7, 16, 17, 33, 48), 1 to 4 input channels, k 1 to 7,
# strides 1 to 3, output rows shorter than a micro tile, images smaller than the kernel
# with padding, and 17 rows (more than one row buffer per image).
SHAPES = [(1, 3, 224, 224, 32, 3, 2, 1), (2, 3, 17, 19, 32, 3, 2, 1), (2, 3, 16, 16, 32, 3, 2, 0),
          (1, 4, 9, 11, 40, 5, 1, 2), (3, 1, 7, 7, 1, 3, 1, 1), (1, 3, 30, 30, 48, 3, 2, 1),
          (2, 2, 5, 6, 17, 1, 1, 0), (1, 3, 8, 8, 24, 7, 2, 3), (2, 3, 20, 9, 7, 3, 3, 1),
          (1, 2, 2, 2, 16, 3, 1, 1), (1, 3, 17, 5, 33, 3, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("padding", ["symmetric", "same"])
def test_matches_conv2d_then_act(shape, padding):
    n, cin, h, w, cout, k, stride, pad = shape
    x, weight, bias = _inputs(n, cin, h, w, cout, k)
    geo = conv_geometry(h, w, k, stride, "same" if padding == "same" else pad)
    for act in ACTS:
        _check(x * act_spread(act), weight, bias, geo, act, f"patch conv {act}")
    _check(x, weight, None, geo, "identity", "patch conv without bias")


def test_results_do_not_depend_on_threads():
    x, weight, bias = _inputs(3, 3, 37, 41, 32, 3)
    geo = conv_geometry(37, 41, 3, 2, 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = EXT.cpu.patch_conv_act(x, weight, bias, *geo, ACT_CODES["silu"]).clone()
        torch.set_num_threads(max(2, threads))
        many = EXT.cpu.patch_conv_act(x, weight, bias, *geo, ACT_CODES["silu"])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_empty_batch_and_strided_weight():
    x, weight, bias = _inputs(0, 3, 8, 8, 32, 3)
    out = EXT.cpu.patch_conv_act(x, weight, bias, *conv_geometry(8, 8, 3, 2, 1), 2)
    assert out.shape == (0, 32, 4, 4)
    x, _, bias = _inputs(2, 3, 9, 9, 16, 3)
    wide = torch.randn(16, 6, 3, 3)[:, ::2]  # a non-contiguous weight
    _check(x, wide, bias, conv_geometry(9, 9, 3, 1, 1), "silu", "strided weight")


def _call(x=None, weight=None, bias=None, geo=(2, 1, 1, 4, 4), act=2):
    x = torch.randn(1, 3, 8, 8).contiguous(memory_format=CL) if x is None else x
    weight = torch.randn(8, 3, 3, 3) if weight is None else weight
    return EXT.cpu.patch_conv_act(x, weight, bias, *geo, act)


@pytest.mark.parametrize("kwargs, message", [
    (dict(x=torch.randn(1, 3, 8, 8)), "x must be contiguous in channels_last format"),
    (dict(x=torch.randn(1, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=CL)),
     "x must have dtype Float"),
    (dict(x=torch.randn(3, 8, 8)), "x must be 4-D"),
    (dict(weight=torch.randn(8, 4, 3, 3)), r"weight must be \(Cout, Cin, k, k\) = \(Cout, 3, k, k\)"),
    (dict(weight=torch.randn(8, 3, 3, 2)), r"weight must be \(Cout, Cin, k, k\)"),
    (dict(weight=torch.randn(8, 3, 3, 3, dtype=torch.float64)), "weight must have dtype Float"),
    (dict(weight=torch.randn(8, 3, 11, 11)), "at most 256 values per output channel"),
    (dict(bias=torch.randn(7)), r"bias must be a float32 cpu tensor of shape \(8,\)"),
    (dict(geo=(0, 1, 1, 4, 4)), "stride must be >= 1"),
    (dict(geo=(2, 3, 1, 4, 4)), r"pad_top and pad_left must be in \[0, 3\)"),
    (dict(geo=(2, 1, 1, 6, 4)), r"output size \(6, 4\) does not fit input size \(8, 8\)"),
    (dict(geo=(2, 1, 1, 0, 4)), r"output size \(0, 4\)"),
    (dict(act=4), "act"),
])
def test_errors(kwargs, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        _call(**kwargs)


_AVX2_CHECK = """
import torch, torch.nn.functional as F
from effnet_kernels._ext import ext_module
e = ext_module().cpu
print(e.dw_simd_isa(), e.patch_conv_available())
x = torch.randn(2, 3, 13, 15).contiguous(memory_format=torch.channels_last)
w, b = torch.randn(41, 3, 3, 3) / 5, torch.randn(41)
got = e.patch_conv_act(x, w, b, 2, 1, 1, 7, 8, 0).double()
ref = F.conv2d(x.double(), w.double(), b.double(), 2, 1)
assert (got - ref).abs().max().item() < 1e-5
"""


def test_avx2_copy():
    """EFFNET_CPU_ISA=avx2: the 8-lane micro tiles (6 rows x 16 columns), 41 columns."""
    if EXT.cpu.dw_simd_isa() != "avx512":
        pytest.skip("the AVX2 copy is the default here")
    done = subprocess.run([sys.executable, "-c", _AVX2_CHECK], capture_output=True, text=True,
                          env=dict(os.environ, EFFNET_CPU_ISA="avx2", EFFNET_CPU_GEMM="native"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["avx2", "True"]


def test_not_available_on_the_blas_route():
    previous = EXT.cpu.gemm_set_mode("blas")
    try:
        assert not EXT.cpu.patch_conv_available()
        with pytest.raises(RuntimeError, match="needs the native GEMM"):
            _call()
        # the eval route falls back to oneDNN
        x, weight, bias = _inputs(2, 3, 16, 16, 32, 3)
        got = eval_conv.eval_conv_act(x, weight, bias, (2, 2), (1, 1), (1, 1), 1, "silu")
        geo = conv_geometry(16, 16, 3, 2, 1)
        assert_parity("oneDNN fallback", got, _reference(x, weight, bias, geo, "silu", torch.float32),
                      _reference(x, weight, bias, geo, "silu", torch.float64), torch.float32)
    finally:
        EXT.cpu.gemm_set_mode(previous)


@pytest.mark.parametrize("patch", [True, False], ids=["patch", "onednn"])
@pytest.mark.parametrize("case", [((2, 3, 33, 31), (32, 3, 3, 3), (2, 2), (1, 1)),
                                  ((1, 3, 9, 9), (24, 3, 3, 3), (1, 1), (0, 0)),
                                  ((2, 16, 9, 9), (24, 16, 3, 3), (1, 1), (1, 1)),
                                  ((2, 3, 12, 12), (8, 3, 3, 3), (2, 1), (1, 1))],
                         ids=["stem", "no_padding", "large_patch", "uneven_stride"])
def test_eval_route(monkeypatch, patch, case):
    """eval_conv_act takes the patch conv for small patches on channels_last float32 input
    (the last two cases are oneDNN's: 144 taps, unequal strides); both routes match."""
    monkeypatch.setattr(eval_conv, "PATCH_CONV", patch)
    x_shape, w_shape, stride, padding = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*x_shape, generator=gen).contiguous(memory_format=CL)
    weight, bias = torch.randn(*w_shape, generator=gen) / 4, torch.randn(w_shape[0], generator=gen)
    served = eval_conv.patch_conv_serves(x, weight, stride, padding, (1, 1), 1)
    assert served == (patch and w_shape[1] * 9 <= eval_conv.PATCH_MAX_TAPS and stride[0] == stride[1])
    got = eval_conv.eval_conv_act(x, weight, bias, stride, padding, (1, 1), 1, "silu")
    want = F.silu(F.conv2d(x.double(), weight.double(), bias.double(), stride, padding))
    torch_fp32 = F.silu(F.conv2d(x, weight, bias, stride, padding))
    assert got.is_contiguous(memory_format=CL)
    assert_parity("eval route", got, torch_fp32, want, torch.float32)
