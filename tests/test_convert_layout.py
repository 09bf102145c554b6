"""On CPU the fused blocks run channels_last whatever layout the caller uses
(nn/block_layout.py): with NCHW input every block's fused forward sees channels_last
activations, while the model (or block) still returns what the original returns for that
input, in NCHW, and trains to the same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from model_cases import batch, randomize_bn
from torch import nn

import effnet_kernels
from effnet_kernels.models.convert import TorchvisionMBConv
from effnet_kernels.nn import DepthwiseSeparable, MBConv

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

CL = torch.channels_last
BLOCKS = (MBConv, DepthwiseSeparable, TorchvisionMBConv)


def _model(source: str, features: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if source == "ours":
        return effnet_kernels.create_model("efficientnet_b0", num_classes=10,
                                           features_only=features)
    if source == "timm":
        model = timm.create_model("efficientnet_b0", num_classes=10, features_only=features)
    else:
        model = torchvision.models.efficientnet_b0(weights=None, num_classes=10)
    original = randomize_bn(model)
    fused = copy.deepcopy(original)
    effnet_kernels.convert(fused)
    return fused


def _record_block_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Replace each fused block's _fused with a wrapper recording its input."""
    seen = []
    for block in model.modules():
        if isinstance(block, BLOCKS):
            inner = block._fused

            def spy(x, inner=inner):
                seen.append(x)
                return inner(x)
            block._fused = spy
    return seen


@pytest.mark.parametrize("source", ["ours", "timm", "torchvision"])
@pytest.mark.parametrize("training", [True, False])
def test_nchw_input_runs_blocks_channels_last(source, training):
    model = _model(source).train(training)
    seen = _record_block_inputs(model)
    x = batch(2, 32)[0]
    with torch.set_grad_enabled(training):
        out = model(x)
    assert len(seen) == 16
    assert all(t.is_contiguous(memory_format=CL) for t in seen)
    assert out.shape == (2, 10)


@pytest.mark.parametrize("source", ["ours", "timm"])
def test_feature_maps_come_back_in_the_input_layout(source):
    model = _model(source, features=True).eval()
    for fmt in (torch.contiguous_format, CL):
        x = batch(2, 64, fmt=fmt)[0]
        with torch.no_grad():
            maps = model(x)
        assert len(maps) == 5
        assert all(m.is_contiguous(memory_format=fmt) for m in maps), fmt


@pytest.mark.parametrize("block_type", [MBConv, DepthwiseSeparable])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_block_keeps_its_input_layout_and_gradients(block_type, fmt):
    """A lone block: NCHW in gives NCHW out (channels_last in, channels_last out), and the
    same output and input gradient in either layout."""
    torch.manual_seed(0)
    block = block_type(16, 16, kernel=3, drop_path_rate=0.0)
    randomize_bn(block)
    base = torch.randn(2, 16, 9, 9)
    x = base.contiguous(memory_format=fmt).detach().requires_grad_()
    ref = base.contiguous(memory_format=CL).detach().requires_grad_()
    out, ref_out = copy.deepcopy(block)(x), copy.deepcopy(block)(ref)
    assert out.is_contiguous(memory_format=fmt)
    dy = torch.randn_like(ref_out)
    out.backward(dy)
    ref_out.backward(dy)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=0)


def test_traced_calls_keep_their_layout():
    """torch.jit.trace records the graph of its example input: no channels_last copies."""
    model = _model("timm").eval()
    seen = _record_block_inputs(model)
    x = batch(2, 32)[0]
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x))
    assert len(seen) >= 16 and all(t.is_contiguous() for t in seen[:16])
