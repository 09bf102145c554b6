"""EfficientNet B0-B8 and L2 on the fused blocks, state_dict-compatible with timm.

Built from models/config.py by compound scaling: channels by width (rounded like timm),
block repeats by depth, default resolution and dropout from the scaling table, and the
drop-connect (drop-path) rate ramped linearly with the global block index, rate * i / N,
as timm does. Module names are timm's (conv_stem, bn1, blocks.i.j.*, conv_head, bn2,
global_pool, classifier), so `load_state_dict(timm_model.state_dict(), strict=True)` works.

`tf_same=True` gives timm's `tf_` variants: TensorFlow SAME padding on every conv (stem
included) and BN eps 1e-3. timm 1.0.31 keeps PyTorch's BN momentum 0.1 for the `tf_`
models (it sets only bn_eps and pad_type), and so do we.

Torchvision's positional keys (`features.1.0.block.1.0.weight`) load through
`load_torchvision_state_dict`. `EfficientNetFeatures` is the trunk alone (stem and blocks)
returning feature maps, like timm's `features_only=True` models, with their state_dict keys.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.activations import ACT_FUNCTIONS
from ..nn.block_layout import run_channels_last
from ..nn.block_structure import has_call_hooks
from ..nn.conv_bn_act import SameConv2d, conv_bn_act
from ..nn.mbconv import DepthwiseSeparable, MBConv
from .config import (
    BASELINE,
    DROP_CONNECT_RATE,
    HEAD_CHANNELS,
    SCALING,
    STEM_CHANNELS,
    block_shapes,
    round_channels,
)

TF_BN_EPS = 1e-3


def _conv_norm_act(x: Tensor, conv: nn.Module, norm: nn.Module, act: str) -> Tensor:
    """The fused conv + BN + act; a norm that is no BatchNorm (e.g. a FrozenBatchNorm2d
    swapped in to freeze the model), or a conv or norm carrying call hooks, runs as its
    own modules."""
    if type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm) and not has_call_hooks(conv, norm):
        return conv_bn_act(x, conv, norm, act)
    return ACT_FUNCTIONS[act](norm(conv(x)))


def init_weights(module: nn.Module) -> None:
    """Random init in the style of the TF reference (He-normal convs over fan-out, uniform
    linear layers), over module.modules() in order; no pretrained weights are ever fetched."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.weight.shape[0])
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


class _Trunk(nn.Module):
    """The stem (conv_stem, bn1) and the stages of blocks of efficientnet_<variant>, with
    timm's attribute names; EfficientNet adds the head, EfficientNetFeatures the feature
    taps. Not initialized: its owner calls init_weights."""

    def __init__(self, variant: str, in_chans: int, tf_same: bool,
                 drop_path_rate: float | None, eps: float, bn_momentum: float | None,
                 act: str):
        super().__init__()
        scaling = SCALING[variant]
        dpr = DROP_CONNECT_RATE if drop_path_rate is None else drop_path_rate
        stem = round_channels(STEM_CHANNELS, scaling.width)
        if tf_same:
            self.conv_stem = SameConv2d(in_chans, stem, 3, 2, bias=False)
        else:
            self.conv_stem = nn.Conv2d(in_chans, stem, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem, eps=eps, momentum=bn_momentum)

        shapes = block_shapes(variant)
        stages: list[list[nn.Module]] = []
        for idx, b in enumerate(shapes):
            if b.index == 0:
                stages.append([])
            common = dict(kernel=b.kernel, stride=b.stride, se_channels=b.se_channels, act=act,
                          drop_path_rate=dpr * idx / len(shapes), bn_eps=eps,
                          bn_momentum=bn_momentum, pad_same=tf_same)
            expand = BASELINE[b.stage].expand_ratio
            if expand == 1:
                block = DepthwiseSeparable(b.in_channels, b.out_channels, **common)
            else:
                block = MBConv(b.in_channels, b.out_channels, exp_ratio=expand, **common)
            stages[-1].append(block)
        self.blocks = nn.Sequential(*(nn.Sequential(*s) for s in stages))
        self.out_channels = shapes[-1].out_channels


def _bn_eps(bn_eps: float | None, tf_same: bool) -> float:
    return bn_eps if bn_eps is not None else (TF_BN_EPS if tf_same else 1e-5)


class EfficientNet(nn.Module):
    def __init__(self, variant: str = "b0", num_classes: int = 1000, in_chans: int = 3, *,
                 tf_same: bool = False, drop_rate: float | None = None,
                 drop_path_rate: float | None = None, bn_eps: float | None = None,
                 bn_momentum: float | None = 0.1, act: str = "silu"):
        super().__init__()
        scaling = SCALING[variant]
        eps = _bn_eps(bn_eps, tf_same)
        self.variant, self.act = variant, act
        self.drop_rate = scaling.dropout if drop_rate is None else drop_rate
        self.resolution = scaling.resolution
        trunk = _Trunk(variant, in_chans, tf_same, drop_path_rate, eps, bn_momentum, act)
        self.conv_stem, self.bn1, self.blocks = trunk.conv_stem, trunk.bn1, trunk.blocks

        self.num_features = round_channels(HEAD_CHANNELS, scaling.width)
        self.conv_head = nn.Conv2d(trunk.out_channels, self.num_features, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(self.num_features, eps=eps, momentum=bn_momentum)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.num_classes = num_classes
        self.default_cfg = {
            "input_size": (in_chans, scaling.resolution, scaling.resolution),
            "num_classes": num_classes, "crop_pct": 0.875, "interpolation": "bicubic",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        }
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init in the style of the TF reference (init_weights)."""
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        # On CPU the trunk runs channels_last from the image on (nn/block_layout.py).
        return run_channels_last(self._trunk, x)

    def _trunk(self, x: Tensor) -> Tensor:
        x = _conv_norm_act(x, self.conv_stem, self.bn1, self.act)
        x = self.blocks(x)
        return _conv_norm_act(x, self.conv_head, self.bn2, self.act)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x).flatten(1)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def feature_locations(variant: str) -> list[dict]:
    """Where a features-only model takes its maps: the end of every stage followed by a
    stride-2 stage, and of the last stage (timm's "bottleneck" locations), as
    {"num_chs", "reduction", "module"} dicts in timm's feature_info format."""
    shapes = block_shapes(variant)
    stages = sorted({b.stage for b in shapes})
    first = {s: next(b for b in shapes if b.stage == s) for s in stages}
    last = {s: [b for b in shapes if b.stage == s][-1] for s in stages}
    reduction, found = 2, []  # the stem has stride 2
    for i, s in enumerate(stages):
        reduction *= first[s].stride
        if i == len(stages) - 1 or first[stages[i + 1]].stride == 2:
            found.append({"num_chs": last[s].out_channels, "reduction": reduction,
                          "module": f"blocks.{i}"})
    return found


class EfficientNetFeatures(nn.Module):
    """The stem and blocks of efficientnet_<variant> (no head), returning the feature maps
    at `out_indices` of `feature_locations(variant)` (strides 2, 4, 8, 16, 32), in that
    order. Like timm's `features_only=True` models every block runs whatever out_indices
    selects, and the state_dict keys are theirs (conv_stem, bn1, blocks.i.j.*)."""

    def __init__(self, variant: str = "b0", in_chans: int = 3, *,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3, 4), tf_same: bool = False,
                 drop_path_rate: float | None = None, bn_eps: float | None = None,
                 bn_momentum: float | None = 0.1, act: str = "silu"):
        super().__init__()
        locations = feature_locations(variant)
        out_indices = tuple(out_indices)
        if not out_indices or len(set(out_indices)) != len(out_indices) or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(locations)
                for i in out_indices):
            raise ValueError(f"out_indices must be distinct ints in [0, {len(locations)}), "
                             f"got {out_indices!r}")
        trunk = _Trunk(variant, in_chans, tf_same, drop_path_rate, _bn_eps(bn_eps, tf_same),
                       bn_momentum, act)
        self.variant, self.act, self.resolution = variant, act, SCALING[variant].resolution
        self.conv_stem, self.bn1, self.blocks = trunk.conv_stem, trunk.bn1, trunk.blocks
        self.out_indices = out_indices
        self.feature_info = [locations[i] for i in out_indices]
        self._out_stages = {int(f["module"].split(".")[1]) for f in self.feature_info}
        init_weights(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        return run_channels_last(self._features, x)

    def _features(self, x: Tensor) -> list[Tensor]:
        x = _conv_norm_act(x, self.conv_stem, self.bn1, self.act)
        features = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in self._out_stages:
                features.append(x)
        return features


# Torchvision's EfficientNet: features.0 = stem (conv, bn), features.1..7 = stages with
# each block's layers in `block` (expand?, depthwise, SE with fc1/fc2, project),
# features.8 = head (conv, bn), classifier.1 = Linear.
_TV_MBCONV = {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1",
              "se.conv_reduce": "2.fc1", "se.conv_expand": "2.fc2", "conv_pwl": "3.0", "bn3": "3.1"}
_TV_DS = {"conv_dw": "0.0", "bn1": "0.1", "se.conv_reduce": "1.fc1", "se.conv_expand": "1.fc2",
          "conv_pw": "2.0", "bn2": "2.1"}


def torchvision_key_map(model: EfficientNet) -> dict[str, str]:
    """{our state_dict key: torchvision's key} for every entry of model.state_dict()."""
    head = len(model.blocks) + 1
    top = {"conv_stem": "features.0.0", "bn1": "features.0.1",
           "conv_head": f"features.{head}.0", "bn2": f"features.{head}.1",
           "classifier": "classifier.1"}
    mapping = {}
    for key in model.state_dict():
        module, leaf = key.rsplit(".", 1)
        if module in top:
            mapping[key] = f"{top[module]}.{leaf}"
            continue
        _, stage, index, rest = module.split(".", 3)
        block = model.blocks[int(stage)][int(index)]
        table = _TV_DS if isinstance(block, DepthwiseSeparable) else _TV_MBCONV
        mapping[key] = f"features.{int(stage) + 1}.{index}.block.{table[rest]}.{leaf}"
    return mapping


def load_torchvision_state_dict(model: EfficientNet, tv_state_dict: dict) -> None:
    """Load a torchvision efficientnet_bX state_dict (keys and values only: torchvision's
    B5-B7 use BN eps 1e-3 / momentum 0.01, so build those with bn_eps=1e-3,
    bn_momentum=0.01 to match its numerics)."""
    mapping = torchvision_key_map(model)
    missing = sorted(set(mapping.values()) - set(tv_state_dict))
    unexpected = sorted(set(tv_state_dict) - set(mapping.values()))
    if missing or unexpected:
        raise KeyError(f"torchvision state_dict does not match efficientnet_{model.variant}: "
                       f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict({ours: tv_state_dict[tv] for ours, tv in mapping.items()}, strict=True)
