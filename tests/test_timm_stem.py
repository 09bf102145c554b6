"""The fused eval stem and head of a converted timm EfficientNet (models/timm_model.py):
the model's class becomes FusedStemEfficientNet, whose forward_features runs conv_stem +
bn1 as one patch_conv_act and conv_head + bn2 as one epilogue GEMM where they serve:
parity against float64 (plain and TF SAME models), the calls they serve and the ones they
leave to timm's forward (training, autograd, hooks, frozen or replaced modules, layouts,
dtypes, autocast), and the class change."""

from __future__ import annotations

import copy

import pytest
import torch
from model_cases import assert_eval_parity, batch, randomize_bn
from native_gemm import native_gemm_forced, native_gemm_possible  # noqa: F401
from torch import nn

import effnet_kernels
from effnet_kernels._ext import ext_module
from effnet_kernels.nn import eval_conv
from effnet_kernels.testing import assert_parity

timm = pytest.importorskip("timm")
timm_model = pytest.importorskip("effnet_kernels.models.timm_model")
EXT = ext_module()
pytestmark = [pytest.mark.skipif(not native_gemm_possible(),
                                 reason="the fused stem needs the patch conv (native GEMM)"),
              pytest.mark.usefixtures("native_gemm_forced")]
CL = torch.channels_last


def _pair(name="efficientnet_b0"):
    original = randomize_bn(timm.create_model(name, num_classes=10)).eval()
    model = copy.deepcopy(original)
    effnet_kernels.convert(model, warn=False)
    return model, original


def _stem(model, x):
    return timm_model.fused_stem(x, model.conv_stem, model.bn1)


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0"])
@pytest.mark.parametrize("size", [64, 33, 224])
def test_stem_matches_float64(name, size):
    model, original = _pair(name)
    assert type(model).__name__ == "FusedStemEfficientNet"
    x = batch(2, size)[0].contiguous(memory_format=CL)
    with torch.no_grad():
        got = _stem(model, x)
        fp32 = original.bn1(original.conv_stem(x))
        truth = copy.deepcopy(original).double()
        want = truth.bn1(truth.conv_stem(x.double()))
    assert got is not None and got.is_contiguous(memory_format=CL)
    assert_parity(f"{name} stem", got, fp32, want, torch.float32)


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0"])
def test_head_matches_float64(name, monkeypatch):
    model, original = _pair(name)
    x = torch.randn(2, 320, 5, 3).contiguous(memory_format=CL)
    with torch.no_grad():
        got = timm_model.fused_head(x, model.conv_head, model.bn2)
        fp32 = original.bn2(original.conv_head(x))
        truth = copy.deepcopy(original).double()
        want = truth.bn2(truth.conv_head(x.double()))
        assert got is not None and got.is_contiguous(memory_format=CL)
        assert_parity(f"{name} head", got, fp32, want, torch.float32)
        monkeypatch.setattr(timm_model, "FUSED_HEAD", False)
        assert timm_model.fused_head(x, model.conv_head, model.bn2) is None
        monkeypatch.undo()
        handle = model.conv_head.register_forward_hook(lambda *a: None)
        assert timm_model.fused_head(x, model.conv_head, model.bn2) is None
        handle.remove()
        assert timm_model.fused_head(x.contiguous(), model.conv_head, model.bn2) is None


@pytest.mark.parametrize("part", ["fused_stem", "fused_head"])
def test_forward_uses_the_fused_passes(monkeypatch, part):
    model, original = _pair()
    served, fused = [], getattr(timm_model, part)

    def spy(*args):
        out = fused(*args)
        served.append(out is not None)
        return out

    monkeypatch.setattr(timm_model, part, spy)
    x = batch(2, 48)[0].contiguous(memory_format=CL)
    with torch.no_grad():
        assert_eval_parity(model, original, x)
    assert served and all(served)


def _left_to_timm(model, original, x, compare=True):
    """The fused stem does not serve this call; the model's output is timm's."""
    with torch.no_grad():
        assert _stem(model, x) is None
        if compare:
            torch.testing.assert_close(model(x), original(x), rtol=1e-4, atol=1e-5)


def test_calls_it_leaves_to_timm(monkeypatch):
    model, original = _pair()
    x = batch(2, 32)[0].contiguous(memory_format=CL)
    _left_to_timm(model, original, x.contiguous())  # NCHW input
    _left_to_timm(model, original, x.double(), compare=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _left_to_timm(model, original, x, compare=False)
    model.train()
    _left_to_timm(model, original, x, compare=False)
    model.eval()
    monkeypatch.setattr(eval_conv, "PATCH_CONV", False)
    _left_to_timm(model, original, x)
    monkeypatch.undo()
    handle = model.conv_stem.register_forward_hook(lambda *a: None)
    _left_to_timm(model, original, x)
    handle.remove()
    handle = model.bn1.register_forward_pre_hook(lambda *a: None)
    _left_to_timm(model, original, x)
    handle.remove()
    with torch.no_grad():
        assert _stem(model, x) is not None


def test_records_graph_through_the_weights():
    model, original = _pair()
    x = batch(2, 32)[0].contiguous(memory_format=CL)
    assert _stem(model, x) is None  # grad mode on, parameters require grad
    out = model(x)
    out.sum().backward()
    assert model.conv_stem.weight.grad is not None
    torch.testing.assert_close(out, original(x), rtol=1e-4, atol=1e-5)


def test_replaced_or_frozen_modules_run_timms_forward():
    model, original = _pair()
    x = batch(2, 32)[0].contiguous(memory_format=CL)
    frozen = copy.deepcopy(model)
    frozen.bn1 = timm.layers.freeze_batch_norm_2d(frozen.bn1)
    other_conv = copy.deepcopy(model)
    other_conv.conv_stem = nn.Sequential(other_conv.conv_stem)
    no_act = copy.deepcopy(model)
    no_act.bn1.act = nn.GELU()
    for changed in (frozen, other_conv, no_act):
        reference = copy.deepcopy(original)
        if changed is frozen:
            reference.bn1 = timm.layers.freeze_batch_norm_2d(reference.bn1)
        if changed is no_act:
            reference.bn1.act = nn.GELU()
        _left_to_timm(changed, reference, x)


def test_class_change_and_revert(monkeypatch):
    model, _ = _pair()
    assert isinstance(model, timm.models.efficientnet.EfficientNet)
    assert effnet_kernels.revert(model) == 16 + 5
    assert type(model) is timm.models.efficientnet.EfficientNet
    features = timm.create_model("efficientnet_b0", features_only=True)
    effnet_kernels.convert(features, warn=False)
    assert type(features).__name__ == "EfficientNetFeatures"
    # a timm whose forward_features reads other modules keeps its class
    monkeypatch.setattr(timm_model, "_TIMM_FORWARD_FEATURES_NAMES", ("conv_stem",))
    other = timm.create_model("efficientnet_b0")
    report = effnet_kernels.convert(other, warn=False)
    assert type(other) is timm.models.efficientnet.EfficientNet and "" not in report.stem_head
