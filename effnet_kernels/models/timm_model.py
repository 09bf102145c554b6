"""timm's EfficientNet with its stem's and head's conv + BN + act as one eval pass each,
for convert().

timm's forward_features calls conv_stem and then bn1 (conv_head and then bn2), siblings
(models/stem_head.py), so neither module alone can fold the norm into the conv, and the
stem's output (B0 at 224: 32 x 112 x 112 per image, the widest early activation) is
written by the conv, read and written again by the norm. FusedStemEfficientNet overrides
forward_features: where the fused stem serves the call it computes

    act(bn1(conv_stem(x))) = act(conv(x, W * s) + (beta - mean * s))
                             s = gamma / sqrt(running_var + eps)

as one patch_conv_act (csrc/cpu/patch_conv.cpp: a direct conv with bias + act on each
output row in cache; the folded weights memoized, nn/eval_fold.py), then timm's blocks,
then the head the same way as one GEMM with the act as its epilogue (conv_bn_act's eval
route, the folded weight packed once) where that serves, else conv_head and bn2; every
other call is timm's own forward_features. B0 on AMD EPYC, 2 threads, the stem alone
after a 64 MiB write (as inside a model): batch 1 0.49-0.62 -> 0.23 ms, batch 8 2.9 ->
1.8-2.0 ms.

The class changes in place (to_fused_stem / from_fused_stem), as the norms' do: the same
model object, modules, Parameters, hooks and state_dict keys, still a timm EfficientNet;
revert() changes it back. Only a model of exactly timm's EfficientNet class whose
forward_features reads the modules this override calls (checked by name) is changed.

The fused passes serve eager eval calls recording no autograd graph, outside autocast,
on float32 channels_last CPU input, with the norm a FusedBatchNormAct2d in eval with
running statistics, a fusable act and no drop, neither module carrying forward hooks,
and the conv one the fused kernel takes: conv_stem a plain nn.Conv2d (or timm's
Conv2dSame) within patch_conv_act's patch size, conv_head a 1x1 GemmConv2d or nn.Conv2d.
"""

from __future__ import annotations

import torch
from timm.models.efficientnet import EfficientNet
from torch import Tensor, nn

from .._ext import ext_module
from ..nn.activations import act_name
from ..nn.block_layout import run_channels_last
from ..nn.block_structure import has_call_hooks
from ..nn.class_swap import swap_class
from ..nn.conv_bn_act import conv_bn_act, is_same_conv
from ..nn.eval_conv import patch_conv_serves
from ..nn.eval_fold import folded_conv_bn
from ..nn.gemm_conv import epilogue_gemm_serves, gemm_conv_eligible
from ..nn.gemm_conv2d import GemmConv2d
from ..ops.activations import act_code
from ..ops.eager import plain_eager, records_graph
from ..ops.geometry import conv_geometry
from .timm_norm import FusedBatchNormAct2d

# The attributes and globals timm 1.0's EfficientNet.forward_features reads; another
# timm whose forward_features reads others keeps its class.
_TIMM_FORWARD_FEATURES_NAMES = ("conv_stem", "bn1", "grad_checkpointing", "torch", "jit",
                                "is_scripting", "checkpoint_seq", "blocks", "conv_head",
                                "bn2")


# Switch for in-process A/B measurements and tests: the eval head conv + bn2 as one GEMM
# with the BN folded and the act as its epilogue (True) or conv_head then bn2 (False).
FUSED_HEAD = True


class FusedStemEfficientNet(EfficientNet):
    """timm's EfficientNet whose eval stem (and head) run as fused conv + BN + act passes."""

    def forward_features(self, x: Tensor) -> Tensor:
        # On CPU the whole trunk runs channels_last from the (3-channel) image on; the
        # feature map comes back in NCHW for NCHW input (nn/block_layout.py).
        return run_channels_last(self._trunk, x)

    def _trunk(self, x: Tensor) -> Tensor:
        stem = fused_stem(x, self.conv_stem, self.bn1)
        if stem is None:
            return super().forward_features(x)
        # No graph is recorded: grad checkpointing has nothing to save.
        x = self.blocks(stem)
        head = fused_head(x, self.conv_head, self.bn2)
        return self.bn2(self.conv_head(x)) if head is None else head


def _fusable_act(x: Tensor, conv: nn.Module, bn: nn.Module) -> str | None:
    """bn's act name when conv (an nn.Conv2d) + bn may run as one eval pass on x (an eager
    call recording no graph, outside autocast, on float32 channels_last CPU input; bn a
    FusedBatchNormAct2d in eval with running statistics, a fusable act and no drop; no
    forward hooks on either), else None."""
    if not (type(x) is Tensor and type(bn) is FusedBatchNormAct2d and not bn.training
            and bn.running_mean is not None and bn.running_var is not None
            and isinstance(bn.drop, nn.Identity) and x.dim() == 4 and x.numel() > 0
            and x.device.type == "cpu" and x.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last)
            and plain_eager(x) and not torch.is_autocast_enabled("cpu")):
        return None
    act = act_name(bn.act)
    if act is None or has_call_hooks(conv, bn):
        return None
    if records_graph(x, conv.weight, conv.bias, bn.weight, bn.bias):
        return None
    return act


def fused_stem(x: Tensor, conv: nn.Module, bn: nn.Module) -> Tensor | None:
    """act(bn(conv(x))) as one patch_conv_act, or None where it does not serve the call."""
    same = is_same_conv(conv)
    if not (type(conv) is nn.Conv2d or same):
        return None
    act = _fusable_act(x, conv, bn)
    if act is None:
        return None
    padding = (0, 0) if same else conv.padding
    if isinstance(padding, str) or not patch_conv_serves(x, conv.weight, conv.stride, padding,
                                                         conv.dilation, conv.groups):
        return None
    weight, bias = folded_conv_bn(conv, bn)
    geo = conv_geometry(x.shape[2], x.shape[3], conv.kernel_size[0], conv.stride[0],
                        "same" if same else padding[0])
    return ext_module().cpu.patch_conv_act(x, weight, bias, *geo, act_code(act))


def fused_head(x: Tensor, conv: nn.Module, bn: nn.Module) -> Tensor | None:
    """act(bn(conv(x))) for the 1x1 head conv as one GEMM with the BN folded into its
    (packed, memoized) weight and the act as its epilogue (conv_bn_act's eval route), or
    None where that does not serve the call."""
    if not FUSED_HEAD or type(conv) not in (nn.Conv2d, GemmConv2d):
        return None
    act = _fusable_act(x, conv, bn)
    if act is None or not epilogue_gemm_serves(x) \
            or not gemm_conv_eligible(x, conv.weight, conv.stride, conv.padding, conv.groups):
        return None
    return conv_bn_act(x, conv, bn, act)


def to_fused_stem(model: nn.Module) -> bool:
    """Make exactly a timm EfficientNet (with the forward_features this module knows) a
    FusedStemEfficientNet in place; False for any other module."""
    names = EfficientNet.forward_features.__code__.co_names
    return names == _TIMM_FORWARD_FEATURES_NAMES and swap_class(model, EfficientNet,
                                                                FusedStemEfficientNet)


def from_fused_stem(model: nn.Module) -> bool:
    """Undo to_fused_stem; False for any other module."""
    return swap_class(model, FusedStemEfficientNet, EfficientNet)
