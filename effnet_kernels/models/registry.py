"""Model names (timm's) and `create_model`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .config import SCALING
from .efficientnet import EfficientNet, EfficientNetFeatures

MODELS: dict[str, Callable[..., EfficientNet]] = {}
FEATURE_MODELS: dict[str, Callable[..., EfficientNetFeatures]] = {}
for _variant in SCALING:
    for _prefix, _tf_same in (("", False), ("tf_", True)):
        _name = f"{_prefix}efficientnet_{_variant}"
        MODELS[_name] = partial(EfficientNet, _variant, tf_same=_tf_same)
        FEATURE_MODELS[_name] = partial(EfficientNetFeatures, _variant, tf_same=_tf_same)


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, num_classes: int = 1000, drop_rate: float | None = None,
                 drop_path_rate: float | None = None, *, features_only: bool = False,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3, 4),
                 **kwargs) -> EfficientNet | EfficientNetFeatures:
    """Build `name` (e.g. "efficientnet_b0", "tf_efficientnet_b3") with random weights.

    drop_rate (classifier dropout) and drop_path_rate default to the paper's values
    (the variant's dropout, 0.2); pass 0.0 to turn them off. kwargs: in_chans, bn_eps,
    bn_momentum, act. features_only=True builds the trunk alone (EfficientNetFeatures:
    a list of feature maps at out_indices, timm's features_only state_dict keys; there
    is no classifier, so num_classes and drop_rate do not apply)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {list_models()}")
    if features_only:
        return FEATURE_MODELS[name](out_indices=out_indices, drop_path_rate=drop_path_rate,
                                    **kwargs)
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
