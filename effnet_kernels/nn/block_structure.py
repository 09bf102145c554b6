"""What a fused block must watch in its own module tree: the fused forward reads a block's
children as parameters and never calls them, so anything that would change what calling
them computes makes the block run its original forward instead (structure_changed), and
a fused block shares its original's hook registries (share_hooks). Used by the timm and
torchvision blocks (nn/mbconv.py, models/convert.py) and the fused stem / head
(models/stem_head.py).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

# The hook registries of an nn.Module (forward, backward and state_dict hooks), and the
# flag torch keeps beside them. A fused block shares its original's registries (the same
# dict objects), so hooks registered on either one, before or after convert() or
# revert(), fire on whichever is in the model, and their handles still remove them.
_HOOK_DICTS = tuple(k for k, v in vars(nn.Module()).items() if "hook" in k and isinstance(v, dict))
_HOOK_FLAGS = ("_is_full_backward_hook",)


def share_hooks(block: nn.Module, original: nn.Module) -> None:
    """Make `block` use `original`'s hook registries (see _HOOK_DICTS)."""
    for name in _HOOK_DICTS + _HOOK_FLAGS:
        object.__setattr__(block, name, getattr(original, name))


def record_structure(block: nn.Module) -> None:
    """Remember every descendant module's path and kind as validated when the fused
    block was built: structure_changed() compares against it on each call."""
    named = [(tuple(n.split(".")), _kind(m)) for n, m in block.named_modules() if n]
    block.fused_paths = tuple(p for p, _ in named)
    block.fused_kinds = tuple(k for _, k in named)


def _kind(module: nn.Module) -> type:
    """A module's class, SyncBatchNorm counted as BatchNorm2d (the fused ops synchronize
    its statistics themselves)."""
    kind = type(module)
    return nn.BatchNorm2d if kind is nn.SyncBatchNorm else kind


def structure_changed(block: nn.Module) -> bool:
    """Whether the fused forward would now compute something else than the block's modules
    would, or skip code that the user attached to them: a descendant replaced by another
    kind of module (a norm frozen by timm's freeze_batch_norm_2d or torchvision's
    FrozenBatchNorm2d, a conv swapped for a subclass, an activation changed, SE
    replaced by Identity), removed, or carrying forward / backward hooks (hooks,
    torch.nn.utils.prune, weight_norm, observers). The fused forward never calls the
    descendants, so such a block runs its original modules' forward instead. Blocks
    pickled before the structure was recorded count as unchanged.

    Per call this costs one identity check per descendant and one emptiness check per
    hook registry (a few microseconds a block); the walk by kinds runs only when some
    descendant object was replaced."""
    if block.__dict__.get("fused_paths") is None:
        return False
    if torch.compiler.is_compiling():  # traced once, guarded by dynamo: the plain walk
        return _changed_by_kinds(block)
    watch = _WATCHES.get(block)
    if watch is not None:
        slots, modules, registries = watch
        if [d.get(name) for d, name in slots] == modules and not any(registries):
            return False
    changed = _changed_by_kinds(block)
    if not changed:  # the same kinds (new objects, e.g. SyncBatchNorm): watch these
        _WATCHES[block] = _watch_objects(block)
    return changed


# block -> (slots (parent's _modules dict, name) of every recorded descendant, the
# descendants, their hook registries): the fast check of structure_changed.
_WATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_call_hooks(*modules: nn.Module) -> bool:
    """Whether any of the modules carries hooks that run when it is called (forward,
    forward-pre, backward): a fused path that reads the module's tensors instead of calling
    it must then call it."""
    return any(getattr(m, name) for m in modules for name in CALL_HOOKS)


def _watch_objects(block: nn.Module) -> tuple:
    slots, modules, registries = [], [], []
    for path in block.fused_paths:
        parent = block
        for part in path[:-1]:
            parent = parent._modules[part]
        module = parent._modules[path[-1]]
        slots.append((parent._modules, path[-1]))
        modules.append(module)
        registries += [getattr(module, name) for name in CALL_HOOKS]
    return tuple(slots), modules, tuple(registries)


def _changed_by_kinds(block: nn.Module) -> bool:
    for path, kind in zip(block.fused_paths, block.fused_kinds):
        module = block
        for part in path:
            module = module._modules.get(part)
            if module is None:
                return True
        if _kind(module) is not kind or has_call_hooks(module):
            return True
    return False


def sync_unfused_children(block: nn.Module) -> nn.Module:
    """The original timm / torchvision block (`block.unfused`) holding this block's current
    children (the same objects; a norm frozen after convert() included)."""
    original, children = block.unfused, block.unfused._modules
    for name, child in block._modules.items():
        if children.get(name) is not child:
            children[name] = child
    for name in _HOOK_FLAGS:
        object.__setattr__(original, name, getattr(block, name))
    return original


def unfused_forward(block: nn.Module, x: Tensor) -> Tensor:
    """The original block's own forward over this block's current children, in this
    block's mode: exactly what the unconverted model with the same changes computes."""
    original = sync_unfused_children(block)
    original.training = block.training
    return original.forward(x)
