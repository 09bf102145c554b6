"""drop_connect_add: parity with the reference on every backend, mask semantics and
statistics, reproducibility, exact eval path, gradcheck, opcheck, torch.compile, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from backend_params import backend_device_pairs, require_backend

from effnet_kernels import functional as F
from effnet_kernels.backends import BACKENDS, not_supported_reasons, use_backend
from effnet_kernels.nn import DropConnect
from effnet_kernels.ops import drop_connect as dc
from effnet_kernels.ops import reference

OP = "drop_connect_add"
BACKEND_NAMES = list(BACKENDS)
FORMATS = [torch.contiguous_format, torch.channels_last]
# (dtype, atol, rtol): one multiply-add per element, so only output rounding separates backends.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


def _pair(shape, dtype=torch.float32, fmt=torch.contiguous_format, requires_grad=False,
          device="cpu"):
    x = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    s = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    return x.requires_grad_(requires_grad), s.requires_grad_(requires_grad)


def _gen(seed=1234, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def _run(fn, x, s, dy):
    x = x.detach().requires_grad_()
    s = s.detach().requires_grad_()
    out = fn(x, s)
    out.backward(dy)
    return out, x.grad, s.grad


@pytest.fixture(params=["native", "function", "op"])
def route(request, monkeypatch):
    """Eager calls take the backend's C++ autograd node where it has one ("native") or the
    Python autograd.Function ("function"); traced ones the custom ops ("op")."""
    monkeypatch.setattr(dc, "EAGER_FAST_PATH", request.param != "op")
    monkeypatch.setattr(dc, "NATIVE_AUTOGRAD_NODE", request.param == "native")
    return request.param


@pytest.mark.parametrize(("backend", "device"), backend_device_pairs())
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_parity_with_reference(backend, device, fmt, dtype, route):
    require_backend(OP, backend, device, dtype)
    x, s = _pair((6, 5, 7, 3), dtype, fmt, device=device)
    dy = torch.randn(x.shape, dtype=dtype, device=device)
    want = _run(lambda a, b: reference.drop_connect_add(a, b, 0.3, training=True,
                                                         generator=_gen(device=device)), x, s, dy)
    with use_backend(backend):
        got = _run(lambda a, b: F.drop_connect_add(a, b, 0.3, training=True,
                                                   generator=_gen(device=device)), x, s, dy)
    atol, rtol = TOLERANCES[dtype]
    for name, g, w in zip(("out", "dx", "dshortcut"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")
    assert got[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("shape", [(9,), (4, 33), (3, 2, 17), (2, 3, 4, 5, 2)], ids=str)
def test_other_ranks(backend, shape):
    require_backend(OP, backend, "cpu", torch.float32)
    x, s = _pair(shape)
    dy = torch.randn(shape)
    want = _run(lambda a, b: reference.drop_connect_add(a, b, 0.4, training=True,
                                                         generator=_gen()), x, s, dy)
    with use_backend(backend):
        got = _run(lambda a, b: F.drop_connect_add(a, b, 0.4, training=True, generator=_gen()),
                   x, s, dy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_non_contiguous_and_mixed_formats(backend, route):
    require_backend(OP, backend, "cpu", torch.float32)
    base = torch.randn(4, 10, 6, 8).contiguous(memory_format=torch.channels_last)
    x = base[:, ::2]                                  # strided, channel stride 1
    s = torch.randn(4, 5, 8, 6).transpose(2, 3)       # NCHW-ish but not dense NCHW
    x_cl = torch.randn(4, 5, 6, 8).contiguous(memory_format=torch.channels_last)
    s_nchw = torch.randn(4, 5, 6, 8)
    for a, b in ((x, s), (x_cl, s_nchw), (s_nchw, x_cl)):
        want = reference.drop_connect_add(a, b, 0.5, training=True, generator=_gen())
        with use_backend(backend):
            got = F.drop_connect_add(a, b, 0.5, training=True, generator=_gen())
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # The output keeps x's format when the shortcut comes in the other one.
    with use_backend(backend):
        assert F.drop_connect_add(x_cl, s_nchw, 0.5, training=True).is_contiguous(
            memory_format=torch.channels_last)
        assert F.drop_connect_add(s_nchw, x_cl, 0.5, training=True).is_contiguous()


@pytest.mark.parametrize(("backend", "device"), backend_device_pairs())
@pytest.mark.parametrize("p", [0.5, 0.3])
def test_exact_mask_semantics(backend, device, p):
    """Each sample is exactly the shortcut (dropped) or shortcut + x / keep (kept)."""
    require_backend(OP, backend, device, torch.float32)
    x, s = _pair((64, 3, 4, 4), device=device)
    with use_backend(backend):
        out = F.drop_connect_add(x, s, p, training=True, generator=_gen(device=device))
    keep = 1.0 - p
    kept_value = s + x * torch.tensor(1.0 / keep, dtype=torch.float32, device=device)
    dropped = (out == s).flatten(1).all(1)
    kept = (out == kept_value).flatten(1).all(1) if p == 0.5 else torch.isclose(
        out, kept_value, rtol=1e-6, atol=1e-6).flatten(1).all(1)
    assert bool((dropped ^ kept).all()), "every sample must be exactly dropped or kept"
    assert 0 < int(dropped.sum()) < 64


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_keep_rate_statistics(backend):
    require_backend(OP, backend, "cpu", torch.float32)
    n, p = 20000, 0.3
    x, s = torch.ones(n, 1), torch.zeros(n, 1)
    with use_backend(backend):
        out = F.drop_connect_add(x, s, p, training=True)
    kept = int((out != 0).sum())
    mean, sd = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(kept - mean) < 5 * sd, f"kept {kept} of {n}, expected {mean:.0f} +- {5 * sd:.0f}"
    torch.testing.assert_close(out[out != 0], torch.full((kept,), 1 / (1 - p)))


def test_seed_reproducibility_across_backends():
    x, s = _pair((32, 4, 3, 3))
    outs = {}
    for backend in BACKEND_NAMES:
        with use_backend(backend):
            try:
                outs[backend] = F.drop_connect_add(x, s, 0.5, training=True, generator=_gen(7))
            except RuntimeError as exc:
                assert "cannot run" in str(exc)
    first = outs.pop("reference")
    for backend, out in outs.items():
        assert torch.equal(out, first), backend
    again = F.drop_connect_add(x, s, 0.5, training=True, generator=_gen(7))
    other = F.drop_connect_add(x, s, 0.5, training=True, generator=_gen(8))
    assert torch.equal(again, first) and not torch.equal(other, first)
    torch.manual_seed(3)
    a = F.drop_connect_add(x, s, 0.5, training=True)
    torch.manual_seed(3)
    assert torch.equal(F.drop_connect_add(x, s, 0.5, training=True), a)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_eval_and_p0_are_exact_add(backend, dtype, fmt):
    x, s = _pair((3, 4, 5, 6), dtype, fmt)
    reasons = not_supported_reasons(OP, backend, x.device, dtype)
    with use_backend(backend):
        for p, training in ((0.3, False), (0.0, True), (0, False)):
            if reasons:  # the add runs no kernel, but a forced backend must serve x
                with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run"):
                    F.drop_connect_add(x, s, p, training=training)
                continue
            out = F.drop_connect_add(x, s, p, training=training)
            assert torch.equal(out, s + x)
            assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_gradcheck_float64(backend, route):
    require_backend(OP, backend, "cpu", torch.float64)
    x, s = _pair((4, 3, 2), torch.float64, requires_grad=True)

    def fn(a, b):  # a fixed generator state, so every call draws the same mask
        return F.drop_connect_add(a, b, 0.3, training=True, generator=_gen(3))

    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, s), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x, s), fast_mode=True)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_opcheck(backend, fmt):
    require_backend(OP, backend, "cpu", torch.float32)
    x, s = _pair((3, 4, 5, 2), fmt=fmt, requires_grad=True)
    scale = dc.drop_scale(3, 0.5, "cpu", torch.float32, _gen())
    with use_backend(backend):
        torch.library.opcheck(dc.dc_fwd, (x, s, scale))
        torch.library.opcheck(dc.dc_bwd, (torch.randn(3, 4, 5, 2).contiguous(memory_format=fmt),
                                          scale))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.drop = DropConnect(0.5)

    def forward(self, x):
        return self.drop(self.conv(x), x)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    block = _Block()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(16, 4, 3, 3, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    assert x.grad is not None
    y = block.conv(x).detach()
    scale = 1.0 / 0.5
    kept = torch.isclose(out, x + y * scale, rtol=1e-6, atol=1e-6).flatten(1).all(1)
    dropped = (out == x).flatten(1).all(1)
    assert bool((kept ^ dropped).all())
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), x + block.conv(x), rtol=0, atol=0)


def test_bad_inputs():
    x, s = _pair((2, 3, 4, 4))
    with pytest.raises(ValueError, match="shortcut must have the same shape as x"):
        F.drop_connect_add(x, s[:, :2], 0.2, training=True)
    with pytest.raises(TypeError, match="shortcut must have the same dtype as x"):
        F.drop_connect_add(x, s.double(), 0.2, training=True)
    with pytest.raises(TypeError, match="x must have dtype in"):
        F.drop_connect_add(x.int(), s.int(), 0.2, training=True)
    with pytest.raises(ValueError, match="shortcut must be on cpu like x"):
        F.drop_connect_add(x, s.to("meta"), 0.2, training=True)
    for p in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
            F.drop_connect_add(x, s, p, training=True)
    with pytest.raises(TypeError, match="p must be a float"):
        F.drop_connect_add(x, s, "0.2", training=True)
    with pytest.raises(TypeError, match="training must be a bool"):
        F.drop_connect_add(x, s, 0.2, training=1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        F.drop_connect_add(x, s, 0.2, training=True, generator=3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        F.drop_connect_add(x.tolist(), s, 0.2, training=True)
    with pytest.raises(ValueError, match="leading batch dimension"):
        F.drop_connect_add(torch.tensor(1.0), torch.tensor(2.0), 0.2, training=True)
    with pytest.raises(ValueError, match=r"p must be a float in \[0, 1\)"):
        DropConnect(1.0)
    assert repr(DropConnect(0.25)) == "DropConnect(p=0.25)"


@pytest.mark.parametrize(("backend", "device"), backend_device_pairs())
def test_empty_batch(backend, device, route):
    require_backend(OP, backend, device, torch.float32)
    x, s = _pair((0, 3, 4, 4), requires_grad=True, device=device)
    with use_backend(backend):
        out = F.drop_connect_add(x, s, 0.2, training=True)
        out.sum().backward()
    assert out.shape == (0, 3, 4, 4) and x.grad.shape == x.shape and s.grad.shape == s.shape


def test_cpu_eager_training_takes_the_native_node():
    """An eager CPU training call builds one C++ graph node that saves only the scale."""
    require_backend(OP, "cpu", "cpu", torch.float32)
    x, s = _pair((4, 3, 5, 5), requires_grad=True)
    with use_backend("cpu"):
        out = F.drop_connect_add(x, s, 0.25, training=True, generator=_gen(5))
    assert "DropConnectAdd" in out.grad_fn.name()
    want = reference.drop_connect_add(x, s, 0.25, training=True, generator=_gen(5))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_native_node_draws_the_mask_of_the_other_routes(dtype, monkeypatch):
    """Same seed, same mask: the C++ node against the Python route, default generator too."""
    require_backend(OP, "cpu", "cpu", dtype)
    x, s = _pair((64, 2, 3, 3), dtype)
    outs = {}
    for native in (True, False):
        monkeypatch.setattr(dc, "NATIVE_AUTOGRAD_NODE", native)
        with use_backend("cpu"):
            torch.manual_seed(11)
            default = F.drop_connect_add(x, s, 0.4, training=True)
            given = F.drop_connect_add(x, s, 0.4, training=True, generator=_gen(9))
        outs[native] = (default, given)
    for got, want in zip(outs[True], outs[False], strict=True):
        assert torch.equal(got, want)
