"""GemmLinear (nn/gemm_linear.py; the classifier of a converted model): eval parity with
nn.Linear against float64, the weight packed once and again after it changes, the calls
it leaves to nn.Linear, and the in-place class change."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from effnet_kernels._ext import ext_module
from effnet_kernels.nn.gemm_linear import GemmLinear, from_gemm_linear, to_gemm_linear
from effnet_kernels.testing import parity

pytestmark = pytest.mark.skipif(ext_module() is None, reason="the compiled extension is not built")


def _linear(cin: int, cout: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(cin, cout, bias=bias)


def _pair(cin: int, cout: int, bias: bool = True) -> tuple[nn.Linear, nn.Linear]:
    base = _linear(cin, cout, bias).eval()
    fused = copy.deepcopy(base)
    assert to_gemm_linear(fused) and isinstance(fused, nn.Linear)
    return base, fused


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch,cin,cout", [(1, 1280, 1000), (8, 1280, 1000), (3, 7, 5),
                                            (33, 64, 10)])
def test_eval_matches_linear(batch, cin, cout, bias):
    base, fused = _pair(cin, cout, bias)
    x = torch.randn(batch, cin, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert fused.gemm_serves(x)
        got, same = fused(x), base(x)
        truth = copy.deepcopy(base).double()(x.double())
    assert got.shape == (batch, cout) and got.is_contiguous()
    assert parity("out", got, same, truth, torch.float32).ok
    with torch.inference_mode():  # an inference-mode input, the weight a normal tensor
        assert parity("out", fused(x), same, truth, torch.float32).ok


def test_weight_packed_once_and_again_after_a_write(monkeypatch):
    packs = []
    pack = ext_module().cpu.pack_weight
    monkeypatch.setattr(ext_module().cpu, "pack_weight", lambda w: packs.append(1) or pack(w))
    base, fused = _pair(96, 40)
    x = torch.randn(4, 96)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(fused(x), base(x))
        assert len(packs) == 1
        fused.weight.mul_(-0.5)  # an in-place write (an optimizer step): packed again
        base.weight.mul_(-0.5)
        truth = copy.deepcopy(base).double()(x.double())
        assert parity("out", fused(x), base(x), truth, torch.float32).ok
        assert len(packs) == 2
        fused.weight = nn.Parameter(torch.randn(40, 96))  # another tensor: packed again
        base.weight = nn.Parameter(fused.weight.detach().clone())
        torch.testing.assert_close(fused(x), base(x))
        assert len(packs) == 3


@pytest.mark.parametrize("case", ["training", "grad", "bfloat16", "autocast",
                                  "non_contiguous", "3d", "empty"])
def test_calls_it_does_not_serve_run_linear(case):
    """Every such call is nn.Linear's own forward: the same bits, the same graph. All but
    the grad case run without recording a graph, as eval calls do."""
    base, fused = _pair(16, 12)
    x = torch.randn(6, 16)
    if case == "training":
        base.train(), fused.train()
    elif case == "grad":
        x.requires_grad_()
    elif case == "bfloat16":
        base, fused, x = base.bfloat16(), fused.bfloat16(), x.bfloat16()
    elif case == "non_contiguous":
        x = torch.randn(16, 6).t()
    elif case == "3d":
        x = torch.randn(2, 3, 16)
    elif case == "empty":
        x = torch.randn(0, 16)
    with (torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"),
          torch.set_grad_enabled(case == "grad")):
        assert not fused.gemm_serves(x)
        got, same = fused(x), base(x)
    torch.testing.assert_close(got, same, rtol=0, atol=0)
    if case == "grad":
        got.sum().backward()
        assert fused.weight.grad is not None and x.grad is not None


def test_non_contiguous_input_is_served_by_linear_with_parity():
    """A transposed input is left to nn.Linear, which reads it as it is."""
    base, fused = _pair(16, 12)
    x = torch.randn(16, 6).t()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), base(x.contiguous()))


def test_class_change_keeps_the_module_and_pickles():
    linear = _linear(8, 16)
    weight, keys = linear.weight, list(linear.state_dict())
    assert to_gemm_linear(linear) and type(linear) is GemmLinear
    assert linear.weight is weight and list(linear.state_dict()) == keys
    assert not to_gemm_linear(linear)  # already one
    assert not to_gemm_linear(nn.Conv2d(4, 8, 1)) and not from_gemm_linear(nn.Linear(4, 8))
    linear.eval()
    buffer = io.BytesIO()
    torch.save(linear, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is GemmLinear
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), linear(x))
    assert from_gemm_linear(linear) and type(linear) is nn.Linear and linear.weight is weight


def test_compiled_and_exported_calls_trace_linear():
    base, fused = _pair(16, 12)
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled = torch.compile(fused, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), base(x))
        exported = torch.export.export(fused, (x,))
    assert "linear" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), base(x))
