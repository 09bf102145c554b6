"""Training forward + backward of every block of an EfficientNet, converted against timm's own.

    python benchmarks/bench_blocks.py                        # B0, batch 8 at 224
    python benchmarks/bench_blocks.py --model efficientnet_b3 --batch 4 --resolution 300

Each block gets the input it sees in the whole model (recorded by a forward hook on the
original), and the two versions of it (the same weights: the converted one is a deepcopy
of the original, converted in place) run interleaved in one process, each round in its
own random order (effnet_kernels.bench.timing). A step is the block's forward and the
gradients of its input and every parameter for a random output gradient. Prints, per
block, both medians and the ratio, then the sums: where a whole-model ratio comes from.
CPU, float32, channels_last, training mode (batch statistics; drop-path off).
"""

from __future__ import annotations

import argparse
import copy

import torch

import effnet_kernels as ek
from effnet_kernels.bench.host_allocator import add_host_allocator_argument, set_host_allocator
from effnet_kernels.bench.timing import measure_interleaved, set_threads

CPU = torch.device("cpu")


def block_inputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, tuple]:
    """name -> (input, output) of every block (blocks.<stage>.<index>) in one forward."""
    seen: dict[str, tuple] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.startswith("blocks.") and name.count(".") == 2:
            def record(_m, args, out, name=name):
                seen[name] = (args[0].detach(), out.detach())
            hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return seen


def step(block: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    params = [p for p in block.parameters() if p.requires_grad]

    def run():
        torch.autograd.grad(block(x), [x, *params], dy)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    add_host_allocator_argument(ap)
    args = ap.parse_args()
    print(f"host allocator: {set_host_allocator(args.host_allocator)}")
    import timm

    threads = set_threads(args.threads)
    torch.manual_seed(0)
    original = timm.create_model(args.model, drop_path_rate=0.0)
    original = original.to(memory_format=torch.channels_last).train()
    converted = copy.deepcopy(original)
    ek.convert(converted)
    converted.train()
    images = torch.randn(args.batch, 3, args.resolution, args.resolution)
    inputs = block_inputs(original, images.contiguous(memory_format=torch.channels_last))
    print(f"{args.model} train blocks, batch {args.batch} at {args.resolution}, {threads} "
          f"threads, {args.rounds} rounds; ms per forward + backward")
    print("| block | input (N, C, H, W) | eager timm | converted | ratio |")
    print("|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for name, (x, out) in inputs.items():
        x = x.clone().requires_grad_()
        dy = torch.randn_like(out)
        timings = measure_interleaved(
            {"eager": step(original.get_submodule(name), x, dy),
             "converted": step(converted.get_submodule(name), x, dy)}, CPU,
            rounds=args.rounds)
        eager, fused = timings["eager"].median_ms, timings["converted"].median_ms
        totals[0] += eager
        totals[1] += fused
        print(f"| {name} | {tuple(x.shape)} | {eager:.2f} | {fused:.2f} | x{eager / fused:.2f} |",
              flush=True)
    print(f"| all blocks | | {totals[0]:.1f} | {totals[1]:.1f} | x{totals[0] / totals[1]:.2f} |")


if __name__ == "__main__":
    main()
