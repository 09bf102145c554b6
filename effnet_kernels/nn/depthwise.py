"""DepthwiseConvBNAct: Conv2d(groups=C, bias=False) + BatchNorm2d + activation, fused.

Holds a real `conv` and `bn` submodule, so parameters, buffers and state_dict keys are
exactly those of the unfused pair; `from_modules` reuses existing modules (and therefore
the same Parameter and buffer objects).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.depthwise import depthwise_conv_bn_act
from .activations import fusable_act
from .batchnorm import bn_call_args
from .conv_bn_act import is_same_conv
from .mbconv import check_conv


class DepthwiseConvBNAct(nn.Module):
    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | str | None = None, act: str = "silu",
                 eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__()
        pad = kernel_size // 2 if padding in (None, "same") else padding
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride, pad,
                              groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
        self.stride = stride
        self.padding = padding
        self.act = act

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str | nn.Module = "silu",
                     padding: int | str | None = None) -> DepthwiseConvBNAct:
        """Wrap an existing depthwise conv and BN (same objects, no copies).

        padding defaults to conv.padding ("same" for a TensorFlow SAME conv: SameConv2d or
        timm's Conv2dSame). Raises ValueError for a conv the fused op cannot compute
        (dilation, a non-zero padding mode, unequal or unsupported stride / padding /
        kernel size)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels:
            raise ValueError(f"conv must be depthwise (groups == in == out channels), got {conv}")
        if conv.bias is not None:
            raise ValueError("conv must have no bias (BatchNorm follows it)")
        check_conv(conv, "conv", depthwise=True)
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) \
                or bn.num_features != conv.out_channels:
            raise ValueError(f"bn must be a BatchNorm2d or SyncBatchNorm of {conv.out_channels} "
                             f"channels, got {bn}")
        if padding is None and is_same_conv(conv):
            padding = "same"
        act = fusable_act(act)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv = conv
        self.bn = bn
        self.stride = conv.stride[0]
        self.padding = conv.padding[0] if padding is None else padding
        self.act = act
        return self

    def forward(self, x: Tensor) -> Tensor:
        return depthwise_conv_bn_act(
            x, self.conv.weight, self.bn.weight, self.bn.bias,
            stride=self.stride, padding=self.padding, act=self.act, **bn_call_args(self.bn),
        )

    def extra_repr(self) -> str:
        return f"stride={self.stride}, padding={self.padding!r}, act={self.act!r}"
