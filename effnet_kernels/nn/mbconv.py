"""MBConv (timm's InvertedResidual) and DepthwiseSeparable blocks on the fused ops.

Submodule names are timm's, so state_dict keys match it exactly:
  MBConv:             conv_pw, bn1, conv_dw, bn2, se.{conv_reduce, conv_expand}, conv_pwl, bn3
  DepthwiseSeparable: conv_dw, bn1, se.{conv_reduce, conv_expand}, conv_pw, bn2

Forward, per block:
  1x1 expand conv + BN + act   nn/conv_bn_act.py: PyTorch conv; in eval BN folded into
                               the conv (on CPU the act is a oneDNN post-op); in training
                               fused BN + act passes (nn/pointwise.py)
  depthwise conv + BN + act    fused `depthwise_conv_bn_act`
  squeeze-excite               fused `squeeze_excite`
  1x1 project conv + BN        as the expand conv, no act
  residual                     fused `drop_connect_add` (stride 1 and in == out channels)
On CPU, depthwise -> SE -> projection runs with the SE pool from the depthwise epilogue
and the SE gate folded into the projection's weights: nn/eval_tail.py in eval without
autograd, nn/train_tail.py in training (the gated activation is never stored); a block
given a CPU tensor that is not channels_last runs on a channels_last copy
(nn/block_layout.py).

`from_timm(block)` builds a fused block around an existing timm block's own child modules
(the same Parameter and buffer objects, every child under its original name), reading
eps, momentum, padding, activations and the drop-path rate from those modules.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.depthwise import pool_epilogue_available
from ..ops.drop_connect import drop_connect_add
from ..ops.squeeze_excite import squeeze_excite
from .activations import ACT_FUNCTIONS, act_name
from .batchnorm import is_plain_batchnorm
from .block_layout import run_channels_last
from .block_structure import record_structure, share_hooks, structure_changed, unfused_forward
from .conv_bn_act import SameConv2d, conv_bn_act, dw_bn_act, is_same_conv
from .eval_plan import eval_block
from .eval_tail import dw_se_project, eval_tail_applies
from .squeeze_excite import SqueezeExcite
from .train_tail import se_projection_train, train_tail_applies
from .train_tail_op import se_projection_traced, traced_tail_applies


def se_gate(x: Tensor, conv_reduce: nn.Conv2d, conv_expand: nn.Conv2d, act: str,
            pooled: Tensor | None = None) -> Tensor:
    return squeeze_excite(x, conv_reduce.weight, conv_reduce.bias, conv_expand.weight,
                          conv_expand.bias, act=act, pooled=pooled)


def dw_se_projection(x: Tensor, depthwise: tuple, se: tuple | None,
                     projection: tuple) -> Tensor:
    """The tail every fused block shares: depthwise conv + BN + act, squeeze-excite (None:
    none), 1x1 projection conv + BN + act; each part a (conv, bn, act) / (conv_reduce,
    conv_expand, act) tuple. On CPU in eval without autograd it runs as nn/eval_tail.py;
    elsewhere the SE pool comes from the depthwise kernel's epilogue where the backend has
    one (one pass over the activation fewer), and in training on CPU the SE gate goes into
    the projection's weights (nn/train_tail.py; traced by torch.compile / export, as the
    custom op of nn/train_tail_op.py)."""
    if se is None:
        return conv_bn_act(dw_bn_act(x, *depthwise), *projection)
    if eval_tail_applies(x, depthwise, se, projection):
        return dw_se_project(x, depthwise, se, projection)
    if pool_epilogue_available(x):
        y, sums = dw_bn_act(x, *depthwise, return_pool_sums=True)
        if train_tail_applies(y, projection):
            return se_projection_train(y, sums, se, projection)
        x = se_gate(y, *se, pooled=sums)
    else:
        y = dw_bn_act(x, *depthwise)
        if traced_tail_applies(y, projection):  # torch.compile / export on CPU
            return se_projection_traced(y, se, projection)
        x = se_gate(y, *se)
    return conv_bn_act(x, *projection)


def _children(block: nn.Module, *names: str) -> tuple:
    """The block's submodules of these names, read from its _modules: per eval call of a
    block these lookups cost 1 us instead of 6 through nn.Module.__getattr__. A missing
    one raises the AttributeError that attribute access would."""
    modules = block._modules
    try:
        return tuple([modules[name] for name in names])
    except KeyError:
        return tuple([getattr(block, name) for name in names])


def _se_parts(block: nn.Module) -> tuple | None:
    """(conv_reduce, conv_expand, act) of a timm-named block's SE, None without one."""
    if block.acts[2] is None:
        return None
    return (*_children(_children(block, "se")[0], "conv_reduce", "conv_expand"), block.acts[2])


# ---------------------------------------------------------------------------------------
# Reading timm / torchvision modules: every fusion precondition, with the reason it fails.

def read_bn(bn: nn.Module, what: str) -> str:
    """The fused act of a BatchNorm2d (timm BatchNormAct2d: its `.act`); raises if unfusable."""
    if not is_plain_batchnorm(bn):
        raise ValueError(f"{what}: {type(bn).__name__} is not a fusable BatchNorm2d")
    if type(bn) is not nn.BatchNorm2d and type(bn).__name__ != "BatchNormAct2d":
        raise ValueError(f"{what}: unknown BatchNorm2d subclass {type(bn).__name__}")
    drop = getattr(bn, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        raise ValueError(f"{what}: BatchNormAct2d with drop {type(drop).__name__}")
    act = getattr(bn, "act", None)
    name = act_name(act)
    if name is None:
        raise ValueError(f"{what}: activation {type(act).__name__} cannot be fused")
    return name


def check_conv(conv: nn.Module, what: str, *, depthwise: bool) -> None:
    if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
        raise ValueError(f"{what}: {type(conv).__name__} is not a zero-padded Conv2d")
    if conv.dilation != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1] \
            or conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1]:
        raise ValueError(f"{what}: needs square kernel/stride/padding and no dilation: {conv}")
    if type(conv) is not nn.Conv2d and not is_same_conv(conv):
        raise ValueError(f"{what}: unknown Conv2d subclass {type(conv).__name__}")
    if depthwise:
        k = conv.kernel_size[0]
        if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels \
                or conv.bias is not None or k not in (1, 3, 5, 7) or conv.stride[0] not in (1, 2) \
                or conv.padding[0] > k // 2:
            raise ValueError(f"{what}: not a fusable depthwise conv: {conv}")


def read_se(se: nn.Module, reduce: str, expand: str, act: str, gate: str, what: str):
    """(conv_reduce, conv_expand, act name) of an SE module, or None for nn.Identity."""
    if isinstance(se, nn.Identity):
        return None
    conv_r, conv_e = getattr(se, reduce, None), getattr(se, expand, None)
    if not isinstance(conv_r, nn.Conv2d) or not isinstance(conv_e, nn.Conv2d):
        raise ValueError(f"{what}: {type(se).__name__} is not a conv squeeze-excite")
    SqueezeExcite.from_modules(conv_r, conv_e, "identity")  # validates the 1x1 convs
    if not isinstance(getattr(se, gate, None), nn.Sigmoid):
        raise ValueError(f"{what}: gate {type(getattr(se, gate, None)).__name__} is not Sigmoid")
    name = act_name(getattr(se, act, None))
    if name is None:
        raise ValueError(f"{what}: SE activation {type(getattr(se, act, None)).__name__}")
    return conv_r, conv_e, name


def read_drop_path(module: nn.Module, what: str) -> None:
    if isinstance(module, nn.Identity):
        return
    if type(module).__name__ == "DropPath" and getattr(module, "scale_by_keep", True):
        return
    raise ValueError(f"{what}: drop path {type(module).__name__} cannot be fused")


def _adopt(block: nn.Module, timm_block: nn.Module) -> None:
    """Make `block` hold every child of `timm_block` under the same name and share its
    hooks; remember it for revert (outside the module tree, so state_dict and
    parameters() are unchanged)."""
    nn.Module.__init__(block)
    for name, child in timm_block._modules.items():
        block.add_module(name, child)
    share_hooks(block, timm_block)
    object.__setattr__(block, "unfused", timm_block)
    block.train(timm_block.training)


def _bn_act(bn: nn.Module, y: Tensor, act: str) -> Tensor:
    return ACT_FUNCTIONS[act](bn(y))


def _drop_module(block: nn.Module) -> nn.Module | None:
    """timm's drop_path or torchvision's stochastic_depth module of the block, if any."""
    module = block._modules.get("drop_path")
    return module if module is not None else block._modules.get("stochastic_depth")


def _drop_prob(block: nn.Module) -> float:
    """The drop-path rate, read live from the block's drop-path module when it has one."""
    module = _drop_module(block)
    if module is not None:
        return float(getattr(module, "drop_prob", getattr(module, "p", 0.0)) or 0.0)
    return block.drop_path_rate


def drop_path_training(block: nn.Module) -> bool:
    """Whether drop path samples masks: the training flag of the block's drop-path module
    where it has one (set apart from the block's by, e.g., .eval() on that module alone),
    else the block's."""
    module = _drop_module(block)
    if module is not None and not isinstance(module, nn.Identity):
        return module.training
    return block.training


def add_residual(block: nn.Module, x: Tensor, shortcut: Tensor) -> Tensor:
    """shortcut + drop_path(x), at the block's drop-path rate and in its drop-path mode."""
    p, training = _drop_prob(block), drop_path_training(block)
    if p == 1.0:
        # timm's drop_path and torchvision's stochastic_depth take a rate of 1: every sample
        # is dropped (x times a zero mask, left unscaled), and eval ignores the rate. The
        # fused op's contract is p in [0, 1): training computes this here, eval takes the
        # op's plain add as at any other rate.
        if training:
            return shortcut + x * 0.0
        p = 0.0
    return drop_connect_add(x, shortcut, p, training=training)


def drops_paths(block: nn.Module, skip: bool) -> bool:
    """Whether this call's residual add draws a drop-path mask: the eval plan (which adds
    the shortcut as is) must not serve it, even where every norm is in eval."""
    return skip and drop_path_training(block) and _drop_prob(block) > 0


def check_children(block: nn.Module, allowed: set[str]) -> None:
    """Refuse blocks with children the fused forward would ignore (s2d, anti-aliasing...)."""
    what = type(block).__name__
    extra = {n for n, m in block.named_children() if m is not None} - allowed
    if extra:
        raise ValueError(f"{what}: children {sorted(extra)} are not supported")
    if getattr(block, "conv_s2d", None) is not None:
        raise ValueError(f"{what}: space-to-depth is not supported")
    if not isinstance(block._modules.get("aa", nn.Identity()), nn.Identity):
        raise ValueError(f"{what}: anti-aliasing is not supported")


def _make_bn(channels: int, eps: float, momentum: float | None) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


def _make_dw(channels: int, kernel: int, stride: int, pad_same: bool) -> nn.Conv2d:
    if pad_same and stride > 1:
        return SameConv2d(channels, channels, kernel, stride, groups=channels, bias=False)
    return nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=channels, bias=False)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise, SE, 1x1 project, residual (timm names)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 3, stride: int = 1,
                 exp_ratio: float = 6.0, se_channels: int | None = None, act: str = "silu",
                 drop_path_rate: float = 0.0, bn_eps: float = 1e-5,
                 bn_momentum: float | None = 0.1, pad_same: bool = False):
        super().__init__()
        mid = int(in_chs * exp_ratio)
        se_channels = max(1, int(in_chs * 0.25)) if se_channels is None else se_channels
        self.conv_pw = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = _make_bn(mid, bn_eps, bn_momentum)
        self.conv_dw = _make_dw(mid, kernel, stride, pad_same)
        self.bn2 = _make_bn(mid, bn_eps, bn_momentum)
        self.se = SqueezeExcite(mid, se_channels, act) if se_channels else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = _make_bn(out_chs, bn_eps, bn_momentum)
        self.acts = (act, act, self.se.act if se_channels else None)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.drop_path_rate = drop_path_rate
        record_structure(self)

    @classmethod
    def from_timm(cls, block: nn.Module) -> MBConv:
        """Fused block around a timm InvertedResidual's own modules; raises ValueError
        (with the reason) when some part cannot be fused."""
        what = type(block).__name__
        check_children(block, {"conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3",
                               "drop_path"})
        check_conv(block.conv_pw, f"{what}.conv_pw", depthwise=False)
        check_conv(block.conv_dw, f"{what}.conv_dw", depthwise=True)
        check_conv(block.conv_pwl, f"{what}.conv_pwl", depthwise=False)
        acts = (read_bn(block.bn1, f"{what}.bn1"), read_bn(block.bn2, f"{what}.bn2"))
        if read_bn(block.bn3, f"{what}.bn3") != "identity":
            raise ValueError(f"{what}.bn3: an activation after the projection is not supported")
        se = read_se(block.se, "conv_reduce", "conv_expand", "act1", "gate", f"{what}.se")
        read_drop_path(block.drop_path, f"{what}.drop_path")
        self = cls.__new__(cls)
        _adopt(self, block)
        self.acts = acts + (se[2] if se else None,)
        self.has_skip = bool(block.has_skip)
        self.drop_path_rate = _drop_prob(self)
        record_structure(self)
        return self

    def forward(self, x: Tensor) -> Tensor:
        if structure_changed(self):
            return self._unfused(x)
        return run_channels_last(self._fused, x)

    def _fused(self, x: Tensor) -> Tensor:
        conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3 = _children(
            self, "conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3")
        expand = (conv_pw, bn1, self.acts[0])
        depthwise = (conv_dw, bn2, self.acts[1])
        projection = (conv_pwl, bn3, "identity")
        se = _se_parts(self)
        out = None if drops_paths(self, self.has_skip) else eval_block(
            self, x, expand, depthwise, se, projection, self.has_skip)
        if out is not None:
            return out
        shortcut = x
        x = conv_bn_act(x, *expand)
        x = dw_se_projection(x, depthwise, se, projection)
        if self.has_skip:
            x = add_residual(self, x, shortcut)
        return x

    def _unfused(self, x: Tensor) -> Tensor:
        if hasattr(self, "unfused"):
            return unfused_forward(self, x)
        shortcut = x
        x = _bn_act(self.bn1, self.conv_pw(x), self.acts[0])
        x = _bn_act(self.bn2, self.conv_dw(x), self.acts[1])
        x = self.se(x)
        x = _bn_act(self.bn3, self.conv_pwl(x), "identity")
        if self.has_skip:
            x = add_residual(self, x, shortcut)
        return x

    def extra_repr(self) -> str:
        return f"acts={self.acts}, has_skip={self.has_skip}, drop_path_rate={_drop_prob(self)}"


class DepthwiseSeparable(nn.Module):
    """Expansion-1 block: depthwise, SE, 1x1 projection, residual (timm names)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 3, stride: int = 1,
                 se_channels: int | None = None, act: str = "silu", pw_act: str = "identity",
                 drop_path_rate: float = 0.0, bn_eps: float = 1e-5,
                 bn_momentum: float | None = 0.1, pad_same: bool = False):
        super().__init__()
        se_channels = max(1, int(in_chs * 0.25)) if se_channels is None else se_channels
        self.conv_dw = _make_dw(in_chs, kernel, stride, pad_same)
        self.bn1 = _make_bn(in_chs, bn_eps, bn_momentum)
        self.se = SqueezeExcite(in_chs, se_channels, act) if se_channels else nn.Identity()
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = _make_bn(out_chs, bn_eps, bn_momentum)
        self.acts = (act, pw_act, self.se.act if se_channels else None)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.drop_path_rate = drop_path_rate
        record_structure(self)

    @classmethod
    def from_timm(cls, block: nn.Module) -> DepthwiseSeparable:
        """Fused block around a timm DepthwiseSeparableConv's own modules."""
        what = type(block).__name__
        check_children(block, {"conv_dw", "bn1", "aa", "se", "conv_pw", "bn2", "drop_path"})
        check_conv(block.conv_dw, f"{what}.conv_dw", depthwise=True)
        check_conv(block.conv_pw, f"{what}.conv_pw", depthwise=False)
        acts = (read_bn(block.bn1, f"{what}.bn1"), read_bn(block.bn2, f"{what}.bn2"))
        se = read_se(block.se, "conv_reduce", "conv_expand", "act1", "gate", f"{what}.se")
        read_drop_path(block.drop_path, f"{what}.drop_path")
        self = cls.__new__(cls)
        _adopt(self, block)
        self.acts = acts + (se[2] if se else None,)
        self.has_skip = bool(block.has_skip)
        self.drop_path_rate = _drop_prob(self)
        record_structure(self)
        return self

    def forward(self, x: Tensor) -> Tensor:
        if structure_changed(self):
            return self._unfused(x)
        return run_channels_last(self._fused, x)

    def _fused(self, x: Tensor) -> Tensor:
        conv_dw, bn1, conv_pw, bn2 = _children(self, "conv_dw", "bn1", "conv_pw", "bn2")
        depthwise = (conv_dw, bn1, self.acts[0])
        projection = (conv_pw, bn2, self.acts[1])
        se = _se_parts(self)
        out = None if drops_paths(self, self.has_skip) else eval_block(
            self, x, None, depthwise, se, projection, self.has_skip)
        if out is not None:
            return out
        shortcut = x
        x = dw_se_projection(x, depthwise, se, projection)
        if self.has_skip:
            x = add_residual(self, x, shortcut)
        return x

    def _unfused(self, x: Tensor) -> Tensor:
        if hasattr(self, "unfused"):
            return unfused_forward(self, x)
        shortcut = x
        x = _bn_act(self.bn1, self.conv_dw(x), self.acts[0])
        x = self.se(x)
        x = _bn_act(self.bn2, self.conv_pw(x), self.acts[1])
        if self.has_skip:
            x = add_residual(self, x, shortcut)
        return x

    def extra_repr(self) -> str:
        return f"acts={self.acts}, has_skip={self.has_skip}, drop_path_rate={_drop_prob(self)}"
