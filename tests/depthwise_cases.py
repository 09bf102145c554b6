"""Inputs and runners for the depthwise conv + BN + act parity tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from act_cases import act_spread

from effnet_kernels.functional import depthwise_conv_bn_act
from effnet_kernels.ops import reference

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@dataclass(frozen=True)
class Case:
    shape: tuple[int, int, int, int]
    kernel: int = 3
    stride: int = 1
    padding: int | str | None = None
    act: str = "silu"

    def __str__(self) -> str:
        n, c, h, w = self.shape
        return f"{n}x{c}x{h}x{w}-k{self.kernel}s{self.stride}p{self.padding}-{self.act}"


ODD_CASES = [
    Case((1, 3, 7, 7)),
    Case((2, 17, 13, 11), kernel=5, stride=2),
    Case((2, 5, 9, 9), kernel=7, stride=2, padding="same"),
    Case((2, 8, 6, 6), kernel=3, stride=2, padding="same", act="relu"),
    Case((3, 4, 1, 1), kernel=3, act="identity"),
    Case((2, 6, 5, 8), kernel=1, stride=2, padding=0),
    Case((2, 9, 7, 5), kernel=5, stride=1, padding=1),
    Case((1, 40, 3, 3), kernel=3, stride=2),
]
# ReLU6 (MobileNetV2, EfficientNet-Lite): both clamps crossed (make_inputs widens gamma).
RELU6_CASE = Case((2, 12, 9, 7), kernel=3, stride=2, padding="same", act="relu6")
ODD_CASES.append(RELU6_CASE)


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random inputs, already rounded to `dtype` (so the float64 truth sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    c, k = case.shape[1], case.kernel
    pdt = param_dtype(dtype)
    return {
        "x": torch.randn(case.shape, generator=gen).to(dtype),
        "weight": (torch.randn(c, 1, k, k, generator=gen) / k).to(dtype),
        "bn_weight": ((torch.rand(c, generator=gen) + 0.5) * act_spread(case.act)).to(pdt),
        "bn_bias": (torch.randn(c, generator=gen) * 0.2).to(pdt),
        "running_mean": (torch.randn(c, generator=gen) * 0.1).to(pdt),
        "running_var": (torch.rand(c, generator=gen) + 0.5).to(pdt),
        "seed": seed,
    }


def run(fn, case: Case, inputs: dict, *, training: bool, dtype: torch.dtype, fmt,
        device: str = "cpu") -> dict:
    """Forward + backward of fn on inputs cast to dtype; returns outputs, grads and stats."""
    pdt = param_dtype(dtype)
    x = inputs["x"].to(device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    weight = inputs["weight"].to(device=device, dtype=dtype).requires_grad_()
    gamma = inputs["bn_weight"].to(device=device, dtype=pdt).requires_grad_()
    beta = inputs["bn_bias"].to(device=device, dtype=pdt).requires_grad_()
    rm = inputs["running_mean"].to(device=device, dtype=pdt).clone()
    rv = inputs["running_var"].to(device=device, dtype=pdt).clone()
    out = fn(x, weight, gamma, beta, rm, rv, stride=case.stride, padding=case.padding,
             training=training, momentum=0.1, eps=1e-5, act=case.act)
    gen = torch.Generator().manual_seed(inputs["seed"] + 1)
    dy = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    dx, dw, dg, db = torch.autograd.grad(out, (x, weight, gamma, beta), dy)
    return {"out": out, "dx": dx, "dweight": dw, "dbn_weight": dg, "dbn_bias": db,
            "running_mean": rm, "running_var": rv}


def fused(*args, **kwargs):
    return depthwise_conv_bn_act(*args, **kwargs)


def truth_and_torch(case: Case, inputs: dict, *, training: bool, dtype, fmt, device="cpu"):
    """The float64 truth and PyTorch's own result in `dtype`."""
    truth = run(reference.depthwise_conv_bn_act, case, inputs, training=training,
                dtype=torch.float64, fmt=fmt, device=device)
    same = run(reference.depthwise_conv_bn_act, case, inputs, training=training,
               dtype=dtype, fmt=fmt, device=device)
    return truth, same
