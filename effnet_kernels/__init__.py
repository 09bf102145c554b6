"""effnet-kernels: fused kernels for EfficientNet training and inference in PyTorch."""

from . import functional
from ._ext import build_info
from .backends import available_backends, use_backend
from .memory import cpu_cache_info, empty_cpu_cache
from .models import convert, create_model, revert
from .nn.batchnorm import convert_sync_batchnorm
from .nn.eval_plan import clear_eval_cache

__version__ = "0.1.0"

__all__ = [
    "available_backends", "build_info", "clear_eval_cache", "convert", "convert_sync_batchnorm",
    "cpu_cache_info", "create_model", "empty_cpu_cache", "functional", "revert", "use_backend",
    "__version__",
]
