"""The CPU 1x1 conv with bias + activation as a GEMM epilogue (csrc/cpu/pointwise_conv.cpp,
`_C.cpu.pw_conv_act`): parity with conv2d + act against float64, shared and per-sample
weights and biases, a per-sample gate on the input channels, both work splits (tiled
GEMMs, one GEMM + a separate epilogue), every ISA copy of the epilogue, and its argument
errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from act_cases import ACTS, act_spread

from effnet_kernels._ext import ext_module
from effnet_kernels.ops.activations import ACT_CODES
from effnet_kernels.testing import assert_parity

EXT = ext_module()
pytestmark = pytest.mark.skipif(EXT is None or not EXT.cpu.pw_conv_available(),
                                reason="compiled extension with BLAS sgemm not available")
CL = torch.channels_last


def _inputs(n, cin, cout, h, w, per_sample=False, seed=0, bias_per_sample=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5
    if per_sample:
        weight = weight.reshape(1, cout, cin) * torch.rand(n, 1, cin, generator=gen)
    bias = torch.randn(n, cout, generator=gen) if bias_per_sample else torch.randn(cout,
                                                                                generator=gen)
    return x, weight, bias


def _reference(x, weight, bias, act, dtype):
    x, bias = x.to(dtype), None if bias is None else bias.to(dtype)
    if weight.dim() == 3:  # per sample, with a shared or a per-sample bias
        y = torch.cat([F.conv2d(x[i:i + 1], weight[i, :, :, None, None].to(dtype),
                                None if bias is None else bias if bias.dim() == 1 else bias[i])
                       for i in range(x.shape[0])])
    else:
        y = F.conv2d(x, weight.to(dtype), bias)
    return ACTS[act](y)


# (n, cin, cout, h, w): odd channel counts exercise the vector tails; the last four have
# enough output tiles (65536 / cout rows each) to split tiles over threads: 3x8x512x10x20
# rounds 5 tiles up to 6 (a multiple of the threads), and 2x400x400x24x24 has a shared
# weight above the tiled path's limit (one GEMM, then the epilogue; tiled per sample).
SHAPES = [(2, 5, 7, 3, 4), (1, 16, 96, 5, 5), (3, 24, 33, 7, 1), (4, 8, 512, 16, 16),
          (2, 40, 1024, 9, 13), (3, 8, 512, 10, 20), (2, 400, 400, 24, 24)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", list(ACT_CODES))
@pytest.mark.parametrize("per_sample", ["shared", "weight", "weight_and_bias"])
def test_matches_conv2d_then_act(shape, act, per_sample):
    x, weight, bias = _inputs(*shape, per_sample=per_sample != "shared",
                              bias_per_sample=per_sample == "weight_and_bias")
    x = x * act_spread(act)
    got = EXT.cpu.pw_conv_act(x, weight, bias, ACT_CODES[act])
    assert got.is_contiguous(memory_format=CL) and got.dtype == torch.float32
    assert_parity(f"pw_conv_act {act}", got, _reference(x, weight, bias, act, torch.float32),
                  _reference(x, weight, bias, act, torch.float64), torch.float32)


def test_without_bias_and_with_strided_weight():
    x, weight, _ = _inputs(2, 6, 9, 4, 4)
    wide = torch.randn(9, 12, 1, 1)[:, ::2]  # non-contiguous (Cout, Cin, 1, 1) view
    for w in (weight, wide):
        got = EXT.cpu.pw_conv_act(x, w, None, ACT_CODES["silu"])
        assert_parity("no bias", got, _reference(x, w, None, "silu", torch.float32),
                      _reference(x, w, None, "silu", torch.float64), torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_bare_product_without_bias_or_act(shape, layout):
    """No bias and the identity act: the product alone, with no epilogue pass (tiled and
    one-GEMM routes; the output buffer starts out with garbage, so a GEMM that relied on
    the epilogue to finish the values would show here)."""
    x, weight, _ = _inputs(*shape)
    run = EXT.cpu.pw_conv_act if layout == "channels_last" else EXT.cpu.pw_conv_act_planar
    if layout == "nchw":
        x = x.contiguous()
    for _ in range(2):  # the second call may reuse the first one's output memory
        got = run(x, weight, None, ACT_CODES["identity"])
        assert_parity("bare product", got, _reference(x, weight, None, "identity", torch.float32),
                      _reference(x, weight, None, "identity", torch.float64), torch.float32)
        del got


@pytest.mark.parametrize("shape", [(2, 40, 1024, 9, 13), (1, 192, 1152, 7, 7), (3, 24, 33, 7, 1)],
                         ids=["tiled", "one_gemm", "tails"])
def test_packed_weight_gives_the_same_bits(shape):
    """A weight packed once (pack_weight) gives bitwise the per-call result, on both
    routes; after an in-place write it no longer serves (packed per call: still right)."""
    x, weight, bias = _inputs(*shape)
    packed = EXT.cpu.pack_weight(weight)
    assert (packed.cout, packed.cin) == tuple(weight.shape[:2])
    for act in (0, 2):
        assert torch.equal(EXT.cpu.pw_conv_act(x, weight, bias, act, packed),
                           EXT.cpu.pw_conv_act(x, weight, bias, act))
    weight.mul_(2)
    got = EXT.cpu.pw_conv_act(x, weight, bias, 2, packed)
    assert_parity("stale pack", got, _reference(x, weight, bias, "silu", torch.float32),
                  _reference(x, weight, bias, "silu", torch.float64), torch.float32)


def test_packed_weight_follows_the_gemm_policy_and_refuses_misuse():
    x, weight, bias = _inputs(2, 16, 48, 6, 6)
    packed = EXT.cpu.pack_weight(weight)
    expected = EXT.cpu.pw_conv_act(x, weight, bias, 1)
    previous = EXT.cpu.gemm_set_mode("blas")
    try:  # packed for the other route: not served, the result is the blas one
        torch.testing.assert_close(EXT.cpu.pw_conv_act(x, weight, bias, 1, packed), expected)
        assert torch.equal(EXT.cpu.pw_conv_act(x, weight, bias, 1, packed),
                           EXT.cpu.pw_conv_act(x, weight, bias, 1))
    finally:
        EXT.cpu.gemm_set_mode(previous)
    with pytest.raises(RuntimeError, match=r"packed must be made from this weight"):
        EXT.cpu.pw_conv_act(x, torch.randn(40, 16, 1, 1), None, 1, packed)
    per_sample = torch.randn(2, 48, 16)
    with pytest.raises(RuntimeError, match="not per-sample weights"):
        EXT.cpu.pw_conv_act(x, per_sample, None, 1, packed)
    with pytest.raises(RuntimeError, match="weight must have dtype"):
        EXT.cpu.pack_weight(weight.double())
    with pytest.raises(RuntimeError, match=r"weight must be \(Cout, Cin, 1, 1\)"):
        EXT.cpu.pack_weight(torch.randn(4, 3, 3, 3))
    with torch.inference_mode():  # no version counter: never served, still right
        frozen = weight.clone()
        got = EXT.cpu.pw_conv_act(x, frozen, bias, 1, EXT.cpu.pack_weight(frozen))
    assert torch.equal(got, EXT.cpu.pw_conv_act(x, weight, bias, 1))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("route", ["native", "blas"])
def test_gate_scales_the_input_channels_per_sample(shape, route):
    """pw_conv_act(x, W, b, act, packed, gate) = act(conv1x1(x * gate[n, c], W) + b): the
    gate goes into each sample's copy of the packed W^T (or of W on the BLAS route), on
    both work splits; with and without a pack made once; x is left untouched."""
    x, weight, bias = _inputs(*shape)
    gate = torch.rand(shape[0], shape[1], generator=torch.Generator().manual_seed(3))
    scaled = x * gate[:, :, None, None]
    previous = EXT.cpu.gemm_set_mode(route)
    try:
        packed = EXT.cpu.pack_weight(weight)
        x_before = x.clone()
        for act in ("identity", "silu"):
            for pack in (None, packed):
                got = EXT.cpu.pw_conv_act(x, weight, bias, ACT_CODES[act], pack, gate)
                assert got.is_contiguous(memory_format=CL)
                assert_parity(f"gated {act}", got,
                              _reference(scaled, weight, bias, act, torch.float32),
                              _reference(scaled.double(), weight, bias, act, torch.float64),
                              torch.float32)
        assert torch.equal(x, x_before)
        got = EXT.cpu.pw_conv_act(x, weight, None, ACT_CODES["identity"], packed, gate)
        assert_parity("gated bare", got, _reference(scaled, weight, None, "identity", torch.float32),
                      _reference(scaled.double(), weight, None, "identity", torch.float64),
                      torch.float32)
    finally:
        EXT.cpu.gemm_set_mode(previous)


def test_gate_errors():
    x, weight, bias = _inputs(2, 4, 6, 3, 3)
    gate = torch.rand(2, 4)
    cases = [
        (gate[:, :3], r"gate must be a contiguous float32 \(N, Cin\) = \(2, 4\)"),
        (gate.double(), "gate must be a contiguous float32"),
        (torch.rand(4, 2).t(), "gate must be a contiguous float32"),
        (gate[:1], "gate must be a contiguous float32"),
    ]
    for bad, message in cases:
        with pytest.raises(RuntimeError, match=message):
            EXT.cpu.pw_conv_act(x, weight, bias, 2, None, bad)
    with pytest.raises(RuntimeError, match="gate scales a shared"):
        EXT.cpu.pw_conv_act(x, weight.reshape(1, 6, 4).expand(2, 6, 4), bias, 2, None, gate)


def test_empty_batch():
    x, weight, bias = _inputs(0, 4, 6, 3, 3)
    assert EXT.cpu.pw_conv_act(x, weight, bias, 2).shape == (0, 6, 3, 3)
    assert EXT.cpu.pw_conv_act(x, weight, bias, 2, None, torch.rand(0, 4)).shape == (0, 6, 3, 3)


_NARROW_ISA_CHECK = """
import os
import torch
import torch.nn.functional as F
from effnet_kernels._ext import ext_module
e = ext_module()
assert e.cpu.dw_simd_isa() == os.environ["EFFNET_CPU_ISA"], e.cpu.dw_simd_isa()
x = torch.randn(2, 37, 9, 7).contiguous(memory_format=torch.channels_last)
w, b = torch.randn(41, 37, 1, 1) / 6, torch.randn(41)
wd, scale, shift = torch.randn(37, 1, 3, 3), torch.rand(37) + 0.5, torch.randn(37)
for code, act in ((0, lambda t: t), (1, F.relu), (2, F.silu)):
    got = e.cpu.pw_conv_act(x, w, b, code).double()
    ref = act(F.conv2d(x.double(), w.double(), b.double()))
    assert (got - ref).abs().max().item() < 1e-5, ("pw", code)
    got = e.cpu.pw_conv_act_planar(x.contiguous(), w, b, code).double()
    assert (got - ref).abs().max().item() < 1e-5, ("pw planar", code)
    got = e.cpu.dw_forward(x, wd, scale, shift, 1, 1, 1, 9, 7, code).double()
    y = F.conv2d(x.double(), wd.double(), None, 1, 1, 1, 37)
    ref = act(y * scale.double()[:, None, None] + shift.double()[:, None, None])
    assert (got - ref).abs().max().item() < 1e-4, ("dw", code)
    planar = e.cpu.dw_forward(x.contiguous(), wd, scale, shift, 1, 1, 1, 9, 7, code)
    assert planar.is_contiguous() and torch.equal(planar.double(), got), ("dw planar", code)
from effnet_kernels import use_backend
from effnet_kernels.nn import pointwise
x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last) + 0.5
w, g, b, dy = torch.randn(24, 8, 1, 1) / 3, torch.rand(24) + 0.5, torch.randn(24), torch.randn(2, 24, 16, 16)
for gram in (True, False):  # the tiled BN tile kernels, both backward routes
    pointwise.GRAM = gram
    grads = []
    for dt in (torch.float32, torch.float64):
        xs, ws = x.to(dt).detach().requires_grad_(), w.to(dt).detach().requires_grad_()
        if dt == torch.float32:
            with use_backend("cpu"):
                out = pointwise.conv_bn_act_train(xs, ws, g, b, None, None, stride=1, padding=0,
                                                  groups=1, momentum=0.1, eps=1e-3, act="silu")
        else:
            out = F.silu(F.batch_norm(F.conv2d(xs, ws), None, None, g.double(), b.double(), True,
                                      0.1, 1e-3))
        out.backward(dy.to(dt).contiguous(memory_format=torch.channels_last))
        grads.append((out.double(), xs.grad.double(), ws.grad.double()))
    for got, ref in zip(*grads):
        assert (got - ref).abs().max().item() < 1e-4 * (1 + ref.abs().max().item()), ("bn", gram)
"""


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_narrower_isa_kernels_match(isa):
    """EFFNET_CPU_ISA forces the AVX2 or baseline copy of the CPU kernels (isa.h): the
    pointwise epilogue (channels_last and NCHW), the depthwise forward with its per-tile
    activation (channels_last and NCHW, whose transposes run in 8 x 8 tiles), and the tiled
    1x1 conv + BN tile kernels on both backward routes (Gram and two-pass)."""
    env = dict(os.environ, EFFNET_CPU_ISA=isa)
    done = subprocess.run([sys.executable, "-c", _NARROW_ISA_CHECK], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# (n, cin, cout, h, w) for the NCHW GEMM: column tiles (the first four; 3x8x512x10x20
# rounds its tiles up to a multiple of the threads), a W above the tiled path's limit and
# too few tiles for the threads (one GEMM per image, then the epilogue), 1-pixel rows.
PLANAR_SHAPES = [(2, 5, 7, 3, 4), (4, 8, 512, 16, 16), (2, 40, 1024, 9, 13), (3, 8, 512, 10, 20),
                 (2, 400, 400, 24, 24), (1, 16, 24, 2, 2), (3, 24, 33, 7, 1)]


@pytest.mark.parametrize("shape", PLANAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", list(ACT_CODES))
def test_planar_matches_conv2d_then_act(shape, act):
    x, weight, bias = _inputs(*shape)
    x = x.contiguous()
    got = EXT.cpu.pw_conv_act_planar(x, weight, bias, ACT_CODES[act])
    assert got.is_contiguous() and got.dtype == torch.float32
    assert_parity(f"pw_conv_act_planar {act}", got, _reference(x, weight, bias, act, torch.float32),
                  _reference(x, weight, bias, act, torch.float64), torch.float32)


def test_planar_without_bias_empty_batch_and_errors():
    x, weight, _ = _inputs(2, 6, 9, 4, 4)
    x = x.contiguous()
    got = EXT.cpu.pw_conv_act_planar(x, weight, None, ACT_CODES["relu"])
    assert_parity("no bias", got, _reference(x, weight, None, "relu", torch.float32),
                  _reference(x, weight, None, "relu", torch.float64), torch.float32)
    assert EXT.cpu.pw_conv_act_planar(x[:0], weight, None, 2).shape == (0, 9, 4, 4)
    cases = [
        ((x.contiguous(memory_format=CL), weight, None, 2), "contiguous in NCHW"),
        ((x.double(), weight, None, 2), "x must have dtype"),
        ((x, weight.reshape(1, 9, 6).expand(2, 9, 6), None, 2), r"weight must be \(Cout, Cin"),
        ((x, weight[:, :3], None, 2), "weight must be"),
        ((x, weight, torch.randn(4), 2), "bias must have shape"),
        ((x, weight, None, 5), "act must be"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            EXT.cpu.pw_conv_act_planar(*args)


def test_bad_arguments_name_the_argument():
    x, weight, bias = _inputs(2, 4, 6, 3, 3)
    cases = [
        ((x.double(), weight, bias, 2), "x must have dtype"),
        ((x.contiguous(), weight, bias, 2), "channels_last"),
        ((x, weight.double(), bias, 2), "weight must have dtype"),
        ((x, weight[:, :3], bias, 2), "weight must be"),
        ((x, torch.randn(6, 4, 3, 3), bias, 2), "weight must be"),
        ((x, torch.randn(3, 6, 4), bias, 2), "weight must be"),
        ((x, weight, bias[:5], 2), r"bias must have shape \(Cout,\) = \(6,\)"),
        ((x, weight, bias.expand(2, 6), 2), "bias must have shape"),  # shared weight
        ((x, weight.reshape(1, 6, 4).expand(2, 6, 4), bias.expand(3, 6), 2),
         r"with per-sample weights, \(N, Cout\) = \(2, 6\)"),
        ((x, weight, bias, 4), "act must be"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            EXT.cpu.pw_conv_act(*args)
