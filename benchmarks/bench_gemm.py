"""The CPU 1x1 conv's GEMM routes side by side: native packed kernel against BLAS sgemm_.

    python benchmarks/bench_gemm.py                  # B0's 1x1 shapes, batch 8, 2 threads
    python benchmarks/bench_gemm.py --threads 1

Each row times `_C.cpu.pw_conv_act` (the eval 1x1 conv + bias, identity act) on one B0
shape with the GEMM policy set to "native" and to "blas" (csrc/cpu/packed_gemm.h),
interleaved in one process (effnet_kernels.bench.timing), and prints the medians, the
achieved GFLOP/s (2 * pixels * Cin * Cout per call) and the blas / native ratio. CPU,
float32, channels_last.
"""

from __future__ import annotations

import argparse

import torch

from effnet_kernels._ext import ext_module
from effnet_kernels.bench.timing import measure_interleaved, set_threads

# (Cin, Cout, H = W) of B0's distinct 1x1 convs at 224^2 input, stage by stage (expand,
# project), then the head.
B0_SHAPES = [(32, 16, 112), (16, 96, 112), (96, 24, 56), (24, 144, 56), (144, 24, 56),
             (144, 40, 28), (40, 240, 28), (240, 40, 28), (240, 80, 14), (80, 480, 14),
             (480, 80, 14), (480, 112, 14), (112, 672, 14), (672, 112, 14), (672, 192, 7),
             (192, 1152, 7), (1152, 192, 7), (1152, 320, 7), (320, 1280, 7)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    ext = ext_module()
    if ext is None or not ext.cpu.pw_conv_available():
        raise SystemExit("needs the compiled extension with libtorch's sgemm_")
    cpu = ext.cpu
    if cpu.dw_simd_isa() not in ("avx2", "avx512"):
        raise SystemExit("the native GEMM needs an AVX2 or AVX-512 CPU")
    previous = cpu.gemm_mode()
    print(f"pw_conv_act, batch {args.batch}, {threads} threads, isa {cpu.dw_simd_isa()}, "
          f"default route {'native' if cpu.gemm_native() else 'blas'}")
    print("| Cin -> Cout at HxW | native ms | blas ms | native GFLOP/s | blas GFLOP/s | blas / native |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    try:
        for cin, cout, hw in B0_SHAPES:
            x = torch.randn(args.batch, cin, hw, hw).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(cout, cin, 1, 1) / cin ** 0.5, torch.randn(cout)

            def run(mode, x=x, w=w, b=b):
                cpu.gemm_set_mode(mode)
                return cpu.pw_conv_act(x, w, b, 0)
            t = measure_interleaved({"native": lambda: run("native"), "blas": lambda: run("blas")},
                                    torch.device("cpu"), rounds=args.rounds)
            gflop = 2 * args.batch * hw * hw * cin * cout / 1e9
            nat, bl = t["native"].median_ms, t["blas"].median_ms
            print(f"| {cin} -> {cout} at {hw}x{hw} | {nat:.3f} | {bl:.3f} | {gflop / nat * 1e3:.0f} "
                  f"| {gflop / bl * 1e3:.0f} | x{bl / nat:.2f} |", flush=True)
    finally:
        cpu.gemm_set_mode(previous)


if __name__ == "__main__":
    main()
