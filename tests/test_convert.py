"""convert()/revert() on timm and torchvision EfficientNets: outputs, gradients and BN
state match the original (parity vs float64), state_dict and Parameter objects are
untouched, revert restores the very same modules, and a converted B0 trains like the
original on real data (sklearn digits)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from backend_params import DEVICES
from model_cases import FlatFeatures, assert_eval_parity, assert_train_parity, batch, randomize_bn
from torch import nn

import effnet_kernels
from effnet_kernels.models.convert import TorchvisionMBConv
from effnet_kernels.nn import DepthwiseSeparable, MBConv
from effnet_kernels.testing import parity

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

CLASSES = 10


def make(source: str, name: str, **kw) -> nn.Module:
    if source == "timm":
        model = timm.create_model(name, pretrained=False, num_classes=CLASSES, **kw)
    else:
        model = getattr(torchvision.models, name)(weights=None, num_classes=CLASSES, **kw)
    return randomize_bn(model)


def converted_pair(source: str, name: str, **kw) -> tuple[nn.Module, nn.Module]:
    original = make(source, name, **kw)
    fused = copy.deepcopy(original)
    report = effnet_kernels.convert(fused)
    assert report.converted and not report.skipped, str(report)
    return fused, original


FAST = [("timm", "efficientnet_b0"), ("timm", "tf_efficientnet_b0"),
        ("timm", "tf_efficientnet_b2"), ("torchvision", "efficientnet_b0"),
        ("torchvision", "efficientnet_b1"), ("torchvision", "efficientnet_b5")]
SWEEP = [("torchvision", f"efficientnet_b{i}") for i in range(8)] + \
        [("timm", f"tf_efficientnet_b{i}") for i in range(8)]
SLOW = [pytest.param(*c, marks=pytest.mark.slow) for c in SWEEP if c not in FAST]


@pytest.mark.parametrize("source,name", FAST + SLOW)
def test_eval_parity(source, name):
    fused, original = converted_pair(source, name)
    assert_eval_parity(fused, original, batch(2, 32)[0])


@pytest.mark.parametrize("source,name", [("timm", "efficientnet_b0"),
                                         ("timm", "tf_efficientnet_b0"),
                                         ("torchvision", "efficientnet_b0"),
                                         ("torchvision", "efficientnet_b5")])
def test_train_step_parity(source, name):
    kw = {"drop_rate": 0.0, "drop_path_rate": 0.0} if source == "timm" else \
        {"dropout": 0.0, "stochastic_depth_prob": 0.0}
    fused, original = converted_pair(source, name, **kw)
    assert_train_parity(fused, original, *batch(4, 64))


@pytest.mark.parametrize("device", DEVICES)
def test_train_step_parity_autocast_bfloat16(device):
    """Mixed precision as users train: bf16 activations, float32 master weights."""
    fused, original = converted_pair("timm", "efficientnet_b0", drop_rate=0.0,
                                     drop_path_rate=0.0)
    for m in (fused, original):
        m.to(device, memory_format=torch.channels_last)
    x, y = batch(4, 64, fmt=torch.channels_last)
    assert_train_parity(fused, original, x.to(device), y.to(device), autocast=torch.bfloat16)


STEM_HEAD = {
    "timm": {"bn1": "FusedBatchNormAct2d", "bn2": "FusedBatchNormAct2d",
             "": "FusedStemEfficientNet", "conv_head": "GemmConv2d",
             "classifier": "GemmLinear"},
    "torchvision": {"classifier.1": "GemmLinear", "features.0": "FusedConvNormActivation",
                    "features.8": "FusedConvNormActivation"},
}


@pytest.mark.parametrize("source,name", [("timm", "tf_efficientnet_b0"),
                                         ("torchvision", "efficientnet_b0")])
def test_state_and_identity_preserved(source, name):
    model = make(source, name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    blocks = dict(model.named_modules())
    before_types = {n: type(m) for n, m in blocks.items()}
    report = effnet_kernels.convert(model)
    assert len(report.converted) == 16
    stem_head = STEM_HEAD[source]
    assert list(report.stem_head) == list(stem_head)
    assert all(type(model.get_submodule(n)).__name__ == t for n, t in stem_head.items())
    assert list(model.state_dict()) == list(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(params[n] is p for n, p in model.named_parameters())
    assert all(buffers[n] is b for n, b in model.named_buffers())
    fused_types = (MBConv, DepthwiseSeparable, TorchvisionMBConv)
    assert all(isinstance(model.get_submodule(n), fused_types) for n in report.converted)

    assert effnet_kernels.revert(model) == 16 + len(stem_head)
    assert all(model.get_submodule(n) is blocks[n] for n in report.converted + report.stem_head)
    assert all(type(m) is before_types[n] for n, m in model.named_modules())
    assert dict(model.named_modules()).keys() == blocks.keys()
    assert all(model.get_submodule(n) is m for n, m in blocks.items() if n)


def test_stem_and_head_follow_moves_and_loads_and_revert_keeps_them():
    """The fused stem reads the norm's tensors at call time: after model.double() (new
    buffer tensors) and load_state_dict it matches the original, and revert hands the
    current tensors back to the original modules."""
    original = make("timm", "efficientnet_b0")
    model = copy.deepcopy(original)
    effnet_kernels.convert(model)
    model.double(), original.double()
    assert type(model.bn1).__name__ == "FusedBatchNormAct2d"
    assert model.bn1.running_mean.dtype == torch.float64
    other = randomize_bn(make("timm", "efficientnet_b0"))
    model.load_state_dict(other.state_dict())
    original.load_state_dict(other.state_dict())
    x = batch(2, 32)[0].double()
    assert_eval_parity(model, original, x)
    model.train()
    model(x)
    running = model.bn1.running_mean.clone()
    effnet_kernels.revert(model)
    assert type(model.bn1).__name__ == "BatchNormAct2d" and type(model.conv_stem) is nn.Conv2d
    assert torch.equal(model.bn1.running_mean, running) and model.bn1.running_mean.dtype == torch.float64
    assert model.bn1.training


def test_unfusable_stem_is_left_and_reported():
    model = make("timm", "efficientnet_b0")
    model.bn2.act = nn.GELU()
    with pytest.warns(UserWarning, match="left 1 unfused"):
        report = effnet_kernels.convert(model)
    # the head conv and the classifier do not depend on the norm
    assert report.stem_head == ["bn1", "", "conv_head", "classifier"]
    assert "GELU" in report.skipped["bn2"]
    assert type(model.conv_head).__name__ == "GemmConv2d"
    assert type(model.bn2).__name__ == "BatchNormAct2d"
    again = effnet_kernels.convert(model, warn=False)
    assert not again.converted and again.stem_head == [] and list(again.skipped) == ["bn2"]


def test_reads_settings_from_modules():
    model = make("timm", "tf_efficientnet_b0", drop_path_rate=0.2)
    rates = [m.drop_path.drop_prob if hasattr(m.drop_path, "drop_prob") else 0.0
             for m in model.blocks.modules() if hasattr(m, "drop_path")]
    effnet_kernels.convert(model)
    blocks = [m for m in model.blocks.modules() if isinstance(m, (MBConv, DepthwiseSeparable))]
    assert [b.drop_path_rate for b in blocks] == rates
    assert blocks[1].bn2.eps == 1e-3  # tf_: eps 1e-3 carried by the reused BN module
    tv = make("torchvision", "efficientnet_b5", stochastic_depth_prob=0.3)
    p = tv.features[3][1].stochastic_depth.p
    effnet_kernels.convert(tv)
    fused = tv.features[3][1]
    assert isinstance(fused, TorchvisionMBConv) and fused.stochastic_depth.p == p > 0
    assert fused.block[1][1].momentum == 0.01 and fused.block[1][1].eps == 1e-3


def test_channels_last():
    fused, original = converted_pair("timm", "tf_efficientnet_b0")
    x = batch(2, 32, fmt=torch.channels_last)[0]
    assert_eval_parity(fused, original, x)
    x, y = batch(4, 32, fmt=torch.channels_last)
    fused.train()
    F.cross_entropy(fused(x), y).backward()
    assert all(p.grad is not None for p in fused.parameters())


@pytest.mark.parametrize("name,fmt", [("efficientnet_b0", torch.channels_last),
                                      ("tf_efficientnet_b0", torch.contiguous_format)])
def test_grad_checkpointing_train_step_matches_original(name, fmt):
    """timm's set_grad_checkpointing (torch.utils.checkpoint per block, recomputing each
    block only up to its last saved tensor): logits, gradients and the running statistics,
    which the recomputation updates a second time in the original, match."""
    fused, original = converted_pair("timm", name, drop_rate=0.0, drop_path_rate=0.0)
    fused.set_grad_checkpointing(True)
    original.set_grad_checkpointing(True)
    assert_train_parity(fused, original, *batch(2, 64, fmt=fmt))


def _freeze_torchvision(model: nn.Module) -> nn.Module:
    """torchvision's FrozenBatchNorm2d in place of every BatchNorm2d (detection-style)."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(module, name, frozen)
    return model


@pytest.mark.parametrize("source", ["timm", "torchvision", "effnet_kernels"])
def test_norms_frozen_after_convert_match_original(source):
    """Norm modules swapped after convert() (frozen BN for fine-tuning) make the fused
    blocks run the module graph they now hold: eval and train-mode logits match the
    original frozen the same way."""
    freeze_batch_norm_2d = pytest.importorskip("timm.layers").freeze_batch_norm_2d
    if source == "torchvision":
        fused, original = converted_pair("torchvision", "efficientnet_b0", dropout=0.0)
        freeze = _freeze_torchvision
    else:
        fused, original = converted_pair("timm", "efficientnet_b0", drop_rate=0.0,
                                         drop_path_rate=0.0)
        if source == "effnet_kernels":
            fused = effnet_kernels.create_model("efficientnet_b0", num_classes=CLASSES,
                                                drop_rate=0.0, drop_path_rate=0.0)
            fused.load_state_dict(original.state_dict())
        freeze = freeze_batch_norm_2d
    fused, original = freeze(fused), freeze(original)
    x, y = batch(2, 32)
    for mode in ("eval", "train"):
        truth = copy.deepcopy(original).double()
        for model in (fused, original, truth):
            model.train(mode == "train")
        with torch.no_grad():
            p = parity(f"{mode} logits", fused(x), original(x), truth(x.double()), torch.float32)
        assert p.ok, str(p)
    F.cross_entropy(fused(x), y).backward()
    assert all(torch.isfinite(q.grad).all() for q in fused.parameters() if q.requires_grad)
    frozen = {n: type(m) for n, m in fused.named_modules() if "Frozen" in type(m).__name__}
    assert frozen
    if source != "effnet_kernels":
        effnet_kernels.revert(fused)
        assert {n: type(m) for n, m in fused.named_modules() if n in frozen} == frozen


def test_revert_keeps_norms_frozen_after_convert():
    """revert() right after freezing (no forward in between) hands the frozen norms to
    the original blocks."""
    freeze_batch_norm_2d = pytest.importorskip("timm.layers").freeze_batch_norm_2d
    fused, _ = converted_pair("timm", "efficientnet_b0")
    fused = freeze_batch_norm_2d(fused)
    effnet_kernels.revert(fused)
    kinds = {type(m).__name__ for n, m in fused.blocks.named_modules() if n.endswith("bn1")}
    assert kinds == {"FrozenBatchNormAct2d"}


def test_our_model_stays_fused_under_sync_batchnorm():
    """convert_sync_batchnorm on our model (the only order there is: nothing to convert)
    keeps its blocks on the fused path, whose ops synchronize the statistics; without a
    process group it computes what the local BatchNorm2d model does. In float64: on CPU
    both run channels_last, where a synced norm takes other (equivalent) statistics routes
    than a local one, and at batch 2 x 32² the last stages normalize two values per
    channel, which turns float32 rounding differences into differences of order 1."""
    from effnet_kernels.nn.batchnorm import convert_sync_batchnorm
    from effnet_kernels.nn.block_structure import structure_changed
    local = effnet_kernels.create_model("efficientnet_b0", num_classes=CLASSES, drop_rate=0.0,
                                        drop_path_rate=0.0).double()
    synced = convert_sync_batchnorm(copy.deepcopy(local))
    blocks = [m for m in synced.modules() if isinstance(m, MBConv | DepthwiseSeparable)]
    assert len(blocks) == 16 and not any(structure_changed(b) for b in blocks)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = batch(2, 32, fmt=fmt)[0].double()
        torch.testing.assert_close(synced.train()(x), local.train()(x))


@pytest.mark.parametrize("source,name", [("timm", "efficientnet_b0"),
                                         ("torchvision", "efficientnet_b0")])
def test_norms_put_in_eval_mode_in_a_training_model(source, name):
    """The usual way to freeze BatchNorm while training the rest (every BatchNorm2d
    instance to eval after model.train()) reaches every norm of a converted model, stem
    and head included: a training step matches the original treated the same way."""
    kw = {"drop_rate": 0.0, "drop_path_rate": 0.0} if source == "timm" else {"dropout": 0.0}
    fused, original = converted_pair(source, name, **kw)
    x, y = batch(2, 32)
    results = []
    for model in (fused, original, copy.deepcopy(original).double()):
        model.train()
        frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in frozen:
            m.eval()
        inputs = x.to(next(model.parameters()).dtype)
        logits = model(inputs)
        F.cross_entropy(logits, y).backward()
        results.append((len(frozen), logits.detach(), model.conv_stem.weight.grad
                        if source == "timm" else model.features[0][0].weight.grad))
    assert results[0][0] == results[1][0] > 0
    for what, i in (("logits", 1), ("stem weight grad", 2)):
        p = parity(what, results[0][i], results[1][i], results[2][i], torch.float32)
        assert p.ok, str(p)


def test_eval_with_autograd_matches_original():
    """Eval mode with grad enabled (saliency, adversarial inputs) takes the differentiable
    path instead of the fused oneDNN conv + act, and input gradients match."""
    fused, original = converted_pair("timm", "efficientnet_b0")
    fused.eval(), original.eval()
    x = batch(2, 32, fmt=torch.channels_last)[0].requires_grad_()
    (dx,) = torch.autograd.grad(fused(x).square().sum(), x)
    (dx_ref,) = torch.autograd.grad(original(x).square().sum(), x)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-4, atol=1e-5)


def test_unfusable_blocks_left_and_reported():
    model = make("timm", "efficientnet_b0")
    model.blocks[2][1].bn2.act = nn.GELU()
    model.blocks[3][0].se.gate = nn.Hardsigmoid()
    original_blocks = (model.blocks[2][1], model.blocks[3][0])
    with pytest.warns(UserWarning, match="left 2 unfused"):
        report = effnet_kernels.convert(model)
    assert len(report.converted) == 14
    assert "GELU" in report.skipped["blocks.2.1"] and "Hardsigmoid" in report.skipped["blocks.3.0"]
    assert (model.blocks[2][1], model.blocks[3][0]) == original_blocks
    tv2 = torchvision.models.efficientnet_v2_s(weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = effnet_kernels.convert(tv2, warn=False)
    assert any("FusedMBConv" in why for why in report.skipped.values())
    assert report.converted  # the MBConv stages of V2 are fused


def test_ddp_wrapped_is_refused():
    with pytest.raises(TypeError, match="before wrapping"):
        effnet_kernels.convert(nn.parallel.DistributedDataParallel.__new__(
            nn.parallel.DistributedDataParallel))


def _digits(n_batches: int, batch_size: int, seed: int = 0):
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[idx].contiguous(), y[idx])
            for idx in order[: n_batches * batch_size].split(batch_size)]


def _train(model: nn.Module, batches, dtype=torch.float32) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x.to(dtype)), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_digits_training_matches_original():
    """20 SGD steps (4 batches of 16 digits, 5 passes) side by side. Training from scratch
    is chaotic: PyTorch's own float32 run leaves the float64 run after ~5 steps, so the
    curves are held to the parity rule (error vs float64 <= 3x PyTorch's + floor) after a
    tight check on the first steps."""
    torch.manual_seed(0)
    original = timm.create_model("efficientnet_b0", pretrained=False, num_classes=CLASSES,
                                 drop_rate=0.0, drop_path_rate=0.0)
    nn.init.zeros_(original.classifier.weight)  # start at loss ln(10), not at saturation
    fused = copy.deepcopy(original)
    effnet_kernels.convert(fused)
    truth_model = copy.deepcopy(original).double()
    batches = _digits(n_batches=4, batch_size=16) * 5
    ref = _train(original, batches)
    got = _train(fused, batches)
    truth = _train(truth_model, batches, torch.float64)
    assert max(abs(a - b) for a, b in zip(got[:4], ref[:4])) < 1e-3, (got, ref)
    err = sum(abs(a - t) for a, t in zip(got, truth)) / len(truth)
    torch_err = sum(abs(a - t) for a, t in zip(ref, truth)) / len(truth)
    assert err <= 3 * torch_err + 0.05, (err, torch_err, got, ref, truth)
    for curve in (got, ref):
        assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5, curve


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0"])
def test_timm_features_only_backbone(name):
    """A timm features_only backbone (EfficientNetFeatures) converts like the full model:
    every feature map matches in eval, and in a training step every gradient and buffer."""
    original = FlatFeatures(make("timm", name, features_only=True, drop_path_rate=0.0))
    fused = copy.deepcopy(original)
    report = effnet_kernels.convert(fused)
    assert report.converted and not report.skipped, str(report)
    x, y = batch(2, 64)
    assert_eval_parity(fused, original, x)
    assert_train_parity(fused, original, x, y)


def test_backward_inside_the_autocast_region():
    """`loss.backward()` inside the `torch.autocast` block (PyTorch advises against it but
    runs it): the fused backwards run with autocast off, as outside the block, and give
    the same gradients (squeeze-excite's float32 MLP used to meet bfloat16 there)."""
    fused, _ = converted_pair("timm", "efficientnet_b0", drop_rate=0.0, drop_path_rate=0.0)
    fused = fused.train().to(memory_format=torch.channels_last)
    x, y = batch(2, 32, classes=CLASSES, fmt=torch.channels_last)
    grads = []
    for inside in (False, True):
        fused.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(fused(x).float(), y)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append([p.grad for p in fused.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
