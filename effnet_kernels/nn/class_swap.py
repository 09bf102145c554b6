"""In-place class changes of modules, the way convert() gives a module a fused forward
while it stays the same object (its Parameters, buffers, hooks and state_dict keys)."""

from __future__ import annotations

from torch import nn


def swap_class(module: nn.Module, old: type, new: type) -> bool:
    """Make a module of exactly class `old` an instance of `new` in place; False (and no
    change) for any other module."""
    if type(module) is not old:
        return False
    module.__class__ = new
    return True
