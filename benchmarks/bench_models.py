"""Whole-model benchmark: EfficientNet-B0, fp32, channels_last, CPU.

Providers
  fused         timm efficientnet_b0 after effnet_kernels.convert()
  eager         timm efficientnet_b0 as is
  compile       torch.compile(timm efficientnet_b0)          (default inductor backend)
  onnxruntime   torch.onnx.export(timm b0) run by onnxruntime's CPU EP (inference only;
                intra-op threads = torch.get_num_threads(), inter-op 1, ORT_ENABLE_ALL)
Modes: `train` (forward + backward + SGD step, drop_rate/drop_path_rate 0, batch-stat BN)
and `infer` (eval, no_grad). `test_saved_activations` reports the bytes autograd saves
per image (unique storages seen by saved_tensors_hooks, parameters excluded) for fused
vs eager, in extra_info and on stdout.

Run:  pytest benchmarks/bench_models.py --benchmark-only -s
Options from benchmarks/conftest.py: --effnet-batch (8), --effnet-providers (fused,eager,
compile; onnxruntime runs with those defaults or when listed), --effnet-threads.
Env: EFFNET_BENCH_RES (224), EFFNET_BENCH_ROUNDS (5).
Targets (issue): train step >= 2x eager; inference faster than onnxruntime; saved
activations <= 65% of eager.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import OPTIONS, bench_option

import effnet_kernels

timm = pytest.importorskip("timm")

RES = int(os.environ.get("EFFNET_BENCH_RES", "224"))
ROUNDS = int(os.environ.get("EFFNET_BENCH_ROUNDS", "5"))
CL = torch.channels_last
BATCH = 8


@pytest.fixture(autouse=True)
def _options(request):
    global BATCH
    BATCH = bench_option(request.config, "batch") or 8
    providers = bench_option(request.config, "providers")
    if providers == OPTIONS["providers"][1].split(","):
        providers = providers + ["onnxruntime"]
    provider = getattr(request.node, "callspec", None)
    provider = provider.params.get("provider") if provider else None
    if provider and provider not in providers:
        pytest.skip(f"{provider} not in --effnet-providers")


def _timm_b0() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, drop_rate=0.0,
                              drop_path_rate=0.0)
    return model.to(memory_format=CL)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, RES, RES, generator=g).contiguous(memory_format=CL)
    return x, torch.randint(0, 1000, (BATCH,), generator=g)


def _model(provider: str) -> torch.nn.Module:
    model = _timm_b0()
    if provider == "fused":
        effnet_kernels.convert(model)
    elif provider == "compile":
        model = torch.compile(model)
    return model


def _info(benchmark, provider: str, mode: str) -> None:
    benchmark.group = f"efficientnet_b0-{mode}-b{BATCH}-{RES}px-fp32-channels_last-cpu"
    benchmark.extra_info.update(provider=provider, mode=mode, batch=BATCH, resolution=RES,
                                threads=torch.get_num_threads(),
                                backends=effnet_kernels.available_backends("cpu"))


@pytest.mark.parametrize("provider", ["fused", "eager", "compile"])
def test_train_step(benchmark, provider):
    model = _model(provider).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = _inputs()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up (compiles for torch.compile)
    _info(benchmark, provider, "train")
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def _onnx_session(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _timm_b0().eval().to(memory_format=torch.contiguous_format)
    path = str(tmp_path / "efficientnet_b0.onnx")
    x = torch.randn(BATCH, 3, RES, RES)
    torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["logits"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("provider", ["fused", "eager", "compile", "onnxruntime"])
def test_inference(benchmark, provider, tmp_path):
    x, _ = _inputs()
    if provider == "onnxruntime":
        session = _onnx_session(tmp_path)
        feed = {"x": x.contiguous().numpy()}

        def run():
            return session.run(None, feed)
    else:
        model = _model(provider).eval()

        def run():
            with torch.no_grad():
                return model(x)

    run()
    _info(benchmark, provider, "infer")
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward,
    parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


def test_saved_activations(benchmark):
    eager = _timm_b0().train()
    fused = copy.deepcopy(eager)
    effnet_kernels.convert(fused)
    x, _ = _inputs()
    eager_bytes = saved_activation_bytes(eager, x) / BATCH
    fused_bytes = saved_activation_bytes(fused, x) / BATCH
    ratio = fused_bytes / eager_bytes
    benchmark.group = "efficientnet_b0-saved-activations"
    benchmark.extra_info.update(eager_mib_per_image=eager_bytes / 2**20,
                                fused_mib_per_image=fused_bytes / 2**20, ratio=ratio)
    print(f"\nsaved activations per image: eager {eager_bytes / 2**20:.2f} MiB, "
          f"fused {fused_bytes / 2**20:.2f} MiB ({ratio:.1%} of eager; target <= 65%)")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
