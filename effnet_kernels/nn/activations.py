"""Mapping between activation modules and the fused ops' act names."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

_ACT_MODULES = {nn.SiLU: "silu", nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Identity: "identity"}
# act name -> the PyTorch function (the unfused paths)
ACT_FUNCTIONS = {"silu": F.silu, "relu": F.relu, "relu6": F.relu6, "identity": lambda t: t}


def act_name(module: nn.Module | None) -> str | None:
    """'silu', 'relu', 'relu6' or 'identity' for a module the kernels can fuse; None
    otherwise."""
    if module is None:
        return "identity"
    return _ACT_MODULES.get(type(module))


def fusable_act(act: str | nn.Module) -> str:
    """The act name for a name or a module; raises for activations the kernels lack."""
    if isinstance(act, str):
        return act
    name = act_name(act)
    if name is None:
        raise ValueError(f"act {type(act).__name__} cannot be fused; use SiLU/ReLU/ReLU6/Identity")
    return name


def act_module(name: str) -> nn.Module:
    for cls, act in _ACT_MODULES.items():
        if act == name:
            return cls()
    raise ValueError(f"act must be one of {sorted(_ACT_MODULES.values())}, got {name!r}")
