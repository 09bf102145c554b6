"""The compiled per-channel BatchNorm vector primitives (csrc/*/bn_vectors.*) against the
plain-PyTorch composite of ops/bn_math.py and a float64 truth: bn_affine,
bn_backward_coefs and the in-place bn_update_running, on every device that has them."""

from __future__ import annotations

import pytest
import torch

from effnet_kernels._ext import ext_module
from effnet_kernels.ops import bn_math
from effnet_kernels.testing import assert_parity

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
C = 37  # not a multiple of a vector width or warp


def _compiled(device: str):
    mod = ext_module()
    prims = getattr(mod, device, None) if mod is not None else None
    if device == "cuda" and not getattr(mod, "cuda_compiled", False):
        pytest.skip("effnet_kernels._C was built without CUDA")
    if prims is None or not hasattr(prims, "bn_update_running"):
        pytest.skip(f"effnet_kernels._C has no {device} BN vector primitives")
    return prims


def _vectors(device, dtype, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(C, generator=gen, dtype=torch.float64) for _ in range(n)]
    return [t.to(device=device, dtype=dtype) for t in out]


def _check(name, actual, composite, truth, dtype):
    assert actual.dtype == truth.dtype == dtype, name
    assert_parity(name, actual, composite, truth.double(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", ["none", "same", "bfloat16"])
def test_bn_affine_matches_composite(device, dtype, affine):
    prims = _compiled(device)
    mean, var, gamma, beta = _vectors(device, dtype)
    var = var.abs() + 0.1
    if affine == "none":
        gamma = beta = None
    elif affine == "bfloat16":
        gamma, beta = gamma.bfloat16(), beta.bfloat16()
    got = prims.bn_affine(mean, var, gamma, beta, 1e-3)
    ref = bn_math.bn_affine(mean, var, gamma, beta, 1e-3)
    truth = bn_math.bn_affine(mean.double(), var.double(),
                              None if gamma is None else gamma.double(),
                              None if beta is None else beta.double(), 1e-3)
    for name, a, r, t in zip(("invstd", "scale", "shift"), got, ref, truth):
        _check(name, a, r, t.to(dtype), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_bn_backward_coefs_matches_composite(device, dtype, training):
    prims = _compiled(device)
    scale, invstd, sum_g, sum_g_yc = _vectors(device, dtype)
    invstd = invstd.abs() + 0.5
    got = prims.bn_backward_coefs(scale, invstd, sum_g, sum_g_yc, 123, training)
    ref = bn_math.bn_backward_coefs(scale, invstd, sum_g, sum_g_yc, 123, training)
    truth = bn_math.bn_backward_coefs(scale.double(), invstd.double(), sum_g.double(),
                                      sum_g_yc.double(), 123, training)
    for name, a, r, t in zip(("coef_b", "coef_c", "dgamma"), got, ref, truth):
        _check(name, a, r, t.to(dtype), dtype)
    if not training:
        assert not got[0].any() and not got[1].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("running_dtype", ["acc", "bfloat16"])
@pytest.mark.parametrize("count", [1, 50])
def test_bn_update_running_matches_composite(device, dtype, running_dtype, count):
    prims = _compiled(device)
    rm, rv, mean, var = _vectors(device, dtype)
    rv, var = rv.abs(), var.abs()
    if running_dtype == "bfloat16":
        rm, rv = rm.bfloat16(), rv.bfloat16()
    rm_ref, rv_ref = rm.clone(), rv.clone()
    rm_truth, rv_truth = rm.double(), rv.double()
    versions = (rm._version, rv._version)
    prims.bn_update_running(rm, rv, mean, var, 0.3, count)
    bn_math.bn_update_running(rm_ref, rv_ref, mean, var, 0.3, count)
    bn_math.bn_update_running(rm_truth, rv_truth, mean.double(), var.double(), 0.3, count)
    check_dtype = rm.dtype
    _check("running_mean", rm, rm_ref, rm_truth.to(check_dtype), check_dtype)
    _check("running_var", rv, rv_ref, rv_truth.to(check_dtype), check_dtype)
    # In-place writes must be visible to version-keyed caches (nn/eval_fold.py).
    assert rm._version > versions[0] and rv._version > versions[1]


@pytest.mark.parametrize("device", DEVICES)
def test_bn_vectors_empty(device):
    prims = _compiled(device)
    e = torch.empty(0, device=device)
    assert all(t.numel() == 0 for t in prims.bn_affine(e, e, None, None, 1e-5))
    assert all(t.numel() == 0 for t in prims.bn_backward_coefs(e, e, e, e, 1, True))
    prims.bn_update_running(e.clone(), e.clone(), e, e, 0.1, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_vectors_bad_input(device):
    prims = _compiled(device)
    mean, var = _vectors(device, torch.float32, n=2)
    with pytest.raises(RuntimeError, match="var must be 1-D with 37 elements"):
        prims.bn_affine(mean, var[:5], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="var must have dtype Float"):
        prims.bn_affine(mean, var.double(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="mean must be float32 or float64"):
        prims.bn_affine(mean.half(), var.half(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="gamma must be 1-D with 37 elements"):
        prims.bn_affine(mean, var, mean[:3], None, 1e-5)
    with pytest.raises(RuntimeError, match="count must be positive"):
        prims.bn_backward_coefs(mean, var, mean, var, 0, True)
    with pytest.raises(RuntimeError, match="running_var must be 1-D with 37 elements"):
        prims.bn_update_running(mean.clone(), var[:4].clone(), mean, var, 0.1, 3)
    other = "cuda" if device == "cpu" else "cpu"
    if other == "cuda" and not torch.cuda.is_available():
        return
    with pytest.raises(RuntimeError, match="must be a"):
        prims.bn_affine(mean.to(other), var.to(other), None, None, 1e-5)
