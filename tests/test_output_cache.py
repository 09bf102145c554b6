"""The CPU output cache: freed kernel outputs are reused, values stay right, the cap
and empty_cpu_cache() hold, and EFFNET_CPU_CACHE_MB=0 turns it off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import effnet_kernels
from effnet_kernels import functional
from effnet_kernels._ext import ext_module

pytestmark = pytest.mark.skipif(ext_module() is None, reason="compiled extension not built")


def _residual(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 64, 32, 32, generator=gen)  # 1 MiB: served by the cache
    return x, torch.randn(4, 64, 32, 32, generator=gen)


def _dropped(x, s, seed):
    gen = torch.Generator().manual_seed(seed)
    return functional.drop_connect_add(x, s, 0.5, training=True, generator=gen)


def _expected(x, s, seed):
    keep = torch.empty(x.shape[0]).bernoulli_(0.5, generator=torch.Generator().manual_seed(seed))
    return s + x * (keep / 0.5).view(-1, 1, 1, 1)


def test_freed_outputs_are_reused_and_values_are_fresh():
    with effnet_kernels.use_backend("cpu"):
        x, s = _residual(0)
        out = _dropped(x, s, 7)
        torch.testing.assert_close(out, _expected(x, s, 7))
        del out
        before = effnet_kernels.cpu_cache_info()
        assert before["cached_bytes"] >= x.nbytes
        x2, s2 = _residual(1)
        out2 = _dropped(x2, s2, 8)
        after = effnet_kernels.cpu_cache_info()
        assert after["hits"] > before["hits"]
        torch.testing.assert_close(out2, _expected(x2, s2, 8))


def test_small_outputs_bypass_the_cache_and_empty_cache_frees():
    effnet_kernels.empty_cpu_cache()
    assert effnet_kernels.cpu_cache_info()["cached_bytes"] == 0
    info = effnet_kernels.cpu_cache_info()
    x = torch.randn(2, 8, 4, 4)
    with effnet_kernels.use_backend("cpu"):
        _dropped(x, x.clone(), 0)
    assert effnet_kernels.cpu_cache_info()["misses"] == info["misses"]


def test_env_zero_disables_the_cache():
    code = ("import torch, effnet_kernels as e\n"
            "from effnet_kernels import functional as F\n"
            "x = torch.randn(4, 64, 32, 32)\n"
            "with e.use_backend('cpu'):\n"
            "    F.drop_connect_add(x, x, 0.2, training=True)\n"
            "i = e.cpu_cache_info()\n"
            "assert i['cap_bytes'] == 0 and i['hits'] == i['misses'] == 0, i\n")
    env = dict(os.environ, EFFNET_CPU_CACHE_MB="0")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("value", ["lots", "-1", str(1 << 44)])
def test_bad_env_value_is_a_clear_error(value):
    code = "import effnet_kernels as e; e.cpu_cache_info()"
    env = dict(os.environ, EFFNET_CPU_CACHE_MB=value)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "EFFNET_CPU_CACHE_MB" in proc.stderr
