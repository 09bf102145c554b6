"""A converted EfficientNet with one of the library's switches on and off, in one process.

    python benchmarks/bench_switches.py --switch prefetch --mode train     # B0, batch 8 at 224
    python benchmarks/bench_switches.py --switch eval_plan --batch 4 --resolution 160
    python benchmarks/bench_switches.py --switch onnxruntime              # converted vs ORT
    python benchmarks/bench_switches.py --switch planar --format nchw     # NCHW model
    python benchmarks/bench_switches.py --switch native_gemm --mode train  # GEMM route
    python benchmarks/bench_switches.py --switch pw_backward --mode train  # 1x1 backward

The two sides run interleaved, each round in its own random order (effnet_kernels.bench.
timing), on the same model, images and thread count: on this project's shared CPU machine
the speed drifts by up to x1.5 between runs, so a change is measured against its own
switch in one process, never against a figure of another run. Switches:

  prefetch     the depthwise row kernels' software prefetch (_C.cpu.dw_set_prefetch)
  planar       the NCHW eval routes of the ops: the depthwise forward reading and writing
               NCHW tensors in place (_C.cpu.dw_set_planar) and the 1x1 convs as one GEMM
               per image (nn/gemm_conv.PLANAR_GEMM), against converting to channels_last
               and back and oneDNN's NCHW conv. A converted model given NCHW input runs its
               fused blocks channels_last (nn/block_layout.py), so there only what runs
               outside them (torchvision's stem and head) can take these routes
  native_gemm  the 1x1 convs' products on the native packed GEMM (_C.cpu.gemm_set_mode
               "native", csrc/cpu/packed_gemm.h) against BLAS sgemm_ ("blas"); "auto"
               picks one per CPU vendor
  half_vectors the native GEMM's AVX-512 panels taking a half vector for their last 8 or
               fewer columns (_C.cpu.gemm_set_half_vectors) against a masked full vector
  eval_plan    the prepared per-block eval forward (nn/eval_plan.ENABLED) against the
               module route
  packed       the eval plans' 1x1 weights packed once for the GEMM
               (nn/eval_plan.PACK_WEIGHTS) against packing them per call
  keep_y       the depthwise backward keeping y between its passes
               (ops/depthwise.KEEP_Y_IN_BACKWARD) against recomputing it
  pw_tiles     the training 1x1 conv + BN + act on GEMM tiles (nn/pointwise.TILED)
               against the GEMM followed by the BN passes
  pw_gram      the tiled convs whose y is recomputed taking the Gram route
               (nn/pointwise.GRAM: statistics from the input's second moments, a one-pass
               backward) against the two-pass route
  kept_dy      the training 1x1 convs' backward keeping a small dL/dy whole and taking
               dW over all its rows (_C.cpu.pw_set_kept_dy) against per-group partials
  pw_backward  the training 1x1 convs' backward on the extension: tiled on a kept y
               (nn/pointwise.TILED_KEPT_BACKWARD) and dx / dW of plain 1x1 convs
               (the head) from pw_conv_backward (nn/gemm_conv.
               EXTENSION_GEMM_BACKWARD_MIN_ROWS), against BN passes + two torch.mm
  classifier   the classifier's eval calls on the packed GEMM (nn/gemm_linear.ENABLED)
               against nn.Linear (MKL sgemm)
  patch_conv   the eval stem as one direct conv + BN + act pass (nn/eval_conv.PATCH_CONV;
               timm: models/timm_model.py) against conv_stem then bn1 (torchvision: a
               oneDNN conv with the act as its post-op)
  train_tail   the training tail with the SE gate folded into the projection
               (nn/train_tail.ENABLED) against SE op + projection conv
  onnxruntime  not a switch: the converted model against onnxruntime (inference only)
  eager        not a switch: the converted model against the original timm model

CPU, float32, channels_last (or --format nchw: model and images in NCHW). Prints the
medians, the p20-p80 spread and the ratio.
"""

from __future__ import annotations

import argparse
import copy

import torch

import effnet_kernels as ek
from effnet_kernels._ext import ext_module
from effnet_kernels.bench.e2e import onnx_infer_fn
from effnet_kernels.bench.host_allocator import add_host_allocator_argument, set_host_allocator
from effnet_kernels.bench.timing import measure_interleaved, set_threads
from effnet_kernels.nn import eval_conv, eval_plan, gemm_conv, gemm_linear, pointwise, train_tail
from effnet_kernels.ops import depthwise as dw_ops

CPU = torch.device("cpu")
FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def setter(switch: str):
    """on -> None: sets the switch (True = the library's default route)."""
    if switch == "prefetch":
        prims = ext_module().cpu
        return lambda on: prims.dw_set_prefetch(on)
    if switch == "planar":
        prims = ext_module().cpu

        def set_planar(on: bool) -> None:
            prims.dw_set_planar(on)
            gemm_conv.PLANAR_GEMM = on
        return set_planar
    if switch == "native_gemm":
        prims = ext_module().cpu
        return lambda on: prims.gemm_set_mode("native" if on else "blas")
    if switch == "half_vectors":
        prims = ext_module().cpu
        return lambda on: prims.gemm_set_half_vectors(on)
    if switch == "kept_dy":
        prims = ext_module().cpu
        return lambda on: prims.pw_set_kept_dy(on)
    if switch == "eval_plan":
        return lambda on: setattr(eval_plan, "ENABLED", on)
    if switch == "packed":
        return lambda on: setattr(eval_plan, "PACK_WEIGHTS", on)
    if switch == "keep_y":
        return lambda on: setattr(dw_ops, "KEEP_Y_IN_BACKWARD", on)
    if switch == "pw_tiles":
        return lambda on: setattr(pointwise, "TILED", on)
    if switch == "pw_gram":
        return lambda on: setattr(pointwise, "GRAM", on)
    if switch == "pw_backward":
        rows = gemm_conv.EXTENSION_GEMM_BACKWARD_MIN_ROWS

        def set_pw_backward(on: bool) -> None:
            pointwise.TILED_KEPT_BACKWARD = on
            gemm_conv.EXTENSION_GEMM_BACKWARD_MIN_ROWS = rows if on else 1 << 62
        return set_pw_backward
    if switch == "classifier":
        return lambda on: setattr(gemm_linear, "ENABLED", on)
    if switch == "patch_conv":
        return lambda on: setattr(eval_conv, "PATCH_CONV", on)
    if switch == "train_tail":
        return lambda on: setattr(train_tail, "ENABLED", on)
    raise ValueError(f"unknown switch {switch!r}")


def model_and_data(name: str, batch: int, resolution: int, fmt: torch.memory_format):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name).to(memory_format=fmt)
    images = torch.randn(batch, 3, resolution, resolution).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,))
    return model, images, labels


def step_fn(model, images, labels, mode: str):
    if mode == "infer":
        def infer():
            if model.training:  # a walk over every module: not part of the model's time
                model.eval()
            with torch.no_grad():
                return model(images)
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        return loss
    return train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switch", required=True,
                    choices=("prefetch", "planar", "native_gemm", "half_vectors", "eval_plan",
                             "packed", "keep_y", "pw_tiles", "pw_gram", "kept_dy", "pw_backward",
                             "classifier", "patch_conv", "train_tail", "onnxruntime", "eager"))
    ap.add_argument("--mode", choices=("train", "infer"), default="infer")
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--format", choices=tuple(FORMATS), default="channels_last")
    add_host_allocator_argument(ap)
    args = ap.parse_args()
    print(f"host allocator: {set_host_allocator(args.host_allocator)}")
    threads = set_threads(args.threads)
    model, images, labels = model_and_data(args.model, args.batch, args.resolution,
                                           FORMATS[args.format])
    compared = args.switch in ("onnxruntime", "eager")
    if args.switch == "onnxruntime":
        if args.mode != "infer":
            raise SystemExit("--switch onnxruntime compares inference only (--mode infer)")
        ort = onnx_infer_fn(model.eval(), images.contiguous(), threads)
        ek.convert(model)
        fns = {"converted": step_fn(model, images, labels, "infer"), "onnxruntime": ort}
    elif args.switch == "eager":
        original = copy.deepcopy(model)
        ek.convert(model)
        fns = {"converted": step_fn(model, images, labels, args.mode),
               "eager": step_fn(original, images, labels, args.mode)}
    else:
        ek.convert(model)
        step, switch = step_fn(model, images, labels, args.mode), setter(args.switch)

        def side(on: bool):
            def run():
                switch(on)
                return step()
            return run
        fns = {"on": side(True), "off": side(False)}
    t = measure_interleaved(fns, CPU, warmup=2, rounds=args.rounds, min_sample_ms=0.0)
    if not compared:
        setter(args.switch)(True)
    a, b = list(fns)
    print(f"{args.model} {args.mode} batch {args.batch} at {args.resolution}, {args.format}, "
          f"{threads} threads, {args.rounds} rounds")
    for name in fns:
        print(f"  {name:12s} {t[name].median_ms:8.2f} ms  (p20-p80 {t[name].p20_ms:.2f}-"
              f"{t[name].p80_ms:.2f})")
    print(f"  {b} / {a}: x{t[b].median_ms / t[a].median_ms:.3f}")


if __name__ == "__main__":
    main()
