"""Shared helpers for the whole-model tests (test_models.py, test_convert.py): random but
well-conditioned BN state, and eval / one-train-step parity against a float64 copy of
the original model (design.md §3)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from effnet_kernels.testing import parity

F32 = torch.float32


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm non-trivial affine params and running stats, so eval outputs
    are O(1) and a wrong eps / mean / var would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
    return model


def batch(n: int = 2, hw: int = 32, classes: int = 10, seed: int = 0, fmt=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, hw, hw, generator=g).contiguous(memory_format=fmt)
    return x, torch.randint(0, classes, (n,), generator=g)


def assert_eval_parity(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """model(x) vs reference(x) in eval, judged against reference run in float64."""
    truth_model = copy.deepcopy(reference).double().eval()
    with torch.no_grad():
        got = model.eval()(x)
        same = reference.eval()(x)
        truth = truth_model(x.double())
    p = parity("logits", got, same, truth, F32)
    assert p.ok, str(p)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                autocast: torch.dtype | None = None):
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        logits = model(x)
    # autocast logits (bf16) go to float32 for the loss; the float64 truth stays float64
    F.cross_entropy(logits.to(torch.promote_types(logits.dtype, F32)), y).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return logits.detach(), grads, dict(model.named_buffers())


def assert_train_parity(model: nn.Module, reference: nn.Module, x: torch.Tensor,
                        y: torch.Tensor, autocast: torch.dtype | None = None) -> None:
    """One training forward/backward: logits, every parameter gradient and every BN
    buffer after the step. `model` and `reference` must start from the same state.
    autocast: run both under torch.autocast in this dtype (the truth stays float64)."""
    truth_model = copy.deepcopy(reference).double()
    got = train_step(model, x, y, autocast)
    same = train_step(reference, x, y, autocast)
    truth = train_step(truth_model, x.double(), y)
    dt = autocast or F32
    failures = []
    p = parity("logits", got[0], same[0], truth[0], dt)
    failures += [] if p.ok else [str(p)]
    # Gradients that vanish in exact arithmetic are judged against the model's scale.
    scale = max(g.abs().max().item() for g in truth[1].values() if g is not None)
    for name, g in truth[1].items():
        if g is None:  # a parameter the output does not depend on: no gradient anywhere
            if got[1][name] is not None or same[1][name] is not None:
                failures.append(f"grad {name}: expected none")
            continue
        p = parity(f"grad {name}", got[1][name], same[1][name], g, dt, scale=scale)
        failures += [] if p.ok else [str(p)]
    for name, b in truth[2].items():
        if name.endswith("num_batches_tracked"):
            if not torch.equal(got[2][name], same[2][name]):
                failures.append(f"{name}: {got[2][name]} != {same[2][name]}")
            continue
        p = parity(f"buffer {name}", got[2][name], same[2][name], b, dt)
        failures += [] if p.ok else [str(p)]
    assert not failures, "\n".join(failures[:10]) + f"\n({len(failures)} failures)"


class FlatFeatures(nn.Module):
    """A features-only backbone's maps flattened into one row per image, so the parity
    helpers above can judge them as logits."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.flatten(1) for f in self.backbone(x)], dim=1)
