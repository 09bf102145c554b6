"""The stem and head conv + BatchNorm + act of timm and torchvision EfficientNets on the
fused kernels, for convert().

Unfused, each is three passes over a large activation: conv, BN, act (on B0 at 224 the
stem's 32 x 112 x 112 output).

torchvision: `features[0]` and `features[-1]` are Conv2dNormActivation Sequentials (conv,
bn, act). FusedConvNormActivation is the same Sequential, holding the same children under
the same names, with a fused forward (conv_bn_act, nn/conv_bn_act.py): in eval one conv
with the BN folded into its weights and the act applied in the same pass (a oneDNN post-op
for the 3x3 stem, the GEMM epilogue for the 1x1 head); in training our conv + BN + act
that saves only its input. A norm swapped after convert() (frozen, say) makes it run the
Sequential's own forward.

timm: the conv and its BatchNormAct2d are siblings called one after the other by the
model's own forward (conv_stem then bn1, conv_head then bn2), so the conv stays a conv
of its own and the norm's class becomes FusedBatchNormAct2d (models/timm_norm.py): BN +
act as fused passes (nn/bn_act.py), the same object still a BatchNormAct2d for code that
finds norms by class. (Fusing the conv too would make the conv apply the norm its
sibling no longer applies, which breaks as soon as that sibling is replaced or frozen by
class.) The model's class becomes FusedStemEfficientNet (models/timm_model.py), whose
forward_features runs conv_stem + bn1 as one eval pass where both are still what it
fuses. The 1x1 head conv's class becomes GemmConv2d (nn/gemm_conv2d.py), still an
nn.Conv2d, whose CPU calls run as GEMMs instead of oneDNN's slower 1x1 conv.

Both: the classifier's nn.Linear (timm's `classifier`, the Linear in torchvision's
`classifier` Sequential) becomes GemmLinear (nn/gemm_linear.py), still an nn.Linear, whose
eval CPU calls run on the packed GEMM.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..nn.block_structure import (
    record_structure,
    share_hooks,
    structure_changed,
    sync_unfused_children,
)
from ..nn.conv_bn_act import conv_bn_act
from ..nn.gemm_conv2d import from_gemm_conv, to_gemm_conv
from ..nn.gemm_linear import from_gemm_linear, to_gemm_linear
from ..nn.mbconv import read_bn


class FusedConvNormActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation (conv, bn[, act]) with one fused forward; the
    children are the original modules under their original names."""

    def __init__(self, layer: nn.Sequential, act: str):
        super().__init__(*layer)
        self.act = act
        share_hooks(self, layer)
        object.__setattr__(self, "unfused", layer)
        self.train(layer.training)
        record_structure(self)

    def forward(self, x: Tensor) -> Tensor:
        if structure_changed(self):  # e.g. frozen after convert(): the Sequential's own forward
            return super().forward(x)
        return conv_bn_act(x, self[0], self[1], self.act)

    def restore(self) -> nn.Module:
        layer = sync_unfused_children(self)
        layer.train(self.training)
        return layer


def _is_timm_efficientnet(model: nn.Module) -> bool:
    """Whether model is a timm EfficientNet (or EfficientNetFeatures), as convert() may
    have made it (FusedStemEfficientNet)."""
    kind = type(model)
    if kind.__name__ == "FusedStemEfficientNet":
        kind = kind.__base__
    return kind.__module__.startswith("timm.") and kind.__name__ in ("EfficientNet",
                                                                     "EfficientNetFeatures")


def _timm_norms(model: nn.Module) -> list[str]:
    if not _is_timm_efficientnet(model):
        return []
    return [b for b in ("bn1", "bn2") if b in model._modules]


def unfuse_swapped_classes(model: nn.Module) -> int:
    """Give every FusedStemEfficientNet, FusedBatchNormAct2d, GemmConv2d and GemmLinear in
    `model` back its class; returns how many."""
    undone = 0
    for module in model.modules():
        if type(module).__name__ == "FusedBatchNormAct2d":
            from .timm_norm import unfuse_norm  # imports timm: only when there is one
            undone += unfuse_norm(module)
        elif type(module).__name__ == "FusedStemEfficientNet":
            from .timm_model import from_fused_stem
            undone += from_fused_stem(module)
        else:
            undone += from_gemm_conv(module) or from_gemm_linear(module)
    return undone


def _classifier_linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of a timm or torchvision EfficientNet's classifier layers that may
    be its nn.Linear: timm's `classifier`, the children of torchvision's `classifier`
    Sequential."""
    head = module._modules.get("classifier")
    if _is_timm_efficientnet(module) and head is not None:
        return [("classifier", head)]
    if _torchvision_layers(module) and isinstance(head, nn.Sequential):
        return [(f"classifier.{i}", layer) for i, layer in head._modules.items()]
    return []


def _torchvision_layers(model: nn.Module) -> list[str]:
    kind = type(model)
    features = model._modules.get("features")
    if kind.__module__ != "torchvision.models.efficientnet" or kind.__name__ != "EfficientNet" \
            or not isinstance(features, nn.Sequential) or len(features) < 2:
        return []
    return ["0", str(len(features) - 1)]


def fuse_stem_and_head(model: nn.Module, read_cna) -> tuple[list[str], dict[str, str]]:
    """Fuse the stem and head conv + BN + act of every timm / torchvision EfficientNet in
    `model` in place; returns (fused module names, {name: why not fused})."""
    fused, skipped = [], {}
    for prefix, module in list(model.named_modules()):
        dot = f"{prefix}." if prefix else ""
        names = _timm_norms(module)
        if names:
            from .timm_norm import fuse_norm
        for bn_name in names:
            bn, what = module._modules[bn_name], f"{dot}{bn_name}"
            if type(bn).__name__ == "FusedBatchNormAct2d":
                continue
            try:
                read_bn(bn, what)
            except ValueError as err:
                skipped[what] = str(err)
                continue
            if fuse_norm(bn):
                fused.append(what)
            else:
                skipped[what] = f"{type(bn).__name__} is not timm's BatchNormAct2d"
        if names and type(module._modules.get("bn1")).__name__ == "FusedBatchNormAct2d":
            from .timm_model import to_fused_stem
            if to_fused_stem(module):
                fused.append(prefix)  # the model itself: its class changed
        head = module._modules.get("conv_head") if _is_timm_efficientnet(module) else None
        if head is not None and to_gemm_conv(head):
            fused.append(f"{dot}conv_head")
        fused += [f"{dot}{name}" for name, layer in _classifier_linears(module)
                  if to_gemm_linear(layer)]
        for index in _torchvision_layers(module):
            layer = module.features[int(index)]
            if isinstance(layer, FusedConvNormActivation):
                continue
            name = f"{dot}features.{index}"
            try:
                act = read_cna(layer, name)
            except ValueError as err:
                skipped[name] = str(err)
                continue
            module.features[int(index)] = FusedConvNormActivation(layer, act)
            fused.append(name)
    return fused, skipped
