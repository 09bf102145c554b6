"""Per-channel BatchNorm vector math of the fused BN ops (depthwise, pointwise, SyncBN).

On the (C,) statistics of a conv output y (formulas shared with csrc/common/bn_channel.h):
    bn_affine          invstd = 1 / sqrt(var + eps), scale = gamma * invstd,
                       shift = beta - mean * scale        (batch_norm(y) = y * scale + shift)
    bn_backward_coefs  coef_b = -scale * sum_g / M, coef_c = -scale * invstd^2 * sum_g_yc / M
                       (0 in eval), dgamma = sum_g_yc * invstd, from the sums of g = dL/dz
                       and g * (y - mean) over the M values per channel
    bn_update_running  running = (1 - momentum) * running + momentum * batch, unbiased
                       variance (in place)

The functions here are the plain-PyTorch composite: the reference backend's, the Triton
backend's, and what torch.compile traces. The cpu and cuda backends' primitive namespaces
carry compiled versions with the same names and signatures (csrc/cpu/bn_vectors.cpp,
csrc/cuda/bn_vectors.cu): one call instead of 3-8 small ATen ops, each of which costs a
Python dispatch and, on a GPU, a kernel launch. `vector_math(prims)` picks between them.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without a dispatch when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def bn_affine(mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None,
              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(invstd, scale, shift) with z = y * scale + shift == batch_norm(y); None gamma / beta
    mean 1 / 0."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd if gamma is None else as_dtype(gamma, mean.dtype) * invstd
    shift = -mean * scale if beta is None else as_dtype(beta, mean.dtype) - mean * scale
    return invstd, scale, shift


def bn_backward_coefs(scale: Tensor, invstd: Tensor, sum_g: Tensor, sum_g_yc: Tensor,
                      count: int, training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(coef_b, coef_c, dgamma): dL/dy = scale * g + coef_b + coef_c * (y - mean)."""
    dgamma = sum_g_yc * invstd
    if not training:  # eval: mean and var are constants
        zeros = torch.zeros_like(scale)
        return zeros, zeros, dgamma
    return -scale * sum_g / count, -scale * invstd * invstd * sum_g_yc / count, dgamma


def bn_update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                      momentum: float, count: int) -> None:
    """PyTorch's rule: running = m * batch + (1 - m) * running, with the unbiased variance,
    computed in the wider of the two dtypes and rounded once into the running buffer (a
    float16 buffer takes a batch variance above its range, blended, without overflowing)."""
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        for running, batch in ((running_mean, mean), (running_var, unbiased)):
            dtype = torch.promote_types(running.dtype, batch.dtype)
            running.copy_(batch.to(dtype) * momentum + running.to(dtype) * (1 - momentum))


def running_stats(running_mean: Tensor | None, running_var: Tensor | None,
                  momentum: float) -> tuple | None:
    """What an autograd Function that updates the running statistics inside its forward
    takes: (running_mean, running_var, momentum), or None when there are none to update."""
    if running_mean is None or running_var is None:
        return None
    return running_mean, running_var, momentum


def update_running(bn, running: tuple | None, mean: Tensor, var: Tensor, count: int) -> None:
    """bn.bn_update_running (bn: vector_math(prims) or COMPOSITE) for running_stats(...)."""
    if running is not None:
        running_mean, running_var, momentum = running
        bn.bn_update_running(running_mean, running_var, mean, var, momentum, count)


COMPOSITE = types.SimpleNamespace(
    bn_affine=bn_affine, bn_backward_coefs=bn_backward_coefs, bn_update_running=bn_update_running
)


def vector_math(prims):
    """The BN vector functions for a backend's primitives: its compiled ones if it has them
    (cpu, cuda), else the composite above (reference, triton, or an extension built before
    they existed)."""
    return prims if hasattr(prims, "bn_update_running") else COMPOSITE
