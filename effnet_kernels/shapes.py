"""Real layer shapes of EfficientNet B0-B7, shared by tests, benchmarks and the CLI.

Derived from the model configuration (models/config.py), never hard-coded. The batch
and resolution can be scaled down for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models.config import block_shapes


@dataclass(frozen=True)
class DepthwiseShape:
    name: str
    n: int
    c: int
    h: int
    w: int
    kernel: int
    stride: int

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)


@dataclass(frozen=True)
class ActivationShape:
    """An (N, C, H, W) activation plus the SE reduced width, for SE and residual ops."""

    name: str
    n: int
    c: int
    h: int
    w: int
    reduced: int

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)


def depthwise_shapes(
    variant: str = "b0", batch: int = 8, resolution: int | None = None, unique: bool = True
) -> list[DepthwiseShape]:
    """The depthwise conv layers of efficientnet_<variant> (first block of each stage when
    unique, since later blocks of a stage repeat the same shape)."""
    shapes = []
    for b in block_shapes(variant, resolution):
        if unique and b.index > 1:
            continue
        name = f"{variant}.s{b.stage}.b{b.index}"
        shapes.append(DepthwiseShape(name, batch, b.mid_channels, b.in_hw, b.in_hw, b.kernel, b.stride))
    return shapes


def se_shapes(variant: str = "b0", batch: int = 8, resolution: int | None = None):
    """The squeeze-excite inputs (the depthwise outputs) of each stage's first two blocks."""
    return [
        ActivationShape(f"{variant}.s{b.stage}.b{b.index}", batch, b.mid_channels, b.out_hw,
                        b.out_hw, b.se_channels)
        for b in block_shapes(variant, resolution) if b.index <= 1
    ]


def residual_shapes(variant: str = "b0", batch: int = 8, resolution: int | None = None):
    """The residual adds (stride 1, in == out channels), one per stage."""
    return [
        ActivationShape(f"{variant}.s{b.stage}.b{b.index}", batch, b.out_channels, b.out_hw,
                        b.out_hw, b.se_channels)
        for b in block_shapes(variant, resolution)
        if b.index == 1 and b.stride == 1 and b.in_channels == b.out_channels
    ]
