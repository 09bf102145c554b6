"""Our efficientnet_bX / tf_efficientnet_bX: timm's state_dicts load strictly and give
timm's outputs, parameter counts are timm's, torchvision weights load through the key
map, drop-path rates ramp like timm's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from act_cases import act_spread
from model_cases import FlatFeatures, assert_eval_parity, assert_train_parity, batch, randomize_bn

import effnet_kernels
from effnet_kernels.models import MODELS, load_torchvision_state_dict
from effnet_kernels.nn import DepthwiseSeparable, MBConv

timm = pytest.importorskip("timm")

CLASSES = 10
# Published parameter counts of B0..B7 at 1000 classes (timm's model cards, rounded).
PUBLISHED_M = [5.29, 7.79, 9.11, 12.23, 19.34, 30.39, 43.04, 66.35]


def pair(name: str, **kw):
    reference = randomize_bn(timm.create_model(name, pretrained=False, num_classes=CLASSES, **kw))
    model = effnet_kernels.create_model(name, num_classes=CLASSES, **kw)
    model.load_state_dict(reference.state_dict(), strict=True)
    return model, reference


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0", "efficientnet_b2",
                                  "tf_efficientnet_b3"])
def test_matches_timm_eval(name):
    model, reference = pair(name)
    assert_eval_parity(model, reference, batch(2, 64)[0])


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b1"])
def test_matches_timm_train_step(name):
    model, reference = pair(name, drop_rate=0.0, drop_path_rate=0.0)
    assert_train_parity(model, reference, *batch(4, 64))


def test_every_timm_variant_loads_strictly():
    """State_dict keys and shapes of every variant timm registers (on the meta device)."""
    names = [n for n in MODELS if n in timm.list_models()]
    assert len(names) == 20, names
    for name in names:
        with torch.device("meta"):
            ours = effnet_kernels.create_model(name).state_dict()
            theirs = timm.create_model(name, pretrained=False).state_dict()
        assert list(ours) == list(theirs), name
        assert all(ours[k].shape == theirs[k].shape for k in ours), name


@pytest.mark.parametrize("index", range(8))
def test_parameter_counts(index):
    with torch.device("meta"):
        ours = effnet_kernels.create_model(f"efficientnet_b{index}")
        theirs = timm.create_model(f"efficientnet_b{index}", pretrained=False)
        tf_ours = effnet_kernels.create_model(f"tf_efficientnet_b{index}")
    assert n_params(ours) == n_params(theirs) == n_params(tf_ours)
    assert round(n_params(ours) / 1e6, 2) == PUBLISHED_M[index]
    if index == 0:
        assert n_params(ours) == 5_288_548


def test_tf_variant_settings():
    ours = effnet_kernels.create_model("tf_efficientnet_b0")
    theirs = timm.create_model("tf_efficientnet_b0", pretrained=False)
    bns = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    tbns = [m for m in theirs.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [(b.eps, b.momentum) for b in bns] == [(b.eps, b.momentum) for b in tbns]
    assert bns[0].eps == 1e-3
    # SAME padding everywhere: odd input sizes hit the asymmetric case.
    model, reference = pair("tf_efficientnet_b0")
    assert_eval_parity(model, reference, torch.randn(1, 3, 45, 37))


def test_drop_path_ramp_and_defaults():
    ours = effnet_kernels.create_model("efficientnet_b3")
    theirs = timm.create_model("efficientnet_b3", pretrained=False, drop_path_rate=0.2)
    blocks = [m for m in ours.blocks.modules() if isinstance(m, (MBConv, DepthwiseSeparable))]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in theirs.blocks.modules()
             if hasattr(b, "drop_path")]
    assert [b.drop_path_rate for b in blocks] == pytest.approx(rates)
    assert ours.drop_rate == 0.3 and ours.resolution == 300
    assert ours.default_cfg["input_size"] == (3, 300, 300)
    with pytest.raises(ValueError, match="unknown model"):
        effnet_kernels.create_model("efficientnet_b9")


def test_drop_path_active_in_training():
    model = effnet_kernels.create_model("efficientnet_b0", num_classes=CLASSES, drop_rate=0.0,
                                        drop_path_rate=0.5).train()
    x = batch(4, 32)[0]
    with torch.no_grad():
        a, b = model(x), model(x)
        model.eval()
        c, d = model(x), model(x)
    assert not torch.allclose(a, b) and torch.equal(c, d)


@pytest.mark.parametrize("index,bn", [(0, {}), (5, {"bn_eps": 1e-3, "bn_momentum": 0.01})])
def test_torchvision_weights(index, bn):
    torchvision = pytest.importorskip("torchvision")
    tv = randomize_bn(getattr(torchvision.models, f"efficientnet_b{index}")(
        weights=None, num_classes=CLASSES))
    model = effnet_kernels.create_model(f"efficientnet_b{index}", num_classes=CLASSES, **bn)
    load_torchvision_state_dict(model, tv.state_dict())
    assert_eval_parity(model, tv, batch(2, 32)[0])
    bad = dict(tv.state_dict())
    bad.pop("classifier.1.bias")
    with pytest.raises(KeyError, match="classifier.1.bias"):
        load_torchvision_state_dict(model, bad)


def test_channels_last_and_convert_is_noop():
    model, reference = pair("efficientnet_b0")
    x = batch(2, 32, fmt=torch.channels_last)[0]
    assert_eval_parity(model.to(memory_format=torch.channels_last), reference, x)
    report = effnet_kernels.convert(copy.deepcopy(model))
    assert not report.converted and not report.skipped
    model.train()
    F.cross_entropy(model(x), torch.zeros(2, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("act", ["silu", "relu", "relu6", "identity"])
@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 2, 1)])
def test_conv_bn_act_train_gradcheck(act, kernel, stride, padding):
    """The recomputing conv + train-mode BN + act used for the 1x1 convs, in float64."""
    from effnet_kernels.nn.pointwise import ConvBNActTrain

    geo = ([stride, stride], [padding, padding], 1)
    args = [torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(6, 4, kernel, kernel,
            dtype=torch.float64), (torch.rand(6, dtype=torch.float64) + 0.5) * act_spread(act),
            torch.randn(6, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(
        lambda x, w, g, b: ConvBNActTrain.apply(x, w, g, b, geo, 1e-5, act, None)[0], args)


@pytest.mark.parametrize("name,out_indices", [("efficientnet_b0", (0, 1, 2, 3, 4)),
                                              ("tf_efficientnet_b2", (1, 3))])
def test_features_only_matches_timm(name, out_indices):
    """create_model(features_only=True) loads timm's features_only state_dict strictly,
    describes its maps like timm's feature_info and gives timm's maps in eval and training."""
    kw = dict(features_only=True, out_indices=out_indices, drop_path_rate=0.0)
    reference = randomize_bn(timm.create_model(name, pretrained=False, **kw))
    model = effnet_kernels.create_model(name, **kw)
    model.load_state_dict(reference.state_dict(), strict=True)
    assert [f["num_chs"] for f in model.feature_info] == reference.feature_info.channels()
    assert [f["reduction"] for f in model.feature_info] == reference.feature_info.reduction()
    assert [f["module"] for f in model.feature_info] == reference.feature_info.module_name()
    x, y = batch(2, 64)
    assert_eval_parity(FlatFeatures(model), FlatFeatures(reference), x)
    assert_train_parity(FlatFeatures(model), FlatFeatures(reference), x, y)
    with torch.no_grad():
        maps = model.eval()(x)
    assert [(m.shape[1], 64 // m.shape[-1]) for m in maps] == [
        (f["num_chs"], f["reduction"]) for f in model.feature_info]


def test_features_only_bad_out_indices():
    for bad in ((), (5,), (0, 0), (-1,), (True,)):
        with pytest.raises(ValueError, match="out_indices must be distinct ints in"):
            effnet_kernels.create_model("efficientnet_b0", features_only=True, out_indices=bad)
