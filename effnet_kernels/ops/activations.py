"""Activation names, the integer codes the kernels take, and their PyTorch forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACT_CODES = {"identity": 0, "relu": 1, "silu": 2, "relu6": 3}


def act_code(act: str) -> int:
    if act not in ACT_CODES:
        raise ValueError(f"act must be one of {sorted(ACT_CODES)}, got {act!r}")
    return ACT_CODES[act]


def apply_act(z: torch.Tensor, code: int) -> torch.Tensor:
    if code == 1:
        return F.relu(z)
    if code == 2:
        return F.silu(z)
    if code == 3:
        return F.relu6(z)
    return z


def apply_act_(z: torch.Tensor, act: str) -> torch.Tensor:
    """act(z) written into z, by name."""
    if act == "silu":
        return F.silu(z, inplace=True)
    if act == "relu":
        return z.relu_()
    if act == "relu6":
        return F.relu6(z, inplace=True)
    if act != "identity":
        act_code(act)
    return z


def act_grad(z: torch.Tensor, code: int) -> torch.Tensor:
    """d act(z) / dz, elementwise."""
    if code == 1:
        return (z > 0).to(z.dtype)
    if code == 2:
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if code == 3:  # zero at both kinks, as PyTorch's hardtanh_backward
        return ((z > 0) & (z < 6)).to(z.dtype)
    return torch.ones_like(z)
