"""DropConnect: stochastic depth (timm's drop_path) fused with the residual add."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.drop_connect import drop_connect_add


class DropConnect(nn.Module):
    """forward(x, shortcut) = shortcut + x * mask[n] / (1 - p) in training, shortcut + x in eval.

    mask ~ Bernoulli(1 - p) per sample, drawn from the default generator of x's device."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"p must be a float in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: Tensor, shortcut: Tensor) -> Tensor:
        return drop_connect_add(x, shortcut, self.p, training=self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
