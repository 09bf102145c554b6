"""BatchNorm + act as fused passes on their own (nn/bn_act.py; timm's stem and head norms
in a converted model): parity with BatchNorm2d + act for the output, the input and
parameter gradients and the running statistics, float64 gradcheck, the eval pass, and the
calls it leaves to the module."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from act_cases import ACTS, act_spread
from torch import nn

from effnet_kernels.nn.bn_act import BNActTrain, bn_act
from effnet_kernels.testing import parity

CL = torch.channels_last


def _bn(c: int, dtype=torch.float32, spread=1.0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(3)
    bn = nn.BatchNorm2d(c, eps=1e-3, momentum=0.2)
    with torch.no_grad():
        bn.weight.copy_((torch.rand(c, generator=g) + 0.5) * spread)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn.to(dtype)


def _run(fused: bool, bn: nn.BatchNorm2d, x: torch.Tensor, act: str, dout: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = bn_act(x, bn, act) if fused else ACTS[act](bn(x))
    assert out is not None
    out.backward(dout)
    return {"out": out.detach(), "dx": x.grad, "dgamma": bn.weight.grad, "dbeta": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var}


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("shape", [(4, 32, 17, 15), (2, 40, 7, 7), (3, 5, 1, 2)])
def test_training_matches_batchnorm_then_act(shape, act, fmt):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).contiguous(memory_format=fmt)
    dout = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    base = _bn(shape[1], spread=act_spread(act)).train()
    got = _run(True, copy.deepcopy(base), x, act, dout)
    same = _run(False, copy.deepcopy(base), x, act, dout)
    truth = _run(False, copy.deepcopy(base).double(), x.double(), act, dout.double())
    assert got["out"].is_contiguous(memory_format=fmt)
    failures = [str(p) for k in truth
                if not (p := parity(k, got[k], same[k], truth[k], torch.float32)).ok]
    assert not failures, "\n".join(failures)


def test_eval_matches_batchnorm_then_act():
    x = torch.randn(2, 24, 9, 9).contiguous(memory_format=CL)
    bn = _bn(24).eval()
    with torch.no_grad():
        got = bn_act(x, bn, "silu")
        same = F.silu(bn(x))
        truth = F.silu(copy.deepcopy(bn).double()(x.double()))
    p = parity("eval out", got, same, truth, torch.float32)
    assert p.ok, str(p)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, w, b: BNActTrain.apply(a, w, b, 1e-3, 1, None), (x, gamma, beta))


def test_num_batches_tracked_and_cumulative_momentum():
    x = torch.randn(4, 8, 6, 6)
    fused, plain = _bn(8).train(), _bn(8).train()
    fused.momentum = plain.momentum = None
    for _ in range(3):
        with torch.no_grad():
            bn_act(x, fused, "relu")
            F.relu(plain(x))
    assert fused.num_batches_tracked.item() == plain.num_batches_tracked.item() == 3
    torch.testing.assert_close(fused.running_mean, plain.running_mean)
    torch.testing.assert_close(fused.running_var, plain.running_var)


def test_calls_left_to_the_module():
    """bf16, autograd through an eval BN and one value per channel in training are the
    module's own business: bn_act returns None and counts nothing."""
    bn = _bn(8).train()
    assert bn_act(torch.randn(2, 8, 4, 4, dtype=torch.bfloat16), bn, "silu") is None
    assert bn_act(torch.randn(1, 8, 1, 1), bn, "silu") is None
    assert bn.num_batches_tracked.item() == 0
    bn.eval()
    assert bn_act(torch.randn(2, 8, 4, 4, requires_grad=True), bn, "silu") is None


def test_converted_timm_model_pickles_and_reverts():
    timm = pytest.importorskip("timm")
    import effnet_kernels
    model = timm.create_model("efficientnet_b0", num_classes=10)
    effnet_kernels.convert(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.bn1).__name__ == "FusedBatchNormAct2d"
    x = torch.randn(2, 3, 32, 32)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert type(loaded.conv_head).__name__ == "GemmConv2d"
    assert type(loaded.classifier).__name__ == "GemmLinear"
    assert type(loaded).__name__ == "FusedStemEfficientNet"
    # blocks; bn1, bn2, the model (its fused stem), conv_head, classifier
    assert effnet_kernels.revert(loaded) == 16 + 5
    assert type(loaded).__name__ == "EfficientNet"
    assert type(loaded.bn1).__name__ == "BatchNormAct2d"
    assert type(loaded.classifier) is nn.Linear
