"""Parity of every depthwise conv + BN + act backend against the float64 truth.

Output, every gradient and both running statistics; each within a few times PyTorch's
own error in the same dtype (effnet_kernels.testing)."""

from __future__ import annotations

import pytest
import torch
from backend_params import require_backend
from depthwise_cases import FORMATS, ODD_CASES, RELU6_CASE, Case, fused, make_inputs, run, truth_and_torch

from effnet_kernels import use_backend
from effnet_kernels.shapes import depthwise_shapes
from effnet_kernels.testing import parity

OP = "depthwise_conv_bn_act"
KEYS = ("out", "dx", "dweight", "dbn_weight", "dbn_bias", "running_mean", "running_var")
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16,
          "f16": torch.float16}


def check_case(backend, device, case, dtype, fmt_name, training):
    require_backend(OP, backend, device, dtype)
    fmt = FORMATS[fmt_name]
    inputs = make_inputs(case, dtype)
    truth, same = truth_and_torch(case, inputs, training=training, dtype=dtype, fmt=fmt,
                                  device=device)
    with use_backend(backend):
        got = run(fused, case, inputs, training=training, dtype=dtype, fmt=fmt, device=device)
    failures = [str(p) for key in KEYS
                if not (p := parity(key, got[key], same[key], truth[key], dtype)).ok]
    assert not failures, f"{backend} {case} {fmt_name} training={training}: " + "; ".join(failures)
    out = got["out"]
    assert out.dtype == dtype
    if fmt_name == "nhwc" and case.shape[2] * case.shape[3] > 1 and case.shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert got["dx"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_odd_shapes_cpu(backend, case, dtype, fmt, training):
    check_case(backend, "cpu", case, dtype, fmt, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", [*ODD_CASES[:6], RELU6_CASE], ids=str)
def test_odd_shapes_triton(case, dtype, fmt, training):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_case("triton", device, case, dtype, fmt, training)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_odd_shapes_gpu(backend, case, dtype, fmt, training):
    check_case(backend, "cuda", case, dtype, fmt, training)


def real_cases(variant: str):
    """The real depthwise layers of a variant, batch 2, resolution scaled to 64."""
    return [Case((2, s.c, s.h, s.w), kernel=s.kernel, stride=s.stride)
            for s in depthwise_shapes(variant, batch=2, resolution=64)]


@pytest.mark.parametrize("variant", [f"b{i}" for i in range(8)])
@pytest.mark.parametrize("backend,device", [("cpu", "cpu")]
                         + ([("cuda", "cuda"), ("triton", "cuda")] if torch.cuda.is_available() else []))
def test_real_layer_shapes(backend, device, variant):
    for case in real_cases(variant):
        check_case(backend, device, case, torch.float32, "nhwc", training=True)
    for case in real_cases(variant)[:4]:
        check_case(backend, device, case, torch.float32, "nchw", training=False)


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "custom_op"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_parity_both_routes(backend, fast, monkeypatch):
    """Plain eager calls take an autograd.Function, traced ones the custom ops: same math."""
    from effnet_kernels.ops import depthwise as dw_ops

    monkeypatch.setattr(dw_ops, "EAGER_FAST_PATH", fast)
    for case, dtype, fmt_name, training in ((ODD_CASES[1], torch.float32, "nhwc", True),
                                            (ODD_CASES[2], torch.float64, "nchw", True),
                                            (ODD_CASES[3], torch.float32, "nhwc", False)):
        check_case(backend, "cpu", case, dtype, fmt_name, training)


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
def test_kept_intermediates_match_recomputation_bitwise(case, dtype, fmt, monkeypatch):
    """The cpu route that keeps y and g between passes gives exactly the recomputed results,
    whether the backward keeps y too (always, never, or by the 3x3 size rule) or not."""
    from effnet_kernels.ops import depthwise as dw_ops

    require_backend(OP, "cpu", "cpu", dtype)
    inputs = make_inputs(case, dtype)
    routes = {"g and y": (True, True, 1 << 60), "g only": (True, False, 1 << 60),
              "3x3 rule": (True, True, 0), False: (False, True, 1 << 60)}
    got = {}
    for keep, (intermediates, keep_y, max_3x3) in routes.items():
        monkeypatch.setattr(dw_ops, "KEEP_INTERMEDIATES", intermediates)
        monkeypatch.setattr(dw_ops, "KEEP_Y_IN_BACKWARD", keep_y)
        monkeypatch.setattr(dw_ops, "KEEP_Y_MAX_BYTES_3X3", max_3x3)
        with use_backend("cpu"):
            got[keep] = run(fused, case, inputs, training=True, dtype=dtype, fmt=FORMATS[fmt])
            x = inputs["x"].to(dtype).contiguous(memory_format=FORMATS[fmt])
            pdt = torch.float64 if dtype == torch.float64 else torch.float32
            got[keep]["pooled"] = fused(
                x, inputs["weight"].to(dtype), inputs["bn_weight"].to(pdt),
                inputs["bn_bias"].to(pdt), None, None, stride=case.stride, padding=case.padding,
                training=True, act=case.act, return_pool_sums=True)[1]
    for route in routes:
        for key, value in got[route].items():
            assert torch.equal(value, got[False][key]), (route, key)


def test_backward_keeps_y_except_for_large_3x3_outputs():
    from effnet_kernels.ops.depthwise import KEEP_Y_MAX_BYTES_3X3, backward_keeps_y

    big = torch.empty(KEEP_Y_MAX_BYTES_3X3 // 4)
    small = torch.empty(16)
    for k, dy, keeps in ((1, small, False), (3, small, True), (3, big, False), (5, big, True),
                         (7, small, True)):
        assert backward_keeps_y(torch.empty(1, 1, k, k), dy) is keeps, (k, dy.numel())
