"""The CPU training tail of a block (nn/train_tail.py): the squeeze-excite gate folded into
the projection conv's weights. Whole timm blocks against their originals (output, input
gradient, every parameter gradient, BN running statistics and counters) under the parity
rule, eager and under torch.compile (the custom op of nn/train_tail_op.py: opcheck,
gradcheck), float64 gradcheck of the autograd function, when the tail applies and when it
steps aside, and that the gated activation is not saved for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from act_cases import act_spread
from model_cases import randomize_bn

from effnet_kernels.nn import DepthwiseSeparable, MBConv, mbconv, train_tail, train_tail_op
from effnet_kernels.nn.train_tail import SEProjectionTrain, train_tail_applies
from effnet_kernels.ops.activations import act_code
from effnet_kernels.testing import parity

timm = pytest.importorskip("timm")

CL = torch.channels_last


@pytest.fixture
def tail_calls(monkeypatch):
    """Counts the calls that ran through the training tail."""
    calls = []
    apply = SEProjectionTrain.apply

    def spy(*args):
        calls.append(args[0].shape)
        return apply(*args)
    monkeypatch.setattr(SEProjectionTrain, "apply", spy)
    return calls


def _timm_block(name: str, variant: str = "efficientnet_b0"):
    model = randomize_bn(timm.create_model(variant, num_classes=10))
    index = {"ds": (0, 0), "mb_s2": (1, 0), "mb_res": (1, 1), "mb_late": (6, 0)}[name]
    return model.blocks[index[0]][index[1]]


def _step(block, x, dout):
    """Output, input gradient, parameter gradients and buffers after one training step."""
    block.train()
    x = x.detach().clone().requires_grad_()
    out = block(x)
    out.backward(dout.to(out.dtype))
    grads = {n: p.grad for n, p in block.named_parameters()}
    return out.detach(), x.grad, grads, {n: b.clone() for n, b in block.named_buffers()}


@pytest.mark.parametrize("name,hw,tail", [("ds", 12, True), ("mb_s2", 16, True),
                                          ("mb_res", 8, True), ("mb_late", 8, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [3, 2 * torch.get_num_threads() + 1], ids=["few", "many"])
def test_block_training_matches_timm(name, hw, tail, dtype, batch, tail_calls):
    """The tail where H*W >= 2 Cout (ds: 144 >= 32, mb_s2: 8x8 after stride 2 >= 48,
    mb_res: 64 >= 48), the unfused order where not (mb_late: 64 < 640); with fewer and
    with more than two samples per thread (float32: the per-sample weight-gradient
    products on torch.bmm, then on the extension)."""
    original = _timm_block(name).to(dtype)
    cls = DepthwiseSeparable if name == "ds" else MBConv
    fused = cls.from_timm(copy.deepcopy(original))
    cin = original.conv_dw.in_channels if name == "ds" else original.conv_pw.in_channels
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cin, hw, hw, generator=g).contiguous(memory_format=CL)
    with torch.no_grad():
        out_shape = copy.deepcopy(original)(x.to(dtype)).shape
    dout = torch.randn(out_shape, generator=g).contiguous(memory_format=CL)
    truth_block = copy.deepcopy(original).double()
    got = _step(fused, x.to(dtype), dout)
    same = _step(original, x.to(dtype), dout)
    truth = _step(truth_block, x.double(), dout.double())
    assert len(tail_calls) == (1 if tail else 0)
    assert got[0].is_contiguous(memory_format=CL)
    failures = []
    checks = [("out", got[0], same[0], truth[0], None), ("dx", got[1], same[1], truth[1], None)]
    scale = max(t.abs().max().item() for t in truth[2].values())
    checks += [(f"grad {n}", got[2][n], same[2][n], t, scale) for n, t in truth[2].items()]
    checks += [(f"buffer {n}", got[3][n], same[3][n], t, None) for n, t in truth[3].items()
               if t.is_floating_point()]
    for what, a, b, t, s in checks:
        p = parity(what, a, b, t, dtype, scale=s)
        failures += [] if p.ok else [str(p)]
    assert not failures, "\n".join(failures)
    for n, t in truth[3].items():
        if not t.is_floating_point():
            assert torch.equal(got[3][n], t), n  # num_batches_tracked


@pytest.mark.parametrize("name,hw,tail", [("ds", 12, True), ("mb_res", 8, True),
                                          ("mb_late", 8, False)])
def test_compiled_block_training_matches_timm(name, hw, tail, monkeypatch):
    """torch.compile (fullgraph): the tail as the custom op of nn/train_tail_op.py."""
    calls = []
    traced = mbconv.se_projection_traced
    monkeypatch.setattr(mbconv, "se_projection_traced",
                        lambda *a: calls.append(1) or traced(*a))
    original = _timm_block(name)
    cls = DepthwiseSeparable if name == "ds" else MBConv
    fused = cls.from_timm(copy.deepcopy(original))
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    cin = original.conv_dw.in_channels if name == "ds" else original.conv_pw.in_channels
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, cin, hw, hw, generator=g).contiguous(memory_format=CL)
    with torch.no_grad():
        out_shape = copy.deepcopy(original)(x).shape
    dout = torch.randn(out_shape, generator=g).contiguous(memory_format=CL)
    truth = _step(copy.deepcopy(original).double(), x.double(), dout.double())
    same = _step(original, x, dout)
    out, dx, grads, buffers = _step(compiled, x, dout)
    got = (out, dx, *({k.removeprefix("_orig_mod."): v for k, v in d.items()}
                      for d in (grads, buffers)))
    torch._dynamo.reset()
    assert len(calls) == (1 if tail else 0)
    scale = max(t.abs().max().item() for t in truth[2].values())
    checks = [("out", got[0], same[0], truth[0], None), ("dx", got[1], same[1], truth[1], None)]
    checks += [(f"grad {n}", got[2][n], same[2][n], t, scale) for n, t in truth[2].items()]
    checks += [(f"buffer {n}", got[3][n], same[3][n], t, None) for n, t in truth[3].items()
               if t.is_floating_point()]
    failures = [str(p) for what, a, b, t, sc in checks
                if not (p := parity(what, a, b, t, torch.float32, scale=sc)).ok]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_gated_op_opcheck(dtype, affine):
    g = torch.Generator().manual_seed(0)
    n, c, cout, h, w = 2, 6, 4, 5, 3
    y = torch.randn(n, c, h, w, generator=g, dtype=dtype).contiguous(memory_format=CL)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gate = torch.rand(n, c, generator=g, dtype=acc)
    weight = torch.randn(cout, c, 1, 1, generator=g, dtype=dtype)
    gamma = torch.rand(cout, generator=g) + 0.5 if affine else None
    beta = torch.randn(cout, generator=g) if affine else None
    args = [y.requires_grad_(), gate.requires_grad_(), weight.requires_grad_(),
            *(t if t is None else t.requires_grad_() for t in (gamma, beta)), 1e-3, 2]
    torch.library.opcheck(train_tail_op.gated_conv_bn_act_fwd, args)
    out, mean, var, p = train_tail_op.gated_conv_bn_act_fwd(*args)
    plain = [t if t is None else t.detach() for t in args[:5]]
    torch.library.opcheck(train_tail_op.gated_conv_bn_act_bwd,
                          (torch.randn_like(out), *plain, mean, var, p, 1e-3, 2))


def test_gated_op_gradcheck():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64)
    inputs = (y.contiguous(memory_format=CL), torch.rand(2, 5, generator=g, dtype=torch.float64),
              torch.randn(4, 5, 1, 1, generator=g, dtype=torch.float64) * 0.5,
              torch.rand(4, generator=g, dtype=torch.float64) + 0.5,
              torch.randn(4, generator=g, dtype=torch.float64))
    inputs = tuple(t.requires_grad_() for t in inputs)

    def run(*t):
        return train_tail_op.gated_conv_bn_act_fwd(*t, 1e-5, 2)[0]
    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("se_act,act", [("silu", "identity"), ("relu", "silu"),
                                        ("relu6", "relu6")])
def test_gradcheck(se_act, act):
    g = torch.Generator().manual_seed(0)
    n, c, cr, cout, h, w = 2, 6, 3, 4, 3, 3

    def rand(*shape, scale=1.0, offset=0.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset
        return t.requires_grad_()
    y = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    y = y.contiguous(memory_format=CL).requires_grad_()
    params = (rand(cr, c, 1, 1, scale=0.5), rand(cr), rand(c, cr, 1, 1, scale=0.5), rand(c),
              rand(cout, c, 1, 1, scale=0.5), rand(cout, scale=0.2, offset=act_spread(act)), rand(cout))

    def run(y, *p):
        sums = y.detach().sum(dim=(2, 3))  # the depthwise epilogue's sums: no gradient
        return SEProjectionTrain.apply(y, sums, *p, act_code(se_act), 1e-5, act_code(act), None)[0]
    assert torch.autograd.gradcheck(run, (y, *params))


def _parts(cout=8, c=16):
    conv, bn = torch.nn.Conv2d(c, cout, 1, bias=False), torch.nn.BatchNorm2d(cout)
    return conv, bn, "identity"


def test_applies_only_where_it_serves():
    y = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL)
    conv, bn, act = _parts()
    assert train_tail_applies(y, (conv, bn, act))                         # 16 >= 2 * 8
    assert not train_tail_applies(y[:, :, :3, :3].contiguous(memory_format=CL),
                                  (conv, bn, act))                         # 9 < 16
    assert not train_tail_applies(y.contiguous(), (conv, bn, act))         # NCHW
    assert not train_tail_applies(y.bfloat16(), (conv.bfloat16(), bn, act))
    assert not train_tail_applies(y, (conv, bn.eval(), act))               # eval
    assert not train_tail_applies(y, (torch.nn.Conv2d(16, 8, 1), bn.train(), act))  # bias
    assert not train_tail_applies(y[:0], (conv, bn, act))                  # empty batch
    with torch.autocast("cpu"):
        assert not train_tail_applies(y, (conv, bn, act))
    train_tail.ENABLED = False
    try:
        assert not train_tail_applies(y, (conv, bn, act))
    finally:
        train_tail.ENABLED = True


def _saved_bytes(block, x) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return total


def test_gated_activation_is_not_saved(monkeypatch):
    """With the tail, the block saves at least one activation of the depthwise output's
    size less (the SE-scaled y that the projection would save)."""
    block = MBConv.from_timm(_timm_block("mb_res")).train()
    x = torch.randn(2, 24, 16, 16).contiguous(memory_format=CL).requires_grad_()
    dw_out_bytes = 2 * 144 * 16 * 16 * 4
    with_tail = _saved_bytes(block, x)
    monkeypatch.setattr(train_tail, "ENABLED", False)
    assert _saved_bytes(block, x) - with_tail >= dw_out_bytes


def test_double_backward_raises_instead_of_a_wrong_answer():
    """The backward's primitives record no graph: a second derivative raises."""
    conv, bn, _ = _parts()
    se = MBConv(4, 8, exp_ratio=4).se  # 16 channels, like _parts' conv input
    y = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL).requires_grad_()
    out = train_tail.se_projection_train(y, y.detach().sum(dim=(2, 3)),
                                         (se.conv_reduce, se.conv_expand, "silu"),
                                         (conv, bn, "identity"))
    (dy,) = torch.autograd.grad(out.square().sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dy.sum().backward()
