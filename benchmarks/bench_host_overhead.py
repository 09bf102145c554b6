"""Host cost per EfficientNet step: time and ATen dispatches where kernels are trivial.

    python benchmarks/bench_host_overhead.py                   # CPU, B0, batch 2 at 64x64
    python benchmarks/bench_host_overhead.py --device cuda     # the same on a GPU
    python benchmarks/bench_host_overhead.py --plan-python     # Python per fused eval block

On a GPU, small and medium batches are bound by the host: every ATen op is a Python
dispatch and, mostly, a kernel launch, and the GPU waits for them. This measures that
cost directly, for eager timm and the converted model side by side in one run (training
step with SGD, and inference), on an input so small that the kernels take next to no
time: the step time is then the host's per-step cost. Dispatches are the top-level ATen
ops one step records in torch.profiler (ops called from Python or from our kernels' C++
entry points; ops nested inside other ATen ops are not counted twice).
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch

from effnet_kernels.bench.dispatch import top_level_aten_ops
from effnet_kernels.bench.e2e import build_models, infer_fn, train_step_fn
from effnet_kernels.bench.timing import measure_interleaved, set_threads, synchronize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="train,eval", help="comma-separated: train, eval")
    ap.add_argument("--plan-python", action="store_true",
                    help="only the Python cost of each fused block's eval call on the CPU")
    args = ap.parse_args()
    if args.plan_python:
        return plan_python_cost(args.model, args.batch, args.size)
    device = torch.device(args.device)
    threads = set_threads(args.threads)
    models = build_models(args.model, device, ("eager", "converted"),
                          lambda p, why: print(f"skip {p}: {why}"), {})
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)
    print(f"{args.model}, batch {args.batch} at {args.size}x{args.size}, {device}, "
          f"{threads} threads, float32, channels_last; medians of {args.rounds} "
          "interleaved rounds")
    print("| mode | provider | ms per step | top-level ATen ops per step |")
    print("|---|---|---|---|")
    for mode in args.modes.split(","):
        fns = {p: (train_step_fn(m, images, labels, torch.float32) if mode == "train"
                   else infer_fn(m, images, torch.float32)) for p, m in models.items()}
        timings = measure_interleaved(fns, device, warmup=3, rounds=args.rounds,
                                      min_sample_ms=50.0)
        for name, fn in fns.items():
            ops = sum(top_level_aten_ops(fn).values())
            synchronize(device)
            print(f"| {mode} | {name} | {timings[name].median_ms:.2f} | {ops} |")


def plan_python_cost(model_name: str, batch: int, size: int, calls: int = 5000) -> dict:
    """Microseconds per eval call of each fused block of a converted model outside its
    compiled calls: the checks, the plan lookup and the module plumbing, timed with
    eval_plan._run (the compiled calls) replaced by a stub that returns its input. Best
    of five runs of `calls` calls per block, grad mode off. Prints a line per block kind and
    returns {block: microseconds}."""
    from effnet_kernels.nn import DepthwiseSeparable, MBConv, eval_plan

    model = build_models(model_name, torch.device("cpu"), ("converted",),
                         lambda p, why: print(f"skip {p}: {why}"), {})["converted"].eval()
    blocks = [m for m in model.modules() if isinstance(m, (MBConv, DepthwiseSeparable))]
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, a[0]))
             for b in blocks]
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(images)
        for h in hooks:
            h.remove()
        model(images)  # plans built
        run, stubbed = eval_plan._run, []
        eval_plan._run = lambda plan, x: stubbed.append(1) or x
        try:
            costs = {}
            for b in blocks:
                stubbed.clear()
                costs[b] = min(timeit.repeat(lambda b=b: b(inputs[b]), number=calls,
                                             repeat=5)) / calls * 1e6
                if len(stubbed) != 5 * calls:
                    raise RuntimeError(f"{type(b).__name__} did not run its eval plan (not a CPU "
                                       "float32 channels_last call, or the extension is missing)")
        finally:
            eval_plan._run = run
    for kind in (MBConv, DepthwiseSeparable):
        per_call = [c for b, c in costs.items() if type(b) is kind]
        if per_call:
            print(f"{kind.__name__}: {len(per_call)} blocks, median "
                  f"{statistics.median(per_call):.1f} us per eval call outside the compiled "
                  f"calls (min {min(per_call):.1f}, max {max(per_call):.1f})")
    return costs


if __name__ == "__main__":
    main()
