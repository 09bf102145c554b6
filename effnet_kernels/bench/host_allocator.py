"""What the C heap does with freed memory during CPU benchmarks.

glibc's malloc serves a block above its mmap threshold (dynamic, at most 32 MiB) with a
fresh mmap() and unmaps it on free. Every large CPU tensor then arrives as new pages that
the kernel zeroes on first touch, one minor page fault per 4 KiB. Eager PyTorch allocates
such tensors in every op: EfficientNet-B0's eager training step at batch 8 took 75k page
faults and about 40 % of its time in them. A tuned CPU deployment removes that cost with a
caching malloc (jemalloc, tcmalloc) or glibc's MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_;
our fused kernels sidestep it with their output cache. Left in place, it measures glibc
rather than the kernels, and it inflates every ratio against eager.

So the benchmarks run under the "keep" policy unless told otherwise: glibc keeps freed
memory in its heap (no mmap for large blocks, M_MMAP_MAX 0; no trimming of the heap top,
M_TRIM_THRESHOLD 2 GiB), the same effect as those environment variables. "glibc" leaves
the allocator as it started. The policy is process-wide and cannot be undone, which is why
it is set once, at the start of a benchmark process, and never by the library itself.
"""

from __future__ import annotations

import ctypes

POLICIES = ("keep", "glibc")

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes a C int


def _glibc():
    """The process's C library if it is glibc, else None."""
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None, None
    version.restype = ctypes.c_char_p
    return libc, version().decode()


def set_host_allocator(policy: str) -> str:
    """Apply `policy` ("keep" or "glibc") to this process; returns a line for reports.

    "keep" on a C library other than glibc changes nothing and says so."""
    if policy not in POLICIES:
        raise ValueError(f"host allocator policy must be one of {POLICIES}, got {policy!r}")
    libc, version = _glibc()
    if policy == "glibc":
        return f"glibc {version} defaults" if version else "the C library's defaults (not glibc)"
    if libc is None:
        return "keep requested, not applied: the C library is not glibc"
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)):
        return f"keep requested, not applied: glibc {version} refused mallopt"
    return f"keep (glibc {version}: freed memory stays in the heap, M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB)"


def add_host_allocator_argument(parser) -> None:
    """The --host-allocator option of the benchmark scripts."""
    parser.add_argument(
        "--host-allocator", choices=POLICIES, default="keep",
        help="keep: glibc keeps freed memory, so eager PyTorch pays no page faults for fresh "
             "large tensors (default); glibc: the allocator's own defaults")
