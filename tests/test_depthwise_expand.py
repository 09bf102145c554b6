"""The eval expand conv computed inside the depthwise pass (`_C.cpu.dw_expand_forward`,
csrc/cpu/depthwise_bn_act.cpp with ExpandedRows in depthwise_kernels.h): parity of the
output and of the squeeze-excite pool sums with conv2d + act -> depthwise conv2d + BN
affine + act against float64, agreement with the unfused primitives (pw_conv_act, then
dw_forward_pool), row blocks that cross image and thread boundaries, the eval plan taking
it, and its argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from act_cases import ACTS as ACT_NAMED
from act_cases import act_spread

from effnet_kernels._ext import ext_module
from effnet_kernels.ops.activations import ACT_CODES
from effnet_kernels.ops.geometry import conv_geometry
from effnet_kernels.testing import assert_parity

EXT = ext_module()
pytestmark = pytest.mark.skipif(EXT is None or not EXT.cpu.pw_conv_available(),
                                reason="compiled extension with BLAS sgemm not available")
CL = torch.channels_last
ACTS = {ACT_CODES[name]: fn for name, fn in ACT_NAMED.items()}
SILU, RELU, IDENTITY, RELU6 = (ACT_CODES[name] for name in ("silu", "relu", "identity", "relu6"))


def _case(n, cin, c, h, w, k, seed=0, spread=1.0):
    """Inputs; `spread` widens x and the BN scale (both activations' inputs)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen).contiguous(memory_format=CL) * spread
    expand_weight = torch.randn(c, cin, 1, 1, generator=gen) / cin ** 0.5
    expand_bias = torch.randn(c, generator=gen) * 0.2
    weight = torch.randn(c, 1, k, k, generator=gen) / k
    scale = (torch.rand(c, generator=gen) + 0.5) * spread
    shift = torch.randn(c, generator=gen) * 0.1
    return x, expand_weight, expand_bias, weight, scale, shift


def _torch_route(x, expand_weight, expand_bias, expand_act, weight, scale, shift, geo, act,
                 dtype):
    """conv2d + act, then the depthwise conv2d on explicitly padded input + affine + act,
    and the per-image sums of the result, in dtype."""
    e = ACTS[expand_act](F.conv2d(x.to(dtype), expand_weight.to(dtype), expand_bias.to(dtype)))
    k, s = weight.shape[-1], geo.stride
    pad_bottom = max((geo.out_h - 1) * s + k - e.shape[2] - geo.pad_top, 0)
    pad_right = max((geo.out_w - 1) * s + k - e.shape[3] - geo.pad_left, 0)
    e = F.pad(e, (geo.pad_left, pad_right, geo.pad_top, pad_bottom))
    y = F.conv2d(e, weight.to(dtype), None, s, 0, 1, e.shape[1])[:, :, :geo.out_h, :geo.out_w]
    out = ACTS[act](y * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1))
    return out, out.sum((2, 3))


# (n, cin, c, h, w, k, stride, padding): B0-like blocks scaled down, odd sizes and channel
# counts (vector tails), TF SAME padding (asymmetric on even sizes at stride 2), narrow
# rows (several rows per GEMM block, blocks crossing images) and wide rows (one row per
# block), 1x1 and 7x7 kernels.
CASES = [
    (2, 16, 96, 12, 12, 3, 2, 1),
    (3, 24, 144, 9, 7, 5, 1, 2),
    (2, 8, 37, 11, 70, 3, 1, 1),
    (1, 5, 19, 6, 5, 5, 2, "same"),
    (4, 12, 40, 8, 8, 3, 2, "same"),
    (2, 7, 33, 13, 3, 7, 1, 3),
    (3, 6, 20, 5, 9, 1, 1, 0),
    (2, 10, 48, 7, 7, 5, 2, 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("acts", [(SILU, SILU), (RELU, IDENTITY), (RELU6, RELU6)],
                         ids=["silu", "relu_identity", "relu6"])
@pytest.mark.parametrize("threads", [1, 3])
def test_matches_torch_and_the_unfused_primitives(case, acts, threads):
    n, cin, c, h, w, k, stride, padding = case
    spread = act_spread("relu6") if RELU6 in acts else 1.0
    x, ew, eb, weight, scale, shift = _case(n, cin, c, h, w, k, spread=spread)
    geo = conv_geometry(h, w, k, stride, padding)
    expand_act, act = acts
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, pooled = EXT.cpu.dw_expand_forward(x, ew, eb, expand_act, weight, scale, shift,
                                                *geo, act, True)
        alone, no_pool = EXT.cpu.dw_expand_forward(x, ew, eb, expand_act, weight, scale,
                                                   shift, *geo, act, False)
        e = EXT.cpu.pw_conv_act(x, ew, eb, expand_act)
        unfused, unfused_pooled = EXT.cpu.dw_forward_pool(e, weight, scale, shift, *geo, act)
    finally:
        torch.set_num_threads(previous)
    assert out.shape == (n, c, geo.out_h, geo.out_w) and out.is_contiguous(memory_format=CL)
    assert no_pool is None
    torch.testing.assert_close(alone, out, rtol=0, atol=0)
    same = _torch_route(x, ew, eb, expand_act, weight, scale, shift, geo, act, torch.float32)
    truth = _torch_route(x, ew, eb, expand_act, weight, scale, shift, geo, act, torch.float64)
    assert_parity("dw_expand_forward out", out, same[0], truth[0], torch.float32)
    assert_parity("dw_expand_forward pooled", pooled, same[1], truth[1], torch.float32)
    # Same GEMM per row as the unfused conv's (MKL's result per output element does not
    # depend on the row count here), same depthwise kernel: equal up to float32 rounding.
    torch.testing.assert_close(out, unfused, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled, unfused_pooled, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    x, ew, eb, weight, scale, shift = _case(0, 8, 24, 6, 6, 3)
    out, pooled = EXT.cpu.dw_expand_forward(x, ew, eb, SILU, weight, scale, shift,
                                            *conv_geometry(6, 6, 3, 2, 1), SILU, True)
    assert out.shape == (0, 24, 3, 3) and pooled.shape == (0, 24)


def _call(x, ew, eb, weight, scale, shift, stride=1, act=SILU, expand_act=SILU):
    geo = conv_geometry(x.shape[2], x.shape[3], weight.shape[-1], stride, 1)
    return EXT.cpu.dw_expand_forward(x, ew, eb, expand_act, weight, scale, shift,
                                     *geo[:3], max(geo.out_h, 1), max(geo.out_w, 1), act, True)


@pytest.mark.parametrize("bad,message", [
    ("nchw", "x must be contiguous in channels_last"),
    ("float64", "x"),
    ("expand_cin", "expand_weight must be"),
    ("expand_bias", "expand_bias must have shape"),
    ("weight_channels", "weight must be (C, 1, k, k)"),
    ("weight_device", "weight must be on cpu"),
    ("kernel_4", "kernel size must be 1, 3, 5 or 7"),
    ("stride_3", "stride must be 1 or 2"),
    ("act", "act"),
    ("scale", "scale must have"),
])
def test_bad_arguments_are_refused(bad, message):
    args = list(_case(2, 8, 24, 6, 6, 3))
    kwargs = {}
    if bad == "nchw":
        args[0] = args[0].contiguous()
    elif bad == "float64":
        args[0] = args[0].double()
    elif bad == "expand_cin":
        args[1] = args[1][:, :5]
    elif bad == "expand_bias":
        args[2] = args[2][:7]
    elif bad == "weight_channels":
        args[3] = args[3][:10]
    elif bad == "weight_device":
        args[3] = args[3].to("meta")
    elif bad == "kernel_4":
        args[3] = torch.randn(24, 1, 4, 4)
    elif bad == "stride_3":
        kwargs["stride"] = 3
    elif bad == "act":
        kwargs["act"] = 9
    elif bad == "scale":
        args[4] = args[4][:3]
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _call(*args, **kwargs)


def test_eval_plan_takes_it_for_small_expand_weights(monkeypatch):
    """The plan runs expand + depthwise as dw_expand_forward where the expand weight has at
    most FUSED_EXPAND_MAX_WEIGHT values, else pw_conv_act then the depthwise pass; the
    logits agree either way (test_eval_plan.py checks them against the original model)."""
    timm = pytest.importorskip("timm")
    import effnet_kernels as ek
    from effnet_kernels.nn import eval_plan

    model = timm.create_model("efficientnet_b0", num_classes=10).eval()
    ek.convert(model)
    model = model.to(memory_format=CL)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=CL)
    calls = []
    prims = eval_plan._cpu_prims()

    def spy_on(name):
        fn = getattr(prims, name)

        def spy(*args):
            calls.append((name, tuple(args[1].shape)))
            return fn(*args)
        return spy
    for name in ("dw_expand_forward", "pw_conv_act"):
        monkeypatch.setattr(prims, name, spy_on(name))
    with torch.no_grad():
        fused = model(x)
        expand_shapes = {s for name, s in calls if name == "dw_expand_forward"}
        assert expand_shapes and all(s[0] * s[1] <= eval_plan.FUSED_EXPAND_MAX_WEIGHT
                                     for s in expand_shapes)
        assert any(name == "pw_conv_act" and s == (1152, 192, 1, 1) for name, s in calls)
        monkeypatch.setattr(eval_plan, "FUSED_EXPAND", False)
        calls.clear()
        unfused = model(x)
        assert not any(name == "dw_expand_forward" for name, _ in calls)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
