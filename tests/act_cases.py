"""The activations the fused kernels compute, as the PyTorch functions the tests take as
truth, and how far a test spreads the pre-activations so that each one's kinks are crossed."""

from __future__ import annotations

import torch.nn.functional as F

ACTS = {"identity": lambda t: t, "relu": F.relu, "silu": F.silu, "relu6": F.relu6}


def act_spread(act: str) -> float:
    """Factor on the standard deviation of a test's pre-activations. ReLU6 clamps at 0 and
    at 6: with a spread of 4 about 7 % of normal values land above 6, so both clamps and the
    linear piece between them are exercised; the other activations keep unit spread."""
    return 4.0 if act == "relu6" else 1.0
