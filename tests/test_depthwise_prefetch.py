"""The cpu depthwise kernels' software prefetch changes no result.

It is on for float32/float64 tensors of 8 MiB and more (csrc/cpu/depthwise_bn_act.cpp,
prefetch_pixels), so these cases are that large: every row kernel that prefetches (stats,
in-place affine, eval and recomputing forward, the backward reduce, dx/dweight from a
recomputed or a kept y, the unit-kernel backward, stride 1 and 2) runs once with it on and
once off, and all outputs, gradients and running statistics must be bitwise equal. One
case is also checked against the float64 truth with the parity rule.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from backend_params import require_backend
from depthwise_cases import Case, fused, make_inputs, run
from test_depthwise_parity import OP, check_case

from effnet_kernels import use_backend
from effnet_kernels._ext import ext_module

MIB = 1 << 20
LARGE_F32 = [
    Case((2, 64, 128, 128)),                           # 8 MiB: the smallest tensor it is on for
    Case((2, 64, 128, 128), kernel=5, stride=2, padding="same"),
    Case((2, 64, 128, 128), kernel=1, padding=0, act="relu"),
]
LARGE_F64 = [Case((2, 32, 128, 128), kernel=3, stride=2)]


@contextlib.contextmanager
def prefetch(enabled: bool):
    prims = ext_module().cpu
    before = prims.dw_set_prefetch(enabled)
    try:
        yield
    finally:
        prims.dw_set_prefetch(before)


def routes():
    """(name, KEEP_INTERMEDIATES, KEEP_Y_IN_BACKWARD) of ops/depthwise.py."""
    return [("recompute", False, False), ("keep g", True, False), ("keep g and y", True, True)]


@pytest.mark.parametrize("case,dtype", [(c, torch.float32) for c in LARGE_F32]
                         + [(c, torch.float64) for c in LARGE_F64], ids=str)
def test_prefetch_changes_no_result(case, dtype, monkeypatch):
    from effnet_kernels.ops import depthwise as dw_ops

    require_backend(OP, "cpu", "cpu", dtype)
    x_bytes = torch.Size(case.shape).numel() * torch.empty((), dtype=dtype).element_size()
    assert x_bytes >= 8 * MIB, "the case must be large enough for the kernels to prefetch"
    inputs = make_inputs(case, dtype)
    fmt = torch.channels_last
    monkeypatch.setattr(dw_ops, "KEEP_Y_MAX_BYTES_3X3", 1 << 60)
    for name, intermediates, keep_y in routes():
        monkeypatch.setattr(dw_ops, "KEEP_INTERMEDIATES", intermediates)
        monkeypatch.setattr(dw_ops, "KEEP_Y_IN_BACKWARD", keep_y)
        got = {}
        for enabled in (True, False):
            with prefetch(enabled), use_backend("cpu"):
                got[enabled] = run(fused, case, inputs, training=True, dtype=dtype, fmt=fmt)
                got[enabled]["eval"] = run(fused, case, inputs, training=False, dtype=dtype,
                                           fmt=fmt)["out"]
        for key, value in got[True].items():
            assert torch.equal(value, got[False][key]), (name, key)


def test_prefetch_parity_with_float64_truth():
    with prefetch(True):
        check_case("cpu", "cpu", LARGE_F32[0], torch.float32, "nhwc", True)


def test_set_prefetch_returns_previous_setting():
    prims = ext_module().cpu
    before = prims.dw_set_prefetch(False)
    try:
        assert prims.dw_set_prefetch(True) is False
        assert prims.dw_set_prefetch(True) is True
    finally:
        prims.dw_set_prefetch(before)
