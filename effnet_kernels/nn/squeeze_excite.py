"""SqueezeExcite: timm's SE block (conv_reduce -> act -> conv_expand -> sigmoid gate), fused.

Holds real `conv_reduce` and `conv_expand` 1x1 Conv2d submodules (with bias), so parameter
names and state_dict keys match timm's `se.conv_reduce.*` / `se.conv_expand.*`;
`from_modules` reuses existing convs (the same Parameter objects).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.squeeze_excite import squeeze_excite
from .activations import ACT_FUNCTIONS, fusable_act
from .block_structure import has_call_hooks


def _check_1x1(name: str, conv: nn.Conv2d) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    if tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
        raise ValueError(f"{name} must be a 1x1 conv with groups=1, got {conv}")
    if tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1):
        raise ValueError(f"{name} must have stride 1, padding 0 and dilation 1, got {conv}")


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int, act: str = "silu"):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.act = act

    @classmethod
    def from_modules(cls, conv_reduce: nn.Conv2d, conv_expand: nn.Conv2d,
                     act: str | nn.Module | None = "silu") -> SqueezeExcite:
        """Wrap existing conv_reduce / conv_expand (same objects, no copies)."""
        _check_1x1("conv_reduce", conv_reduce)
        _check_1x1("conv_expand", conv_expand)
        if (conv_expand.in_channels != conv_reduce.out_channels
                or conv_expand.out_channels != conv_reduce.in_channels):
            raise ValueError(
                f"conv_expand ({conv_expand.in_channels} -> {conv_expand.out_channels}) must invert "
                f"conv_reduce ({conv_reduce.in_channels} -> {conv_reduce.out_channels})"
            )
        act = fusable_act(act)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv_reduce = conv_reduce
        self.conv_expand = conv_expand
        self.act = act
        return self

    def forward(self, x: Tensor, pooled: Tensor | None = None) -> Tensor:
        if has_call_hooks(self.conv_reduce, self.conv_expand):
            # The fused op reads the convs' weights without calling them: with hooks on
            # them, run timm's module graph so that the hooks see their calls.
            s = self.conv_reduce(x.mean((2, 3), keepdim=True))
            return x * self.conv_expand(ACT_FUNCTIONS[self.act](s)).sigmoid()
        return squeeze_excite(
            x, self.conv_reduce.weight, self.conv_reduce.bias, self.conv_expand.weight,
            self.conv_expand.bias, act=self.act, pooled=pooled,
        )

    def extra_repr(self) -> str:
        return f"act={self.act!r}"
