"""se_gate_eval (csrc/cpu/squeeze_excite.cpp), the eval plan's squeeze-excite gate: parity with
the ATen composition it replaces against float64, every activation; clear errors for
malformed arguments. (The projection applies the gate: test_pointwise_conv.py.)"""

from __future__ import annotations

import pytest
import torch
from act_cases import ACTS

from effnet_kernels._ext import ext_module
from effnet_kernels.ops.activations import act_code
from effnet_kernels.testing import assert_parity

EXT = ext_module()
pytestmark = pytest.mark.skipif(EXT is None, reason="compiled extension not available")


def _inputs(n, c, cr, seed=0, act="silu"):
    """For relu6 the reduce biases also step across [-2, 8]: hidden units sit below,
    inside and above the clamp."""
    gen = torch.Generator().manual_seed(seed)
    reduce_bias = torch.randn(cr, generator=gen) * 0.1
    if act == "relu6":
        reduce_bias = reduce_bias + torch.linspace(-2, 8, cr)
    return {"sums": torch.randn(n, c, generator=gen) * 40,
            "reduce_t": torch.randn(c, cr, generator=gen) / c ** 0.5,
            "reduce_bias": reduce_bias,
            "expand_t": torch.randn(cr, c, generator=gen) / cr ** 0.5,
            "expand_bias": torch.randn(c, generator=gen) * 0.1}


def _composition(t, count, act, dtype):
    """The ATen ops the plan ran before: div, addmm, act, addmm, sigmoid."""
    v = {k: x.to(dtype) for k, x in t.items()}
    hidden = torch.addmm(v["reduce_bias"], v["sums"] / count, v["reduce_t"])
    hidden = ACTS[act](hidden)
    return torch.addmm(v["expand_bias"], hidden, v["expand_t"]).sigmoid()


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("n,c,cr", [(8, 96, 4), (1, 1152, 48), (3, 37, 5), (2, 16, 1)])
def test_matches_composition(n, c, cr, act):
    t = _inputs(n, c, cr, act=act)
    count = 49
    gate = EXT.cpu.se_gate_eval(t["sums"], count, t["reduce_t"], t["reduce_bias"], t["expand_t"],
                                t["expand_bias"], act_code(act))
    assert gate.shape == (n, c)
    assert_parity("gate", gate, _composition(t, count, act, torch.float32),
                  _composition(t, count, act, torch.float64), torch.float32)


@pytest.mark.parametrize("bad,match", [
    ("count", "count must be positive"),
    ("reduce_t_shape", "reduce_t must have shape"),
    ("expand_t_dtype", "expand_t must be float32"),
    ("bias_len", "expand_bias must have shape"),
    ("act", "act must be"),
    ("non_contiguous", "reduce_t must be contiguous"),
])
def test_bad_arguments(bad, match):
    t = _inputs(2, 16, 4)
    count, act = 9, act_code("silu")
    if bad == "count":
        count = 0
    elif bad == "reduce_t_shape":
        t["reduce_t"] = t["reduce_t"][:-1]
    elif bad == "expand_t_dtype":
        t["expand_t"] = t["expand_t"].double()
    elif bad == "bias_len":
        t["expand_bias"] = t["expand_bias"][:-1]
    elif bad == "act":
        act = 7
    elif bad == "non_contiguous":
        t["reduce_t"] = t["reduce_t"].t().contiguous().t()
    with pytest.raises(RuntimeError, match=match):
        EXT.cpu.se_gate_eval(t["sums"], count, t["reduce_t"], t["reduce_bias"], t["expand_t"],
                             t["expand_bias"], act)
