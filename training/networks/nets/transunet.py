"""TransUNet (ViT encoder + cascaded upsampling decoder) with dMoE layers, 2D.

Encoder: 16×16 conv patch embedding, learned position embedding, ViT blocks (timm ``Block``),
final LayerNorm; the tokens are reshaped to ``(B, C, H/16, W/16)``. Decoder: TransUNet's
``DecoderCup`` without CNN skips (a 3×3 conv to ``decoder_head_channels``, then four stages
of ×2 bilinear upsampling + two 3×3 conv/norm/ReLU), then a 1×1 conv head at full resolution.

The dMoE (Oh et al. 2025, Eq. 2-5) is applied after every encoder block: by default one
layer **shared** by all blocks (paper Table 4), or one per block (``moe_sharing="layerwise"``).
``moe_placement="decoder"`` instead puts a layer-wise dMoE after each decoder stage, ``"both"``
does both (paper Table 8).

Attribute dropout: with ``moe="dmoe"`` and in training mode, each sample's attribute is
replaced by -1 ("unknown") with probability ``attribute_dropout`` before the first dMoE
layer, the same for all layers of that sample. This trains the unknown-attribute router
that serves patients whose attribute is missing at inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.blocks import UpSample
from torch import nn

from ..blocks.moe import DMoE
from ..blocks.resblocks import check_norm, check_spatial_dims, conv_head, conv_norm_act
from ..blocks.spec import MoESpec
from ..blocks.tokens import (
    apply_moe_to_feature_map,
    apply_moe_to_tokens,
    build_moe,
    check_moe_mode,
    prepare_attributes,
    routing_on_grid,
    tokens_to_feature,
    zero_aux,
)
from ..blocks.vit import ViTEncoder, fetch_timm_weights, read_timm_weights
from ..registry import register_model
from .output import LayerRouting, SegmentationOutput, finish_output

PATCH_SIZE = 16
SHARINGS = ("shared", "layerwise")
PLACEMENTS = ("encoder", "decoder", "both")


@register_model("transunet")
class TransUNet(nn.Module):
    """2D TransUNet with shared or layer-wise dMoE.

    Args:
        spatial_dims: must be 2.
        in_channels: image channels.
        out_channels: classes K.
        moe: ``"none"``, ``"moe"`` (attribute-blind) or ``"dmoe"``.
        num_attributes: attribute values (dMoE routers, plus one for unknown).
        img_size: square input side the position embedding is laid out for (other sizes,
            multiples of 16, are served by interpolating it).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: ViT sizes (ViT-B/16: 768, 12, 12, 4).
        drop_rate, attn_drop_rate, drop_path_rate: ViT dropouts.
        decoder_head_channels: channels of the 3×3 conv after the encoder (512 in TransUNet).
        decoder_channels: channels of the four ×2 decoder stages.
        norm: decoder normalisation, ``"batch"`` or ``"instance"``.
        moe_spec: what every (d)MoE layer is made of (:class:`MoESpec`, or a dict of
            its fields; experts, top-k, expert dropout, balancing losses, attribute dropout).
        moe_sharing: ``"shared"`` (one encoder dMoE for all blocks) or ``"layerwise"``.
        moe_placement: ``"encoder"``, ``"decoder"`` or ``"both"``.
        pretrained: load timm ``vit_base_patch16_224`` weights into the encoder (needs the
            hub, or the file in the Hugging Face cache); RuntimeError when unreachable.
        pretrained_path: load the encoder from this timm ``.safetensors``/``.npz`` instead
            (implies ``pretrained``).
    """

    presets = {
        "paper": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, img_size=224,
                      decoder_head_channels=512, decoder_channels=(256, 128, 64, 16)),
        "small": dict(embed_dim=384, depth=6, num_heads=6, mlp_ratio=4.0, img_size=224,
                      decoder_head_channels=256, decoder_channels=(128, 64, 32, 16)),
        "tiny": dict(embed_dim=96, depth=4, num_heads=4, mlp_ratio=4.0, img_size=128,
                     decoder_head_channels=64, decoder_channels=(32, 16, 16, 8)),
    }
    transient_kwargs = {"pretrained": False, "pretrained_path": None}

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        moe: str = "dmoe",
        num_attributes: int = 1,
        img_size: int = 224,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        decoder_head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        norm: str = "batch",
        moe_spec: MoESpec | Mapping[str, Any] | None = None,
        moe_sharing: str = "shared",
        moe_placement: str = "encoder",
        pretrained: bool = False,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(
                f"transunet is 2D only, got spatial_dims={spatial_dims!r}; use 'resunet' for 3D"
            )
        check_spatial_dims(spatial_dims)
        check_moe_mode(moe)
        check_norm(norm)
        if in_channels < 1 or out_channels < 1 or num_attributes < 1:
            raise ValueError(
                f"in_channels, out_channels and num_attributes must be >= 1, got "
                f"{in_channels}, {out_channels}, {num_attributes}"
            )
        if moe_sharing not in SHARINGS:
            raise ValueError(f"moe_sharing must be one of {list(SHARINGS)}, got {moe_sharing!r}")
        if moe_placement not in PLACEMENTS:
            raise ValueError(
                f"moe_placement must be one of {list(PLACEMENTS)}, got {moe_placement!r}"
            )
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if len(decoder_channels) != 4 or min(decoder_channels) < 1:
            raise ValueError(
                f"decoder_channels must be 4 positive ints (one per x2 stage), "
                f"got {decoder_channels}"
            )
        weights = None  # fetched before building anything, so that offline fails fast
        if pretrained or pretrained_path is not None:
            path = pretrained_path if pretrained_path is not None else fetch_timm_weights()
            weights = read_timm_weights(path)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.moe_mode = moe
        self.moe_spec = spec = MoESpec.of(moe_spec)
        self.attribute_dropout = spec.attribute_dropout

        self.encoder = ViTEncoder(
            in_channels, img_size=img_size, patch_size=PATCH_SIZE, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
        )
        self.shared_moe = moe_sharing == "shared"
        n_encoder = 0 if moe_placement == "decoder" else (1 if self.shared_moe else depth)
        self.encoder_moe = nn.ModuleList(
            m for _ in range(n_encoder)
            if (m := build_moe(moe, embed_dim, spec, num_attributes)) is not None
        )

        self.decoder_head = conv_norm_act(2, embed_dim, decoder_head_channels, norm=norm)
        stages = []
        prev = decoder_head_channels
        for ch in decoder_channels:
            stages.append(nn.Sequential(
                UpSample(2, scale_factor=2, mode="nontrainable", interp_mode="bilinear",
                         align_corners=True),
                conv_norm_act(2, prev, ch, norm=norm),
                conv_norm_act(2, ch, ch, norm=norm),
            ))
            prev = ch
        self.decoder = nn.ModuleList(stages)
        with_decoder_moe = moe_placement in ("decoder", "both")
        self.decoder_moe = nn.ModuleList(
            m for ch in (decoder_channels if with_decoder_moe else ())
            if (m := build_moe(moe, ch, spec, num_attributes)) is not None
        )
        self.head = conv_head(2, prev, out_channels)

        if weights is not None:
            self.encoder.load_timm_state_dict(weights)

    def _encoder_layer(self, i: int) -> DMoE | None:
        if not self.encoder_moe:
            return None
        return self.encoder_moe[0 if self.shared_moe else i]

    def forward(
        self,
        x: torch.Tensor,
        attr: torch.Tensor | None = None,
        *,
        return_routing: bool = False,
        return_aux: bool = False,
    ) -> torch.Tensor | SegmentationOutput:
        """Segment a batch.

        Args:
            x: images ``(B, C_in, H, W)``, ``H`` and ``W`` multiples of 16.
            attr: attribute indices ``(B,)`` long, ``-1`` = unknown; ``None`` = all unknown.
                Ignored unless ``moe="dmoe"``.
            return_routing: also return routing per dMoE application ("encoder.block{i}" on
                the ``(H/16, W/16)`` grid, "decoder.stage{j}" at strides 8, 4, 2, 1).
            return_aux: return a :class:`SegmentationOutput` with the summed aux loss.

        Returns:
            Logits ``(B, K, H, W)``, or a :class:`SegmentationOutput` if a flag is set.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        attr = prepare_attributes(attr, x, self.moe_mode, self.attribute_dropout, self.training)
        aux = zero_aux(x)
        routing: list[LayerRouting] = []
        tokens, grid = self.encoder.embed(x)
        for i, block in enumerate(self.encoder.blocks):
            tokens = block(tokens)
            layer = self._encoder_layer(i)
            if layer is not None:
                tokens, loss, info = apply_moe_to_tokens(layer, tokens, attr, return_routing)
                aux = aux + loss
                if info is not None:
                    grid_info = routing_on_grid(info, grid)
                    routing.append(LayerRouting(f"encoder.block{i}", *grid_info, (PATCH_SIZE,) * 2))
        feat = tokens_to_feature(self.encoder.norm(tokens), grid)
        feat = self.decoder_head(feat)
        for j, stage in enumerate(self.decoder):
            feat = stage(feat)
            if self.decoder_moe:
                feat, loss, grid_info = apply_moe_to_feature_map(
                    self.decoder_moe[j], feat, attr, return_routing
                )
                aux = aux + loss
                if grid_info is not None:
                    stride = (PATCH_SIZE >> (j + 1),) * 2
                    routing.append(LayerRouting(f"decoder.stage{j}", *grid_info, stride))
        return finish_output(self.head(feat), aux, routing, return_routing, return_aux)
