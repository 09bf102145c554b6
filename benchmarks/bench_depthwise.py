"""depthwise_conv_bn_act (depthwise conv + BatchNorm + SiLU): fused vs eager vs torch.compile.

Parametrized over providers (each fused backend, eager nn modules, torch.compile of them)
x the real depthwise layer shapes of an EfficientNet (effnet_kernels.shapes, B0 batch 8 by
default; see benchmarks/conftest.py for options) x mode (train = forward + backward, eval)
x memory format; CPU float32. The callables come from effnet_kernels.bench.providers, the
same factory the `effnet-kernels bench` command uses. A backend that cannot run here is
reported as skipped with its reasons.

  pytest benchmarks/bench_depthwise.py --benchmark-only
  pytest benchmarks/bench_depthwise.py --benchmark-only --effnet-variant b4 --effnet-shapes 3
  pytest benchmarks/bench_depthwise.py --benchmark-only --benchmark-save=base
  pytest benchmarks/bench_depthwise.py --benchmark-only --benchmark-compare
"""

from __future__ import annotations

import pytest
import torch
from conftest import bench_option

from effnet_kernels.backends import BACKENDS
from effnet_kernels.bench.providers import MODES, Case, Unavailable, bytes_moved, make, op_shapes
from effnet_kernels.bench.runner import spread

DEVICE = torch.device("cpu")
DTYPE = torch.float32


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    shapes = spread(op_shapes("depthwise", bench_option(cfg, "variant"), bench_option(cfg, "batch")),
                    bench_option(cfg, "shapes"))
    wanted = bench_option(cfg, "providers")
    providers = [f"fused:{b}" for b in BACKENDS if "fused" in wanted]
    providers += [p for p in ("eager", "compile") if p in wanted]
    cases = [Case("depthwise", p, s, mode, DTYPE, DEVICE, fmt)
             for s in shapes for mode in MODES for fmt in bench_option(cfg, "formats")
             for p in providers]
    metafunc.parametrize("case", cases, ids=[
        f"{c.shape.name}-{c.mode}-{c.memory_format}-{c.provider}" for c in cases])


def test_depthwise(benchmark, case):
    try:
        fn = make(case)  # compile: compiled here, once, and reused by every round
    except Unavailable as exc:
        pytest.skip(f"{case.provider}: {exc}")
    s = case.shape
    benchmark.group = f"depthwise {s.name} {case.mode} {case.memory_format}"
    nbytes = bytes_moved(case)
    benchmark.extra_info.update({
        "op": "depthwise", "provider": case.provider, "shape": s.name,
        "dims": [s.n, s.c, s.h, s.w], "kernel": s.kernel, "stride": s.stride, "mode": case.mode,
        "memory_format": case.memory_format, "dtype": "float32", "bytes": nbytes,
        "threads": torch.get_num_threads(), "compile_s": getattr(fn, "compile_s", None),
    })
    benchmark(fn)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median_s = benchmark.stats.stats.median
        benchmark.extra_info["gbps"] = nbytes / median_s / 1e9
