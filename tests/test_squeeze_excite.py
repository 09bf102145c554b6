"""squeeze_excite: parity of every backend against the float64 truth (output and every
gradient), gradcheck, opcheck, torch.compile, the pooled= path, bad inputs, empty batch."""

from __future__ import annotations

import pytest
import torch
from backend_params import DEVICES, backend_device
from backend_params import require_backend as _require_backend
from torch import nn

from effnet_kernels import use_backend
from effnet_kernels._ext import ext_module
from effnet_kernels.functional import squeeze_excite
from effnet_kernels.nn import SqueezeExcite
from effnet_kernels.ops import reference
from effnet_kernels.ops import squeeze_excite as se_ops
from effnet_kernels.ops.activations import ACT_CODES
from effnet_kernels.shapes import se_shapes
from effnet_kernels.testing import parity

OP = "squeeze_excite"
BACKENDS = ["reference", "cpu", "triton", "cuda"]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
KEYS = ("out", "dx", "dreduce_weight", "dreduce_bias", "dexpand_weight", "dexpand_bias")
# (N, C, H, W, Cr): N=1, odd C, 1x1 and 7x7 spatial, non-square.
ODD = [(1, 3, 1, 1, 2), (1, 17, 7, 7, 5), (2, 3, 7, 7, 1), (3, 17, 5, 3, 4), (2, 33, 1, 1, 8)]
REAL = [(s.n, s.c, s.h, s.w, s.reduced) for s in se_shapes("b0", batch=2, resolution=64)]
REAL = [REAL[i] for i in (0, 2, 6, 11)]  # 32x32 C32, 16x16 C144, 4x4 C480, 2x2 C1152


def require_backend(op, backend, device, dtype):
    _require_backend(op, backend, device, dtype)
    if backend in ("cpu", "cuda") and not hasattr(getattr(ext_module(), backend, None), "se_pool"):
        pytest.skip(f"effnet_kernels._C was built without the {backend} squeeze_excite kernels")


def make_inputs(shape, seed=0, act="silu"):
    """float64 master copies: x, reduce (w, b), expand (w, b), upstream gradient. For relu6
    the reduce biases also step across [-2, 8]: hidden units sit below, inside and above
    the clamp."""
    n, c, h, w, cr = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) + 0.5
    rw = torch.randn(cr, c, 1, 1, generator=g, dtype=torch.float64) / c**0.5
    rb = torch.randn(cr, generator=g, dtype=torch.float64) * 0.1
    if act == "relu6":
        rb = rb + torch.linspace(-2, 8, cr, dtype=torch.float64)
    ew = torch.randn(c, cr, 1, 1, generator=g, dtype=torch.float64) / cr**0.5
    eb = torch.randn(c, generator=g, dtype=torch.float64) * 0.1
    dy = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    return x, (rw, rb, ew, eb), dy


def run(fn, inputs, dtype, fmt, device, act="silu", **kw):
    """Output and gradients {KEYS} of fn(x, *params) in `dtype`/`fmt` on `device`."""
    x, params, dy = inputs
    x = x.to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
    params = [p.to(device, dtype).requires_grad_() for p in params]
    out = fn(x, *params, act=act, **kw)
    grads = torch.autograd.grad(out, [x, *params], dy.to(device, dtype).contiguous(memory_format=fmt))
    return dict(zip(KEYS, (out.detach(), *grads)))


def check(backend, device, shape, dtype, fmt_name, act="silu"):
    require_backend(OP, backend, device, dtype)
    fmt = FORMATS[fmt_name]
    inputs = make_inputs(shape, act=act)
    truth = run(reference.squeeze_excite, inputs, torch.float64, fmt, device, act)
    same = run(reference.squeeze_excite, inputs, dtype, fmt, device, act)
    with use_backend(backend):
        got = run(squeeze_excite, inputs, dtype, fmt, device, act)
    failures = [str(p) for k in KEYS if not (p := parity(k, got[k], same[k], truth[k], dtype)).ok]
    assert not failures, f"{backend} {shape} {dtype} {fmt_name} {act}: " + "; ".join(failures)
    assert got["out"].dtype == dtype and got["dx"].dtype == dtype
    if fmt_name == "nhwc" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert got["out"].is_contiguous(memory_format=torch.channels_last)
        assert got["dx"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", ODD, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_odd_shapes(backend, device, shape, dtype, fmt):
    check(backend, device, shape, dtype, fmt)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", REAL, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_b0_shapes(backend, device, shape, fmt):
    if backend == "triton" and device == "cpu" and shape != REAL[2]:
        pytest.skip("Triton interpreter: one real shape only (each program costs ms in numpy)")
    check(backend, device, shape, torch.float32, fmt)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_many_pixels(backend, fmt):
    """400 pixels: several reduction chunks per image (Triton interpreter: 128-pixel chunks)."""
    check(backend, DEVICES[-1], (1, 3, 20, 20, 2), torch.float32, fmt)


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "custom_op"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_both_routes(backend, fast, monkeypatch):
    """Plain eager calls take an autograd.Function, traced ones the custom ops: same math."""
    monkeypatch.setattr(se_ops, "EAGER_FAST_PATH", fast)
    check(backend, DEVICES[-1], ODD[3], torch.float32, "nhwc")
    check(backend, DEVICES[-1], ODD[1], torch.float64, "nchw", act="relu")


@pytest.mark.parametrize("act", list(ACT_CODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_activations(backend, act):
    check(backend, DEVICES[-1], (2, 17, 5, 5, 4), torch.float32, "nhwc", act)
    check(backend, DEVICES[-1], (1, 9, 3, 4, 6), torch.float64, "nchw", act)


# Half types: the kernels read bf16/f16, accumulate and run the MLP in float32 and round
# once, while PyTorch's own bf16 run rounds after every op (mean, both convs, sigmoid, mul),
# so its error is the larger one; the 1e-2 (bf16) / 2e-3 (f16) floors cover the single
# final rounding (2^-8 relative for bf16) on tensors where PyTorch happens to be exact.
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", [ODD[1], ODD[3], REAL[2]], ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_half(backend, device, shape, dtype, fmt):
    check(backend, device, shape, dtype, fmt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    device = DEVICES[-1] if backend != "cpu" else "cpu"
    require_backend(OP, backend, device, torch.float64)
    x, params, _ = make_inputs((2, 5, 3, 2, 3))
    x = x.to(device).contiguous(memory_format=torch.channels_last).requires_grad_()
    params = [p.to(device).requires_grad_() for p in params]
    interpreted = backend == "triton" and device == "cpu"  # fast mode: 2 evaluations, not 2 per input
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: squeeze_excite(*a), (x, *params),
                                        fast_mode=interpreted)


def _op_args(shape, fmt, device="cpu"):
    x, (rw, rb, ew, eb), dy = make_inputs(shape)
    x = x.float().to(device).contiguous(memory_format=fmt).requires_grad_()
    params = [p.float().to(device).requires_grad_() for p in (rw, rb, ew, eb)]
    return x, params, dy.float().to(device).contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend, fmt", [("reference", "nchw"), ("cpu", "nchw"), ("cpu", "nhwc")])
def test_opcheck(backend, fmt):
    require_backend(OP, backend, "cpu", torch.float32)
    x, params, dy = _op_args((2, 6, 3, 5, 2), FORMATS[fmt])
    pooled = x.detach().sum((2, 3))
    with use_backend(backend):
        for pool in (None, pooled):
            torch.library.opcheck(se_ops.se_fwd, (x, *params, pool, 2))
        _, mean, h, gate = se_ops.se_fwd(x.detach(), *[p.detach() for p in params], None, 2)
        torch.library.opcheck(
            se_ops.se_bwd, (dy, x.detach(), mean, h, gate, *[p.detach() for p in params], 2))


def test_compile_fullgraph():
    torch._dynamo.reset()
    block = nn.Sequential(nn.Conv2d(4, 12, 1), SqueezeExcite(12, 3), nn.Conv2d(12, 4, 1))
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x.requires_grad_())
    out.sum().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    expected = block(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_compiled, x.grad)


def test_pooled_path():
    inputs = make_inputs((2, 17, 5, 5, 4))
    x = inputs[0]
    pooled = x.float().sum((2, 3))
    for fmt_name, fmt in FORMATS.items():
        got = run(squeeze_excite, inputs, torch.float32, fmt, "cpu", pooled=pooled)
        want = run(squeeze_excite, inputs, torch.float32, fmt, "cpu")
        for k in KEYS:  # the same op, the same gradients (pooled gets none: it flows via x)
            torch.testing.assert_close(got[k], want[k], msg=f"{fmt_name} {k}")
    # pooled really replaces the pooling read: doubled sums give the gate of 2 * mean.
    _, (rw, rb, ew, eb), _ = inputs
    out = squeeze_excite(x, rw, rb, ew, eb, pooled=2 * x.sum((2, 3)))
    gate = torch.sigmoid(nn.functional.conv2d(
        nn.functional.silu(nn.functional.conv2d(2 * x.mean((2, 3), keepdim=True), rw, rb)), ew, eb))
    torch.testing.assert_close(out, x * gate)


def test_pooled_requires_grad_gets_none():
    x, (rw, rb, ew, eb), _ = make_inputs((2, 5, 3, 3, 2))
    x.requires_grad_()
    pooled = x.sum((2, 3))  # produced differentiably from x: its path must not double-count
    out = squeeze_excite(x, rw, rb, ew, eb, pooled=pooled)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    (want,) = torch.autograd.grad(reference.squeeze_excite(x, rw, rb, ew, eb).sum(), [x])
    torch.testing.assert_close(gx, want)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_empty_batch(backend):
    require_backend(OP, backend, "cpu", torch.float32)
    x, params, dy = _op_args((2, 6, 3, 3, 2), torch.channels_last)
    x = x.detach()[:0].requires_grad_()
    with use_backend(backend):
        out = squeeze_excite(x, *params)
        out.sum().backward()
    assert out.shape == (0, 6, 3, 3) and x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in params)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_non_contiguous_input(backend):
    require_backend(OP, backend, "cpu", torch.float64)
    x, params, _ = make_inputs((2, 6, 5, 8, 3))
    views = [x[:, :, :, ::2], x.transpose(2, 3), x[:, ::2]]
    for v in views:
        p = params if v.shape[1] == 6 else (params[0][:, ::2], params[1], params[2][::2], params[3][::2])
        with use_backend(backend):
            got = squeeze_excite(v, *p)
        torch.testing.assert_close(got, reference.squeeze_excite(v, *p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_views_whose_size_one_dims_carry_any_stride(backend):
    """Views that are dense although a size-1 dim's stride is arbitrary (is_contiguous
    ignores it): W == 1 from a transpose, in NCHW and in channels_last, and a batch-1
    channel slice; output and every gradient against the float64 truth, dy in the
    default layout."""
    device = backend_device(backend)
    require_backend(OP, backend, device, torch.float32)
    _, params, _ = make_inputs((2, 9, 4, 4, 3))
    views = [torch.randn(2, 9, 1, 40).transpose(2, 3),        # NCHW, stride(3) == 40
             torch.randn(2, 1, 40, 9).permute(0, 3, 2, 1),    # channels_last, stride(3) == 360
             torch.randn(1, 10, 6, 6)[:, 1:]]                 # stride(0) == 360, not 324
    for v in views:
        v = v.to(device)
        assert v.is_contiguous() or v.is_contiguous(memory_format=torch.channels_last)
        dy = torch.randn(v.shape, device=device)
        truth = run(reference.squeeze_excite, (v.double(), params, dy.double()), torch.float64,
                    torch.contiguous_format, device)
        x = v.detach().requires_grad_()
        ps = [p.to(device, torch.float32).requires_grad_() for p in params]
        with use_backend(backend):
            out = squeeze_excite(x, *ps)
        grads = torch.autograd.grad(out, [x, *ps], dy)
        for key, a, t in zip(KEYS, (out, *grads), truth.values()):
            torch.testing.assert_close(a.double(), t, rtol=1e-4, atol=1e-5, msg=f"{key} {v.stride()}")


def test_float32_weights_with_bf16_input():
    x, (rw, rb, ew, eb), _ = make_inputs((2, 17, 5, 5, 4))
    xb = x.bfloat16().requires_grad_()
    params = [p.float().requires_grad_() for p in (rw, rb, ew, eb)]
    out = squeeze_excite(xb, *params)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in params)
    torch.testing.assert_close(out.double(), reference.squeeze_excite(x, rw, rb, ew, eb),
                               atol=2e-2, rtol=2e-2)


def _bad(**over):
    x, (rw, rb, ew, eb), _ = make_inputs((2, 8, 4, 4, 2))
    args = dict(x=x, reduce_weight=rw, reduce_bias=rb, expand_weight=ew, expand_bias=eb)
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, match", [
    (dict(x=torch.randn(8, 4, 4, dtype=torch.float64)), ValueError, "x must be 4-D"),
    (dict(x=torch.zeros(2, 8, 4, 4, dtype=torch.int64)), TypeError, "x must have dtype"),
    (dict(reduce_weight=torch.zeros(2, 7, 1, 1, dtype=torch.float64)), ValueError,
     r"reduce_weight must have shape \(2, 8, 1, 1\)"),
    (dict(reduce_weight=torch.zeros(2, 8, 3, 3, dtype=torch.float64)), ValueError,
     r"reduce_weight must have shape \(2, 8, 1, 1\)"),
    (dict(expand_weight=torch.zeros(8, 3, 1, 1, dtype=torch.float64)), ValueError,
     r"expand_weight must have shape \(8, 2, 1, 1\)"),
    (dict(reduce_bias=torch.zeros(3, dtype=torch.float64)), ValueError,
     r"reduce_bias must have shape \(2,\)"),
    (dict(expand_bias=torch.zeros(8, 1, dtype=torch.float64)), ValueError,
     r"expand_bias must have shape \(8,\)"),
    (dict(expand_weight=torch.zeros(8, 2, 1, 1, dtype=torch.float16)), TypeError,
     "expand_weight must have x's dtype"),
    (dict(pooled=torch.zeros(2, 7)), ValueError, r"pooled must have shape \(N, C\) = \(2, 8\)"),
    (dict(pooled=torch.zeros(2, 8, dtype=torch.float16)), TypeError, "pooled must have dtype"),
    (dict(x=torch.zeros(2, 8, 0, 4, dtype=torch.float64)), ValueError, "non-empty spatial"),
    (dict(act="gelu"), ValueError, "act must be one of"),
])
def test_bad_inputs(over, exc, match):
    args = _bad(**over)
    with pytest.raises(exc, match=match):
        squeeze_excite(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch():
    args = _bad(expand_bias=torch.zeros(8, dtype=torch.float64, device="cuda"))
    with pytest.raises(ValueError, match="expand_bias must be on cpu"):
        squeeze_excite(**args)


def test_module_matches_timm_and_reuses_params():
    timm_blocks = pytest.importorskip("timm.models._efficientnet_blocks")
    se = timm_blocks.SqueezeExcite(16, rd_channels=4, act_layer=nn.SiLU)
    fused = SqueezeExcite.from_modules(se.conv_reduce, se.conv_expand, se.act1)
    assert fused.conv_reduce is se.conv_reduce and fused.conv_expand is se.conv_expand
    assert fused.act == "silu"
    assert set(fused.state_dict()) == set(se.state_dict())
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x), se(x))
    fresh = SqueezeExcite(16, 4)
    fresh.load_state_dict(se.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), se(x))
    with pytest.raises(ValueError, match="cannot be fused"):
        SqueezeExcite.from_modules(se.conv_reduce, se.conv_expand, nn.GELU())
    with pytest.raises(ValueError, match="must invert"):
        SqueezeExcite.from_modules(se.conv_reduce, nn.Conv2d(4, 15, 1))


class _CpuWithoutOneCall:
    """The cpu primitives minus se_forward / se_backward: the op's Python composition."""

    def __getattr__(self, name):
        if name in ("se_forward", "se_backward"):
            raise AttributeError(name)
        return getattr(ext_module().cpu, name)


@pytest.mark.parametrize("pooled", [False, True], ids=["pool", "pooled"])
@pytest.mark.parametrize("act", list(ACT_CODES.values()), ids=list(ACT_CODES))
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
def test_cpu_one_call_matches_composition_bitwise(dtype, fmt, act, pooled, monkeypatch):
    """cpu se_forward / se_backward run the composition's ATen ops in its order: every
    output and gradient is bitwise the same, in the same layout."""
    require_backend(OP, "cpu", "cpu", dtype)
    name = {code: name for name, code in ACT_CODES.items()}[act]
    x, (rw, rb, ew, eb), dy = make_inputs((3, 20, 5, 7, 6), act=name)
    x = x.to(dtype).contiguous(memory_format=FORMATS[fmt])
    dy = dy.to(dtype).contiguous(memory_format=FORMATS[fmt])
    params = [p.to(dtype) for p in (rw, rb, ew, eb)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sums = x.to(acc).sum((2, 3)) if pooled else None
    results = []
    for prims in (ext_module().cpu, _CpuWithoutOneCall()):
        monkeypatch.setattr(se_ops, "select", lambda op, t, p=prims: p)
        out, mean, h, gate = se_ops._forward(x, *params, sums, act)
        grads = se_ops._backward_math(dy, x, mean, h, gate, *params, act)
        results.append((out, mean, h, gate, *grads))
    for got, same in zip(*results):
        assert torch.equal(got, same) and got.stride() == same.stride()


def test_cpu_one_call_rejects_unknown_act():
    require_backend(OP, "cpu", "cpu", torch.float32)
    x, (rw, rb, ew, eb), _ = make_inputs((1, 4, 2, 2, 2))
    x = x.float()
    with pytest.raises(RuntimeError, match="act must be"):
        ext_module().cpu.se_forward(x, rw.float(), rb.float(), ew.float(), eb.float(), None, 4)
