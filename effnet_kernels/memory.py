"""The CPU output cache of the compiled kernels (csrc/cpu/output_cache.cpp).

Large outputs of the CPU kernels (64 KiB and up) reuse freed blocks instead of fresh pages
from the OS, which would be page-faulted and zeroed on first write. Freed blocks stay
reserved, like the CUDA caching allocator's, up to a cap: EFFNET_CPU_CACHE_MB (default
1024, read once at start; 0 turns the cache off).
"""

from __future__ import annotations

from ._ext import ext_module


def cpu_cache_info() -> dict[str, int]:
    """{'cached_bytes', 'in_use_bytes', 'cap_bytes', 'hits', 'misses'}; zeros without the
    compiled extension."""
    mod = ext_module()
    if mod is None:
        return {"cached_bytes": 0, "in_use_bytes": 0, "cap_bytes": 0, "hits": 0, "misses": 0}
    return dict(mod.cpu.output_cache_stats())


def empty_cpu_cache() -> None:
    """Return every cached (currently unused) block to the OS."""
    mod = ext_module()
    if mod is not None:
        mod.cpu.empty_output_cache()
