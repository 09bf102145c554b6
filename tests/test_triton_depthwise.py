"""Triton depthwise conv + BN + act primitives against the plain-PyTorch reference.

On a machine without a GPU these run under TRITON_INTERPRET=1 (set by conftest) on CPU
tensors, so the shapes are small and the combinations a representative subset.
"""

from __future__ import annotations

import pytest
import torch
from act_cases import act_spread

pytest.importorskip("triton")

from effnet_kernels.ops import reference  # noqa: E402
from effnet_kernels.ops.activations import ACT_CODES  # noqa: E402
from effnet_kernels.ops.geometry import conv_geometry, memory_format_of  # noqa: E402
from effnet_kernels.testing import assert_parity  # noqa: E402
from effnet_kernels.triton import depthwise_bn_act as tri  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (N, C, H, W, k, stride, padding, act, channels_last): odd sizes, 1x1 spatial, stride 2 on odd
# sizes, every k, symmetric and TF SAME padding, every act, both layouts.
CASES = [
    (2, 5, 9, 9, 3, 1, None, 2, True),
    (2, 5, 9, 7, 3, 2, "same", 1, False),
    (1, 17, 7, 9, 5, 2, "same", 2, True),
    (2, 3, 5, 5, 5, 1, None, 0, False),
    (1, 5, 7, 7, 7, 1, None, 1, True),
    (2, 3, 9, 5, 7, 2, "same", 0, False),
    (2, 17, 5, 7, 1, 1, None, 2, False),
    (1, 3, 1, 1, 3, 1, None, 2, True),
    (2, 5, 1, 1, 3, 2, "same", 1, False),
    (1, 3, 8, 6, 3, 2, "same", 2, True),  # even size: SAME pads only bottom/right
    (2, 6, 7, 9, 3, 1, None, 3, True),  # relu6: scale widened so both clamps are crossed
    (1, 5, 9, 8, 5, 2, "same", 3, False),
]
DTYPES = [torch.float64, torch.float32]
if CUDA:
    DTYPES += [torch.float16, torch.bfloat16]
    # Compiled tiles are larger: these span several partial rows / chunks and channel blocks.
    CASES += [(4, 40, 33, 31, 3, 1, None, 2, True), (3, 72, 29, 27, 5, 2, "same", 2, False)]


def _ids(case):
    n, c, h, w, k, s, pad, act, cl = case
    return f"{n}x{c}x{h}x{w}-k{k}s{s}-{pad}-act{act}-{'cl' if cl else 'nchw'}"


def _setup(case, dtype):
    n, c, h, w, k, s, pad, act, cl = case
    gen = torch.Generator().manual_seed(CASES.index(case))
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    wt = torch.randn(c, 1, k, k, generator=gen, dtype=torch.float64) / k
    x, wt = x.to(DEVICE, dtype), wt.to(DEVICE, dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    geo = conv_geometry(h, w, k, s, pad)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    vec = [torch.randn(c, generator=gen, dtype=torch.float64).to(DEVICE, acc) for _ in range(4)]
    scale, shift, coef_b, coef_c = vec[0].abs() + 0.5, vec[1], vec[2], vec[3]
    if act == ACT_CODES["relu6"]:
        scale = scale * act_spread("relu6")
    # dy in the "other" layout, to check the launcher aligns it with x.
    dy = torch.randn(n, c, geo.out_h, geo.out_w, generator=gen, dtype=torch.float64)
    dy = dy.to(DEVICE, dtype).contiguous(memory_format=torch.contiguous_format if cl else torch.channels_last)
    return x, wt, geo, act, scale, shift, coef_b, coef_c, dy


def _check(dtype, names, got, fn, *args):
    """Parity rule (effnet_kernels.testing): error vs the float64 reference <= a few times the
    reference's own error in `dtype` + a floor relative to the result's magnitude."""
    up = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    truth, same = fn(*up), fn(*args)
    if torch.is_tensor(truth):
        names, got, truth, same = [names], [got], [truth], [same]
    for name, g, t, ref in zip(names, got, truth, same, strict=True):
        assert g.dtype == ref.dtype, name
        assert_parity(name, g, ref, t, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_stats(case, dtype):
    x, wt, geo, *_ = _setup(case, dtype)
    got = tri.dw_stats(x, wt, *geo)
    _check(dtype, ["mean", "var"], got, reference.dw_stats, x, wt, *geo)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward(case, dtype):
    x, wt, geo, act, scale, shift, *_ = _setup(case, dtype)
    out = tri.dw_forward(x, wt, scale, shift, *geo, act)
    assert out.is_contiguous(memory_format=memory_format_of(x))
    _check(dtype, "out", out, reference.dw_forward, x, wt, scale, shift, *geo, act)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_backward(case, dtype):
    x, wt, geo, act, scale, shift, coef_b, coef_c, dy = _setup(case, dtype)
    mean = reference.dw_stats(x, wt, *geo)[0]
    args = (dy, x, wt, scale, shift, mean)
    geo_act = (geo.stride, geo.pad_top, geo.pad_left, act)
    got = tri.dw_backward_reduce(*args, *geo_act)
    _check(dtype, ["sum_g", "sum_g_yc"], got, reference.dw_backward_reduce, *args, *geo_act)

    dx, dw = tri.dw_backward(*args, coef_b, coef_c, *geo_act)
    assert dx.is_contiguous(memory_format=memory_format_of(x)) and dw.shape == wt.shape
    _check(dtype, ["dx", "dweight"], (dx, dw), reference.dw_backward, *args, coef_b, coef_c, *geo_act)


def test_stats_large_offset_is_stable():
    """Shifted data (mean >> std): a naive E[y^2] - E[y]^2 would lose every digit in float32."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 9, 9, generator=gen) * 1e-2 + 1e3).to(DEVICE)
    wt = torch.full((3, 1, 3, 3), 1.0 / 9, device=DEVICE)
    geo = conv_geometry(9, 9, 3, 1, 0)  # no padding: every y is ~1e3 +- 3e-3
    _, var = tri.dw_stats(x, wt, *geo)
    _, ref_var = reference.dw_stats(x.double(), wt.double(), *geo)
    torch.testing.assert_close(var, ref_var.float(), rtol=2e-2, atol=0)
