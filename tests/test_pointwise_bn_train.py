"""The tiled CPU training 1x1 conv + BN + act (csrc/cpu/pointwise_bn_train.cpp, through
nn/pointwise.py): output, every gradient and the running statistics against float64
conv2d -> batch_norm -> act under the parity rule, for a recomputed and a kept y, shapes
with few tiles, many tiles, more tiles than groups and a weight large enough to cap the
dW partials, and a narrowing conv that stays on the unfused route; convs whose forward
runs untiled and keeps y, with the backward tiled on that y or not; bitwise the same
results on one thread and on two; the primitives' argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from act_cases import ACTS, act_spread

from effnet_kernels import use_backend
from effnet_kernels._ext import ext_module
from effnet_kernels.nn import pointwise
from effnet_kernels.nn.pointwise import conv_bn_act_train
from effnet_kernels.ops.activations import ACT_CODES
from effnet_kernels.testing import parity

EXT = ext_module()
pytestmark = pytest.mark.skipif(
    EXT is None or not hasattr(EXT.cpu, "pw_bn_stats") or not EXT.cpu.pw_conv_available(),
    reason="compiled extension with the tiled pointwise kernels and BLAS sgemm not available")
CL = torch.channels_last
CASES = [  # (N, Cin, Cout, H, W): y recomputed where Cin < 64, else kept
    (2, 5, 12, 7, 9),        # 8 tiles of 16 rows, odd channel counts
    (2, 64, 80, 5, 4),       # Cin >= KEEP_Y_MIN_MACS: kept
    (2, 16, 96, 48, 48),     # 7 tiles of 682 rows
    (1, 24, 144, 96, 96),    # 21 tiles in 16 groups
    (1, 400, 1200, 4, 4),    # Cout * Cin above the dW partial budget: 4 groups (the
                             # route's TILED_MAX_WEIGHT raised for it)
    (3, 40, 24, 8, 8),       # Cout < Cin: not tiled (the unfused route)
]


def _inputs(case, seed=0, act="silu"):
    n, cin, cout, h, w = case
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, cin, h, w, generator=gen) + 0.5,
            torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5,
            (torch.rand(cout, generator=gen) + 0.5) * act_spread(act),
            torch.randn(cout, generator=gen),
            torch.randn(cout, generator=gen), torch.rand(cout, generator=gen) + 0.5,
            torch.randn(n, cout, h, w, generator=gen)]


def _run(fn, inputs, dtype):
    x, w, g, b, rm, rv, dy = (t.clone().to(dtype) for t in inputs)
    x = x.contiguous(memory_format=CL).requires_grad_()
    w, g, b = (t.requires_grad_() for t in (w, g, b))
    out = fn(x, w, g, b, rm, rv)
    out.backward(dy.contiguous(memory_format=CL))
    return {"out": out, "dx": x.grad, "dweight": w.grad, "dgamma": g.grad, "dbeta": b.grad,
            "running_mean": rm, "running_var": rv}


def _fused(act):
    def run(x, w, g, b, rm, rv):
        return conv_bn_act_train(x, w, g, b, rm, rv, stride=1, padding=0, groups=1,
                                 momentum=0.1, eps=1e-3, act=act)
    return run


def _eager(act):
    def run(x, w, g, b, rm, rv):
        return ACTS[act](F.batch_norm(F.conv2d(x, w), rm, rv, g, b, True, 0.1, 1e-3))
    return run


@pytest.fixture
def stats_calls(monkeypatch):
    """Records the statistics primitive of every tiled call: keep_y of pw_bn_stats, or
    "gram" for pw_bn_stats_gram."""
    calls = []
    stats, gram = EXT.cpu.pw_bn_stats, EXT.cpu.pw_bn_stats_gram

    def spy(x, w, keep_y):
        calls.append(keep_y)
        return stats(x, w, keep_y)

    def spy_gram(x, w):
        calls.append("gram")
        return gram(x, w)
    monkeypatch.setattr(EXT.cpu, "pw_bn_stats", spy)
    monkeypatch.setattr(EXT.cpu, "pw_bn_stats_gram", spy_gram)
    return calls


def _expected_route(case):
    n, cin, cout, h, w = case
    if cout <= cin:
        return []
    if cin >= pointwise.KEEP_Y_MIN_MACS:
        return [True]
    gram = pointwise.GRAM and n * h * w >= pointwise.GRAM_MIN_ROWS_PER_INPUT * cin
    return ["gram" if gram else False]


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "two_pass"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("act", sorted(ACTS))
def test_tiled_route_matches_eager(case, act, gram, stats_calls, monkeypatch):
    monkeypatch.setattr(pointwise, "TILED_MAX_WEIGHT", 1 << 20)
    monkeypatch.setattr(pointwise, "GRAM", gram)
    inputs = _inputs(case, act=act)
    truth = _run(_eager(act), inputs, torch.float64)
    same = _run(_eager(act), inputs, torch.float32)
    with use_backend("cpu"):
        got = _run(_fused(act), inputs, torch.float32)
    assert stats_calls == _expected_route(case)
    failures = [str(p) for key in truth
                if not (p := parity(key, got[key], same[key], truth[key], torch.float32)).ok]
    assert not failures, "; ".join(failures)
    assert got["out"].is_contiguous(memory_format=CL) and got["dx"].is_contiguous(memory_format=CL)


# (N, Cin, Cout, H, W) of convs whose forward stays untiled and keeps y: narrowing
# (projections, one of them with a Cout tail) and a weight above TILED_MAX_WEIGHT.
KEPT_UNTILED = [(3, 40, 24, 8, 8), (2, 96, 37, 7, 5), (1, 400, 1200, 4, 4)]


@pytest.mark.parametrize("tiled_backward", [True, False], ids=["tiled_bwd", "passes_bwd"])
@pytest.mark.parametrize("case", KEPT_UNTILED, ids=str)
@pytest.mark.parametrize("act", ["silu", "identity"])
def test_untiled_forward_with_kept_y(case, act, tiled_backward, stats_calls, monkeypatch):
    """The forward runs one GEMM, then the BN passes, and keeps y; the backward runs the
    tiled primitives on that y (TILED_KEPT_BACKWARD) or the BN passes and two GEMMs."""
    monkeypatch.setattr(pointwise, "TILED_KEPT_BACKWARD", tiled_backward)
    tiled_calls = []
    backward = EXT.cpu.pw_bn_backward

    def spy(*args):
        tiled_calls.append(args[3] is not None)  # y given: the kept one
        return backward(*args)
    monkeypatch.setattr(EXT.cpu, "pw_bn_backward", spy)
    inputs = _inputs(case, seed=5)
    truth = _run(_eager(act), inputs, torch.float64)
    same = _run(_eager(act), inputs, torch.float32)
    with use_backend("cpu"):
        got = _run(_fused(act), inputs, torch.float32)
    assert stats_calls == [] and tiled_calls == ([True] if tiled_backward else [])
    failures = [str(p) for key in truth
                if not (p := parity(key, got[key], same[key], truth[key], torch.float32)).ok]
    assert not failures, "; ".join(failures)
    assert got["dx"].is_contiguous(memory_format=CL)


@pytest.mark.parametrize("case", [(2, 96, 288, 7, 7), (4, 288, 96, 7, 7), (1, 400, 1200, 4, 4)],
                         ids=str)
@pytest.mark.parametrize("gemm", ["auto", "blas"])
def test_whole_dy_and_group_partials_give_the_same_gradients(case, gemm, monkeypatch):
    """Where dL/dy is small the backward keeps it whole and takes dW over all rows
    (pw_set_kept_dy, on by default); with it off, per-group dW partials. Both meet the
    parity rule, dx is bitwise the same, and dW differs only in the order of its sums; on
    the GEMM route this CPU picks and on BLAS sgemm_ (dW blocks read dy's columns at a
    row stride)."""
    monkeypatch.setattr(pointwise, "TILED_MAX_WEIGHT", 1 << 20)
    inputs = _inputs(case, seed=9)
    truth = _run(_eager("silu"), inputs, torch.float64)
    same = _run(_eager("silu"), inputs, torch.float32)
    got = {}
    previous, mode = EXT.cpu.pw_set_kept_dy(True), EXT.cpu.gemm_set_mode(gemm)
    try:
        for whole in (True, False):
            EXT.cpu.pw_set_kept_dy(whole)
            with use_backend("cpu"):
                got[whole] = _run(_fused("silu"), inputs, torch.float32)
    finally:
        EXT.cpu.pw_set_kept_dy(previous)
        EXT.cpu.gemm_set_mode(mode)
    for route in got.values():
        failures = [str(p) for key in truth
                    if not (p := parity(key, route[key], same[key], truth[key], torch.float32)).ok]
        assert not failures, "; ".join(failures)
    assert torch.equal(got[True]["dx"], got[False]["dx"])
    assert not torch.equal(got[True]["dweight"], got[False]["dweight"])  # the route ran


@pytest.mark.parametrize("gemm", ["auto", "blas"])
@pytest.mark.parametrize("case", [*CASES[1:5], (4, 288, 96, 7, 7)], ids=str)
def test_results_do_not_depend_on_the_thread_count(case, gemm, monkeypatch):
    monkeypatch.setattr(pointwise, "TILED_MAX_WEIGHT", 1 << 20)
    inputs = _inputs(case, seed=3)
    threads, mode = torch.get_num_threads(), EXT.cpu.gemm_set_mode(gemm)
    got = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with use_backend("cpu"):
                got[count] = _run(_fused("silu"), inputs, torch.float32)
    finally:
        torch.set_num_threads(threads)
        EXT.cpu.gemm_set_mode(mode)
    for key, value in got[1].items():
        assert torch.equal(value, got[2][key]), key


@pytest.mark.parametrize("shape", [(2, 16, 96, 48, 48), (2, 5, 37, 7, 9), (1, 24, 144, 3, 5)],
                         ids=["aligned_rows", "channel_tails", "few_rows"])
@pytest.mark.parametrize("act", list(ACT_CODES))
def test_forward_streaming_stores_give_the_same_bits(shape, act):
    """pw_bn_forward with the epilogue streaming out from scratch (the default) and in place
    over the GEMM's output (pw_set_streaming(False)): the same output, bit for bit, with
    whole aligned vectors, channel tails and unaligned rows."""
    n, cin, cout, h, w = shape
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, cin, h, w, generator=gen).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, generator=gen) / cin ** 0.5
    scale = (torch.rand(cout, generator=gen) + 0.5) * act_spread(act)
    shift = torch.randn(cout, generator=gen)
    previous = EXT.cpu.pw_set_streaming(True)
    try:
        streamed = EXT.cpu.pw_bn_forward(x, weight, scale, shift, ACT_CODES[act])
        EXT.cpu.pw_set_streaming(False)
        in_place = EXT.cpu.pw_bn_forward(x, weight, scale, shift, ACT_CODES[act])
    finally:
        EXT.cpu.pw_set_streaming(previous)
    assert torch.equal(streamed, in_place)
    truth = ACTS[act](
        F.conv2d(x.double(), weight.double()[:, :, None, None]) * scale.double().view(1, -1, 1, 1)
        + shift.double().view(1, -1, 1, 1))
    torch.testing.assert_close(streamed.double(), truth, rtol=1e-4, atol=1e-4)


def test_primitives_name_bad_arguments():
    x = torch.randn(2, 6, 3, 3).contiguous(memory_format=CL)
    w = torch.randn(8, 6)
    v = torch.ones(8)
    dout = torch.randn(2, 8, 3, 3).contiguous(memory_format=CL)
    cases = [
        (lambda: EXT.cpu.pw_bn_stats(x.contiguous(), w, True), "x must be contiguous in channels_last"),
        (lambda: EXT.cpu.pw_bn_stats(x.double(), w, True), "x must have dtype"),
        (lambda: EXT.cpu.pw_bn_stats(x, torch.randn(8, 5), True), r"weight must be \(Cout, 6\)"),
        (lambda: EXT.cpu.pw_bn_stats(x, w.t(), True), "weight must be contiguous"),
        (lambda: EXT.cpu.pw_bn_forward(x, w, v[:7], v, 2), r"scale must be a contiguous cpu \(8\)"),
        (lambda: EXT.cpu.pw_bn_forward(x, w, v, v, 5), "act must be"),
        (lambda: EXT.cpu.pw_bn_backward_reduce(dout[:, :7], x, w, None, v, v, v, 2),
         r"dout must be a cpu \(2, 8, 3, 3\) tensor"),
        (lambda: EXT.cpu.pw_bn_backward_reduce(dout, x, w, dout.contiguous(), v, v, v, 2),
         "y must be contiguous in channels_last"),
        (lambda: EXT.cpu.pw_bn_backward(dout, x, w, None, v, v, v, v, v[:3], 2, True, True),
         r"coef_c must be a contiguous cpu \(8\)"),
        (lambda: EXT.cpu.pw_bn_stats(x[:0], w, True), "must be non-empty"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def _parity_failures(got, same, truth):
    return [str(p) for key in truth
            if not (p := parity(key, got[key], same[key], truth[key], torch.float32)).ok]


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_gram_statistics_match_float64(offset):
    """pw_bn_stats_gram: mean and biased var of y = x W^T from x's moments, as float64
    computes them from y, also for inputs far from zero mean (the moments are taken
    around a shift, then centered)."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 20, 17, 19, generator=gen) + offset).contiguous(memory_format=CL)
    w = torch.randn(72, 20, generator=gen) / 20 ** 0.5
    mean, var, mu, gram = EXT.cpu.pw_bn_stats_gram(x, w)
    rows = x.double().permute(0, 2, 3, 1).reshape(-1, 20)
    y = rows @ w.double().t()
    centered = rows - rows.mean(0)
    torch.testing.assert_close(mu, rows.mean(0), rtol=0, atol=1e-6 * (1 + offset))
    torch.testing.assert_close(gram, centered.t() @ centered, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(mean.double(), y.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), y.var(0, unbiased=False), rtol=1e-5, atol=1e-6)


def test_gram_route_holds_parity_far_from_zero_mean(stats_calls):
    """The Gram route's batch-sum terms work on x - mu: an input offset of 1000 (y's
    mean ~100 standard deviations from zero) keeps every result within the parity rule."""
    case = (2, 16, 96, 24, 24)
    inputs = _inputs(case, seed=7)
    inputs[0] = inputs[0] + 1000.0
    truth = _run(_eager("silu"), inputs, torch.float64)
    same = _run(_eager("silu"), inputs, torch.float32)
    with use_backend("cpu"):
        got = _run(_fused("silu"), inputs, torch.float32)
    assert stats_calls == ["gram"]
    assert not (failures := _parity_failures(got, same, truth)), "; ".join(failures)


@pytest.mark.parametrize("frozen", ["x", "weight"])
def test_gram_route_with_one_of_dx_and_dweight(frozen, stats_calls):
    """need_dx / need_dweight false on the Gram route: the other gradient alone, right."""
    case = (2, 24, 144, 20, 20)
    inputs = _inputs(case, seed=11)
    results = {}
    for dtype in (torch.float64, torch.float32, "fused"):
        x, w, g, b, rm, rv, dy = (t.clone().to(torch.float32 if dtype == "fused" else dtype)
                                  for t in inputs)
        x = x.contiguous(memory_format=CL).requires_grad_(frozen != "x")
        w.requires_grad_(frozen != "weight")
        fn = _fused("silu") if dtype == "fused" else _eager("silu")
        with use_backend("cpu"):
            out = fn(x, w, g, b, rm, rv)
        out.backward(dy.contiguous(memory_format=CL))
        results[dtype] = {"out": out, "grad": (w if frozen == "x" else x).grad}
    assert stats_calls == ["gram"]
    failures = _parity_failures(results["fused"], results[torch.float32], results[torch.float64])
    assert not failures, "; ".join(failures)


def test_gram_primitives_name_bad_arguments():
    x = torch.randn(2, 6, 3, 3).contiguous(memory_format=CL)
    w = torch.randn(8, 6)
    v = torch.ones(8)
    dout = torch.randn(2, 8, 3, 3).contiguous(memory_format=CL)
    mu, gram = torch.zeros(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64)
    dx = torch.zeros_like(x)
    cases = [
        (lambda: EXT.cpu.pw_bn_stats_gram(x.contiguous(), w), "x must be contiguous in channels_last"),
        (lambda: EXT.cpu.pw_bn_stats_gram(x, torch.randn(8, 5)), r"weight must be \(Cout, 6\)"),
        (lambda: EXT.cpu.pw_bn_backward_gram(dout[:, :7], x, w, v, v, v, 2, True, True),
         r"dout must be a cpu \(2, 8, 3, 3\) tensor"),
        (lambda: EXT.cpu.pw_bn_backward_gram(dout, x, w, v, v, v, 7, True, True), "act must be"),
        (lambda: EXT.cpu.pw_bn_gram_finish(x, dx, w, mu.float(), gram, v, v, v, None),
         r"mu must be a float64 cpu \(6\) tensor"),
        (lambda: EXT.cpu.pw_bn_gram_finish(x, dx, w, mu, gram[:5], v, v, v, None),
         r"gram must be a float64 cpu \(6, 6\) tensor"),
        (lambda: EXT.cpu.pw_bn_gram_finish(x, dx, w, mu, gram, v, v[:3], v, None),
         r"coef_b must be a contiguous cpu \(8\)"),
        (lambda: EXT.cpu.pw_bn_gram_finish(x, dx.contiguous(), w, mu, gram, v, v, v, None),
         "dx must be contiguous in channels_last"),
        (lambda: EXT.cpu.pw_bn_gram_finish(x, None, w, mu, gram, v, v, v, torch.zeros(8, 5)),
         "dw_partial must be a contiguous cpu tensor shaped like weight"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
