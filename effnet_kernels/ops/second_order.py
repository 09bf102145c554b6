"""Derivatives beyond reverse-mode first order: the fused ops do not have them.

A backward op (dw_bn_act_bwd, se_bwd) gets an autograd formula that raises, so that
differentiating a gradient taken with create_graph=True (gradient penalties, MAML,
double backward) fails with a message that names the op, instead of PyTorch's generic
"no autograd formula was registered". First-order gradients under create_graph=True
are unaffected. Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) would
otherwise give zero or missing tangents without an error: the ops' entries call
reject_forward_ad. drop_connect_add is linear in its inputs and supports double
backward.
"""

from __future__ import annotations

import torch.autograd.forward_ad as forward_ad
from torch import Tensor


def reject_forward_ad(public_name: str, *tensors) -> None:
    """Raise if a forward-mode AD level is active and some input carries a tangent (one
    integer test per call otherwise)."""
    if forward_ad._current_level < 0:
        return
    if any(isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None
           for t in tensors):
        raise NotImplementedError(
            f"effnet_kernels: {public_name} has no forward-mode derivative (jvp); use "
            f"effnet_kernels.ops.reference.{public_name}, the plain-PyTorch reference, under "
            "forward-mode AD")


def first_order_only(backward_op, public_name: str) -> None:
    """Register on `backward_op` (a torch.library custom op) an autograd formula that
    raises when its outputs are differentiated."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"effnet_kernels: {public_name} has no second derivative (double backward); "
            f"compute second-order terms with effnet_kernels.ops.reference.{public_name}, "
            "the plain-PyTorch reference, instead")

    backward_op.register_autograd(backward, setup_context=setup_context)
