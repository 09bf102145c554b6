"""The native GEMM forced on for the tests of what runs only on it (the patch conv and the
fused eval stem): the 'auto' policy keeps MKL's sgemm on Intel CPUs, where those tests
would otherwise skip although the CPU runs the native kernel for every other vendor's
users. Import `native_gemm_forced` into a test module and list it in its usefixtures."""

from __future__ import annotations

import pytest

from effnet_kernels._ext import ext_module

EXT = ext_module()


def native_gemm_possible() -> bool:
    """Whether this CPU can run the native GEMM (AVX2 or AVX-512) with the extension built."""
    if EXT is None:
        return False
    try:
        previous = EXT.cpu.gemm_set_mode("native")
    except RuntimeError:
        return False
    EXT.cpu.gemm_set_mode(previous)
    return True


@pytest.fixture
def native_gemm_forced():
    previous = EXT.cpu.gemm_set_mode("native")
    yield
    EXT.cpu.gemm_set_mode(previous)
