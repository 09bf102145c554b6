"""The prepared CPU eval forward of fused blocks (nn/eval_plan.py): the module route's
output on timm (plain and SAME-padded) and torchvision blocks (up to the rounding of the
squeeze-excite gate, which the plan computes in its own loops), parity with the original
blocks against float64, when it applies and when it steps aside, and that it follows
in-place changes of every kind of source tensor."""

from __future__ import annotations

import copy

import pytest
import torch
from model_cases import randomize_bn

import effnet_kernels as ek
from effnet_kernels import use_backend
from effnet_kernels.nn import eval_plan
from effnet_kernels.testing import assert_parity

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
EXT = ek._ext.ext_module()
pytestmark = pytest.mark.skipif(EXT is None or not EXT.cpu.pw_conv_available(),
                                reason="compiled extension with BLAS sgemm not available")
CL = torch.channels_last


def _model(source: str, name: str):
    if source == "timm":
        model = timm.create_model(name, num_classes=10)
    else:
        model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    return randomize_bn(model).eval()


def _blocks(model):
    """(name, block) of every fused block of a converted model."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in
            ("MBConv", "DepthwiseSeparable", "TorchvisionMBConv")]


@pytest.fixture
def plan_calls(monkeypatch):
    """Counts the calls that ran through a plan."""
    calls = []
    run = eval_plan._run

    def spy(plan, x):
        calls.append(plan)
        return run(plan, x)
    monkeypatch.setattr(eval_plan, "_run", spy)
    return calls


def _assert_module_route(got, same_route):
    """The plan's result is the module route's up to the SE gate's float32 rounding (the
    plan sums the excitation products in another order): far tighter than any stale plan,
    whose sources differ by 10 % or more in these tests."""
    torch.testing.assert_close(got, same_route, rtol=1e-5, atol=1e-5)


def _module_route(model, x):
    eval_plan.ENABLED = False
    try:
        return model(x)
    finally:
        eval_plan.ENABLED = True


@pytest.mark.parametrize("source,name,hw", [("timm", "efficientnet_b0", 64),
                                            ("timm", "tf_efficientnet_b2", 45),
                                            ("torchvision", "efficientnet_b0", 40)])
def test_model_matches_module_route_and_original(source, name, hw, plan_calls):
    """Every block (with and without expansion, residual, gated and SE-scaled projection,
    SAME padding on odd sizes) runs through its plan; the logits are the module route's
    and within the parity rule of the original model."""
    original = _model(source, name).to(memory_format=CL)
    fused = copy.deepcopy(original)
    ek.convert(fused)
    x = torch.randn(2, 3, hw, hw, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        got = fused(x)
        assert len(plan_calls) == len(_blocks(fused))
        same_route = _module_route(fused, x)
        same = original(x)
        truth = copy.deepcopy(original).double()(x.double())
    _assert_module_route(got, same_route)
    assert_parity(f"{name} eval logits", got, same, truth, torch.float32)


def _block_and_input(hw=8, seed=1):
    original = _model("timm", "efficientnet_b0").blocks[1][1]  # MBConv 24 -> 24, residual
    fused = ek.nn.MBConv.from_timm(copy.deepcopy(original)).eval()
    x = torch.randn(2, 24, hw, hw, generator=torch.Generator().manual_seed(seed))
    return fused, original, x.contiguous(memory_format=CL)


@pytest.mark.parametrize("case", ["nchw", "non_contiguous"])
def test_other_layouts_run_the_plan_on_a_channels_last_copy(case, plan_calls):
    """A block given NCHW or non-dense input runs its plan on a channels_last copy
    (nn/block_layout.py) and returns NCHW, with the channels_last input's result."""
    fused, original, x_cl = _block_and_input()
    x = x_cl.contiguous() if case == "nchw" else torch.cat([x_cl, x_cl], dim=3)[..., ::2]
    with torch.no_grad():
        got = fused(x)
        same = fused(x.contiguous(memory_format=CL))
        truth = copy.deepcopy(original).double()(x.double())
    assert len(plan_calls) == 2
    assert got.is_contiguous()
    torch.testing.assert_close(got, same, rtol=0, atol=0)
    assert_parity(case, got, original(x), truth, x.dtype)


@pytest.mark.parametrize("case", ["bfloat16", "grad", "training", "reference", "empty"])
def test_steps_aside_where_it_does_not_apply(case, plan_calls):
    """Inputs and modes the plan does not compute take the module route, with the same
    results as before."""
    fused, original, x = _block_and_input()
    ctx = torch.no_grad()
    if case == "bfloat16":
        fused, original, x = fused.bfloat16(), original.bfloat16(), x.bfloat16()
    elif case == "grad":
        ctx = torch.enable_grad()
    elif case == "training":
        fused.train()
        original.train()
    elif case == "reference":
        ctx = use_backend("reference")
    elif case == "empty":
        x = x[:0]
    with ctx:
        got = fused(x)
    assert plan_calls == []
    if case == "grad":
        assert got.requires_grad
    with torch.no_grad():
        same = original(x)
        if case == "training":
            return  # batch statistics: the original's pass updated its own running stats
        truth = copy.deepcopy(original).double()(x.double())
    assert_parity(case, got, same, truth, x.dtype)


@pytest.mark.parametrize("change", ["weight", "bn_stats", "se_bias", "load_state_dict",
                                    "train_step"])
def test_plan_follows_in_place_changes(change, plan_calls):
    """An in-place write to any source (weights, BN running stats, SE bias, a state_dict
    load, a training step's optimizer update and running-stat update) rebuilds the plan."""
    fused, original, x = _block_and_input()
    with torch.no_grad():
        fused(x)
        fused(x)
    assert len(plan_calls) == 2 and plan_calls[0] is plan_calls[1]  # kept between calls
    if change == "weight":
        with torch.no_grad():
            fused.conv_pwl.weight.mul_(1.5)
    elif change == "bn_stats":
        with torch.no_grad():
            fused.bn2.running_var.mul_(2.0)
    elif change == "se_bias":
        with torch.no_grad():
            fused.se.conv_expand.bias.add_(0.5)
    elif change == "load_state_dict":
        state = {k: v * 1.1 if v.is_floating_point() else v
                 for k, v in fused.state_dict().items()}
        fused.load_state_dict(state)
    elif change == "train_step":
        opt = torch.optim.SGD(fused.parameters(), lr=0.1)
        fused.train()
        fused(x.clone().requires_grad_()).square().mean().backward()
        opt.step()
        fused.eval()
    with torch.no_grad():
        got = fused(x)
        same_route = _module_route(fused, x)
    assert plan_calls[-1] is not plan_calls[0]
    _assert_module_route(got, same_route)


@pytest.mark.parametrize("name,hw", [("efficientnet_b0", 64), ("efficientnet_b0", 16)])
def test_weights_are_packed_once_and_give_the_same_bits(name, hw, monkeypatch):
    """Each plan packs its expand and (where the gate is not folded in) projection weight
    once, on first use; later calls reuse them and the logits are bitwise those of per-call
    packing (PACK_WEIGHTS off). At 16 x 16 the 7x7-stage blocks' projections run ungated
    (on y * gate), so their weights are packed too. A write to a source packs again."""
    packs = []
    pack = EXT.cpu.pack_weight
    monkeypatch.setattr(EXT.cpu, "pack_weight", lambda w: packs.append(tuple(w.shape)) or pack(w))
    fused = copy.deepcopy(_model("timm", name)).to(memory_format=CL)
    ek.convert(fused)
    x = torch.randn(2, 3, hw, hw, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        got = fused(x)
        first = len(packs)
        assert fused(x).equal(got) and len(packs) == first
        monkeypatch.setattr(eval_plan, "PACK_WEIGHTS", False)
        assert fused(x).equal(got) and len(packs) == first
        monkeypatch.setattr(eval_plan, "PACK_WEIGHTS", True)
        expands = sum(1 for _, b in _blocks(fused) if hasattr(b, "conv_pw"))
        assert first >= expands
        fused.blocks[6][0].conv_pwl.weight.mul_(0.5)
        fused(x)
    assert len(packs) > first


def test_inference_tensors_are_planned_per_call(plan_calls):
    """Weights loaded under inference_mode have no version counter: no memo, a plan per
    call, the module route's results."""
    fused, _, x = _block_and_input()
    with torch.inference_mode():
        for module in fused.modules():
            for name, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is not None:
                    setattr(module, name, torch.nn.Parameter(t.detach().clone(), False)
                            if isinstance(t, torch.nn.Parameter) else t.clone())
        got = fused(x)
        again = fused(x)
        same_route = _module_route(fused, x)
    assert len(plan_calls) == 2 and plan_calls[0] is not plan_calls[1]
    _assert_module_route(got, same_route)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


@pytest.mark.parametrize("source,name,hw", [("timm", "efficientnet_b0", 64),
                                            ("timm", "tf_efficientnet_b2", 45),
                                            ("torchvision", "efficientnet_b0", 40)])
def test_compiled_model_runs_every_block_as_one_op(source, name, hw, plan_calls):
    """torch.compile (fullgraph): each block is the block_eval custom op, its plan
    prepared in the graph; the logits are the eager plan's and within the parity rule of
    the original model."""
    original = _model(source, name).to(memory_format=CL)
    fused = copy.deepcopy(original)
    ek.convert(fused)
    x = torch.randn(2, 3, hw, hw, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=CL)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
        assert len(plan_calls) == len(_blocks(fused))
        eager = fused(x)
        same = original(x)
        truth = copy.deepcopy(original).double()(x.double())
    torch._dynamo.reset()
    _assert_module_route(got, eager)
    assert_parity(f"{name} compiled eval logits", got, same, truth, torch.float32)


@pytest.mark.parametrize("expand,se,padding", [(True, True, 1), (False, True, -1),
                                               (True, False, 2)])
def test_block_eval_opcheck(expand, se, padding):
    g = torch.Generator().manual_seed(0)
    cin, mid, cout, k = 8, 16, 12, 3 if padding != 2 else 5

    def rand(*shape):
        return torch.randn(*shape, generator=g)
    x = rand(2, cin if expand else mid, 9, 7).contiguous(memory_format=CL)
    args = (x, rand(mid, cin, 1, 1) if expand else None, rand(mid) if expand else None,
            rand(mid, 1, k, k), torch.rand(mid, generator=g) + 0.5, rand(mid),
            rand(mid, 4).contiguous() if se else None, rand(4) if se else None,
            rand(4, mid).contiguous() if se else None, rand(mid) if se else None,
            rand(cout, mid, 1, 1), rand(cout), [2, 2, 2, 0], 2 if padding == 2 else 1,
            padding, False)
    torch.library.opcheck(eval_plan.block_eval, args)
    out = eval_plan.block_eval(*args)
    assert out.is_contiguous(memory_format=CL)
