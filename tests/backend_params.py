"""Parametrization helpers: every backend the registry knows, skipped with its reasons
when it cannot serve the given device and dtype."""

from __future__ import annotations

import pytest
import torch

from effnet_kernels.backends import BACKENDS, not_supported_reasons

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def require_backend(op: str, backend: str, device: str, dtype: torch.dtype) -> None:
    reasons = not_supported_reasons(op, backend, torch.device(device), dtype)
    if reasons:
        pytest.skip(f"{backend} on {device} {dtype}: " + "; ".join(reasons))


def backend_device(backend: str) -> str:
    """The device a backend's test runs on: the GPU for cuda, the CPU for the others
    (Triton in its interpreter when no GPU is present)."""
    return "cuda" if backend == "cuda" else "cpu"


def backend_device_pairs():
    """(backend, device) pairs worth collecting on this machine."""
    return [(b, d) for d in DEVICES for b in BACKENDS if d in BACKENDS[b].devices or b == "triton"]
