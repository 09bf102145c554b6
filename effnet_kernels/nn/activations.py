"""Mapping between activation modules and the fused ops' act names."""

from __future__ import annotations

from torch import nn

from ..ops.activations import ACTIVATIONS, activation

_ACT_MODULES = {a.module: a.name for a in ACTIVATIONS}
# act name -> the PyTorch function (the unfused paths)
ACT_FUNCTIONS = {a.name: a.forward for a in ACTIVATIONS}


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
    return activation(name).module()
