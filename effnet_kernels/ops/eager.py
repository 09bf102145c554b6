"""When an op may skip its custom-op wrapper and run as a plain autograd.Function.

A torch.library custom op with registered autograd costs tens of microseconds of Python
dispatch per call, more than the kernels on EfficientNet's small late-stage tensors. Ops
therefore offer an eager fast path (an autograd.Function calling the same primitives)
for plain eager calls, and keep the custom ops for everything that traces or transforms:
torch.compile, export, fake and proxy modes, torch-function modes, functorch transforms
and tensor subclasses all see the opaque custom op.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

# nn.Parameter is a Tensor subclass without a __torch_function__ of its own: module
# weights are plain tensors for this purpose. Any other subclass takes the custom op.
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def plain_eager(*tensors) -> bool:
    """True for an eager call on plain tensors with no tracing or dispatch mode active
    (torch.jit.trace included: it records ATen and custom ops only, so an extension call
    made here would become a constant of the trace)."""
    if torch.compiler.is_compiling() or torch._C._is_tracing():
        return False
    if _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled():
        return False
    return all(type(t) in _PLAIN_TYPES and not is_functorch_wrapped_tensor(t)
               for t in tensors if t is not None)


def records_graph(*tensors) -> bool:
    """Whether autograd would record a graph through any of these tensors now; when not,
    an op may skip its autograd.Function and save nothing."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def traced_cpu_call(x: Tensor) -> bool:
    """True while torch.compile or torch.export traces a call on CPU tensor x, outside
    autocast and the ONNX exporter: where the CPU fused routes run as custom ops (ONNX has
    no node for them; under autocast they would compute in x's dtype where the original
    computes in a lower one)."""
    return (torch.compiler.is_compiling() and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu") and not onnx_exporting())


def autocast_enabled_for(x) -> bool:
    """Whether autocast is on for x's device (a tensor on a device autocast knows: the
    query raises for others, e.g. meta)."""
    return isinstance(x, Tensor) and x.device.type in ("cpu", "cuda") \
        and torch.is_autocast_enabled(x.device.type)


def onnx_exporting() -> bool:
    """True while torch.onnx.export traces: the dynamo exporter compiles, the TorchScript
    one (dynamo=False) runs torch.jit's tracer (the cheap checks first keep eager calls
    from paying for is_in_onnx_export's ~1 us)."""
    return ((torch.compiler.is_compiling() or torch._C._is_tracing())
            and torch.onnx.is_in_onnx_export())
