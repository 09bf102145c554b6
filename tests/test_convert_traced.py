"""Converted models under torch.compile(fullgraph=True) and torch.export, training and eval,
and torch.onnx.export in eval: the whole model traces as one graph (the fused ops appear as
their custom ops, the rest as ATen ops; in ONNX as their plain definition) and gives the
original model's numbers (parity vs float64, design.md §3).

torch.compile runs with backend="aot_eager": it traces exactly what inductor would
(dynamo + AOT autograd, forward and backward graphs) without inductor's code generation;
one training step runs through inductor itself (about 30 s of compilation on two cores),
where the custom ops' fake implementations must agree with the real ones on every
output's strides."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
from model_cases import assert_eval_parity, assert_train_parity, batch, randomize_bn

import effnet_kernels
from effnet_kernels.testing import parity

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

CL = torch.channels_last
# ("effnet_kernels", name): our own model, loaded with the timm model's state_dict.
MODELS = [("timm", "efficientnet_b0"), ("timm", "tf_efficientnet_b0"),
          ("torchvision", "efficientnet_b0"), ("effnet_kernels", "tf_efficientnet_b0")]


def _original(source: str, name: str, drop: float = 0.0) -> torch.nn.Module:
    if source in ("timm", "effnet_kernels"):
        model = timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0,
                                  drop_path_rate=drop)
    else:
        model = torchvision.models.efficientnet_b0(weights=None, num_classes=10, dropout=0.0,
                                                   stochastic_depth_prob=drop)
    return randomize_bn(model).to(memory_format=CL)


def _fused(source: str, name: str, original: torch.nn.Module) -> torch.nn.Module:
    if source == "effnet_kernels":
        ours = effnet_kernels.create_model(name, num_classes=10, drop_rate=0.0,
                                            drop_path_rate=0.0)
        ours.load_state_dict(original.state_dict())
        return ours.to(memory_format=CL).train(original.training)
    fused = copy.deepcopy(original)
    report = effnet_kernels.convert(fused)
    assert report.converted and not report.skipped, str(report)
    return fused


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("source,name", MODELS)
def test_compile_fullgraph_train_step_matches_original(source, name):
    original = _original(source, name)
    fused = _fused(source, name, original)
    fused.compile(fullgraph=True, backend="aot_eager")
    assert_train_parity(fused, original, *batch(2, 64, fmt=CL))


def test_inductor_train_step_matches_original():
    original = _original("timm", "efficientnet_b0")
    fused = _fused("timm", "efficientnet_b0", original)
    fused.compile(fullgraph=True)
    assert_train_parity(fused, original, *batch(2, 64, fmt=CL))


@pytest.mark.parametrize("source,name", MODELS)
def test_compile_fullgraph_eval_matches_original(source, name):
    original = _original(source, name)
    fused = _fused(source, name, original)
    fused.compile(fullgraph=True, backend="aot_eager")
    assert_eval_parity(fused, original, batch(2, 64, fmt=CL)[0])


def test_compile_fullgraph_with_drop_connect():
    """Stochastic depth on: the drop-connect op's custom op is in the graph; one step runs
    and every parameter gets a finite gradient."""
    fused = _fused("timm", "efficientnet_b0", _original("timm", "efficientnet_b0", drop=0.2)).train()
    fused.compile(fullgraph=True, backend="aot_eager")
    x, y = batch(2, 64, fmt=CL)
    torch.nn.functional.cross_entropy(fused(x), y).backward()
    grads = [p.grad for p in fused.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _op_names(exported) -> set[str]:
    return {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}


def _assert_logits_match(got: torch.Tensor, original: torch.nn.Module, x: torch.Tensor,
                         what: str) -> None:
    """got vs the original's logits on x in its current mode, judged against float64."""
    truth = copy.deepcopy(original).double()
    with torch.no_grad():
        same = original(x)
        expected = truth(x.double())
    p = parity(what, got, same, expected, torch.float32)
    assert p.ok, str(p)


@pytest.mark.parametrize("source,name", MODELS)
def test_export_eval_matches_original(source, name):
    original = _original(source, name).eval()
    x = batch(2, 64, fmt=CL)[0]
    exported = torch.export.export(_fused(source, name, original).eval(), (x,))
    with torch.no_grad():
        got = exported.module()(x)
    _assert_logits_match(got, original, x, "eval logits")


@pytest.mark.parametrize("source,name", MODELS)
def test_export_train_sees_fused_ops(source, name):
    """The training graph holds the fused depthwise and squeeze-excite ops (one node per
    block each) and computes the original model's training-mode logits (batch statistics)."""
    original = _original(source, name).train()
    x = batch(2, 64, fmt=CL)[0]
    exported = torch.export.export(_fused(source, name, original).train(), (x,))
    ops = _op_names(exported)
    assert {"effnet_kernels.dw_bn_act_fwd.default", "effnet_kernels.se_fwd.default"} <= ops, \
        sorted(ops)
    with torch.no_grad():
        got = exported.module()(x)
    _assert_logits_match(got, original, x, "train-mode logits")


@pytest.mark.parametrize("source,name", MODELS)
def test_onnx_export_eval_runs_in_onnxruntime(source, name):
    """torch.onnx.export (the dynamo exporter) of a converted model in eval: the fused ops
    export as their plain-PyTorch definition (ONNX has no node for them), and
    onnxruntime's logits match the original model's."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    original = _original(source, name).eval()
    x = batch(2, 64)[0]
    program = torch.onnx.export(_fused(source, name, original).eval(), (x,), dynamo=True,
                                verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    _assert_logits_match(torch.from_numpy(got), original, x, "onnxruntime logits")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks on traced sizes
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace")  # deprecated in torch 2.14, still used
@pytest.mark.parametrize("source,name", MODELS[:3])
def test_jit_trace_and_torchscript_onnx_export_follow_their_input(source, name):
    """torch.jit.trace records ATen and custom ops only, so the extension's direct calls
    (eval plans, GEMM convs, the fused stem) must stand aside while it traces, or their
    results become constants of the trace. A trace made on one batch gives the original's
    logits on another, and so does onnxruntime on torch.onnx.export's TorchScript export
    (dynamo=False: the fused ops export as their plain definition)."""
    ort = pytest.importorskip("onnxruntime")
    original = _original(source, name).eval()
    fused = _fused(source, name, original).eval()
    x, other = batch(2, 64)[0].contiguous(memory_format=CL), batch(2, 64, seed=1)[0]
    other = other.contiguous(memory_format=CL)
    with torch.no_grad():
        traced = torch.jit.trace(fused, x, check_trace=False)
        _assert_logits_match(traced(other), original, other, "torch.jit.trace logits")
    buffer = io.BytesIO()
    with contextlib.redirect_stdout(None):
        torch.onnx.export(fused, (x,), buffer, dynamo=False, input_names=["input"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": other.contiguous().numpy()})
    _assert_logits_match(torch.from_numpy(got), original, other, "TorchScript ONNX logits")
