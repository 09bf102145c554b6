"""Backend registry: which implementation serves an op call, and why others cannot.

A backend declares the devices and dtypes it serves and whether it is usable on this
machine. Each op module registers, per backend, a loader for its primitives
(`register_impl`). `select(op, *tensors)` returns the primitives of the forced backend
(`use_backend(...)` or env EFFNET_KERNELS_BACKEND) or, in auto mode, of the first usable
backend in priority order for the tensors' device. A forced backend that cannot serve
raises with every reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ._ext import ext_error, ext_module

_HALF = (torch.float16, torch.bfloat16)
_ALL_FLOATS = frozenset((torch.float32, torch.float64, *_HALF))


def _cpu_ext_missing() -> str | None:
    return None if ext_module() is not None else ext_error()


def _cuda_missing() -> str | None:
    mod = ext_module()
    if mod is None:
        return ext_error()
    if not mod.cuda_compiled:
        return "effnet_kernels._C was built without CUDA (rebuild with FORCE_CUDA=1)"
    return None


def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Backend:
    name: str
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    missing: Callable[[], str | None]

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        reasons = []
        devices = set(self.devices)
        if self.name == "triton" and triton_interpreted():
            devices.add("cpu")
        if device.type not in devices:
            hint = " (on CPU it runs only with TRITON_INTERPRET=1)" if self.name == "triton" else ""
            reasons.append(f"device {device.type} is not supported{hint}")
        elif device.type == "cuda" and not torch.cuda.is_available():
            reasons.append("no CUDA device is available")
        dtypes = self.dtypes
        if self.name == "triton" and device.type == "cpu":
            dtypes = frozenset((torch.float32, torch.float64))
        if dtype not in dtypes:
            reasons.append(f"dtype {dtype} is not supported")
        why = self.missing()
        if why:
            reasons.append(why)
        return reasons


BACKENDS: dict[str, Backend] = {
    "cuda": Backend("cuda", frozenset({"cuda"}), frozenset((torch.float32, *_HALF)), _cuda_missing),
    "triton": Backend(
        "triton", frozenset({"cuda"}), frozenset((torch.float32, *_HALF)), _triton_missing
    ),
    "cpu": Backend("cpu", frozenset({"cpu"}), _ALL_FLOATS, _cpu_ext_missing),
    "reference": Backend(
        "reference", frozenset({"cpu", "cuda"}), _ALL_FLOATS, lambda: None
    ),
}
# Auto mode tries these in order; triton on CPU (interpreter) is never picked automatically.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_IMPLS: dict[str, dict[str, Callable[[], object]]] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("effnet_backend", default=None)


def register_impl(op: str, backend: str, loader: Callable[[], object]) -> None:
    """Declare that `backend` implements `op`; loader() returns its primitives namespace."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {sorted(BACKENDS)}")
    _IMPLS.setdefault(op, {})[backend] = loader
    _SELECTED.clear()


def _check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    return name


def forced_backend() -> str:
    """The backend forced by use_backend() or EFFNET_KERNELS_BACKEND, or 'auto'."""
    name = _forced.get()
    if name is not None:
        return name  # checked by use_backend
    name = os.environ.get("EFFNET_KERNELS_BACKEND", "auto") or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"EFFNET_KERNELS_BACKEND must be 'auto' or one of {sorted(BACKENDS)}, "
                         f"got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend ('cuda', 'triton', 'cpu', 'reference' or 'auto') in this context."""
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def remember_backend(ctx) -> None:
    """Record on an autograd ctx the backend forced while its forward runs, for
    runs_forward_backend: backward may run after the use_backend block has exited, or on
    another thread (the autograd engine's device threads on a GPU), where the context
    variable reads 'auto'. Traced forwards record nothing (their backward is traced too)."""
    if not torch.compiler.is_compiling():
        ctx.effnet_backend = forced_backend()


# The devices whose autocast state runs_forward_backend turns off around a backward.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def runs_forward_backend(backward: Callable) -> Callable:
    """Decorate an autograd backward(ctx, *grads) so that it runs under the backend its
    forward ran under (recorded by remember_backend), with autocast off. The forwards
    compute in dtypes they fix themselves (squeeze-excite's MLP in float32, the depthwise
    op in its input's dtype); a backward called inside an autocast region (`loss.backward()`
    within `torch.autocast`) would otherwise have its ATen ops recast, and the dtypes no
    longer match what the forward saved."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        name = getattr(ctx, "effnet_backend", None)
        autocast_on = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
        if name is None and not autocast_on:
            return backward(ctx, *grads)
        with contextlib.ExitStack() as stack:
            if name is not None:
                stack.enter_context(use_backend(name))
            for device in autocast_on:
                stack.enter_context(torch.autocast(device, enabled=False))
            return backward(ctx, *grads)
    return wrapper


def not_supported_reasons(op: str, backend: str, device: torch.device, dtype: torch.dtype):
    reasons = BACKENDS[backend].not_supported_reasons(device, dtype)
    if backend not in _IMPLS.get(op, {}):
        reasons.append(f"{backend} has no implementation of {op}")
    return reasons


def select_name(op: str, device: torch.device, dtype: torch.dtype) -> str:
    forced = forced_backend()
    if forced != "auto":
        reasons = not_supported_reasons(op, forced, device, dtype)
        if reasons:
            raise RuntimeError(
                f"effnet_kernels: backend {forced!r} cannot run {op} on {device.type} "
                f"{dtype}: " + "; ".join(reasons)
            )
        return forced
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        if not not_supported_reasons(op, name, device, dtype):
            return name
    raise RuntimeError(f"effnet_kernels: no backend can run {op} on {device.type} {dtype}")


# (op, forced backend, device type, dtype, interpreter on) -> primitives. What can serve a
# call is fixed once the process runs, so the choice is made once per key: ops run per
# layer, and the checks above cost microseconds that small layers feel.
_SELECTED: dict[tuple, object] = {}


def _device_type(x: torch.Tensor) -> str:
    # x.device builds a torch.device object (about 1 us); the flags are plain reads.
    return "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type


def select(op: str, x: torch.Tensor):
    """The primitives namespace that serves `op` for tensors like x."""
    forced = forced_backend()
    # The interpreter flag changes what triton can serve, and triton serves only when forced
    # or on a GPU (AUTO_ORDER): other keys skip reading it (an environment lookup).
    interpreted = (forced == "triton" or x.is_cuda) and triton_interpreted()
    key = (op, forced, _device_type(x), x.dtype, interpreted)
    prims = _SELECTED.get(key)
    if prims is None:
        prims = _SELECTED[key] = _IMPLS[op][select_name(op, x.device, x.dtype)]()
    return prims


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable on this machine (for `device`'s type, if given), in auto order."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
    names = []
    for dev in devices:
        for name, backend in BACKENDS.items():
            usable = not backend.not_supported_reasons(dev, torch.float32)
            if usable and name not in names:
                names.append(name)
    return names
