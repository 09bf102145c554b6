"""The benchmarks' host allocator policy: under "keep" a large CPU tensor freed and allocated
again reuses its pages (no minor page faults once the heap has settled); under glibc's
defaults every one arrives as fresh pages. Each policy runs in its own process, since it is
process-wide and cannot be undone."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from effnet_kernels.bench.host_allocator import POLICIES, _glibc, set_host_allocator

PROBE = """
import json, resource, sys
import torch
from effnet_kernels.bench.host_allocator import set_host_allocator

line = set_host_allocator(sys.argv[1])
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(16 << 20)  # 64 MiB: above glibc's largest mmap threshold
    a.fill_(1.0)
    b = a * 2.0
    del a, b
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"line": line, "faults": faults}))
"""
PAGES_PER_STEP = 2 * (64 << 20) // 4096

needs_glibc = pytest.mark.skipif(
    _glibc()[1] is None or not sys.platform.startswith("linux"),
    reason="the policy acts on glibc's malloc (Linux)")


def probe(policy: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_glibc
def test_keep_reuses_freed_pages():
    result = probe("keep")
    assert result["line"].startswith("keep (glibc")
    # the heap grows over the first steps while small allocations settle between the large
    # blocks (now and then later too); from then on steps reuse the same pages
    later = result["faults"][10:]
    assert statistics.median(later) < PAGES_PER_STEP // 100, result["faults"]
    assert sum(later) < 3 * PAGES_PER_STEP, result["faults"]


@needs_glibc
def test_glibc_defaults_map_fresh_pages():
    """The cost that "keep" removes, so the test above measures something."""
    result = probe("glibc")
    assert result["line"].startswith("glibc ")
    assert statistics.median(result["faults"][10:]) > PAGES_PER_STEP // 2, result["faults"]


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="host allocator policy must be one of"):
        set_host_allocator("jemalloc")
    assert POLICIES == ("keep", "glibc")
