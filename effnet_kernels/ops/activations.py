"""The activations the kernels fuse: one table of each one's name, the integer code the
kernels take (csrc/common/math.h `Act`), its nn.Module class and its PyTorch forms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_aten = torch.ops.aten


@dataclass(frozen=True)
class Activation:
    name: str
    code: int
    module: type[nn.Module]
    forward: Callable[[Tensor], Tensor]         # act(z)
    forward_: Callable[[Tensor], Tensor]        # act(z) written into z
    grad: Callable[[Tensor], Tensor]            # act'(z), elementwise
    backward: Callable[[Tensor, Tensor], Tensor]  # (da, z) -> da * act'(z) in one ATen op


def _identity(z: Tensor) -> Tensor:
    return z


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


ACTIVATIONS = (
    Activation("identity", 0, nn.Identity, _identity, _identity, torch.ones_like,
               lambda da, z: da),
    Activation("relu", 1, nn.ReLU, F.relu, torch.relu_, lambda z: (~(z <= 0)).to(z.dtype),
               lambda da, z: _aten.threshold_backward(da, z, 0)),
    Activation("silu", 2, nn.SiLU, F.silu, partial(F.silu, inplace=True), _silu_grad,
               _aten.silu_backward),
    # relu6' is zero at both kinks, and one at NaN (relu' too), as PyTorch's
    # hardtanh_backward and threshold_backward
    Activation("relu6", 3, nn.ReLU6, F.relu6, partial(F.relu6, inplace=True),
               lambda z: (~((z <= 0) | (z >= 6))).to(z.dtype),
               lambda da, z: _aten.hardtanh_backward(da, z, 0, 6)),
)
_BY_NAME = {a.name: a for a in ACTIVATIONS}
_BY_CODE = {a.code: a for a in ACTIVATIONS}
ACT_CODES = {a.name: a.code for a in ACTIVATIONS}


def activation(act: str) -> Activation:
    if act not in _BY_NAME:
        raise ValueError(f"act must be one of {sorted(_BY_NAME)}, got {act!r}")
    return _BY_NAME[act]


def act_code(act: str) -> int:
    return activation(act).code


def by_code(code: int) -> Activation:
    """The activation of a kernel code (codes the table lacks: identity; the ops check
    codes before any kernel runs)."""
    return _BY_CODE.get(code, _BY_CODE[0])


def apply_act(z: Tensor, code: int) -> Tensor:
    return by_code(code).forward(z)


def apply_act_(z: Tensor, act: str) -> Tensor:
    """act(z) written into z, by name."""
    return activation(act).forward_(z)


def act_grad(z: Tensor, code: int) -> Tensor:
    """d act(z) / dz, elementwise."""
    return by_code(code).grad(z)
