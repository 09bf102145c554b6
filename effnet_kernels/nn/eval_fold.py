"""Eval-mode conv + BatchNorm folding, memoized while its sources are unchanged.

In eval, bn(conv(x, W, b)) == conv(x, W * s[o], (b - mean) * s + beta) with
s = gamma / sqrt(running_var + eps) per output channel o. Folding on every call costs about
ten small ops per conv (one of them over the whole weight): on a GPU, launches that
outnumber the conv itself; on CPU, Python dispatch. The folded (weight, bias) is kept per
BatchNorm module and reused while every source tensor is the same object with the same
storage and the same version counter. In-place writes (optimizer steps, load_state_dict,
`.data` swaps by `module.to(...)`) change one of these, so the fold is recomputed on the
next call. PyTorch's own BatchNorm updates the running statistics inside its kernel and
bumps no version of theirs, but it counts the batch in `num_batches_tracked` with an
in-place add: the memo watches that counter too, so a training forward through any route
(the original module's forward, a hooked or autocast call, a reverted model) refolds.
In-place writes through `.data` (`p.data.mul_(...)`) bump no version counter: after
those, call effnet_kernels.clear_eval_cache().

Only calls that record no autograd graph through the sources use the memo; calls that
differentiate w.r.t. the weights, and torch.compile tracing, fold inline.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from ..ops.bn_math import bn_affine

# BatchNorm module -> (stamp, source tensors, (weight, bias)); entries go with the module.
_FOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the conv with the eval BatchNorm after it folded in."""
    _, scale, shift = bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    weight = conv.weight
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return weight * scale.view(-1, 1, 1, 1).to(weight.dtype), shift.to(weight.dtype)


def folded_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """fold_conv_bn(conv, bn), from the memo when its sources have not changed."""
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
               getattr(bn, "num_batches_tracked", None))
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in sources)):
        return fold_conv_bn(conv, bn)
    try:
        stamp = (bn.eps,) + tuple(None if t is None else (t._version, t.data_ptr(), t.dtype)
                                  for t in sources)
    except RuntimeError:  # inference tensors carry no version counter: fold every call
        return fold_conv_bn(conv, bn)
    entry = _FOLDS.get(bn)
    if entry is not None and entry[0] == stamp and all(a is b for a, b in zip(entry[1], sources)):
        return entry[2]
    # Ordinary tensors even under inference_mode, so a later call that records a graph
    # through x (frozen weights) may save them for backward.
    with torch.inference_mode(False), torch.no_grad():
        folded = fold_conv_bn(conv, bn)
    _FOLDS[bn] = (stamp, sources, folded)
    return folded


def clear_folds() -> None:
    """Forget every memoized fold (see effnet_kernels.clear_eval_cache)."""
    _FOLDS.clear()
