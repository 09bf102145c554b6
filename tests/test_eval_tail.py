"""The CPU eval tail of a block (nn/eval_tail.py): the depthwise op's pool epilogue
(`return_pool_sums`), the SE gate folded into the projection's weights
(`gated_gemm_conv1x1`), and whole blocks through it against timm's own blocks, each
against a float64 truth under the parity rule."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from backend_params import backend_device_pairs, require_backend
from model_cases import randomize_bn

from effnet_kernels import use_backend
from effnet_kernels.functional import depthwise_conv_bn_act
from effnet_kernels.nn import DepthwiseSeparable, MBConv, eval_plan, eval_tail
from effnet_kernels.nn.gemm_conv import gated_gemm_conv1x1, gemm_conv1x1_act
from effnet_kernels.ops import reference
from effnet_kernels.testing import assert_parity

timm = pytest.importorskip("timm")

CL = torch.channels_last
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _dw_inputs(c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, c, 9, 7, generator=g)
    w = torch.randn(c, 1, 3, 3, generator=g) * 0.5
    return x, w, torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), \
        torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_pool_sums_match_sum_of_output(backend, device, dtype, fmt, training, stride):
    require_backend("depthwise_conv_bn_act", backend, device, dtype)
    x, w, g, b, rm, rv = (t.to(device) for t in _dw_inputs())
    if fmt == "nhwc":
        x = x.contiguous(memory_format=CL)
    args = dict(stride=stride, training=training, act="silu")
    with use_backend(backend), torch.no_grad():
        out, sums = depthwise_conv_bn_act(x.to(dtype), w.to(dtype), g, b, rm.clone(),
                                          rv.clone(), return_pool_sums=True, **args)
        plain = depthwise_conv_bn_act(x.to(dtype), w.to(dtype), g, b, rm.clone(), rv.clone(),
                                      **args)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # the epilogue changes nothing
    assert sums.shape == x.shape[:2] and not sums.requires_grad
    assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    truth = reference.depthwise_conv_bn_act(x.double(), w.double(), g.double(), b.double(),
                                            rm.double().clone(), rv.double().clone(), **args)
    same = out.double().sum(dim=(2, 3))  # summing the stored output in float64
    assert_parity("pool sums", sums, same, truth.sum(dim=(2, 3)), dtype)


def test_pool_sums_without_autograd_use_the_cpu_epilogue(monkeypatch):
    """On the cpu backend in eval, the sums come from the forward kernel, not a reduction."""
    x, w, g, b, rm, rv = _dw_inputs()
    monkeypatch.setattr(torch.Tensor, "sum", lambda *a, **k: pytest.fail("reduced out"))
    with use_backend("cpu"), torch.no_grad():
        out, sums = depthwise_conv_bn_act(x, w, g, b, rm, rv, return_pool_sums=True)
    assert sums.shape == (3, 12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["identity", "silu"])
@pytest.mark.parametrize("epilogue", [False, True])
def test_gated_gemm_conv_matches_conv_of_scaled_input(dtype, bias, act, epilogue):
    """gated_gemm_conv1x1 (ATen GEMM, then act in place) and gemm_conv1x1_act with a gate
    (the compiled epilogue GEMM for float32, the former otherwise)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 6, 5, generator=g).contiguous(memory_format=CL)
    w = torch.randn(8, 20, 1, 1, generator=g) * 0.3
    b = torch.randn(8, generator=g) if bias else None
    gate = torch.rand(3, 20, generator=g)
    args = (x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
    if epilogue:
        got = gemm_conv1x1_act(*args, act, gate)
    else:
        got = gated_gemm_conv1x1(*args, gate)
        got = F.silu(got) if act == "silu" else got
    assert got.is_contiguous(memory_format=CL) and got.dtype == dtype

    def conv(dt):
        xs = (x.to(dt) * gate.to(dt)[:, :, None, None])
        y = F.conv2d(xs, w.to(dt), None if b is None else b.to(dt))
        return F.silu(y) if act == "silu" else y
    assert_parity("gated conv", got, conv(dtype), conv(torch.float64), dtype)


def _timm_blocks():
    model = randomize_bn(timm.create_model("efficientnet_b0", num_classes=10))
    return {"ds": model.blocks[0][0], "mb_s2": model.blocks[1][0], "mb_res": model.blocks[1][1],
            "mb_late": model.blocks[6][0]}


@pytest.mark.parametrize("name,hw", [("ds", 16), ("mb_s2", 16), ("mb_res", 8), ("mb_late", 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_eval_tail_matches_timm(name, hw, dtype, monkeypatch):
    """Gated projection where H*W >= Cout (ds, mb_s2, mb_res), SE-scaled fallback where
    not (mb_late: 4x4 < 320). The prepared eval plan (nn/eval_plan.py, tested in
    test_eval_plan.py) is off, so float32 takes this route too."""
    monkeypatch.setattr(eval_plan, "ENABLED", False)
    calls = []

    def spy(*args):
        calls.append(len(args) == 5)  # (y, weight, bias, act, gate): the gated projection
        return gemm_conv1x1_act(*args)
    monkeypatch.setattr(eval_tail, "gemm_conv1x1_act", spy)
    original = _timm_blocks()[name].eval()
    fused = copy.deepcopy(original)
    fused = (DepthwiseSeparable if name == "ds" else MBConv).from_timm(fused).eval()
    cin = original.conv_dw.in_channels if name == "ds" else original.conv_pw.in_channels
    x = torch.randn(2, cin, hw, hw, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        got = fused.to(dtype)(x.to(dtype))
        same = copy.deepcopy(original).to(dtype)(x.to(dtype))
        truth = copy.deepcopy(original).double()(x.double())
    assert got.is_contiguous(memory_format=CL)
    assert sum(calls) == (0 if name == "mb_late" else 1)
    assert_parity(f"{name} eval", got, same, truth, dtype)
