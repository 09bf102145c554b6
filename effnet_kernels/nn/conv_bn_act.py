"""conv + BatchNorm + activation with BatchNorm2d's exact bookkeeping, for the 1x1 expand
and projection convs of the fused blocks (and the stem / head of our EfficientNet), and the
module-level call of the fused depthwise op (`dw_bn_act`).

  training  nn/pointwise.py: PyTorch's conv (a GEMM on channels_last CPU tensors), then
            the fused BN + act passes; saves the conv input only. Traced CPU calls
            (torch.compile, torch.export) take the same passes as one custom op
            (nn/pointwise_op.py); other traced calls (GPU, autocast, the ONNX
            exporter) take F.conv2d + F.batch_norm + act
  eval      BN folded into the conv weights (memoized, nn/eval_fold.py); on CPU the conv
            and act in one pass (nn/eval_conv.py: a float32 1x1 conv as a tiled GEMM
            with the act as its epilogue, other convs as one oneDNN conv with the act as
            a post-op), under torch.compile / export as one custom op
Also TensorFlow SAME padding (timm's Conv2dSame semantics) for the tf_ variants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.activations import act_code
from ..ops.depthwise import depthwise_conv_bn_act
from ..ops.eager import plain_eager, traced_cpu_call
from .activations import ACT_FUNCTIONS
from .batchnorm import bn_call_args, sync_group
from .eval_conv import conv_act_eval, eager_eval_serves, eval_conv_act, traced_eval_serves
from .eval_fold import folded_conv_bn
from .pointwise import conv_bn_act_train
from .pointwise_op import conv_bn_act_train_traced

_RECOMPUTE_DTYPES = (torch.float32, torch.float64)
# timm's dynamic TF-SAME convs (class names, so timm stays an optional dependency).
_TIMM_SAME_CONVS = ("Conv2dSame", "Conv2dSameExport")


def same_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TensorFlow SAME padding: total pad max((ceil(i/s)-1)*s + k - i, 0), extra on bottom/right."""
    h, w = x.shape[-2:]
    pad_h = max((-(-h // stride) - 1) * stride + kernel - h, 0)
    pad_w = max((-(-w // stride) - 1) * stride + kernel - w, 0)
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return x


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TensorFlow SAME padding computed from the input size (timm's
    Conv2dSame semantics; the state_dict is a plain Conv2d's)."""

    def __init__(self, *args, **kwargs):
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(same_pad(x, self.kernel_size[0], self.stride[0]))


def is_same_conv(conv: nn.Module) -> bool:
    return isinstance(conv, SameConv2d) or type(conv).__name__ in _TIMM_SAME_CONVS


def _values_per_channel(x: Tensor, conv: nn.Conv2d, padding: int) -> int:
    k, s = conv.kernel_size[0], conv.stride[0]
    return x.shape[0] * ((x.shape[2] + 2 * padding - k) // s + 1) * ((x.shape[3] + 2 * padding - k) // s + 1)


def conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str) -> Tensor:
    """act(bn(conv(x))) with BatchNorm2d's exact bookkeeping; BN folded into the conv in eval."""
    if bn.training and sync_group(bn) is not None:
        return ACT_FUNCTIONS[act](bn(conv(x)))  # SyncBatchNorm: torch's module syncs the statistics
    args = bn_call_args(bn)
    if args["training"]:
        weight, bias = conv.weight, conv.bias
    else:
        weight, bias = folded_conv_bn(conv, bn)
    if is_same_conv(conv):
        x, padding = same_pad(x, conv.kernel_size[0], conv.stride[0]), (0, 0)
    else:
        padding = conv.padding
    if args["training"] and bias is None and x.dtype in _RECOMPUTE_DTYPES \
            and conv.dilation == (1, 1) and len(set(conv.stride)) == len(set(padding)) == 1 \
            and _values_per_channel(x, conv, padding[0]) > 1:
        train = dict(stride=conv.stride[0], padding=padding[0], groups=conv.groups,
                     momentum=args["momentum"], eps=args["eps"])
        if plain_eager(x, weight):
            # Saves only x for backward (nn/pointwise.py); recomputes the conv there.
            return conv_bn_act_train(x, weight, bn.weight, bn.bias, args["running_mean"],
                                     args["running_var"], act=act, **train)
        if _traced_op_serves(x):
            # torch.compile / export: the same passes as one custom op (nn/pointwise_op.py).
            return conv_bn_act_train_traced(x, weight, bn.weight, bn.bias,
                                            args["running_mean"], args["running_var"],
                                            act=act_code(act), **train)
    if not args["training"]:
        geo = (conv.stride, padding, conv.dilation, conv.groups)
        if eager_eval_serves(x, weight, bias):
            return eval_conv_act(x, weight, bias, *geo, act, packs_for=bn)  # bn: its fold's memo key
        if traced_eval_serves(x, weight, bias):  # torch.compile / export: one custom op
            return conv_act_eval(x, weight, bias, *map(list, geo[:3]), conv.groups, act)
    y = F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
    if args["training"]:
        y = F.batch_norm(y, args["running_mean"], args["running_var"], bn.weight, bn.bias,
                         True, args["momentum"], args["eps"])
    return ACT_FUNCTIONS[act](y)


# Switch for in-process A/B measurements and tests: traced training calls take the custom
# op of nn/pointwise_op.py (True) or F.conv2d + F.batch_norm + act (False).
TRACED_OP = True


def _traced_op_serves(x: Tensor) -> bool:
    """Whether a traced training call takes the custom op: a traced CPU call (where the op
    was measured faster than inductor's conv + BN + act; on a GPU inductor keeps them)."""
    return TRACED_OP and traced_cpu_call(x)


def dw_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str,
              return_pool_sums: bool = False):
    """The fused depthwise conv + BN + act of a depthwise Conv2d (SAME-padded or not) and
    its BatchNorm2d, with BatchNorm2d's bookkeeping; (out, pool sums) with return_pool_sums."""
    padding = "same" if is_same_conv(conv) else conv.padding[0]
    return depthwise_conv_bn_act(x, conv.weight, bn.weight, bn.bias, stride=conv.stride[0],
                                 padding=padding, act=act, return_pool_sums=return_pool_sums,
                                 **bn_call_args(bn))
