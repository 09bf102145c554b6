"""The parity rule shared by tests and the self-check.

A kernel's error against a float64 computation must stay within a few times PyTorch's
own error in the same dtype, plus a small floor relative to the result's magnitude
(flash-attention's reference-relative rule). Errors are max-abs over the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOORS = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
FACTOR = 4.0


@dataclass(frozen=True)
class Parity:
    name: str
    error: float
    torch_error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        return (f"{self.name}: error {self.error:.3e} vs bound {self.bound:.3e} "
                f"(PyTorch's own error {self.torch_error:.3e})")


def max_abs_error(a: torch.Tensor, truth: torch.Tensor) -> float:
    if a.shape != truth.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(truth.shape)}")
    if a.numel() == 0:
        return 0.0
    return (a.detach().double().cpu() - truth.detach().double().cpu()).abs().max().item()


def parity(name: str, actual: torch.Tensor, same_dtype_torch: torch.Tensor, truth: torch.Tensor,
           dtype: torch.dtype, factor: float = FACTOR, scale: float | None = None) -> Parity:
    """Compare `actual` and PyTorch's result in the same dtype against the float64 truth.

    scale: the magnitude the floor is relative to (defaults to max |truth|); pass the
    model's gradient scale for gradients that are zero in exact arithmetic."""
    if scale is None:
        scale = truth.detach().abs().max().item() if truth.numel() else 0.0
    torch_error = max_abs_error(same_dtype_torch, truth)
    bound = factor * torch_error + FLOORS[dtype] * max(scale, 1.0)
    return Parity(name, max_abs_error(actual, truth), torch_error, bound)


def assert_parity(*args, **kwargs) -> Parity:
    result = parity(*args, **kwargs)
    if not result.ok:
        raise AssertionError(str(result))
    return result
