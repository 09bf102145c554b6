"""One provider factory per op: a benchmark case in, a zero-arg callable out.

A case is (op, provider, shape, mode, dtype, device, memory format). Providers:
  fused:<backend>  our functional op with that backend forced (fused:auto: the op has
                   no backend registry, or none was forced)
  eager            plain nn modules (what a timm EfficientNet runs)
  compile          torch.compile of the eager module, compiled once per case and reused
Mode "train" times forward + backward (torch.autograd.grad with respect to the input and
every parameter, so no .grad accumulation is timed); "eval" times the forward under
no_grad with the modules in eval mode. The benchmark CLI (bench/cli.py) and the
pytest-benchmark suites (benchmarks/) both build their callables here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import functional, shapes
from ..backends import BACKENDS, not_supported_reasons, use_backend

OPS = ("depthwise", "squeeze_excite", "drop_connect")
MODES = ("train", "eval")
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# op -> (name in the backend registry, name in effnet_kernels.functional)
OP_NAMES = {
    "depthwise": ("depthwise_conv_bn_act", "depthwise_conv_bn_act"),
    "squeeze_excite": ("squeeze_excite", "squeeze_excite"),
    "drop_connect": ("drop_connect_add", "drop_connect_add"),
}
DROP_P = 0.2  # EfficientNet's largest drop-connect rate


class Unavailable(Exception):
    """This case cannot run here; str(exc) says why (recorded as a skip, never fatal)."""


@dataclass(frozen=True)
class Case:
    op: str
    provider: str
    shape: object  # shapes.DepthwiseShape or shapes.ActivationShape
    mode: str = "train"
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    memory_format: str = "nchw"

    def label(self) -> str:
        return f"{self.op}/{self.shape.name}/{self.mode}/{self.memory_format}/{self.provider}"


def op_shapes(op: str, variant: str = "b0", batch: int = 8, resolution: int | None = None) -> list:
    """Real layer shapes of efficientnet_<variant> for op, duplicates removed."""
    if op == "depthwise":
        found = shapes.depthwise_shapes(variant, batch, resolution)
    elif op == "squeeze_excite":
        found = shapes.se_shapes(variant, batch, resolution)
    elif op == "drop_connect":
        found = shapes.residual_shapes(variant, batch, resolution)
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    seen, unique = set(), []
    for s in found:
        dims = tuple(v for k, v in vars(s).items() if k != "name")
        if dims not in seen:
            seen.add(dims)
            unique.append(s)
    return unique


def functional_op(op: str) -> Callable:
    fn = getattr(functional, OP_NAMES[op][1], None)
    if fn is None:
        raise Unavailable(f"effnet_kernels.functional.{OP_NAMES[op][1]} is not available yet")
    return fn


def fused_providers(op: str, device: torch.device, dtype: torch.dtype) -> tuple[list[str], dict]:
    """(usable fused providers, {unusable provider: reason}) for op on device/dtype."""
    try:
        functional_op(op)
    except Unavailable as exc:
        return [], {"fused": str(exc)}
    usable, skipped = [], {}
    reasons = {b: not_supported_reasons(OP_NAMES[op][0], b, device, dtype) for b in BACKENDS}
    if all(any("has no implementation" in r for r in rs) for rs in reasons.values()):
        return ["fused:auto"], {}  # the op does not go through the backend registry
    for backend, why in reasons.items():
        if backend == "triton" and device.type == "cpu" and not why:
            why = ["triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): not timed"]
        if why:
            skipped[f"fused:{backend}"] = "; ".join(why)
        else:
            usable.append(f"fused:{backend}")
    return usable, skipped


def bytes_moved(case: Case) -> int:
    """The op's minimal DRAM traffic: each input read once, each output written once.

    depthwise eval: read x, write y; train adds backward (read dy and x, write dx).
    SE and drop-connect likewise (the shortcut gradient is dy itself, no extra write).
    Parameters and per-channel vectors are negligible and left out.
    """
    s = case.shape
    es = torch.empty((), dtype=case.dtype).element_size()
    x = s.n * s.c * s.h * s.w
    if case.op == "depthwise":
        out_hw = -(-s.h // s.stride) * -(-s.w // s.stride)
        y = s.n * s.c * out_hw
        return es * ((x + y) if case.mode == "eval" else (3 * x + 2 * y))
    if case.op == "squeeze_excite":
        return es * (2 * x if case.mode == "eval" else 5 * x)
    return es * (3 * x if case.mode == "eval" else 5 * x)


class SqueezeExciteEager(nn.Module):
    """timm's SqueezeExcite: mean -> conv_reduce -> SiLU -> conv_expand -> sigmoid -> mul."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = nn.SiLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x):
        s = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


def timm_drop_path_add(x, shortcut, p: float):
    """timm's drop_path (timm.layers.drop_path, scale_by_keep) then the residual add, op for
    op: the (N, 1, 1, 1) mask is divided by keep, so x takes one multiply, not two passes."""
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
    return shortcut + x * mask


class DropConnectEager(nn.Module):
    """timm's drop_path + residual add (timm_drop_path_add); eval or p == 0: the add."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x, shortcut):
        if not self.training or self.p == 0:
            return shortcut + x
        return timm_drop_path_add(x, shortcut, self.p)


def _randomize_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _build(case: Case):
    """(eager module, input tensors, fused forward taking the inputs) for the case."""
    s, dev, dt = case.shape, case.device, case.dtype
    fmt = MEMORY_FORMATS[case.memory_format]
    gen = torch.Generator().manual_seed(0)

    def act_input(shape):
        return torch.randn(shape, generator=gen).to(dev, dt).contiguous(memory_format=fmt)

    train = case.mode == "train"
    if case.op == "depthwise":
        conv = nn.Conv2d(s.c, s.c, s.kernel, s.stride, s.kernel // 2, groups=s.c, bias=False)
        bn = nn.BatchNorm2d(s.c)
        _randomize_bn(bn, gen)
        # BN parameters stay float32 (the fused op's contract; eager BN accepts mixed dtypes)
        module = nn.Sequential(conv.to(dev, dt, memory_format=fmt), bn.to(dev), nn.SiLU())
        inputs = (act_input(s.input_shape),)

        def fused(x):
            return functional_op("depthwise")(
                x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                stride=s.stride, padding=s.kernel // 2, training=train, momentum=bn.momentum,
                eps=bn.eps, act="silu")
    elif case.op == "squeeze_excite":
        module = SqueezeExciteEager(s.c, s.reduced).to(dev, dt)
        inputs = (act_input(s.input_shape),)
        m = module

        def fused(x):
            return functional_op("squeeze_excite")(
                x, m.conv_reduce.weight, m.conv_reduce.bias, m.conv_expand.weight,
                m.conv_expand.bias, act="silu")
    elif case.op == "drop_connect":
        module = DropConnectEager(DROP_P)
        inputs = (act_input(s.input_shape), act_input(s.input_shape))

        def fused(x, shortcut):
            return functional_op("drop_connect")(x, shortcut, DROP_P, training=train)
    else:
        raise ValueError(f"op must be one of {OPS}, got {case.op!r}")
    module.train(train)
    return module, inputs, fused


def _as_callable(forward: Callable, inputs: tuple, params: list, train: bool) -> Callable[[], object]:
    if not train:
        def run_eval():
            with torch.no_grad():
                return forward(*inputs)
        return run_eval
    inputs = tuple(t.detach().requires_grad_(True) for t in inputs)
    wrt = list(inputs) + [p for p in params if p.requires_grad]
    with torch.no_grad():
        grad_out = torch.randn_like(forward(*inputs))

    def run_train():
        return torch.autograd.grad(forward(*inputs), wrt, grad_out)
    return run_train


_COMPILED: dict[Case, Callable[[], object]] = {}


def make(case: Case) -> Callable[[], object]:
    """A zero-arg callable running `case` once (forward, or forward + backward).

    Raises Unavailable when the provider cannot serve the case here. Compiled callables
    are cached per case and carry `compile_s` (compilation time of their first call)."""
    if case.provider == "compile" and case in _COMPILED:
        return _COMPILED[case]
    if case.device.type == "cuda" and not torch.cuda.is_available():
        raise Unavailable("CUDA is not available")
    module, inputs, fused = _build(case)
    params = list(module.parameters())
    train = case.mode == "train"
    if case.provider == "eager":
        return _as_callable(module, inputs, params, train)
    if case.provider == "compile":
        compiled = torch.compile(module)
        fn = _as_callable(compiled, inputs, params, train)
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - compile problems become a recorded skip
            raise Unavailable(f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]) from exc
        fn.compile_s = time.perf_counter() - t0
        _COMPILED[case] = fn
        return fn
    if case.provider.startswith("fused:"):
        backend = case.provider.split(":", 1)[1]
        usable, skipped = fused_providers(case.op, case.device, case.dtype)
        if case.provider not in usable:
            raise Unavailable(skipped.get(case.provider) or skipped.get("fused")
                              or f"{case.provider} is not a backend of {case.op}")

        def forced(*xs):
            ctx = contextlib.nullcontext() if backend == "auto" else use_backend(backend)
            with ctx:
                return fused(*xs)
        return _as_callable(forced, inputs, params, train)
    raise ValueError(f"provider must be fused:<backend>, eager or compile, got {case.provider!r}")


def clear_compiled() -> None:
    """Drop cached compiled callables (and their memory)."""
    _COMPILED.clear()
