"""EfficientNet's baseline (B0) architecture and its compound-scaling table.

Every variant is the baseline scaled in width (channels), depth (block repeats) and
resolution, with its own dropout rate (Tan & Le, 2019, table 1 and section 3.3).
Channel rounding and depth rounding follow timm, so shapes and state_dicts match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StageConfig:
    expand_ratio: int
    kernel: int
    stride: int
    out_channels: int
    repeats: int
    se_ratio: float = 0.25


@dataclass(frozen=True)
class Scaling:
    width: float
    depth: float
    resolution: int
    dropout: float


BASELINE: tuple[StageConfig, ...] = (
    StageConfig(1, 3, 1, 16, 1),
    StageConfig(6, 3, 2, 24, 2),
    StageConfig(6, 5, 2, 40, 2),
    StageConfig(6, 3, 2, 80, 3),
    StageConfig(6, 5, 1, 112, 3),
    StageConfig(6, 5, 2, 192, 4),
    StageConfig(6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
DROP_CONNECT_RATE = 0.2

SCALING: dict[str, Scaling] = {
    "b0": Scaling(1.0, 1.0, 224, 0.2),
    "b1": Scaling(1.0, 1.1, 240, 0.2),
    "b2": Scaling(1.1, 1.2, 260, 0.3),
    "b3": Scaling(1.2, 1.4, 300, 0.3),
    "b4": Scaling(1.4, 1.8, 380, 0.4),
    "b5": Scaling(1.6, 2.2, 456, 0.4),
    "b6": Scaling(1.8, 2.6, 528, 0.5),
    "b7": Scaling(2.0, 3.1, 600, 0.5),
    "b8": Scaling(2.2, 3.6, 672, 0.5),
    "l2": Scaling(4.3, 5.3, 800, 0.5),
}


def round_channels(channels: float, width: float, divisor: int = 8) -> int:
    """Scale channels by width, round to a multiple of divisor, never down by >10%."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def scale_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(repeats * depth))


@dataclass(frozen=True)
class BlockShape:
    """One MBConv block of a scaled network, at a given input resolution."""

    stage: int
    index: int
    in_channels: int
    mid_channels: int
    out_channels: int
    se_channels: int
    kernel: int
    stride: int
    in_hw: int
    out_hw: int


def block_shapes(variant: str, resolution: int | None = None) -> list[BlockShape]:
    """Every MBConv block of efficientnet_<variant>, with its spatial size."""
    scaling = SCALING[variant]
    hw = -(-(resolution or scaling.resolution) // 2)
    in_ch = round_channels(STEM_CHANNELS, scaling.width)
    blocks = []
    for stage_idx, stage in enumerate(BASELINE):
        out_ch = round_channels(stage.out_channels, scaling.width)
        for i in range(scale_repeats(stage.repeats, scaling.depth)):
            stride = stage.stride if i == 0 else 1
            out_hw = -(-hw // stride)
            blocks.append(BlockShape(
                stage_idx, i, in_ch, in_ch * stage.expand_ratio, out_ch,
                max(1, int(in_ch * stage.se_ratio)), stage.kernel, stride, hw, out_hw,
            ))
            in_ch, hw = out_ch, out_hw
    return blocks
