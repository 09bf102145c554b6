"""drop_connect_add forward + backward: fused (each usable backend) vs eager vs torch.compile.

Eager is timm's drop_path followed by the residual add:
    mask = x.new_empty((N, 1, 1, 1)).bernoulli_(keep).div_(keep);  out = shortcut + x * mask
Shapes: the residual adds of EfficientNet-B0 (effnet_kernels.shapes.residual_shapes), batch 8,
channels_last, training mode, p = 0.2.

  pytest benchmarks/bench_drop_connect.py --benchmark-only        (pytest-benchmark)
  python benchmarks/bench_drop_connect.py [--device cuda] [--batch 8] [--reps 200]
      interleaved timing (providers round-robin per repetition), medians with p20/p80
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

from effnet_kernels import available_backends, use_backend
from effnet_kernels.bench.host_allocator import add_host_allocator_argument, set_host_allocator
from effnet_kernels.bench.providers import timm_drop_path_add
from effnet_kernels.functional import drop_connect_add
from effnet_kernels.shapes import residual_shapes

P = 0.2


def eager_drop_connect_add(x, shortcut, p: float = P):
    return timm_drop_path_add(x, shortcut, p)


_compiled = {}


def _compiled_eager():
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(eager_drop_connect_add, dynamic=False)
    return _compiled["fn"]


def providers(device: str) -> list[str]:
    fused = [b for b in available_backends(device) if b != "triton" or device == "cuda"]
    return ["eager", "compile"] + [f"fused-{b}" for b in fused]


def make_step(provider: str, shape, device: str = "cpu", dtype=torch.float32):
    """A closure running one forward + backward of `provider` on fresh leaf inputs."""
    n, c, h, w = shape.input_shape
    fmt = torch.channels_last

    def leaf():
        t = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
        return t.requires_grad_()

    x, s = leaf(), leaf()
    dy = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
    if provider == "eager":
        fn = eager_drop_connect_add
    elif provider == "compile":
        fn = _compiled_eager()
    else:
        backend = provider.removeprefix("fused-")

        def fn(a, b):
            with use_backend(backend):
                return drop_connect_add(a, b, P, training=True)

    def step():  # autograd.grad: no leaf .grad accumulation copies in the measurement
        return torch.autograd.grad(fn(x, s), (x, s), dy)

    step()  # warm-up (and compilation)
    return step


SHAPES = residual_shapes("b0", batch=8)


@pytest.mark.parametrize("provider", providers("cpu"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_drop_connect_fwd_bwd(benchmark, provider, shape):
    benchmark.group = f"drop_connect fwd+bwd {shape.name} {tuple(shape.input_shape)}"
    benchmark(make_step(provider, shape))


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(device: str = "cpu", batch: int = 8, reps: int = 200, skip=(), clock=time.perf_counter):
    """{shape: {provider: (median, p20, p80) seconds}}, providers timed round-robin."""
    results = {}
    for shape in residual_shapes("b0", batch=batch):
        names = [p for p in providers(device) if p not in skip]
        steps = {p: make_step(p, shape, device) for p in names}
        times = {p: [] for p in names}
        for _ in range(reps):
            for p in names:
                _sync(device)
                t0 = clock()
                steps[p]()
                _sync(device)
                times[p].append(clock() - t0)
        results[shape] = {}
        for p in names:
            q = statistics.quantiles(times[p], n=10)
            results[shape][p] = (statistics.median(times[p]), q[1], q[7])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this thread's CPU clock (needs --threads 1): robust to a "
                             "loaded machine, blind to waiting")
    add_host_allocator_argument(parser)
    args = parser.parse_args()
    print(f"host allocator: {set_host_allocator(args.host_allocator)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and (args.device != "cpu" or torch.get_num_threads() != 1):
        parser.error("--cpu-time needs --device cpu and --threads 1")
    skip = ("compile",) if args.no_compile else ()
    clock = time.thread_time if args.cpu_time else time.perf_counter
    results = interleaved(args.device, args.batch, args.reps, skip, clock)
    print(f"drop_connect_add fwd+bwd, {args.device} float32 channels_last, p={P}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} "
          f"{'cpu-time ' if args.cpu_time else ''}"
          "interleaved reps: median us [p20, p80] (eager / provider)")
    totals: dict[str, float] = {}
    for shape, row in results.items():
        eager = row["eager"][0]
        cells = []
        for p, (m, lo, hi) in row.items():
            totals[p] = totals.get(p, 0.0) + m
            cells.append(f"{p} {m * 1e6:.0f} [{lo * 1e6:.0f},{hi * 1e6:.0f}] ({eager / m:.2f}x)")
        print(f"{shape.name} {tuple(shape.input_shape)}: " + " | ".join(cells))
    print("sum of medians: " + " | ".join(
        f"{p} {t * 1e6:.0f} ({totals['eager'] / t:.2f}x)" for p, t in totals.items()))


if __name__ == "__main__":
    main()
