"""Fused blocks run on channels_last activations on CPU, whatever layout the caller uses.

The CPU kernels work on channels_last rows (a pixel's channels contiguous). Handed NCHW
activations, every fused op converted them to channels_last and back around each of its
passes, over the block's widest (expanded) tensors. A converted timm EfficientNet-B0 in
its default NCHW layout then trained slower than eager timm (473 against 444 ms per step
at batch 8 x 224², 2 threads; 206 ms with channels_last input).

So a fused block called on a CPU tensor that is not channels_last runs its fused forward
on a channels_last copy and returns the result in NCHW (contiguous), the layout the
original block gives for NCHW input: one copy of the block's narrow input and one of its
output per call, and none in backward, where the gradients pass through the copies in
whatever layout they arrive. Whole models do the same once: our own EfficientNets and a
converted timm EfficientNet copy the (3-channel) image and return the feature maps in
NCHW, so their blocks see channels_last and copy nothing (the step above: 203 ms). The
copies come from the extension's output cache, so the C allocator maps no fresh pages
for them. Only plain eager calls convert: a traced call (torch.compile, export,
jit.trace) keeps the graph it had.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..ops.eager import plain_eager
from ..ops.geometry import copy_in_format


def _needs_channels_last(x: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and x.numel() > 0
            and not x.is_contiguous(memory_format=torch.channels_last) and plain_eager(x))


def run_channels_last(forward: Callable[[Tensor], Tensor | list[Tensor]],
                      x: Tensor) -> Tensor | list[Tensor]:
    """forward(x); for a CPU x not in channels_last, run on a channels_last copy of x with
    the result (a tensor, or a list of feature maps) returned in NCHW."""
    if not _needs_channels_last(x):
        return forward(x)
    out = forward(copy_in_format(x, torch.channels_last))
    if isinstance(out, list):
        return [copy_in_format(t, torch.contiguous_format) for t in out]
    return copy_in_format(out, torch.contiguous_format)
