"""The CPU speed targets of the issues, measured side by side in one run.

    python benchmarks/bench_targets.py            # ops only, about 3 minutes on 2 cores
    python benchmarks/bench_targets.py --e2e      # plus EfficientNet-B0, batch 8 at 224
    python benchmarks/bench_targets.py --e2e-only # EfficientNet-B0 only, in a fresh process

Each row times our fused op, the eager PyTorch modules a timm EfficientNet runs and
torch.compile of them, interleaved (effnet_kernels.bench), float32, channels_last:
  depthwise      B0 stage-2 activation 8x96x112x112, k3 s1 (target: train >= 4x eager,
                 >= 3x compile; eval >= 5x eager)
  squeeze_excite every B0 SE shape at batch 8 (target: train >= 2x eager)
  drop_connect   every B0 residual shape at batch 8 (target: train >= 2x eager)
  e2e            B0 batch 8 at 224: training step, inference vs onnxruntime, saved
                 activations (targets: train >= 2x eager, inference faster than
                 onnxruntime, saved activations <= 65% of eager)

By default glibc keeps freed memory in its heap for the whole run (--host-allocator keep,
see effnet_kernels/bench/host_allocator.py): with its own defaults it maps every large
tensor freshly and the kernel zeroes each page on first touch, which cost eager PyTorch
56 % of the stage-2 depthwise call and 40 % of B0's training step (75k page faults)
while our kernels, served from their output cache, take none: a ratio of allocators, not
of kernels. --host-allocator glibc measures that setting. The e2e table has each
provider's minor page faults per call. --e2e-only measures B0 alone, without the op rows
before it.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from effnet_kernels.bench.e2e import run_e2e
from effnet_kernels.bench.host_allocator import add_host_allocator_argument, set_host_allocator
from effnet_kernels.bench.providers import Case, make, op_shapes
from effnet_kernels.bench.timing import copy_bandwidth_gbps, measure_interleaved
from effnet_kernels.shapes import DepthwiseShape

CPU = torch.device("cpu")


def time_case(op, shape, mode, rounds):
    fns = {p: make(Case(op, p, shape, mode, torch.float32, CPU, "channels_last"))
           for p in ("fused:cpu", "eager", "compile")}
    t = measure_interleaved(fns, CPU, warmup=2, rounds=rounds, min_sample_ms=20.0)
    return {p: v.median_ms for p, v in t.items()}


def row(op, shape, mode, ms):
    fused = ms["fused:cpu"]
    return (f"| {op} | {shape.name} {shape.input_shape} | {mode} | {fused:.2f} | "
            f"{ms['eager']:.2f} | {ms['compile']:.2f} | x{ms['eager'] / fused:.2f} | "
            f"x{ms['compile'] / fused:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--e2e", action="store_true", help="also run the end-to-end B0 targets")
    ap.add_argument("--e2e-only", action="store_true",
                    help="only the end-to-end B0 targets (a fresh process: no op rows first)")
    ap.add_argument("--rounds", type=int, default=7)
    add_host_allocator_argument(ap)
    args = ap.parse_args()
    print(f"host allocator: {set_host_allocator(args.host_allocator)}")
    print(f"threads {torch.get_num_threads()}, copy bandwidth {copy_bandwidth_gbps(CPU):.1f} GB/s")
    if not args.e2e_only:
        op_rows(args.rounds)
    if args.e2e or args.e2e_only:
        e2e_rows()


def op_rows(rounds: int) -> None:
    print("| op | shape | mode | fused ms | eager ms | compile ms | vs eager | vs compile |")
    print("|---|---|---|---|---|---|---|---|")
    stage2 = DepthwiseShape("b0.stage2", 8, 96, 112, 112, 3, 1)
    for mode in ("train", "eval"):
        print(row("depthwise", stage2, mode, time_case("depthwise", stage2, mode, rounds)))
    for op in ("squeeze_excite", "drop_connect"):
        ratios = []
        for shape in op_shapes(op, "b0", 8):
            ms = time_case(op, shape, "train", rounds)
            ratios.append(ms["eager"] / ms["fused:cpu"])
            print(row(op, shape, "train", ms))
        print(f"{op}: train speedup vs eager min x{min(ratios):.2f}, "
              f"geomean x{statistics.geometric_mean(ratios):.2f}")


def e2e_rows() -> None:
    rows = run_e2e("efficientnet_b0", CPU, torch.float32, 8, 224,
                   ("eager", "converted", "compile", "converted_compile", "onnxruntime"),
                   threads=torch.get_num_threads(), warmup=1, rounds=5,
                   skip=lambda p, why: print(f"skipped {p}: {why}"))
    print("| provider | mode | ms | img/s | saved MB/img | page faults per call |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        saved, faults = r.get("saved_bytes_per_image"), r.get("page_faults_per_call")
        print(f"| {r['provider']} | {r['mode']} | {r['median_ms']:.1f} | {r['img_per_s']:.1f} | "
              f"{saved / 2**20 if saved else float('nan'):.1f} | "
              f"{faults if faults is not None else float('nan'):.0f} |")
    ms = {(r["provider"], r["mode"]): r for r in rows}
    ours = ms.get(("converted", "train"))
    for base in ("eager", "compile", "converted_compile"):
        if ours and (base, "train") in ms:
            print(f"train step vs {base}: x{ms[(base, 'train')]['median_ms'] / ours['median_ms']:.2f}")
    infer, ort = ms.get(("converted", "infer")), ms.get(("onnxruntime", "infer"))
    if infer and ort:
        print(f"inference vs onnxruntime: x{ort['median_ms'] / infer['median_ms']:.2f}")
    eager = ms.get(("eager", "train"))
    if ours and eager and ours.get("saved_bytes_per_image") and eager.get("saved_bytes_per_image"):
        share = ours["saved_bytes_per_image"] / eager["saved_bytes_per_image"]
        print(f"saved activations: {100 * share:.1f} % of eager")

if __name__ == "__main__":
    main()
