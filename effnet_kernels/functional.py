"""Functional API: one entry point per fused op (contracts in design.md §2)."""

from .ops.depthwise import depthwise_conv_bn_act
from .ops.drop_connect import drop_connect_add
from .ops.squeeze_excite import squeeze_excite

__all__ = ["depthwise_conv_bn_act", "drop_connect_add", "squeeze_excite"]
