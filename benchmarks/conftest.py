"""pytest-benchmark configuration shared by the benchmarks/bench_*.py suites.

Options (each also read from an environment variable, for CI):
  --effnet-variant   EfficientNet variant whose real layer shapes are used (b0)   EFFNET_BENCH_VARIANT
  --effnet-batch     batch size of those shapes (8)                              EFFNET_BENCH_BATCH
  --effnet-shapes    how many shapes, spread over the network (all)              EFFNET_BENCH_SHAPES
  --effnet-providers comma subset of fused,eager,compile (all)                   EFFNET_BENCH_PROVIDERS
  --effnet-formats   comma subset of nchw,channels_last (both)                   EFFNET_BENCH_FORMATS
  --effnet-threads   torch CPU threads, fixed and recorded (torch's default)     EFFNET_BENCH_THREADS
  --effnet-host-allocator keep or glibc: what malloc does with freed memory (keep)
                     (effnet_kernels/bench/host_allocator.py)                    EFFNET_BENCH_HOST_ALLOCATOR

`pytest benchmarks/bench_depthwise.py --benchmark-only` runs one suite; `pytest benchmarks
--benchmark-only` runs all (bench_*.py files are collected here, tests/ keeps test_*.py).
Store and compare runs with pytest-benchmark's --benchmark-save=NAME and
--benchmark-compare[=NUM] (--benchmark-compare-fail=median:10% to fail on regressions).
"""

from __future__ import annotations

import os

import pytest
import torch

from effnet_kernels.bench.host_allocator import set_host_allocator

OPTIONS = {
    "variant": ("EFFNET_BENCH_VARIANT", "b0"),
    "batch": ("EFFNET_BENCH_BATCH", "8"),
    "shapes": ("EFFNET_BENCH_SHAPES", ""),
    "providers": ("EFFNET_BENCH_PROVIDERS", "fused,eager,compile"),
    "formats": ("EFFNET_BENCH_FORMATS", "nchw,channels_last"),
    "threads": ("EFFNET_BENCH_THREADS", ""),
    "host_allocator": ("EFFNET_BENCH_HOST_ALLOCATOR", "keep"),
}


def pytest_addoption(parser):
    group = parser.getgroup("effnet-kernels benchmarks")
    for name, (env, default) in OPTIONS.items():
        group.addoption(f"--effnet-{name.replace('_', '-')}", dest=f"effnet_{name}",
                        default=os.environ.get(env, default),
                        help=f"(env {env}, default {default or 'all'})")


def bench_option(config, name: str):
    """The option's value: ints for batch/shapes/threads (None when empty), lists for the
    comma-separated ones, a string otherwise."""
    value = config.getoption(f"effnet_{name}")
    if name in ("batch", "shapes", "threads"):
        return int(value) if str(value).strip() else None
    if name in ("providers", "formats"):
        return [v.strip() for v in str(value).split(",") if v.strip()]
    return value


def pytest_configure(config):
    threads = bench_option(config, "threads")
    if threads:
        torch.set_num_threads(threads)
    try:
        config.effnet_host_allocator = set_host_allocator(bench_option(config, "host_allocator"))
    except ValueError as exc:
        raise pytest.UsageError(f"--effnet-host-allocator: {exc}") from None


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py when a folder is given (explicit file paths collect already)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions, build and thread count go into every saved benchmark JSON."""
    import effnet_kernels
    from effnet_kernels.bench.report import git_sha

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["effnet_kernels_build"] = effnet_kernels.build_info()
    machine_info["effnet_kernels_git_sha"] = git_sha()
    machine_info["host_allocator"] = getattr(config, "effnet_host_allocator", None)
