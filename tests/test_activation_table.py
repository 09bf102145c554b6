"""The table of fused activations (effnet_kernels/ops/activations.py) against PyTorch:
each entry's forms agree with its nn.Module and with autograd, and the lookups by name,
code and module class find it."""

from __future__ import annotations

import pytest
import torch
from act_cases import ACTS, act_spread

from effnet_kernels.nn.activations import act_module, act_name
from effnet_kernels.ops.activations import (
    ACT_CODES,
    ACTIVATIONS,
    act_code,
    act_grad,
    activation,
    apply_act,
    apply_act_,
    by_code,
)


def test_codes_are_the_kernels_enum():
    # csrc/common/math.h: Act::Identity = 0, ReLU = 1, SiLU = 2, ReLU6 = 3
    assert ACT_CODES == {"identity": 0, "relu": 1, "silu": 2, "relu6": 3}
    assert sorted(a.code for a in ACTIVATIONS) == list(range(len(ACTIVATIONS)))
    assert set(ACTS) == set(ACT_CODES)


@pytest.mark.parametrize("act", sorted(ACT_CODES))
def test_entry_forms_agree(act):
    torch.manual_seed(0)
    z = (torch.randn(4096, dtype=torch.float64) * act_spread(act)).requires_grad_()
    entry = activation(act)
    assert by_code(act_code(act)) is entry
    assert act_name(act_module(act)) == act
    want = ACTS[act](z)
    torch.testing.assert_close(entry.forward(z), want, rtol=0, atol=0)
    torch.testing.assert_close(apply_act(z, entry.code), want, rtol=0, atol=0)
    torch.testing.assert_close(act_module(act)(z), want, rtol=0, atol=0)
    written = z.detach().clone()
    assert apply_act_(written, act) is written
    torch.testing.assert_close(written, want.detach(), rtol=0, atol=0)
    if act == "identity":
        grad = torch.ones_like(z)
    else:
        (grad,) = torch.autograd.grad(want.sum(), z)
    z = z.detach()
    torch.testing.assert_close(act_grad(z, entry.code), grad, rtol=1e-12, atol=1e-12)
    da = torch.randn_like(z)
    torch.testing.assert_close(entry.backward(da, z), da * grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", sorted(ACT_CODES))
def test_kinks_and_nan_as_pytorch(act):
    """At the kinks (0 and 6, either sign of zero) and at NaN the table's value and
    derivative are PyTorch's: relu and relu6 pass NaN, their derivative is 0 at the kinks
    and passes the gradient at NaN (threshold_backward, hardtanh_backward)."""
    z = torch.tensor([float("nan"), -0.0, 0.0, 6.0, -1.0, 7.0, 3.0], dtype=torch.float64,
                     requires_grad=True)
    want = ACTS[act](z)
    grad = torch.ones_like(z) if act == "identity" else torch.autograd.grad(want.sum(), z)[0]
    entry = activation(act)
    torch.testing.assert_close(entry.forward(z.detach()), want.detach(), rtol=0, atol=0,
                               equal_nan=True)
    torch.testing.assert_close(act_grad(z.detach(), entry.code), grad, rtol=0, atol=0,
                               equal_nan=True)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="act must be one of"):
        act_code("gelu")
    with pytest.raises(ValueError, match="act must be one of"):
        act_module("gelu")
    with pytest.raises(ValueError, match="act must be one of"):
        apply_act_(torch.zeros(2), "gelu")
