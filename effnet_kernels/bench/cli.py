"""`effnet-kernels bench` and `effnet-kernels info`: argument parsing and settings.

Levels: --smoke (tiny, for CI, ~30 s), --quick (README default, < 3 min on a 2-core CPU:
a spread of 3 real layer shapes per op, a scaled-down batch, fewer rounds, a capped
torch.compile budget) and the default full run (every unique layer shape, both memory
formats, more rounds).
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

from ..backends import BACKENDS, not_supported_reasons
from ..models.config import SCALING
from .e2e import PROVIDERS as E2E_PROVIDERS
from .host_allocator import add_host_allocator_argument
from .providers import OPS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Per level: shapes per op (None = all), batch (cpu, cuda), memory formats, warm-up calls,
# rounds, minimal sample length, compile budget in s (cpu, cuda; None = unlimited),
# end-to-end batch (cpu, cuda), e2e resolution (None = the model's), e2e rounds.
LEVELS = {
    # smoke checks the machinery, not speed: 1 thread keeps it fast on a busy CI runner, where
    # every OpenMP barrier of a 2-thread run can wait a whole scheduler time slice
    "smoke": dict(threads=1, shapes=1, batch=(2, 8), resolution=64, formats=("nchw",), warmup=1,
                  rounds=3, min_sample_ms=0.2, compile_budget=(0, 0), e2e_batch=(2, 8),
                  e2e_resolution=32, e2e_rounds=2, e2e_providers=("eager", "converted")),
    # GPU batches are large enough that kernels, not per-call host costs, set the time (at
    # batch 32 on an H200 every op case measured host overhead, 0-5 % of copy bandwidth)
    "quick": dict(shapes=3, batch=(4, 128), resolution=None, formats=("channels_last",), warmup=2,
                  rounds=7, min_sample_ms=1.0, compile_budget=(45, 90), e2e_batch=(4, 128),
                  e2e_resolution=(160, None), e2e_rounds=5,
                  e2e_providers=("eager", "converted", "onnxruntime")),
    "full": dict(shapes=None, batch=(8, 256), resolution=None, formats=("nchw", "channels_last"),
                 warmup=3, rounds=15, min_sample_ms=2.0, compile_budget=(None, None),
                 e2e_batch=(8, 128), e2e_resolution=None, e2e_rounds=10,
                 e2e_providers=("eager", "converted", "compile", "onnxruntime")),
}


def model_variant(name: str) -> str:
    """'b0' for efficientnet_b0, tf_efficientnet_b4_ns, ...; raises ValueError otherwise."""
    m = re.search(r"efficientnet_(b\d|l2)", name)
    if not m or m.group(1) not in SCALING:
        raise ValueError(f"--model must name an EfficientNet (e.g. efficientnet_b0), got {name!r}")
    return m.group(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effnet-kernels", description="Fused EfficientNet kernels: benchmarks and info.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the build and the usable backends per device")
    b = sub.add_parser("bench", help="parity self-check + benchmark report with plots",
                       description="Parity self-check, op benchmarks (fused vs eager vs "
                       "torch.compile), end-to-end EfficientNet; writes JSON, markdown, PNGs.")
    level = b.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true",
                       help="< 3 minutes on a 2-core CPU: 3 shapes per op, small batch")
    level.add_argument("--smoke", action="store_true", help="tiny run for CI (~30 s)")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    b.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    b.add_argument("--out", default="./effnet-bench-out", help="output folder (created)")
    b.add_argument("--model", default="efficientnet_b0",
                   help="timm EfficientNet for the end-to-end part and the layer shapes")
    b.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    b.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end model part")
    b.add_argument("--skip-selfcheck", action="store_true", help="skip the parity self-check")
    b.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's current setting), recorded")
    b.add_argument("--batch", type=int, default=None, help="batch size of the op benchmarks")
    b.add_argument("--e2e-batch", type=int, default=None, help="batch size of the e2e part")
    b.add_argument("--compile-budget", type=float, default=None,
                   help="seconds of torch.compile time allowed (later compile cases are "
                   "skipped); default per level")
    b.add_argument("--formats", default=None,
                   help="comma-separated memory formats of the op cases (nchw,channels_last); "
                   "default per level")
    b.add_argument("--e2e-providers", default=None,
                   help=f"comma-separated subset of {','.join(E2E_PROVIDERS)} for the end-to-end "
                   "part; default per level")
    add_host_allocator_argument(b)
    return parser


def _positive(parser, name, value):
    if value is not None and value < 1:
        parser.error(f"{name} must be a positive integer, got {value}")


def _subset(parser, flag, value, allowed):
    """The comma-separated names of `value` (None when not given), each one of `allowed`."""
    if value is None:
        return None
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        parser.error(f"{flag} must be a comma-separated subset of {','.join(allowed)}, "
                     f"got {value!r}")
    return names


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Validated settings for the runner (argparse errors for bad combinations)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but no CUDA GPU is visible "
                     "(torch.cuda.is_available() is False); use --device cpu or auto")
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        variant = model_variant(args.model)
    except ValueError as exc:
        parser.error(str(exc))
    ops = _subset(parser, "--ops", args.ops, OPS)
    formats = _subset(parser, "--formats", args.formats, ("nchw", "channels_last"))
    e2e_providers = _subset(parser, "--e2e-providers", args.e2e_providers, E2E_PROVIDERS)
    for name in ("threads", "batch", "e2e_batch"):
        _positive(parser, "--" + name.replace("_", "-"), getattr(args, name))
    if args.compile_budget is not None and args.compile_budget < 0:
        parser.error("--compile-budget must be >= 0")
    level = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = LEVELS[level]
    gpu = int(device.type == "cuda")

    def per_device(v):
        return v[gpu] if isinstance(v, tuple) and len(v) == 2 and not isinstance(v[0], str) else v

    e2e_res = per_device(cfg["e2e_resolution"]) or SCALING[variant].resolution
    return {
        "level": level, "device": device.type, "dtype": args.dtype, "model": args.model,
        "variant": variant, "ops": ops, "out": args.out, "skip_e2e": args.skip_e2e,
        "skip_selfcheck": args.skip_selfcheck, "threads": args.threads or cfg.get("threads"),
        "shapes_per_op": cfg["shapes"], "batch": args.batch or per_device(cfg["batch"]),
        "resolution": cfg["resolution"], "memory_formats": formats or cfg["formats"],
        "warmup": cfg["warmup"], "rounds": cfg["rounds"], "min_sample_ms": cfg["min_sample_ms"],
        "compile_budget_s": args.compile_budget if args.compile_budget is not None
        else per_device(cfg["compile_budget"]),
        "e2e_batch": args.e2e_batch or per_device(cfg["e2e_batch"]), "e2e_resolution": e2e_res,
        "e2e_rounds": cfg["e2e_rounds"], "e2e_providers": e2e_providers or cfg["e2e_providers"],
        "host_allocator": args.host_allocator,
    }


def info() -> int:
    """Print build_info() and, per device, which backends can run and why others cannot."""
    from .. import build_info

    for key, value in build_info().items():
        print(f"{key:16s} {value}")
    from .providers import OP_NAMES

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"\nbackends on {dev} (float32):")
        for op, (reg_name, _) in OP_NAMES.items():
            for backend in BACKENDS:
                why = not_supported_reasons(reg_name, backend, torch.device(dev), torch.float32)
                state = "usable" if not why else "unusable: " + "; ".join(why)
                print(f"  {op:15s} {backend:10s} {state}")
    if not torch.cuda.is_available():
        print("\ncuda: no GPU visible (torch.cuda.is_available() is False)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    settings = resolve(parser, args)
    from .runner import run_bench

    return run_bench(settings)


if __name__ == "__main__":
    sys.exit(main())
