"""nn layers built on the fused ops."""

from .depthwise import DepthwiseConvBNAct
from .drop_connect import DropConnect
from .mbconv import DepthwiseSeparable, MBConv
from .squeeze_excite import SqueezeExcite

__all__ = ["DepthwiseConvBNAct", "DepthwiseSeparable", "DropConnect", "MBConv", "SqueezeExcite"]
