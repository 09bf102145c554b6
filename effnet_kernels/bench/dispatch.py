"""ATen dispatches per call: a device-independent measure of host cost.

Each top-level ATen op is a trip through the dispatcher and, on a GPU, mostly a kernel
launch; where kernels are short (small batches, late EfficientNet stages) the host's
time per op, not the GPU, sets the step time.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def top_level_aten_ops(fn: Callable[[], object]) -> collections.Counter:
    """name -> count of the ATen ops one call of fn dispatches that no other ATen op
    encloses (ops called from Python or from a C++ extension's entry points; the ops an
    ATen op runs internally are not counted again). fn runs once untimed first."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: collections.Counter = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts
