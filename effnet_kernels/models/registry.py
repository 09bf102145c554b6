"""Model names (timm's) and `create_model`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .config import SCALING
from .efficientnet import EfficientNet

MODELS: dict[str, Callable[..., EfficientNet]] = {}
for _variant in SCALING:
    MODELS[f"efficientnet_{_variant}"] = partial(EfficientNet, _variant)
    MODELS[f"tf_efficientnet_{_variant}"] = partial(EfficientNet, _variant, tf_same=True)


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, num_classes: int = 1000, drop_rate: float | None = None,
                 drop_path_rate: float | None = None, **kwargs) -> EfficientNet:
    """Build `name` (e.g. "efficientnet_b0", "tf_efficientnet_b3") with random weights.

    drop_rate (classifier dropout) and drop_path_rate default to the paper's values
    (the variant's dropout, 0.2); pass 0.0 to turn them off. kwargs: in_chans, bn_eps,
    bn_momentum, act."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {list_models()}")
    return MODELS[name](num_classes=num_classes, drop_rate=drop_rate,
                        drop_path_rate=drop_path_rate, **kwargs)


def _entry(name: str) -> Callable[..., EfficientNet]:
    def build(**kwargs) -> EfficientNet:
        return create_model(name, **kwargs)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name} with random weights; kwargs as for create_model."
    return build


# efficientnet_b0 ... efficientnet_l2, tf_efficientnet_b0 ... tf_efficientnet_l2
globals().update({name: _entry(name) for name in MODELS})
