"""Input validation shared by the public functions. Errors name the argument and what
was expected, and are raised before any kernel runs."""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def check_device(name: str, t: torch.Tensor | None, ref: torch.Tensor) -> None:
    if t is not None and t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like x, got {t.device}")


def check_vector(name: str, t, length: int, ref: torch.Tensor) -> None:
    """An optional per-channel vector of `length` floats on ref's device."""
    if t is None:
        return
    check_tensor(name, t)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    check_device(name, t, ref)


def type_name(value) -> str:
    """The type of value as an error message names it: `float`, `numpy.bool`."""
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def is_int(value) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int_arg(name: str, value, allowed) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be an int or a pair of equal ints, got {value!r}")
        value = value[0]
    if not is_int(value) or value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
    return int(value)


def check_bool_arg(name: str, value) -> bool:
    """value as a bool: a Python or NumPy bool (not a number or a tensor)."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool) or numpy_bool):
        raise TypeError(f"{name} must be a bool, got {type_name(value)}")
    return bool(value)


def check_real_arg(name: str, value, expected: str) -> float:
    """value as a float: a Python or NumPy real number, not a bool; `expected` says what
    the argument takes (its range) in the error."""
    if not is_real(value):
        raise TypeError(f"{name} must be {expected}, got {type_name(value)}")
    return float(value)
