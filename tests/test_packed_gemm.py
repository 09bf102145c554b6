"""The native packed float32 GEMM of the CPU 1x1 convs (csrc/cpu/gemm_microkernel.h,
packed_gemm.h) and its route policy, whatever route this CPU picks by default: every case
runs with the route forced, against float64 and PyTorch's float32 error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from effnet_kernels import build_info
from effnet_kernels._ext import ext_module
from effnet_kernels.ops.activations import ACT_CODES
from effnet_kernels.testing import assert_parity

EXT = ext_module()
pytestmark = pytest.mark.skipif(EXT is None or not EXT.cpu.pw_conv_available(),
                                reason="compiled extension with BLAS sgemm not available")
CL = torch.channels_last


def _native_available() -> bool:
    return EXT is not None and EXT.cpu.dw_simd_isa() in ("avx2", "avx512")


needs_native = pytest.mark.skipif(not _native_available(),
                                  reason="the native GEMM needs an AVX2 or AVX-512 CPU")


@pytest.fixture
def gemm_mode():
    """Sets the GEMM policy for one test and restores the previous one."""
    previous = EXT.cpu.gemm_mode()
    yield EXT.cpu.gemm_set_mode
    EXT.cpu.gemm_set_mode(previous)


def _case(n, cin, cout, h, w, per_sample=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5
    if per_sample:
        weight = weight.reshape(1, cout, cin) * torch.rand(n, 1, cin, generator=gen)
    return x, weight, torch.randn(cout, generator=gen)


def _reference(x, weight, bias, dtype):
    x, bias = x.to(dtype), bias.to(dtype)
    if weight.dim() == 3:
        return torch.cat([F.conv2d(x[i:i + 1], weight[i, :, :, None, None].to(dtype), bias)
                          for i in range(x.shape[0])])
    return F.conv2d(x, weight.to(dtype), bias)


# (n, cin, cout, h, w): Cout around the vector, half-vector and panel widths (8/16 lanes,
# an AVX-512 panel's last 8 or fewer columns in a half vector, 16/32-column panels: 1, 7, 8,
# 9, 16, 17, 24, 31, 32, 33, 40, 48, 100), pixel counts that leave every micro-tile
# row tail (12 rows on AVX-512, 6 on AVX2), Cin from 1 up; the last two run the untiled
# route (a shared weight above 2^17 values: columns split over threads when there are as
# many 32-column panels as threads, else rows).
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 7, 5, 5), (3, 16, 8, 3, 7), (2, 5, 9, 4, 4),
          (1, 64, 16, 11, 13), (2, 33, 17, 6, 5), (1, 12, 31, 5, 7), (2, 20, 32, 9, 3),
          (1, 70, 33, 4, 6), (2, 48, 48, 7, 7), (1, 100, 100, 10, 10), (2, 24, 144, 8, 8),
          (2, 144, 24, 5, 9), (1, 30, 40, 6, 6),
          (2, 512, 320, 3, 5), (1, 400, 400, 2, 3)]


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_native_matches_float64(gemm_mode, shape, per_sample):
    gemm_mode("native")
    assert EXT.cpu.gemm_native()
    x, weight, bias = _case(*shape, per_sample=per_sample)
    got = EXT.cpu.pw_conv_act(x, weight, bias, ACT_CODES["identity"])
    assert_parity("native pw_conv_act", got, _reference(x, weight, bias, torch.float32),
                  _reference(x, weight, bias, torch.float64), torch.float32)


@pytest.mark.parametrize("mode", ["native", "blas"])
def test_both_routes_agree_through_the_model_paths(gemm_mode, mode):
    """Every caller of the product (eval conv, expand + depthwise, training 1x1 conv + BN
    forward and backward) on each route, against float64."""
    if mode == "native" and not _native_available():
        pytest.skip("the native GEMM needs an AVX2 or AVX-512 CPU")
    gemm_mode(mode)
    x, weight, bias = _case(2, 24, 40, 9, 11)
    scale, shift = torch.rand(40) + 0.5, torch.randn(40)
    dw = torch.randn(40, 1, 3, 3)
    got, _ = EXT.cpu.dw_expand_forward(x, weight, bias, ACT_CODES["silu"], dw, scale, shift,
                                       1, 1, 1, 9, 11, ACT_CODES["silu"], False)

    def truth(dtype):
        e = F.silu(F.conv2d(x.to(dtype), weight.to(dtype), bias.to(dtype)))
        z = F.conv2d(e, dw.to(dtype), None, 1, 1, 1, 40)
        return F.silu(z * scale.to(dtype)[:, None, None] + shift.to(dtype)[:, None, None])
    assert_parity(f"{mode} dw_expand_forward", got, truth(torch.float32), truth(torch.float64),
                  torch.float32)

    _assert_train_grads(x, weight, mode)


def _assert_train_grads(x, weight, label):
    """The tiled training 1x1 conv + BN + SiLU (forward, dx, dW GEMMs) against float64."""
    from effnet_kernels import use_backend
    from effnet_kernels.nn import pointwise
    cout = weight.shape[0]
    g, b = torch.rand(cout) + 0.5, torch.randn(cout)
    dy = torch.randn(x.shape[0], cout, *x.shape[2:]).contiguous(memory_format=CL)
    results = {}
    for dtype in (torch.float32, torch.float64):
        xs = x.to(dtype).detach().requires_grad_()
        ws = weight.to(dtype).detach().requires_grad_()
        if dtype == torch.float32:
            with use_backend("cpu"):
                out = pointwise.conv_bn_act_train(xs, ws, g, b, None, None, stride=1, padding=0,
                                                  groups=1, momentum=0.1, eps=1e-3, act="silu")
        else:
            out = F.silu(F.batch_norm(F.conv2d(xs, ws), None, None, g.double(), b.double(),
                                      True, 0.1, 1e-3))
        out.backward(dy.to(dtype))
        results[dtype] = (out, xs.grad, ws.grad)
    for name, got_t, ref_t in zip(("out", "dx", "dweight"), results[torch.float32],
                                  results[torch.float64]):
        err = (got_t.double() - ref_t).abs().max().item()
        assert err < 1e-4 * (1 + ref_t.abs().max().item()), (label, name, err)


@needs_native
@pytest.mark.parametrize("cin, cout", [(1, 5), (8, 13), (17, 24), (24, 144), (33, 40),
                                       (40, 100), (144, 24)])
def test_native_training_gradients(gemm_mode, cin, cout):
    """dW = dy^T x on the native kernel: Cin column tails (masked loads of x's rows, in
    full or half vectors) and Cout row tails; dx = dy w and the forward on the packed
    weight."""
    gemm_mode("native")
    x, weight, _ = _case(2, cin, cout, 7, 9)
    _assert_train_grads(x + 0.5, weight, f"native {cin}->{cout}")


@needs_native
def test_native_results_do_not_depend_on_threads_or_tiling(gemm_mode):
    """Each output is one dot product in k order, whichever tile, panel or thread computes
    it: the same bits on 1, 2 and 3 threads and on the tiled and untiled routes."""
    gemm_mode("native")
    x, weight, bias = _case(4, 96, 112, 14, 14)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(EXT.cpu.pw_conv_act(x, weight, bias, ACT_CODES["identity"]))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    per_row = torch.cat([EXT.cpu.pw_conv_act(x[i:i + 1], weight, bias, ACT_CODES["identity"])
                         for i in range(4)])
    assert torch.equal(per_row, results[0])


@needs_native
@pytest.mark.parametrize("cout", [7, 24, 40])
def test_half_vectors_give_the_same_bits(gemm_mode, cout):
    """A panel's last 8 or fewer columns in a half vector (AVX-512) or in a masked full one:
    the same products in the same order, on the packed weight (forward, gated) and on the
    unpadded dW operand (Cin = Cout columns)."""
    gemm_mode("native")
    x, weight, bias = _case(2, cout, cout, 5, 7)
    dy = torch.randn(2, cout, 5, 7).contiguous(memory_format=CL)
    gate = torch.rand(2, cout)
    w2d = weight.view(cout, cout)

    def products():
        packed = EXT.cpu.pack_weight(weight)
        return (EXT.cpu.pw_conv_act(x, weight, bias, ACT_CODES["identity"]),
                EXT.cpu.pw_conv_act(x, weight, bias, ACT_CODES["identity"], packed, gate),
                *EXT.cpu.pw_conv_backward(dy, x, w2d, True, True))
    previous = EXT.cpu.gemm_set_half_vectors(False)
    try:
        masked = products()
        assert EXT.cpu.gemm_set_half_vectors(True) is False
        halves = products()
    finally:
        EXT.cpu.gemm_set_half_vectors(previous)
    for a, b in zip(masked, halves):
        assert torch.equal(a, b)


def test_mode_switch_and_errors(gemm_mode):
    previous = gemm_mode("blas")
    assert previous in ("auto", "native", "blas")
    assert not EXT.cpu.gemm_native() and build_info()["cpu_gemm"] == "blas"
    assert gemm_mode("auto") == "blas"
    with pytest.raises(ValueError, match="gemm mode must be 'auto', 'native' or 'blas'"):
        gemm_mode("fast")
    assert EXT.cpu.gemm_mode() == "auto"
    if _native_available():
        gemm_mode("native")
        assert EXT.cpu.gemm_native() and build_info()["cpu_gemm"] == "native"
    else:
        with pytest.raises(RuntimeError, match="needs an AVX2 or AVX-512 CPU"):
            gemm_mode("native")


_ENV_CHECK = """
import torch, torch.nn.functional as F
from effnet_kernels._ext import ext_module
e = ext_module()
print(e.cpu.dw_simd_isa(), e.cpu.gemm_mode(), e.cpu.gemm_native())
x = torch.randn(3, 37, 5, 7).contiguous(memory_format=torch.channels_last)
w, b = torch.randn(41, 37, 1, 1) / 6, torch.randn(41)
got = e.cpu.pw_conv_act(x, w, b, 0).double()
ref = F.conv2d(x.double(), w.double(), b.double())
assert (got - ref).abs().max().item() < 1e-5
gate = torch.rand(3, 37)
got = e.cpu.pw_conv_act(x, w, b, 0, e.cpu.pack_weight(w), gate).double()
ref = F.conv2d(x.double() * gate.double()[:, :, None, None], w.double(), b.double())
assert (got - ref).abs().max().item() < 1e-5
dy = torch.randn(3, 41, 5, 7).contiguous(memory_format=torch.channels_last)
dx, _ = e.cpu.pw_conv_backward(dy, x, w.view(41, 37), True, False)
ref = F.conv_transpose2d(dy.double(), w.double())
assert (dx.double() - ref).abs().max().item() < 1e-5
"""


def _run_env(**env):
    return subprocess.run([sys.executable, "-c", _ENV_CHECK], env=dict(os.environ, **env),
                          capture_output=True, text=True)


@needs_native
def test_avx2_native_kernel_and_environment_policy():
    """EFFNET_CPU_ISA=avx2 runs the 8-lane copy of the kernel (6 x 16 micro tiles, 16-column
    panels: plain, gated and dx = dy w products of 41 columns, a last panel of 16);
    EFFNET_CPU_GEMM sets the starting policy and a bad value names the variable."""
    done = _run_env(EFFNET_CPU_ISA="avx2", EFFNET_CPU_GEMM="native")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["avx2", "native", "True"]
    done = _run_env(EFFNET_CPU_GEMM="blas")
    assert done.returncode == 0 and done.stdout.split()[1:] == ["blas", "False"], done.stderr
    done = _run_env(EFFNET_CPU_GEMM="fastest")
    assert done.returncode != 0
    assert "EFFNET_CPU_GEMM must be 'auto', 'native' or 'blas', got 'fastest'" in done.stderr
