"""Time of each CPU primitive of the fused depthwise op, per EfficientNet layer.

    python benchmarks/bench_depthwise_passes.py                        # B0 layers, batch 8
    python benchmarks/bench_depthwise_passes.py --variant b3 --batch 4 --threads 1

Where a training call of effnet_kernels.functional.depthwise_conv_bn_act goes on the cpu
backend (float32, channels_last, SiLU), pass by pass (ops/depthwise.py):
  forward   stats      dw_stats_stash: conv + per-channel batch statistics, keeps y
            affine     dw_affine_act_: act(y * scale + shift) in place over the kept y
  backward  reduce     dw_backward_reduce_stash: conv + sums of g and g * (y - mean),
                       keeps g and y
            dx_dw      dw_backward: dx and dweight from the kept g and y
and, for comparison, the eval forward (`eval`: dw_forward, one conv pass). The passes of
one layer are timed interleaved (medians); the inputs are random, the BN vectors fixed.
To compare two builds, alternate processes: this machine's speed drifts within minutes.

    python benchmarks/bench_depthwise_passes.py --prefetch both    # with and without

`--prefetch both` times every pass with the row kernels' software prefetch on and off,
interleaved in one run (`dw_set_prefetch`; it is only ever on for float tensors of 8 MiB
and more, so smaller layers show the same code twice). `--stage2` adds the 8x96x112x112
k3 s1 shape of the depthwise target in benchmarks/bench_targets.py.

    python benchmarks/bench_depthwise_passes.py --stage2 --cold 640  # caches full of other data

By default a pass is timed over repeated calls, so its tensors stay in the caches between
calls (warm). `--cold MB` times single calls, each after writing MB of other memory: the
inputs then come from DRAM and the caches hold dirty lines of other data, as for a layer
inside a model step or for our op in benchmarks/bench_targets.py, where eager and
torch.compile samples run between ours. The `copy` column (copying the layer's input into a
second buffer, the bandwidth reference) is not part of the train total.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from effnet_kernels._ext import ext_module
from effnet_kernels.bench.providers import op_shapes
from effnet_kernels.bench.timing import measure_interleaved, set_threads
from effnet_kernels.ops.activations import act_code
from effnet_kernels.ops.depthwise import backward_keeps_y
from effnet_kernels.shapes import DepthwiseShape

CPU = torch.device("cpu")
PASSES = ("stats", "affine", "reduce", "dx_dw", "eval")
COLUMNS = PASSES + ("copy",)


def pass_callables(prims, shape) -> dict:
    """name -> zero-arg callable running that primitive once on the layer's shape."""
    n, c, h, w, k, s = shape.n, shape.c, shape.h, shape.w, shape.kernel, shape.stride
    gen = torch.Generator().manual_seed(0)
    pad = k // 2
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, generator=gen)
    dy = torch.randn(n, c, oh, ow, generator=gen).contiguous(memory_format=torch.channels_last)
    scale, shift, mean = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen), \
        torch.randn(c, generator=gen)
    coef_b, coef_c = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    silu, identity = act_code("silu"), act_code("identity")
    geo = (s, pad, pad)
    _, _, y = prims.dw_stats_stash(x, weight, *geo, oh, ow)
    keep_y = backward_keeps_y(weight, dy)
    _, _, g, kept_y = prims.dw_backward_reduce_stash(dy, x, weight, scale, shift, mean, *geo, silu,
                                                     keep_y=keep_y)
    kept = {} if kept_y is None else {"y": kept_y}
    copy = torch.empty_like(x)
    return {
        "stats": lambda: prims.dw_stats_stash(x, weight, *geo, oh, ow),
        "affine": lambda: prims.dw_affine_act_(y, scale, shift, silu),
        "reduce": lambda: prims.dw_backward_reduce_stash(dy, x, weight, scale, shift, mean, *geo,
                                                         silu, keep_y=keep_y),
        "dx_dw": lambda: prims.dw_backward(g, x, weight, scale, shift, mean, coef_b, coef_c,
                                           *geo, identity, **kept),
        "eval": lambda: prims.dw_forward(x, weight, scale, shift, *geo, oh, ow, silu),
        "copy": lambda: copy.copy_(x),
    }


def with_prefetch(prims, fn, enabled: bool):
    def run():
        prims.dw_set_prefetch(enabled)
        return fn()
    return run


def cold_medians(fns: dict, rounds: int, megabytes: int) -> dict:
    """key -> median ms of single calls, each after writing `megabytes` of other memory."""
    other = torch.empty(megabytes * (1 << 20) // 4)
    samples = {k: [] for k in fns}
    for r in range(rounds + 1):
        for key, fn in fns.items():
            other.add_(1.0)
            t0 = time.perf_counter()
            fn()
            if r > 0:  # round 0 warms up the code paths and the output cache
                samples[key].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="b0")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--prefetch", choices=("on", "off", "both"), default="on")
    ap.add_argument("--stage2", action="store_true", help="also the 8x96x112x112 k3 s1 target")
    ap.add_argument("--cold", type=int, default=0, metavar="MB",
                    help="time single calls, each after writing MB of other memory")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    prims = ext_module().cpu
    settings = {"on": (True,), "off": (False,), "both": (True, False)}[args.prefetch]
    print(f"threads {threads}, ISA {prims.dw_simd_isa()}, float32 channels_last, ms per call"
          + (", prefetch on / off" if len(settings) == 2 else f", prefetch {args.prefetch}")
          + (f", cold (after {args.cold} MB of other writes)" if args.cold else ", warm"))
    print("| layer | shape (N, C, H, W) | k | s | " + " | ".join(COLUMNS) + " | train total |")
    print("|---|---|---|---|" + "---|" * (len(COLUMNS) + 1))
    shapes = op_shapes("depthwise", args.variant, args.batch)
    if args.stage2:
        shapes.insert(0, DepthwiseShape("b0.stage2", args.batch, 96, 112, 112, 3, 1))
    for shape in shapes:
        passes = pass_callables(prims, shape)
        fns = {(p, on): with_prefetch(prims, passes[p], on) for p in COLUMNS for on in settings}
        if args.cold:
            medians = cold_medians(fns, args.rounds, args.cold)
        else:
            t = measure_interleaved(fns, CPU, warmup=2, rounds=args.rounds, min_sample_ms=5.0)
            medians = {key: timing.median_ms for key, timing in t.items()}
        prims.dw_set_prefetch(True)

        def cell(values):
            return " / ".join(f"{v:.2f}" for v in values)

        ms = {p: [medians[(p, on)] for on in settings] for p in COLUMNS}
        train = [sum(ms[p][i] for p in PASSES if p != "eval") for i in range(len(settings))]
        print(f"| {shape.name} | {(shape.n, shape.c, shape.h, shape.w)} | {shape.kernel} | "
              f"{shape.stride} | " + " | ".join(cell(ms[p]) for p in COLUMNS)
              + f" | {cell(train)} |")


if __name__ == "__main__":
    main()
