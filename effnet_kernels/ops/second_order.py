"""Second derivatives: the fused ops' backward ops are first-order only.

A backward op (dw_bn_act_bwd, se_bwd) gets an autograd formula that raises, so that
differentiating a gradient taken with create_graph=True (gradient penalties, MAML,
double backward) fails with a message that names the op, instead of PyTorch's generic
"no autograd formula was registered". First-order gradients under create_graph=True
are unaffected. drop_connect_add is linear in its inputs and supports double backward.
"""

from __future__ import annotations


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
