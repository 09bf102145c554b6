"""timm's BatchNormAct2d with the fused BN + act passes (nn/bn_act.py), for the norms of a
converted timm EfficientNet's stem and head (their convs stay timm's own).

convert() changes the class of the model's own BatchNormAct2d objects to
FusedBatchNormAct2d and revert() changes it back: the module stays the same object (its
Parameters, buffers, hooks and state_dict keys), and stays a BatchNormAct2d, so code that
finds norms by class (freezing them, convert_sync_batchnorm) treats it as timm's. Imports
timm: only convert() of a timm model loads this module.
"""

from __future__ import annotations

from timm.layers import BatchNormAct2d
from torch import Tensor, nn

from ..nn.activations import act_name
from ..nn.bn_act import bn_act
from ..nn.class_swap import swap_class


class FusedBatchNormAct2d(BatchNormAct2d):
    """BatchNormAct2d whose forward runs BN + act as fused passes where they serve the call
    (else timm's own forward)."""

    def forward(self, x: Tensor) -> Tensor:
        act = act_name(self.act)
        if act is not None and isinstance(self.drop, nn.Identity):
            out = bn_act(x, self, act)
            if out is not None:
                return out
        return super().forward(x)


def fuse_norm(bn: nn.Module) -> bool:
    """Make a BatchNormAct2d (exactly that class) a FusedBatchNormAct2d in place."""
    return swap_class(bn, BatchNormAct2d, FusedBatchNormAct2d)


def unfuse_norm(bn: nn.Module) -> bool:
    """Undo fuse_norm; False for any other module."""
    return swap_class(bn, FusedBatchNormAct2d, BatchNormAct2d)
