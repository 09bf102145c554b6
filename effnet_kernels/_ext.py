"""Loads the compiled extension (effnet_kernels._C) once and reports what was built."""

from __future__ import annotations

import functools
import importlib
import platform

import torch


@functools.cache
def _load():
    try:
        return importlib.import_module("effnet_kernels._C"), None
    except ImportError as exc:
        return None, f"the compiled extension effnet_kernels._C could not be imported ({exc})"


def ext_module():
    """The compiled module, or None when the package was installed without it."""
    return _load()[0]


@torch.compiler.assume_constant_result
def ext_built() -> bool:
    """Whether the compiled module loaded; a constant to torch.compile (checks in traced
    code do not trace the import)."""
    return _load()[0] is not None


def ext_error() -> str | None:
    """Why the compiled module is missing (None when it loaded)."""
    return _load()[1]


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def build_info() -> dict:
    """What was compiled and what this machine offers."""
    mod = ext_module()
    return {
        "cpu_ext": mod is not None,
        "cuda_compiled": bool(mod is not None and mod.cuda_compiled),
        "cuda_arch_list": mod.cuda_arch_list if mod is not None else "",
        "ext_error": ext_error(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_gemm": _cpu_gemm(mod),
    }


def _cpu_gemm(mod) -> str | None:
    """The 1x1 convs' float32 GEMM route: "native" (packed AVX2/AVX-512 kernel) or "blas"
    (csrc/cpu/packed_gemm.h); None without the extension."""
    if mod is None:
        return None
    return "native" if mod.cpu.gemm_native() else "blas"
