"""Timing primitives: warm-up, interleaved rounds, medians with a p20/p80 spread.

Providers of one case are timed in interleaved rounds, each round in its own order (a
permutation drawn from a generator seeded with the round number): slow drifts of a
shared, noisy machine (other processes, clocks, thermal state) then hit every provider
alike instead of whichever happened to run last, and no provider always runs right after
the same other one. That matters on CPU: a call finds less of its data in cache after a
provider that streams hundreds of megabytes (eager EfficientNet) than after a light one,
and a cyclic rotation (A B C, B C A, C A B) puts B after A in every round but one. Each sample times
`inner` back-to-back calls, with `inner` chosen from the warm-up so that one sample
lasts at least `min_sample_ms` (short kernels are otherwise dominated by timer noise).
On CUDA, samples are bracketed by CUDA events on the current stream and the stream is
synchronized once per round, so host overhead that overlaps device work is not counted
twice.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    inner: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "samples": self.samples, "inner": self.inner}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _time_once(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Milliseconds per call over `inner` calls (wall clock on CPU, events on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def calibrate(fn: Callable[[], object], device: torch.device, warmup: int, min_sample_ms: float,
              max_inner: int = 1000) -> int:
    """Run the warm-up calls and return how many calls one sample needs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if min_sample_ms <= 0:  # one call per sample (slow cases such as whole models)
        return 1
    once = _time_once(fn, 1, device)
    return int(min(max_inner, max(1, round(min_sample_ms / max(once, 1e-6)))))


def round_order(names: list[str], r: int) -> list[str]:
    """The providers' order in round r: a permutation fixed by r (reproducible runs)."""
    return random.Random(r).sample(names, len(names))


def measure_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3,
    rounds: int = 10, min_sample_ms: float = 1.0,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> dict[str, Timing]:
    """Time each named zero-arg callable in interleaved rounds; returns name -> Timing.

    A provider that raises during warm-up or timing is dropped (reported to on_error,
    or re-raised when no on_error is given); the others still get measured.
    """
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        try:
            inner[name] = calibrate(fn, device, warmup, min_sample_ms)
        except Exception as exc:  # noqa: BLE001 - recorded as a skip by the caller
            if on_error is None:
                raise
            on_error(name, exc)
    names = list(inner)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = round_order(names, r)
        for name in order:
            if name not in inner:
                continue
            try:
                samples[name].append(_time_once(fns[name], inner[name], device))
            except Exception as exc:  # noqa: BLE001
                if on_error is None:
                    raise
                on_error(name, exc)
                del inner[name]
        synchronize(device)
    return {
        n: Timing(statistics.median(s), quantile(s, 0.2), quantile(s, 0.8), len(s), inner[n])
        for n, s in samples.items() if s and n in inner
    }


def measure(fn: Callable[[], object], device: torch.device, **kw) -> Timing:
    """Time one callable (see measure_interleaved)."""
    return measure_interleaved({"fn": fn}, device, **kw)["fn"]


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count (None keeps the current one); returns it."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 64, rounds: int = 5) -> float:
    """Measured memory-copy bandwidth (bytes read + bytes written per second, in GB/s).

    The ceiling that a memory-bound op can hope for; a buffer far larger than the last
    level cache keeps the figure honest (64 MB on CPU, 1 GB on a GPU by default).
    """
    n = megabytes * (1 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=2, rounds=rounds, min_sample_ms=5.0)
    return 2 * src.numel() * src.element_size() / (t.median_ms * 1e-3) / 1e9
