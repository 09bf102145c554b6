"""BatchNorm2d's own forward bookkeeping, for fused layers that call a functional op."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn


def bn_call_args(bn: nn.BatchNorm2d) -> dict:
    """The (training, momentum, running stats) a BatchNorm2d forward would use now,
    incrementing num_batches_tracked exactly as nn.BatchNorm2d does."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    group = sync_group(bn) if use_batch_stats else None
    return {
        "process_group": group,
        "running_mean": bn.running_mean if track else None,
        "running_var": bn.running_var if track else None,
        "training": use_batch_stats,
        "momentum": momentum,
        "eps": bn.eps,
    }


def sync_group(bn: nn.Module):
    """The process group a SyncBatchNorm synchronizes over now, or None (no sync)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not dist.is_available() or not dist.is_initialized():
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (same Parameter and buffer objects); the fused layers then
    synchronize their batch statistics over `process_group` in training. Models holding
    timm's BatchNormAct2d (norm + act in one module) go through timm's conversion, which
    keeps the act in a SyncBatchNormAct: torch's own would turn them into a plain
    SyncBatchNorm and drop it."""
    if any(_is_timm_norm_act(m) for m in model.modules()):
        from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm

        return timm_convert_sync_batchnorm(model, process_group)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)


def _is_timm_norm_act(module: nn.Module) -> bool:
    return any(k.__name__ == "BatchNormAct2d" and k.__module__.startswith("timm.")
               for k in type(module).__mro__)


def is_plain_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm2d (or a subclass that adds nothing to its forward) the kernels can fuse."""
    return isinstance(module, nn.BatchNorm2d) and not isinstance(module, nn.SyncBatchNorm)

