"""EfficientNet models built on the fused kernels, and convert()/revert() for timm and
torchvision models."""

from . import registry
from .convert import ConvertReport, convert, revert
from .efficientnet import (
    EfficientNet,
    EfficientNetFeatures,
    load_torchvision_state_dict,
    torchvision_key_map,
)
from .registry import MODELS, create_model, list_models

globals().update({name: getattr(registry, name) for name in MODELS})

__all__ = ["ConvertReport", "EfficientNet", "EfficientNetFeatures", "MODELS", "convert",
           "create_model", "list_models", "load_torchvision_state_dict", "revert",
           "torchvision_key_map", *sorted(MODELS)]
