"""``MoESpec``: the settings of every (d)MoE layer of a network, passed as one object.

Networks take ``moe`` (``"none"|"moe"|"dmoe"``), ``num_attributes`` and ``moe_spec``; the
spec holds what the layers are made of (timm passes a config the same way). Checkpoints
store it as a dict under ``model_kwargs["moe_spec"]``. Checkpoints and ``--model-kwargs``
written before the spec existed name its fields flat (``num_experts``, ``moe_dropout``, …):
:func:`fold_moe_kwargs` moves them into the spec, so they still load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# flat constructor argument (before MoESpec) -> MoESpec field
LEGACY_FIELDS = {
    "num_experts": "num_experts",
    "top_k": "top_k",
    "expert_mlp_ratio": "mlp_ratio",
    "moe_dropout": "dropout",
    "unknown_router": "unknown_router",
    "importance_weight": "importance_weight",
    "load_weight": "load_weight",
    "attribute_dropout": "attribute_dropout",
}


@dataclass(frozen=True)
class MoESpec:
    """What each MoE layer of a network is made of (Eq. 2-5 of Oh et al. 2025).

    Args:
        num_experts: shared experts E (8 in the paper).
        top_k: experts per token (2 in the paper).
        mlp_ratio: expert hidden width over the token width C (4: C -> 4C -> C).
        dropout: dropout inside the experts (0.1).
        unknown_router: an extra router for patients whose attribute is unknown.
        importance_weight, load_weight: Shazeer et al.'s balancing losses (0 = off).
        attribute_dropout: probability of hiding a sample's attribute while training (trains
            the unknown router); one decision per sample, shared by all its layers.
        router_bias: routers with a bias and nn.Linear's default init (the official code);
            default: no bias, zero init (Shazeer et al.).
        dropout_position: expert dropout ``"hidden"`` (after the ReLU, default) or
            ``"output"`` (after the second linear layer, the official code).
        attribute_parts: intersectional *summed* routing (``--attribute-routing sum``): the
            number of values of each attribute part, e.g. ``(3, 2)`` for race × gender; the
            network's ``num_attributes`` must be their product (combination indices in
            mixed radix, first part most significant). ``None``: one router per attribute
            value (see ``AttributeRouterBank``).
    """

    num_experts: int = 8
    top_k: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    unknown_router: bool = True
    importance_weight: float = 0.0
    load_weight: float = 0.0
    attribute_dropout: float = 0.1
    router_bias: bool = False
    dropout_position: str = "hidden"
    attribute_parts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.attribute_parts is not None:  # a JSON list from a checkpoint → tuple
            parts = tuple(int(n) for n in self.attribute_parts)
            if not parts or min(parts) < 1:
                raise ValueError(f"attribute_parts must be sizes >= 1, got "
                                 f"{self.attribute_parts!r}")
            object.__setattr__(self, "attribute_parts", parts)
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], "
                             f"got {self.top_k}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.importance_weight < 0 or self.load_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got importance="
                             f"{self.importance_weight}, load={self.load_weight}")
        if self.dropout_position not in ("hidden", "output"):
            raise ValueError(f"dropout_position must be hidden or output, got "
                             f"{self.dropout_position!r}")
        if not 0.0 <= self.attribute_dropout <= 1.0:
            raise ValueError(f"attribute_dropout must be in [0, 1], got {self.attribute_dropout}")

    @classmethod
    def of(cls, value: MoESpec | Mapping[str, Any] | None) -> MoESpec:
        """``value`` as a spec: a spec, a dict of its fields, or ``None`` (the defaults).

        Raises:
            ValueError: a dict key that is not a field (the valid fields are listed).
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"moe_spec must be a MoESpec or a dict, got {type(value).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ValueError(f"moe_spec does not take {unknown}; valid fields: {fields}")
        return cls(**value)

    def replace(self, **changes: Any) -> MoESpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fold_moe_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with flat pre-spec MoE arguments (``num_experts=4``, ``moe_dropout=0``, …)
    moved into ``kwargs["moe_spec"]`` (a dict); other keys unchanged.

    Raises:
        ValueError: a flat argument and the spec give the same field different values.
    """
    out = dict(kwargs)
    flat = {LEGACY_FIELDS[k]: out.pop(k) for k in list(out) if k in LEGACY_FIELDS}
    if not flat:
        return out
    spec = out.get("moe_spec")
    base = MoESpec.of(spec).to_dict() if spec is not None else {}
    given = dict(spec.to_dict() if isinstance(spec, MoESpec) else (spec or {}))
    for name, value in flat.items():
        if name in given and given[name] != value:
            raise ValueError(f"{name} is given twice with different values "
                             f"({value!r} and moe_spec {given[name]!r}); give it once")
    out["moe_spec"] = {**base, **flat}
    return out
