"""Parameters and GFLOPs of a network without / with MoE / with dMoE (paper Table 7).

Usage::

    python -m training.profile --arch transunet --preset paper
    python -m training.profile --arch resunet --preset paper --spatial-dims 3 --json

Models are built on PyTorch's ``meta`` device and counted by :mod:`training.flops`, so the
3D paper preset at 384×384×128 takes seconds and no memory. One multiply-add = 2 FLOPs,
batch size 1, inference (only the top-k experts a token is routed to are counted).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from .flops import count_flops, count_params
from .networks.blocks.tokens import MOE_MODES
from .networks.registry import create_model, list_models, model_class

DEFAULT_ATTRIBUTES = {("transunet", 2): 3, ("resunet", 2): 3, ("resunet", 3): 4}
"""Attribute values assumed when ``--num-attributes`` is not given: 3 for 2D (FairSeg's
race: Asian/Black/White), 4 for 3D (T stage T1-T4)."""


def default_size(arch: str, preset: str, spatial_dims: int) -> tuple[int, ...]:
    """Input size profiled by default: the preset's ``img_size`` for TransUNet, 224² for a
    2D ResUNet and 384×384×128 (the paper's 3D setting) for a 3D one."""
    presets = model_class(arch).presets
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {arch!r}; choose one of {list(presets)}")
    if "img_size" in presets[preset]:
        return (presets[preset]["img_size"],) * spatial_dims
    return (224, 224) if spatial_dims == 2 else (384, 384, 128)


def profile_model(
    arch: str,
    preset: str = "paper",
    spatial_dims: int = 2,
    size: Sequence[int] | None = None,
    in_channels: int = 1,
    out_channels: int = 2,
    num_attributes: int | None = None,
) -> dict[str, dict[str, float]]:
    """Parameters and GFLOPs for ``moe`` = none, moe, dmoe.

    Args:
        arch: a registered model name.
        preset: the model preset.
        spatial_dims: 2 or 3.
        size: input ``(H, W[, D])``; default :func:`default_size`.
        in_channels, out_channels: image channels and classes.
        num_attributes: attribute values of the dMoE; default ``DEFAULT_ATTRIBUTES``.

    Returns:
        ``{"none": {"params": n, "gflops": x}, "moe": {...}, "dmoe": {...},
        "separate": {...}}``. ``separate`` is one plain backbone per attribute value
        (``--arch separate``): ``num_attributes ×`` the plain network's parameters and
        GFLOPs (the paper's convention: every group model; a patient of known group runs
        one of them, ``gflops_per_patient``, an unknown one runs all).
    """
    size = tuple(size) if size else default_size(arch, preset, spatial_dims)
    if len(size) != spatial_dims:
        raise ValueError(
            f"--size needs {spatial_dims} values for spatial_dims={spatial_dims}, got {size}"
        )
    if num_attributes is None:
        num_attributes = DEFAULT_ATTRIBUTES.get((arch, spatial_dims), 3)
    result: dict[str, dict[str, float]] = {}
    for moe in MOE_MODES:
        with torch.device("meta"):
            model = create_model(
                arch, preset=preset, spatial_dims=spatial_dims, in_channels=in_channels,
                out_channels=out_channels, moe=moe, num_attributes=num_attributes,
            )
        flops = count_flops(model, (1, in_channels, *size))
        result[moe] = {"params": count_params(model), "gflops": flops.total / 1e9}
    # the group models are identical plain backbones with no shared parts, so the totals are
    # exact multiples (SeparateModels routes on values, which meta tensors do not have)
    result["separate"] = {"params": num_attributes * result["none"]["params"],
                          "gflops": num_attributes * result["none"]["gflops"],
                          "gflops_per_patient": result["none"]["gflops"]}
    return result


def format_table(result: dict[str, dict[str, float]], title: str) -> str:
    """A Table-7-like text table: params, GFLOPs and what the MoE adds to the plain net."""
    base = result["none"]
    header = f"{'model':<8}{'params (M)':>12}{'GFLOPs':>12}{'+params (M)':>14}{'+GFLOPs':>10}"
    lines = [title, header]
    for moe, row in result.items():
        d_params = (row["params"] - base["params"]) / 1e6
        d_flops = row["gflops"] - base["gflops"]
        lines.append(
            f"{moe:<8}{row['params'] / 1e6:>12.2f}{row['gflops']:>12.2f}"
            f"{d_params:>14.2f}{d_flops:>10.2f}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.profile",
        description="Parameters and GFLOPs (1 multiply-add = 2 FLOPs, batch 1, inference, "
        "top-k experts only) without MoE, with MoE and with dMoE, like Table 7 of Oh et al. 2025.",
    )
    model = p.add_argument_group("model")
    model.add_argument("--arch", required=True,
                       choices=[m for m in list_models() if m != "separate"],
                       help="backbone; the 'separate' row (one per group) is always shown")
    model.add_argument("--preset", default="paper", help="model preset (default: paper)")
    model.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2)
    model.add_argument("--in-channels", type=int, default=1)
    model.add_argument("--out-channels", type=int, default=2)
    model.add_argument(
        "--num-attributes", type=int, default=None,
        help="attribute values of the dMoE (default: 3 for 2D models, e.g. FairSeg race; "
        "4 for the 3D resunet, T stage T1-T4)",
    )
    inp = p.add_argument_group("input")
    inp.add_argument(
        "--size", type=int, nargs="+", metavar="N",
        help="input size H W [D] (default: the preset's img_size for transunet, 224 224 for a "
        "2D resunet, 384 384 128 for a 3D resunet)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = profile_model(
            args.arch, args.preset, args.spatial_dims, args.size, args.in_channels,
            args.out_channels, args.num_attributes,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        size = args.size or default_size(args.arch, args.preset, args.spatial_dims)
        shape = "x".join(map(str, size))
        title = f"{args.arch} ({args.preset}), {args.spatial_dims}D input {shape}"
        print(format_table(result, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
