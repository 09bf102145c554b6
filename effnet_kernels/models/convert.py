"""convert(model): swap the MBConv blocks of a timm or torchvision EfficientNet for fused
blocks, and its stem and head conv + BN + act for fused layers (models/stem_head.py), in
place; revert(model) undoes it.

A fused block holds the replaced block's own child modules under their original names,
so Parameter and buffer objects, state_dict keys and values are unchanged; only forward
differs. The replaced block is kept (outside the module tree) for revert. Every setting
(eps, momentum, padding incl. TF SAME, activations, drop-path rate) is read from the
modules themselves. Blocks that cannot be fused are left untouched and reported, with
the reason, in the returned ConvertReport and one `warnings.warn`.

Convert before wrapping in DistributedDataParallel (DDP keeps references to modules), and
before convert_sync_batchnorm (blocks whose norms are SyncBatchNorm already are left
unfused and reported).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..nn.activations import act_name
from ..nn.block_layout import run_channels_last
from ..nn.block_structure import (
    record_structure,
    share_hooks,
    structure_changed,
    sync_unfused_children,
    unfused_forward,
)
from ..nn.conv_bn_act import conv_bn_act
from ..nn.eval_plan import eval_block
from ..nn.mbconv import (
    DepthwiseSeparable,
    MBConv,
    add_residual,
    check_conv,
    drops_paths,
    dw_se_projection,
    read_se,
)
from .stem_head import fuse_stem_and_head, unfuse_swapped_classes


@dataclass
class ConvertReport:
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    # modules of the fused stem / head; a timm model's own name ("" at the root) where its
    # class changed (models/timm_model.py)
    stem_head: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} blocks and {len(self.stem_head)} stem/head "
                 f"modules, left {len(self.skipped)} unfused"]
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _read_cna(layer: nn.Module, what: str) -> str:
    """torchvision Conv2dNormActivation: (conv, bn[, act]) -> the fused act name."""
    if not isinstance(layer, nn.Sequential) or len(layer) not in (2, 3):
        raise ValueError(f"{what}: {type(layer).__name__} is not conv + norm (+ act)")
    check_conv(layer[0], f"{what}.0", depthwise=layer[0].groups > 1)
    if type(layer[1]) is not nn.BatchNorm2d:
        raise ValueError(f"{what}.1: {type(layer[1]).__name__} is not a plain BatchNorm2d")
    if len(layer) == 2:
        return "identity"
    name = act_name(layer[2])
    if name is None:
        raise ValueError(f"{what}.2: activation {type(layer[2]).__name__} cannot be fused")
    return name


class TorchvisionMBConv(nn.Module):
    """Fused forward for torchvision's MBConv; children `block` and `stochastic_depth` are
    the original objects, so keys stay `block.<i>.<j>...`."""

    def __init__(self, tv_block: nn.Module):
        super().__init__()
        what = type(tv_block).__name__
        layers = list(tv_block.block)
        if len(layers) not in (3, 4):
            raise ValueError(f"{what}: expected [expand,] depthwise, SE, project; got {len(layers)}")
        self.has_expand = len(layers) == 4
        dw, se, proj = layers[-3:]
        expand_act = _read_cna(layers[0], f"{what}.block.0") if self.has_expand else None
        if self.has_expand and layers[0][0].groups != 1:
            raise ValueError(f"{what}.block.0: the expand conv is grouped")
        if dw[0].groups == 1 and dw[0].in_channels > 1:
            raise ValueError(f"{what}: the spatial conv is not depthwise")
        dw_act = _read_cna(dw, f"{what}.block.dw")
        if _read_cna(proj, f"{what}.block.project") != "identity":
            raise ValueError(f"{what}: an activation after the projection is not supported")
        if not isinstance(getattr(se, "avgpool", None), nn.AdaptiveAvgPool2d) \
                or se.avgpool.output_size not in (1, (1, 1)):
            raise ValueError(f"{what}: SE without a global average pool")
        se_act = read_se(se, "fc1", "fc2", "activation", "scale_activation", f"{what}.se")[2]
        sd = tv_block.stochastic_depth
        if type(sd).__name__ != "StochasticDepth" or sd.mode != "row":
            raise ValueError(f"{what}: stochastic depth {sd} is not per-row")
        self.block = tv_block.block
        self.stochastic_depth = sd
        self.use_res_connect = tv_block.use_res_connect
        self.out_channels = tv_block.out_channels
        self.acts = (expand_act, dw_act, se_act)
        share_hooks(self, tv_block)
        object.__setattr__(self, "unfused", tv_block)
        self.train(tv_block.training)
        record_structure(self)

    def forward(self, x: Tensor) -> Tensor:
        if structure_changed(self):
            return unfused_forward(self, x)
        return run_channels_last(self._fused, x)

    def _fused(self, x: Tensor) -> Tensor:
        shortcut, layers = x, self.block
        expand = (layers[0][0], layers[0][1], self.acts[0]) if self.has_expand else None
        dw, se, proj = layers[-3], layers[-2], layers[-1]
        depthwise = (dw[0], dw[1], self.acts[1])
        se_parts = (se.fc1, se.fc2, self.acts[2])
        projection = (proj[0], proj[1], "identity")
        out = None if drops_paths(self, self.use_res_connect) else eval_block(
            self, x, expand, depthwise, se_parts, projection, self.use_res_connect)
        if out is not None:
            return out
        if expand is not None:
            x = conv_bn_act(x, *expand)
        x = dw_se_projection(x, depthwise, se_parts, projection)
        if self.use_res_connect:
            x = add_residual(self, x, shortcut)
        return x


def _fusers() -> tuple[dict[type, Callable], tuple[type, ...]]:
    """{exact block class: fused-block factory}, and block classes known to be unfusable."""
    fusers: dict[type, Callable] = {}
    unfusable: list[type] = []
    try:
        from timm.models import _efficientnet_blocks as tb
        fusers[tb.InvertedResidual] = MBConv.from_timm
        fusers[tb.DepthwiseSeparableConv] = DepthwiseSeparable.from_timm
        unfusable += [getattr(tb, n) for n in ("CondConvResidual", "EdgeResidual",
                                               "UniversalInvertedResidual", "ConvBnAct")
                      if hasattr(tb, n)]
    except ImportError:
        pass
    try:
        from torchvision.models import efficientnet as tv
        fusers[tv.MBConv] = TorchvisionMBConv
        unfusable.append(tv.FusedMBConv)
    except ImportError:
        pass
    return fusers, tuple(unfusable)


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def convert(model: nn.Module, *, warn: bool = True) -> ConvertReport:
    """Replace every fusable EfficientNet block of `model` in place; returns what was
    converted and what was left unfused (and why)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("convert() the model before wrapping it in DistributedDataParallel")
    fusers, unfusable = _fusers()
    report = ConvertReport()
    replacements = []
    for name, module in model.named_modules():
        fuse = fusers.get(type(module))
        if fuse is None:
            if isinstance(module, unfusable) or isinstance(module, tuple(fusers)):
                report.skipped[name] = f"{type(module).__name__} has no fused implementation"
            continue
        if not name:
            report.skipped[name] = "the model itself is a block; convert its parent"
            continue
        try:
            replacements.append((name, fuse(module)))
        except ValueError as err:
            report.skipped[name] = str(err)
    for name, fused in replacements:
        _set_child(model, name, fused)
        report.converted.append(name)
    report.stem_head, skipped = fuse_stem_and_head(model, _read_cna)
    report.skipped.update(skipped)
    if warn and report.skipped:
        warnings.warn(f"effnet_kernels.convert: {report}", stacklevel=2)
    return report


def revert(model: nn.Module) -> int:
    """Put back the original blocks and stem / head modules convert() replaced; returns
    how many modules were put back."""
    restored = [(n, m) for n, m in model.named_modules() if n and hasattr(m, "unfused")]
    for name, fused in restored:
        if hasattr(fused, "restore"):
            original = fused.restore()
        else:
            original = sync_unfused_children(fused)
            original.train(fused.training)
        _set_child(model, name, original)
    return len(restored) + unfuse_swapped_classes(model)
