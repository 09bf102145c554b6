"""What a converted model does when its modules are used beyond a plain forward: hooks on
blocks and on their children, children swapped after convert(), pruning, and drop path
in a training model whose BatchNorms are frozen or whose drop-path modules are in eval.
Each case must compute (and call) what the unconverted model with the same changes
does."""

from __future__ import annotations

import copy

import pytest
import torch
from model_cases import batch, randomize_bn
from torch import nn

import effnet_kernels
from effnet_kernels.testing import parity

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

CLASSES = 10
CL = torch.channels_last


def pair(source: str, **kw) -> tuple[nn.Module, nn.Module]:
    """(converted, original) B0 with the same random weights, channels_last."""
    torch.manual_seed(0)
    if source == "timm":
        original = timm.create_model("efficientnet_b0", num_classes=CLASSES, **kw)
    elif source == "torchvision":
        original = torchvision.models.efficientnet_b0(weights=None, num_classes=CLASSES, **kw)
    else:
        original = effnet_kernels.create_model("efficientnet_b0", num_classes=CLASSES, **kw)
    original = randomize_bn(original).to(memory_format=CL)
    fused = copy.deepcopy(original)
    if source != "effnet_kernels":
        report = effnet_kernels.convert(fused, warn=False)
        assert len(report.converted) == 16, str(report)
    return fused, original


def assert_same_logits(fused, original, x, seed=0):
    truth_model = copy.deepcopy(original).double()
    outs = []
    for model, inp in ((fused, x), (original, x), (truth_model, x.double())):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(inp))
    p = parity("logits", *outs, torch.float32)
    assert p.ok, str(p)


def test_block_hooks_survive_convert_and_revert():
    fused, _ = pair("timm")
    original_block = fused.blocks[2][0].unfused
    calls = []
    before = original_block.register_forward_hook(lambda m, i, o: calls.append("before"))
    fused.blocks[3][1].unfused.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    x = batch(1, 32, fmt=CL)[0]
    fused.eval()(x)
    assert calls == ["before", "pre"]
    after = fused.blocks[2][0].register_forward_hook(lambda m, i, o: calls.append("after"))
    effnet_kernels.revert(fused)
    calls.clear()
    fused(x)
    assert sorted(calls) == ["after", "before", "pre"]
    before.remove(), after.remove()
    calls.clear()
    fused(x)
    assert calls == ["pre"]


@pytest.mark.parametrize("source", ["timm", "torchvision", "effnet_kernels"])
def test_hooks_on_children_run_and_see_what_the_original_computes(source):
    fused, original = pair(source, **({"dropout": 0.0} if source == "torchvision" else {}))
    seen = {}
    for name, model in (("fused", fused), ("original", original)):
        block = model.features[2][0] if source == "torchvision" else model.blocks[1][0]
        child = block.block[1][0] if source == "torchvision" else block.conv_dw

        def hook(module, inputs, output, name=name):
            seen[name] = output.detach().clone()
        child.register_forward_hook(hook)
    x = batch(2, 32, fmt=CL)[0]
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), original.eval()(x))
    assert set(seen) == {"fused", "original"}
    torch.testing.assert_close(seen["fused"], seen["original"])


def test_pruned_convs_follow_their_mask_after_updates():
    from torch.nn.utils import prune

    def pruned():  # a pruned module cannot be deep-copied: build it twice
        torch.manual_seed(0)
        model = randomize_bn(timm.create_model("efficientnet_b0", num_classes=CLASSES))
        for name, module in model.named_modules():
            if name.startswith("blocks.") and name.endswith(("conv_pw", "conv_pwl")):
                prune.l1_unstructured(module, "weight", amount=0.3)
        return model.eval()

    fused, original = pruned(), pruned()
    effnet_kernels.convert(fused, warn=False)
    with torch.no_grad():  # as an optimizer step would: the pruned weights' originals move
        for model in (fused, original):
            for name, p in model.named_parameters():
                if name.endswith("weight_orig"):
                    p.mul_(-1.0)
        x = batch(2, 32)[0]
        torch.testing.assert_close(fused(x), original(x))


@pytest.mark.parametrize("change", ["conv_subclass", "act", "se_identity", "wrapped_conv"])
def test_children_swapped_after_convert(change):
    fused, original = pair("timm")

    class WeightStandardized(nn.Conv2d):
        def forward(self, x):
            w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    for model in (fused, original):
        block = model.blocks[2][1]
        if change == "conv_subclass":
            conv = block.conv_pw
            block.conv_pw = WeightStandardized(conv.in_channels, conv.out_channels, 1,
                                               bias=False)
            block.conv_pw.weight = conv.weight
        elif change == "act":
            block.bn1.act = nn.GELU()
        elif change == "se_identity":
            block.se = nn.Identity()
        else:
            block.conv_pwl = nn.Sequential(block.conv_pwl)
    x = batch(4, 64, fmt=CL)[0]  # train-mode BN: enough values per channel at 2 x 2
    assert_same_logits(fused.eval(), original.eval(), x)
    assert_same_logits(fused.train(), original.train(), x)


def drop_path_pair(source: str, in_eval) -> tuple[nn.Module, nn.Module]:
    """(converted, original) with drop path 0.5, in train mode but for the modules
    in_eval(module) selects."""
    kw = {"stochastic_depth_prob": 0.5, "dropout": 0.0} if source == "torchvision" else \
        {"drop_path_rate": 0.5, "drop_rate": 0.0}
    fused, original = pair(source, **kw)
    for model in (fused, original):
        model.train()
        for m in model.modules():
            if in_eval(m):
                m.eval()
    return fused, original


def same_masks(model: nn.Module, x, seed_a: int, seed_b: int) -> bool:
    outs = []
    for seed in (seed_a, seed_b):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(x))
    return torch.equal(*outs)


@pytest.mark.parametrize("source", ["timm", "torchvision", "effnet_kernels"])
def test_drop_path_in_a_training_model_with_frozen_norms(source):
    """Fine-tuning with frozen BatchNorms: model.train(), every norm in eval, no graph
    through the blocks; stochastic depth still applies, with the original's masks."""
    fused, original = drop_path_pair(source, lambda m: isinstance(m, nn.BatchNorm2d))
    x = batch(2, 32, fmt=CL)[0]
    assert_same_logits(fused, original, x, seed=3)
    assert not same_masks(fused, x, 3, 4)


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_drop_path_modules_in_eval_turn_stochastic_depth_off(source):
    kind = "StochasticDepth" if source == "torchvision" else "DropPath"
    fused, original = drop_path_pair(source, lambda m: type(m).__name__ == kind)
    x = batch(4, 64, fmt=CL)[0]  # train-mode BN: enough values per channel at 2 x 2
    assert_same_logits(fused, original, x, seed=1)
    assert same_masks(fused, x, 2, 5)


def test_clear_eval_cache_after_writes_through_data():
    """Writes through .data bump no version counter, so the eval memos cannot see them;
    clear_eval_cache() makes the next call fold the current values."""
    fused, original = pair("timm")
    x = batch(2, 32, fmt=CL)[0]
    fused.eval(), original.eval()
    with torch.no_grad():
        fused(x)
        for model in (fused, original):
            for p in model.parameters():
                p.data.mul_(0.9)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_var.data.mul_(1.5)
    effnet_kernels.clear_eval_cache()
    assert_same_logits(fused, original, x)


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_convert_sync_batchnorm_after_convert_keeps_the_numbers(source):
    """timm's BatchNormAct2d must become SyncBatchNormAct (act kept), not a plain
    SyncBatchNorm; without a process group the model computes what it did."""
    fused, original = pair(source, **({"dropout": 0.0} if source == "torchvision" else {}))
    fused = effnet_kernels.convert_sync_batchnorm(fused)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in fused.modules())
    assert_same_logits(fused.eval(), original.eval(), batch(2, 32, fmt=CL)[0])


@pytest.mark.parametrize("route", ["reverted", "hooked_children", "autocast"])
def test_eval_memos_follow_running_stats_torch_batchnorm_updates(route):
    """PyTorch's BatchNorm updates the running statistics without bumping their version
    counters (it does bump num_batches_tracked's, which the memos watch): after a training
    forward that takes torch's norms (a reverted model converted again, blocks whose
    children carry hooks, autocast), the next eval call folds the new statistics."""
    fused, original = pair("timm")
    x = batch(4, 64, fmt=CL)[0]  # train-mode BN: enough values per channel at 2 x 2
    with torch.no_grad():
        fused.eval()(x)  # memoizes every fold and block plan
    if route == "reverted":
        effnet_kernels.revert(fused)
    for model in (fused, original):
        hooks = [b.bn1.register_forward_hook(lambda *args: None)
                 for b in model.blocks[1]] if route == "hooked_children" else []
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=route == "autocast")
        with torch.no_grad(), autocast:
            model.train()(x)
        for hook in hooks:
            hook.remove()
    if route == "reverted":
        effnet_kernels.convert(fused, warn=False)
    with torch.no_grad():
        memoized = fused.eval()(x)
        effnet_kernels.clear_eval_cache()
        assert torch.equal(memoized, fused(x))
    if route != "autocast":  # bf16 statistics differ between the routes by rounding
        assert_same_logits(fused, original.eval(), x)


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_drop_path_rate_one_drops_every_sample(source):
    """timm's drop_path and torchvision's stochastic_depth take a rate of 1 (every sample
    dropped in training, nothing in eval); the fused op's p must be below 1, so the
    converted blocks compute that case themselves."""
    fused, original = drop_path_pair(source, lambda m: isinstance(m, nn.BatchNorm2d))
    for model in (fused, original):
        for m in model.modules():
            if type(m).__name__ == "DropPath":
                m.drop_prob = 1.0
            elif type(m).__name__ == "StochasticDepth":
                m.p = 1.0
    x = batch(2, 32, fmt=CL)[0]
    assert_same_logits(fused, original, x)  # training, norms frozen: no randomness left
    assert_same_logits(fused.eval(), original.eval(), x)


def test_own_models_call_hooked_children():
    """In effnet_kernels' own models a stem, head or SE conv carrying a forward hook is
    called as a module (the fused paths read its weights without calling it), with the
    same logits."""
    model = pair("effnet_kernels")[0].eval()
    x = batch(2, 32, fmt=CL)[0]
    with torch.no_grad():
        plain = model(x)
    names = ["conv_stem", "bn1", "blocks.0.0.se.conv_reduce", "blocks.2.1.se.conv_expand",
             "conv_head", "bn2"]
    calls = dict.fromkeys(names, 0)
    for name in names:
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    with torch.no_grad():
        hooked = model(x)
    assert calls == dict.fromkeys(names, 1)
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)
