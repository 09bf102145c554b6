"""End-to-end EfficientNet: training and inference throughput, activation memory.

Providers: "eager" (the timm model as is), "converted" (effnet_kernels.convert of a copy),
"compile" (torch.compile of the timm model), "converted_compile" (torch.compile of a
converted copy) and "onnxruntime" (inference only, CPU).
A training step is forward + cross-entropy + backward + SGD(momentum) step. Saved
activations are counted with torch.autograd.graph.saved_tensors_hooks over one training
forward: unique storages, parameters excluded, divided by the batch size. On a GPU the
peak allocated memory of one training step is recorded too. With --dtype bfloat16 or
float16 the models run under torch.autocast (float32 master weights). Models and images
are channels_last unless told otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from collections.abc import Callable

import torch

from .providers import Unavailable
from .timing import measure_interleaved, synchronize

PROVIDERS = ("eager", "converted", "compile", "converted_compile", "onnxruntime")
DROP_PATH_RATE = 0.2


def _convert_fn() -> Callable:
    import effnet_kernels

    fn = getattr(effnet_kernels, "convert", None)
    if fn is None:
        try:
            from effnet_kernels.models import convert as mod
            fn = getattr(mod, "convert", None)
        except ImportError:
            fn = None
    if fn is None:
        raise Unavailable("effnet_kernels.convert is not available yet")
    return fn


def build_models(name: str, device: torch.device, providers, skip, notes: dict,
                 memory_format: torch.memory_format = torch.channels_last):
    """provider -> model for each provider that can be built; skip(provider, reason).

    Built with EfficientNet's training drop-connect rate (0.2), so drop_path runs too, and
    moved to `memory_format` (channels_last: the layout CPU and GPU convs are fastest in)."""
    try:
        import timm
    except ImportError:
        for p in providers:
            skip(p, "timm is not installed")
        return {}
    base = timm.create_model(name, pretrained=False, drop_path_rate=DROP_PATH_RATE)
    base = base.to(device, memory_format=memory_format)
    models = {}
    for p in providers:
        try:
            if p in ("eager", "onnxruntime"):
                models[p] = base
            elif p == "converted":
                model = copy.deepcopy(base)
                rep = _convert_fn()(model)  # in place; returns a report of what was fused
                models[p] = rep if isinstance(rep, torch.nn.Module) else model
                notes[p] = str(rep).splitlines()[0] if not isinstance(rep, torch.nn.Module) else ""
            elif p == "compile":
                models[p] = torch.compile(copy.deepcopy(base))
            elif p == "converted_compile":
                model = copy.deepcopy(base)
                _convert_fn()(model)
                models[p] = torch.compile(model)
        except Unavailable as exc:
            skip(p, str(exc))
        except Exception as exc:  # noqa: BLE001
            skip(p, f"{type(exc).__name__}: {exc}"[:300])
    return models


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step_fn(model, images, labels, dtype) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        if not model.training:  # the mode switch walks every module: only when needed
            model.train()
        with _autocast(images.device, dtype):
            loss = loss_fn(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def infer_fn(model, images, dtype) -> Callable[[], object]:
    def run():
        if model.training:
            model.eval()
        with torch.no_grad(), _autocast(images.device, dtype):
            return model(images)
    return run


def onnx_infer_fn(model, images, threads: int) -> Callable[[], object]:
    """Export to ONNX once and return an onnxruntime CPU inference callable."""
    if images.device.type != "cpu":
        raise Unavailable("onnxruntime is measured on CPU only")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise Unavailable("onnxruntime is not installed") from exc
    path = os.path.join(tempfile.mkdtemp(prefix="effnet-bench-"), "model.onnx")
    model.eval()
    errors = []
    for dynamo in (False, True):  # the TorchScript exporter is faster; the dynamo one newer
        try:
            with contextlib.redirect_stdout(None):
                torch.onnx.export(model, (images,), path, input_names=["input"],
                                  output_names=["logits"], dynamo=dynamo)
            break
        except Exception as exc:  # noqa: BLE001
            errors.append(f"dynamo={dynamo}: {type(exc).__name__}: {exc}"[:200])
    else:
        raise Unavailable("ONNX export failed: " + " | ".join(errors))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # ORT's idle workers spin after each run and take the cores from whatever the process
    # runs next (measured: +45 ms on the next converted B0 step on 2 cores). Without
    # spinning its own time is unchanged within noise (82 vs 80 ms, B0 batch 8).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"input": images.numpy()}
    return lambda: session.run(None, feed)


def saved_activation_bytes(model, images, dtype) -> int:
    """Bytes of the unique storages autograd saves in one training forward (no params)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            if st.data_ptr() not in param_ptrs:
                seen[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(images.device, dtype):
        out = model(images)
    del out
    return sum(seen.values())


def page_faults_per_call(fn: Callable[[], object], device: torch.device,
                         calls: int = 2) -> float | None:
    """Minor page faults of this process per call of fn (CPU only; None elsewhere or where
    getrusage is missing). Fresh pages the allocator maps for large tensors are zeroed by
    the kernel on first touch: on CPU that can be a large share of a training step, and it
    depends on the C allocator's state (glibc raises its mmap threshold after the first
    large frees), so it is reported next to the step times."""
    if device.type != "cpu":
        return None
    try:
        import resource
    except ImportError:
        return None
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def peak_train_memory(step: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def run_e2e(model_name: str, device: torch.device, dtype: torch.dtype, batch: int,
            resolution: int, providers, *, threads: int, warmup: int, rounds: int,
            skip: Callable[[str, str], None], progress=None,
            memory_format: torch.memory_format = torch.channels_last) -> list[dict]:
    """One row per (provider, metric kind) that could be measured; models and images in
    `memory_format`."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution, generator=gen).to(device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    notes: dict[str, str] = {}
    models = build_models(model_name, device, providers, skip, notes, memory_format)
    train_fns, infer_fns, extra = {}, {}, {}
    for p, model in models.items():
        t0 = time.perf_counter()
        try:
            if p == "onnxruntime":
                infer_fns[p] = onnx_infer_fn(model, images, threads)
            else:
                train_fns[p] = train_step_fn(model, images, labels, dtype)
                infer_fns[p] = infer_fn(model, images, dtype)
                train_fns[p]()  # first calls outside the timed region (compiles, if any)
                infer_fns[p]()
                extra[p] = {"peak_train_bytes": peak_train_memory(train_fns[p], device)}
                try:
                    saved = saved_activation_bytes(model, images, dtype) / batch
                except Exception as exc:  # noqa: BLE001 - hooks vs compiled graphs
                    saved = None
                    skip(p, f"saved-activation count: {type(exc).__name__}: {exc}"[:300])
                extra[p]["saved_bytes_per_image"] = saved
        except Unavailable as exc:
            skip(p, str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded, the rest still runs
            skip(p, f"{type(exc).__name__}: {exc}"[:300])
            train_fns.pop(p, None)
            infer_fns.pop(p, None)
            extra.pop(p, None)
        else:
            extra.setdefault(p, {})["setup_s"] = time.perf_counter() - t0
            if notes.get(p):
                extra[p]["note"] = notes[p]
        if progress is not None:
            progress(p)

    def on_error(kind):
        return lambda p, exc: skip(p, f"{kind}: {type(exc).__name__}: {exc}"[:300])

    rows = []
    for kind, fns in (("train", train_fns), ("infer", infer_fns)):
        timings = measure_interleaved(fns, device, warmup=warmup, rounds=rounds,
                                      min_sample_ms=0.0, on_error=on_error(kind))
        faults = {p: page_faults_per_call(fns[p], device) for p in timings}
        for p, t in timings.items():
            rows.append({"model": model_name, "provider": p, "mode": kind, "batch": batch,
                         "resolution": resolution, "dtype": str(dtype).replace("torch.", ""),
                         "memory_format": str(memory_format).replace("torch.", ""),
                         "device": device.type, **t.as_dict(),
                         "img_per_s": batch / (t.median_ms * 1e-3),
                         "page_faults_per_call": faults[p], **extra.get(p, {})})
        if progress is not None:
            progress(kind)
    return rows
