"""Squeeze-excite forward + backward: fused backends vs eager PyTorch vs torch.compile.

Shapes: the SE inputs of EfficientNet-B0 (effnet_kernels.shapes.se_shapes), batch 8,
float32 channels_last on CPU (CUDA too when present). The eager baseline is timm's
SqueezeExcite as plain modules: mean -> conv_reduce -> SiLU -> conv_expand -> sigmoid -> mul.

    pytest benchmarks/bench_squeeze_excite.py --benchmark-only        # pytest-benchmark
    python benchmarks/bench_squeeze_excite.py [--rounds 30] [--no-compile] [--threads 1 --clock cpu]

`--clock cpu` times with process CPU time instead of wall time: on a shared, oversubscribed
machine wall times mostly measure the scheduler; with one thread, CPU time measures the work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
from torch import nn

from effnet_kernels import available_backends, use_backend
from effnet_kernels.bench.host_allocator import add_host_allocator_argument, set_host_allocator
from effnet_kernels.nn import SqueezeExcite
from effnet_kernels.shapes import se_shapes

SHAPES = se_shapes("b0", batch=8)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class EagerSE(nn.Module):
    """timm.models._efficientnet_blocks.SqueezeExcite with SiLU, written out."""

    def __init__(self, se: SqueezeExcite):
        super().__init__()
        self.conv_reduce, self.conv_expand = se.conv_reduce, se.conv_expand
        self.act = nn.SiLU()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.conv_expand(self.act(self.conv_reduce(s))))


def providers() -> list[str]:
    fused = [b for b in available_backends(DEVICE) if not (b == "triton" and DEVICE == "cpu")]
    return [f"fused-{b}" for b in fused] + ["eager", "compile"]


def make_step(shape, provider: str, device: str = DEVICE):
    """A no-argument callable running one forward + backward of `provider` on `shape`."""
    torch.manual_seed(0)
    se = SqueezeExcite(shape.c, shape.reduced).to(device)
    x = torch.randn(shape.input_shape, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)
    params = list(se.parameters())
    if provider.startswith("fused-"):
        backend = provider.removeprefix("fused-")

        def fwd():
            with use_backend(backend):
                return se(x)
    elif provider == "eager":
        fwd = EagerSE(se)
    else:
        torch._dynamo.reset()  # one specialized graph per shape; stay under the recompile limit
        fwd = torch.compile(EagerSE(se), fullgraph=True, dynamic=False)

    def step():
        out = fwd() if provider.startswith("fused-") else fwd(x)
        return torch.autograd.grad(out, [x, *params], dy)

    step()  # warm-up (and compilation)
    return step


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", providers())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_se_fwd_bwd(benchmark, shape, provider):
    step = make_step(shape, provider)
    benchmark.group = f"se_fwd_bwd {shape.name} {shape.input_shape} {DEVICE} f32 channels_last"

    def run():
        step()
        _sync()

    benchmark(run)


def interleaved(rounds: int, names: list[str], clock=time.perf_counter) -> list[dict]:
    """Median seconds per provider and shape, providers timed round-robin (fair under load)."""
    rows = []
    for shape in SHAPES:
        steps = {p: make_step(shape, p) for p in names}
        times = {p: [] for p in names}
        for _ in range(rounds):
            for p, step in steps.items():
                _sync()
                t0 = clock()
                step()
                _sync()
                times[p].append(clock() - t0)
        rows.append({"shape": shape.name, "size": shape.input_shape,
                     **{p: statistics.median(v) for p, v in times.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    add_host_allocator_argument(parser)
    args = parser.parse_args()
    print(f"host allocator: {set_host_allocator(args.host_allocator)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [p for p in providers() if not (args.no_compile and p == "compile")]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = interleaved(args.rounds, names, clock)
    print(f"SE fwd+bwd, {DEVICE} float32 channels_last, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, "
          f"medians of {args.rounds} interleaved rounds (ms)")
    print(f"{'layer':10} {'N,C,H,W':>20} " + " ".join(f"{p:>15}" for p in names)
          + "  " + " ".join(f"{'eager/' + p:>20}" for p in names if p.startswith("fused")))
    totals = dict.fromkeys(names, 0.0)
    for r in rows:
        for p in names:
            totals[p] += r[p]
        print(f"{r['shape']:10} {str(r['size']):>20} " + " ".join(f"{r[p] * 1e3:15.3f}" for p in names)
              + "  " + " ".join(f"{r['eager'] / r[p]:20.2f}" for p in names if p.startswith("fused")))
    print(f"{'total':10} {'':>20} " + " ".join(f"{totals[p] * 1e3:15.3f}" for p in names)
          + "  " + " ".join(f"{totals['eager'] / totals[p]:20.2f}" for p in names if p.startswith("fused")))
    if "compile" in names:
        for p in names:
            if p.startswith("fused"):
                print(f"compile/{p} total: {totals['compile'] / totals[p]:.2f}")


if __name__ == "__main__":
    main()
