"""A plain ViT encoder (conv patch embedding + timm ``Block``s) and timm weight loading.

The encoder exposes its pieces (``embed``, ``blocks``, ``norm``) so that a network can
insert layers between the blocks (TransUNet applies its dMoE after every block). There is
no class token: the tokens are exactly the ``(H/p) x (W/p)`` patch grid.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch_size`` patches → tokens, by one strided convolution.

    Args:
        in_channels: image channels.
        embed_dim: token width C.
        patch_size: patch side p (16 for ViT/16).
        spatial_dims: 2 (only 2D is used by the networks, 3 works too).
    """

    def __init__(
        self, in_channels: int, embed_dim: int, patch_size: int = 16, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.patch_size = patch_size
        self.proj = conv(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``(B, C_in, H, W[, D])`` → tokens ``(B, N, C)`` and the grid ``(H/p, W/p[, D/p])``."""
        bad = [s for s in x.shape[2:] if s % self.patch_size]
        if bad:
            raise ValueError(
                f"input size {tuple(x.shape[2:])} must be a multiple of the patch size "
                f"{self.patch_size}; resize or pad the image"
            )
        y = self.proj(x)
        grid = tuple(y.shape[2:])
        return y.flatten(2).transpose(1, 2), grid


class ViTEncoder(nn.Module):
    """Patch embedding, learned position embedding, ``depth`` timm blocks, final LayerNorm.

    Args:
        in_channels: image channels.
        img_size: side of the square input the position embedding is laid out for; other
            sizes are served by bicubic interpolation of the embedding.
        patch_size: patch side.
        embed_dim, depth, num_heads, mlp_ratio: the usual ViT sizes.
        qkv_bias: bias on the attention projections (True in ViT-B/16).
        drop_rate, attn_drop_rate, drop_path_rate: dropout on tokens / attention / stochastic
            depth (linearly increasing over the blocks).
    """

    def __init__(
        self,
        in_channels: int,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("img_size", img_size), ("patch_size", patch_size),
                            ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbedding(in_channels, embed_dim, patch_size)
        side = img_size // patch_size
        self.grid_size = (side, side)
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=rate)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            init_weights_vit_timm(module)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images ``(B, C_in, H, W)`` → position-embedded tokens ``(B, N, C)`` and the grid."""
        tokens, grid = self.patch_embed(x)
        pos = self.pos_embed
        if grid != self.grid_size:
            pos = resample_abs_pos_embed(
                pos, list(grid), old_size=list(self.grid_size), num_prefix_tokens=0
            )
        return self.pos_drop(tokens + pos), grid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Plain ViT: ``(B, C_in, H, W)`` → normalised tokens ``(B, N, C)`` and the grid."""
        tokens, grid = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens), grid

    def load_timm_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a timm ``VisionTransformer`` state dict into this encoder.

        Loads the patch embedding (input channels adapted by timm's rule: RGB summed for one
        channel), the position embedding (class token dropped, resampled to ``img_size``),
        the first ``depth`` blocks and the final norm. Shapes must otherwise match.

        Raises:
            ValueError: the weights do not fit this encoder's sizes.
        """
        from timm.models import adapt_input_conv

        own = self.state_dict()
        new: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key == "patch_embed.proj.weight":
                value = adapt_input_conv(own[key].shape[1], value)
            elif key == "pos_embed":  # drop class/register tokens, fit our grid
                value = value[:, value.shape[1] - _square_tokens(value.shape[1]) :]
                value = resample_abs_pos_embed(value, list(self.grid_size), num_prefix_tokens=0)
            if key in own:
                new[key] = value
        missing = sorted(k for k in own if k not in new)
        if missing:
            raise ValueError(f"pretrained weights lack {len(missing)} tensors, e.g. {missing[:3]}")
        wrong = [k for k in new if new[k].shape != own[k].shape]
        if wrong:
            k = wrong[0]
            raise ValueError(
                f"pretrained weights do not fit: {k} is {tuple(new[k].shape)}, this encoder "
                f"(embed_dim={self.embed_dim}) needs {tuple(own[k].shape)}; build the model with "
                "the checkpoint's embed_dim and mlp_ratio, or pass pretrained=False"
            )
        self.load_state_dict(new, strict=True)


def _square_tokens(n: int) -> int:
    """Largest square number <= n (tokens minus class/register prefix tokens)."""
    return math.isqrt(n) ** 2


def read_timm_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a timm ViT checkpoint: ``.safetensors`` (no pickle) or a big_vision ``.npz``.

    Returns a timm-style state dict (``patch_embed.proj.weight``, ``pos_embed``,
    ``blocks.0.attn.qkv.weight``, ...). ``.npz`` files are converted by timm's own loader.

    Raises:
        ValueError: missing file or unsupported format.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
        return {k.removeprefix("module."): v for k, v in state.items()}
    if path.suffix == ".npz":
        return _npz_to_state_dict(path)
    raise ValueError(f"unsupported weights file {path.name!r}: give a timm .safetensors or .npz")


def _npz_to_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Convert a big_vision/JAX ``.npz`` ViT checkpoint with timm's own loader."""
    import numpy as np
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    with np.load(path) as w:
        pre = "opt/target/" if "opt/target/embedding/kernel" in w else ""
        patch = w[f"{pre}embedding/kernel"].shape  # (p, p, C_in, C)
        pattern = re.compile(rf"{pre}Transformer/encoderblock_(\d+)/")
        blocks = {m.group(1) for k in w if (m := pattern.match(k))}
        block0 = f"{pre}Transformer/encoderblock_0"
        num_heads = w[f"{block0}/MultiHeadDotProductAttention_1/query/kernel"].shape[1]
        hidden = w[f"{block0}/MlpBlock_3/Dense_0/kernel"].shape[1]
    vit = VisionTransformer(
        img_size=224, patch_size=patch[0], in_chans=patch[2], embed_dim=patch[3],
        depth=len(blocks), num_heads=num_heads, mlp_ratio=hidden / patch[3], num_classes=0,
    )
    _load_weights(vit, str(path))
    return vit.state_dict()


VIT_BASE_HUB_NAME = "vit_base_patch16_224"
"""timm model whose weights ``pretrained=True`` loads (ViT-B/16, 224²)."""


def fetch_timm_weights(model_name: str = VIT_BASE_HUB_NAME, timeout: float = 3.0) -> Path:
    """Local path of a timm model's ``model.safetensors``, downloading it if reachable.

    Looks in the Hugging Face cache first; otherwise downloads, unless ``HF_HUB_OFFLINE``
    is set or the hub does not answer a TCP connection within ``timeout`` seconds (checked
    in a daemon thread, so a silent firewall cannot hang the caller).

    Raises:
        RuntimeError: the weights could not be fetched; the message says what to do.
    """
    import os
    import socket
    import threading

    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    repo = cfg.hf_hub_id if cfg is not None else None
    if not repo:
        raise RuntimeError(f"timm has no hub weights for {model_name!r}")
    cached = try_to_load_from_cache(repo, "model.safetensors")  # local only, no network
    if isinstance(cached, str):
        return Path(cached)
    advice = (
        f"could not fetch the pretrained {model_name} weights ({repo}) from the Hugging Face "
        "hub: {why}. Pass pretrained=False, or download the timm .safetensors/.npz file "
        "elsewhere and pass pretrained_path=<file>."
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise RuntimeError(advice.format(why="HF_HUB_OFFLINE is set"))
    host = constants.ENDPOINT.split("//")[-1].split("/")[0].split(":")[0]
    reachable: list[bool] = []

    def _probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            reachable.append(True)
        except Exception:  # DNS failure, refused, timed out: all mean "not reachable"
            pass

    probe = threading.Thread(target=_probe, daemon=True)
    probe.start()
    probe.join(timeout)
    if not reachable:
        raise RuntimeError(advice.format(why=f"{host} is not reachable (no internet?)"))
    try:
        return Path(hf_hub_download(repo, "model.safetensors", etag_timeout=timeout))
    except Exception as err:
        raise RuntimeError(advice.format(why=f"{type(err).__name__}: {err}")) from err
