"""Networks by name: ``@register_model``, ``create_model`` and ``list_models`` (timm style).

A registered network is a class with a ``presets`` dict (preset name → constructor
arguments) whose constructor takes the shared arguments ``spatial_dims, in_channels,
out_channels, moe, num_attributes`` plus its own, all with defaults.

Every model built by :func:`create_model` carries ``model.model_name`` and
``model.model_kwargs``: the full constructor arguments after preset resolution, as plain
JSON values (tuples become lists), plus the preset's name. A checkpoint stores both, and
``create_model(model.model_name, **model.model_kwargs)`` rebuilds the same architecture.
Arguments that only matter while constructing (``pretrained``, ``pretrained_path``) are
stored with their "off" values, since the weights travel in the checkpoint.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from .blocks.spec import MoESpec, fold_moe_kwargs
from .blocks.tokens import check_moe_mode

_MODELS: dict[str, type[nn.Module]] = {}
_M = TypeVar("_M", bound=type[nn.Module])


def register_model(name: str) -> Callable[[_M], _M]:
    """Class decorator adding a network to the registry under ``name``.

    The class needs a ``presets: dict[str, dict]`` attribute; it may define
    ``transient_kwargs: dict`` (arguments stored with fixed values in ``model_kwargs``).
    """

    def decorate(cls: _M) -> _M:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"a model named {name!r} is already registered")
        if not isinstance(getattr(cls, "presets", None), dict) or not cls.presets:
            raise TypeError(f"{cls.__name__} needs a non-empty `presets` dict to be registered")
        _MODELS[name] = cls
        return cls

    return decorate


def _registry() -> dict[str, type[nn.Module]]:
    if not _MODELS:  # the networks register themselves when their package is imported
        from . import nets  # noqa: F401
    return _MODELS


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_registry())


def list_presets(name: str) -> list[str]:
    """Preset names of network ``name``."""
    return list(model_class(name).presets)


def model_class(name: str) -> type[nn.Module]:
    """The class registered as ``name`` (ValueError listing the names if unknown)."""
    models = _registry()
    if name not in models:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(models)}")
    return models[name]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def create_model(
    name: str,
    *,
    preset: str = "tiny",
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 2,
    moe: str = "dmoe",
    num_attributes: int = 1,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered segmentation network.

    Args:
        name: one of :func:`list_models` (``"transunet"``, ``"resunet"``).
        preset: one of the network's presets (``"paper"``, ``"small"``, ``"tiny"``); its
            values are defaults that ``kwargs`` override.
        spatial_dims: 2 or 3 (``transunet`` is 2D only).
        in_channels: image channels.
        out_channels: classes K, including background.
        moe: ``"none"`` (no MoE), ``"moe"`` (attribute-blind MoE, the attribute is ignored)
            or ``"dmoe"`` (one router per attribute value + an unknown-attribute router).
        num_attributes: attribute values (the routing attribute's vocabulary size).
        **kwargs: further constructor arguments of the network (see its class); the MoE
            layers' settings as ``moe_spec=MoESpec(...)`` (or a dict). The flat names used
            before the spec existed (``num_experts``, ``top_k``, ``moe_dropout``, …) are
            still accepted and folded into it.

    Returns:
        The model, with ``model_name`` and ``model_kwargs`` set. Its ``forward(x, attr)``
        returns logits ``(B, out_channels, *spatial)``.

    Raises:
        ValueError: unknown name, preset, moe mode or keyword, or an invalid value.
    """
    cls = model_class(name)
    if preset not in cls.presets:
        raise ValueError(
            f"unknown preset {preset!r} for {name!r}; choose one of {list(cls.presets)}"
        )
    check_moe_mode(moe)
    params = inspect.signature(cls.__init__).parameters
    if "moe_spec" in params:  # flat pre-MoESpec arguments (old checkpoints, --model-kwargs)
        kwargs = fold_moe_kwargs(kwargs)
    accepted = [p for p in params if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{name!r} does not take {unknown}; valid arguments: {accepted}")
    args = {
        **cls.presets[preset],
        **kwargs,
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "moe": moe,
        "num_attributes": num_attributes,
    }
    model = cls(**args)
    bound = inspect.signature(cls.__init__).bind(None, **args)
    bound.apply_defaults()
    resolved = {k: v for k, v in bound.arguments.items() if k != "self"}
    resolved.update(getattr(cls, "transient_kwargs", {}))
    if "moe_spec" in resolved:
        resolved["moe_spec"] = MoESpec.of(resolved["moe_spec"]).to_dict()
    model.model_name = name
    model.model_kwargs = {"preset": preset, **_jsonable(resolved)}
    return model
