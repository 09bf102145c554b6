"""The stem and head conv + BatchNorm + act of timm and torchvision EfficientNets as one
fused layer (nn/conv_bn_act.py), for convert().

Unfused, each is three passes over a large activation: conv, BN, act (on B0 at 224 the
stem's 32 x 112 x 112 output). Fused (conv_bn_act): in eval one conv with the BN folded
into its weights and the act applied in the same pass (a oneDNN post-op for the 3x3 stem,
the GEMM epilogue for the 1x1 head); in training our conv + BN + act that saves only its
input.

torchvision: `features[0]` and `features[-1]` are Conv2dNormActivation Sequentials (conv,
bn, act). FusedConvNormActivation is the same Sequential, holding the same children under
the same names, with a fused forward.

timm: the conv and its BatchNormAct2d are siblings called one after the other by the
model's own forward (conv_stem then bn1, conv_head then bn2). The conv becomes
ConvThenNorm, a Conv2d holding the same Parameters whose forward is conv + BN + act; the
BatchNormAct2d becomes NormAppliedByConv, which holds the same Parameters and buffers
under the same names (state_dict unchanged) and passes its input through.
SyncBatchNorm: convert_sync_batchnorm first, then convert(); the norm modules made here
are not BatchNorm instances, so a later conversion leaves them local.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..nn.conv_bn_act import SameConv2d, conv_bn_act, is_same_conv
from ..nn.mbconv import check_conv, norms_replaced, read_bn, record_norms

_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_BN_SETTINGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")


class NormAppliedByConv(nn.Module):
    """The BatchNorm of a ConvThenNorm: its Parameters, buffers and settings, applied by
    the conv before it; its own forward passes the input through."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        for name in _BN_SETTINGS:
            setattr(self, name, getattr(bn, name))
        for name in _BN_STATE:
            if name in bn._parameters:
                self.register_parameter(name, bn._parameters[name])
            else:
                self.register_buffer(name, bn._buffers.get(name))
        object.__setattr__(self, "unfused", bn)
        self.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def restore(self) -> nn.Module:
        """The replaced BatchNorm, holding this module's current tensors."""
        bn = self.unfused
        for name in _BN_STATE:
            target = bn._parameters if name in bn._parameters else bn._buffers
            target[name] = getattr(self, name)
        bn.train(self.training)
        return bn

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum} (applied by the conv)"


class _ConvThenNormMixin:
    """forward = act(norm(conv(x))) with the sibling NormAppliedByConv `norm`."""

    def _adopt(self, conv: nn.Conv2d, norm: NormAppliedByConv, act: str) -> None:
        self.weight, self.bias = conv.weight, conv.bias
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "unfused", conv)
        self.act = act
        self.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_act(x, self, self.norm, self.act)

    def restore(self) -> nn.Module:
        conv = self.unfused
        conv.weight, conv.bias = self.weight, self.bias
        conv.train(self.training)
        return conv


class ConvThenNorm(_ConvThenNormMixin, nn.Conv2d):
    """A Conv2d that also applies the BatchNorm and act after it (timm stem / head)."""


class SameConvThenNorm(_ConvThenNormMixin, SameConv2d):
    """ConvThenNorm with TensorFlow SAME padding (timm's Conv2dSame)."""


def _conv_then_norm(conv: nn.Conv2d, norm: NormAppliedByConv, act: str) -> nn.Conv2d:
    cls = SameConvThenNorm if is_same_conv(conv) else ConvThenNorm
    fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, device="meta")
    fused._adopt(conv, norm, act)
    return fused


class FusedConvNormActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation (conv, bn[, act]) with one fused forward; the
    children are the original modules under their original names."""

    def __init__(self, layer: nn.Sequential, act: str):
        super().__init__(*layer)
        self.act = act
        object.__setattr__(self, "unfused", layer)
        self.train(layer.training)
        record_norms(self, ("1",))

    def forward(self, x: Tensor) -> Tensor:
        if norms_replaced(self):  # e.g. frozen after convert(): the Sequential's own forward
            return super().forward(x)
        return conv_bn_act(x, self[0], self[1], self.act)

    def restore(self) -> nn.Module:
        layer = self.unfused
        for i, child in enumerate(self):
            layer[i] = child
        layer.train(self.training)
        return layer


_FUSED = (ConvThenNorm, SameConvThenNorm, NormAppliedByConv, FusedConvNormActivation)


def _timm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    kind = type(model)
    if kind.__module__.startswith("timm.") and kind.__name__ in ("EfficientNet",
                                                                 "EfficientNetFeatures"):
        return [(c, b) for c, b in (("conv_stem", "bn1"), ("conv_head", "bn2"))
                if c in model._modules and b in model._modules]
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
        for conv_name, bn_name in _timm_pairs(module):
            conv, bn = module._modules[conv_name], module._modules[bn_name]
            if isinstance(conv, _FUSED):
                continue
            what = f"{dot}{conv_name} + {bn_name}"
            try:
                check_conv(conv, f"{dot}{conv_name}", depthwise=False)
                act = read_bn(bn, f"{dot}{bn_name}")
            except ValueError as err:
                skipped[what] = str(err)
                continue
            norm = NormAppliedByConv(bn)
            setattr(module, conv_name, _conv_then_norm(conv, norm, act))
            setattr(module, bn_name, norm)
            fused += [f"{dot}{conv_name}", f"{dot}{bn_name}"]
        for index in _torchvision_layers(module):
            layer = module.features[int(index)]
            if isinstance(layer, _FUSED):
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
