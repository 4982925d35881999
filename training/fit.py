"""``python -m training.fit``: train a dMoE (or baseline) segmentation model.

``main(argv)`` parses flags (a ``--config file.yaml`` may set any of them) and calls
:func:`training.fitting.fit`, a plain function of a :class:`FitConfig`. Outputs in ``--out``:
``best.safetensors`` (best validation ES-Dice), ``last.safetensors``, ``config.yaml`` (the
resolved configuration) and ``history.csv`` (per epoch: losses, validation Dice and
ES-Dice, learning rate, seconds), plus ``last.state.safetensors`` (optimizer, scheduler,
RNG, epoch, best metric, patience, history; see ``training.train_state``) for ``--resume``.

``torchrun --nproc_per_node=N -m training.fit ...`` trains with DistributedDataParallel
(``training.distributed``). Exit codes of ``main``: 0 done, 2 bad settings/data or an
unusable resume point, 3 non-finite loss (last good files kept), 128+signal (143 SIGTERM,
130 SIGINT) when a signal stopped training after the current step.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .cli import add_config_argument, parse_with_config
from .fitting import FitConfig, FitResult, build_model, fit, prepare_data

__all__ = ["FitConfig", "FitResult", "build_model", "build_parser", "fit", "main",
           "prepare_data"]


def json_object(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.fit", description=__doc__.split("\n")[0],
        epilog="Several processes/GPUs: torchrun --standalone --nproc_per_node=N -m "
               "training.fit ... (--batch-size is per process). Exit codes: 2 bad settings or "
               "unusable resume files, 3 non-finite loss, 4 an output could not be written (disk "
               "full), 143/130 stopped by SIGTERM/SIGINT (rerun with --resume).")
    add_config_argument(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="manifest.csv or a dataset folder (FairSeg, HAM10000)")
    g.add_argument("--format", choices=["manifest", "fairseg", "ham10000"], help="default: detect")
    g.add_argument("--attribute", help="patient attribute column that routes (e.g. race)")
    g.add_argument("--attribute-routing", default="combination", choices=["combination", "sum"],
                   help="several attributes (--attribute race,gender): one dMoE router per "
                        "observed combination, or per-attribute routers summed (a combination "
                        "unseen in training is routed by its parts); stored in the checkpoint")
    g.add_argument("--classes", type=lambda s: s.split(","), help="e.g. background,rim,cup")
    g.add_argument("--image-size", type=int, help="2D model input side (default 224)")
    g.add_argument("--center-crop", type=int,
                   help="2D centre crop in pixels before resizing (default none; 512 under "
                        "--protocol paper)")
    g.add_argument("--gray-from", default="luminance",
                   choices=["luminance", "red", "green", "blue"],
                   help="how inference turns an RGB photograph into gray for a grayscale "
                        "model (e.g. green for fundus); stored in the checkpoint")
    g.add_argument("--intensity", choices=["minmax", "scale255", "none"],
                   help="2D intensity scaling (default minmax per image; scale255: fixed /255 "
                        "as the FairSeg reference, the default under --protocol paper)")
    g.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="3D training patch (default 64 64 32)")
    g.add_argument("--ct-window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="3D intensity window in HU, e.g. -1000 1000 (default: min-max)")
    g.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="3D voxel size in mm the volumes are resampled to, in RAS axis order "
                        "(default: the training set's median spacing)")
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--test-fraction", type=float, default=0.1)
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="transunet", choices=["transunet", "resunet", "separate"],
                   help="separate: one backbone per attribute group (--model-kwargs "
                        "'{\"backbone\": \"resunet\"}' for ResUNets; default transunet)")
    g.add_argument("--spatial-dims", type=int, default=2, choices=[2, 3])
    g.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper"])
    g.add_argument("--moe", default="dmoe", choices=["none", "moe", "dmoe"])
    g.add_argument("--attribute-dropout", type=float,
                   help="share of training samples routed as 'unknown' (default 0.1 with --moe "
                        "dmoe: trains the unknown router; 0 with --arch separate, whose unknown "
                        "path is the mean of the group models: > 0 also trains every group "
                        "model on that share of the other groups' samples)")
    g.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                   help='extra network arguments, e.g. \'{"embed_dim": 64, "depth": 2}\'')
    g.add_argument("--moe-importance-weight", type=float, default=0.0)
    g.add_argument("--moe-load-weight", type=float, default=0.0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", default="dicece", choices=["dicece", "febs", "groupdro", "adv"],
                   help="adv: gradient-reversal attribute discriminator on the bottleneck")
    g.add_argument("--adv-weight", type=float, default=0.1,
                   help="weight of the adversarial attribute loss (--loss adv)")
    g.add_argument("--febs-missing", default="reference", choices=["reference", "present"],
                   help="FEBS when a group is missing from the batch: reference (all weights "
                        "tanh(0)=0) or present (min over the groups present)")
    g.add_argument("--dice", choices=["monai", "reference"],
                   help="Dice loss form: monai (per sample; default) or reference (squared, "
                        "batch-pooled; default under --protocol paper)")
    g.add_argument("--select", default="dice", choices=["es_dice", "dice", "worst_group", "last"],
                   help="validation score that picks best.safetensors (default dice)")
    g.add_argument("--protocol", default="ours", choices=["ours", "paper"],
                   help="paper: every reference-code choice (README table) that no explicit "
                        "flag sets (--dice, --intensity, --center-crop, --model-kwargs "
                        "drop_rate / moe_spec: explicit flags win; the log lists both)")
    g.add_argument("--epochs", type=int, default=50)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--lr-decay", type=float, default=0.98, help="exponential decay per epoch")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    g.add_argument("--val-every", type=int, default=1)
    g.add_argument("--patience", type=int, help="stop after N validations without improvement")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument("--workers", type=int, default=0)
    g.add_argument("--out", default="runs/fit")
    g.add_argument("--quiet", action="store_true")
    g.add_argument("--description", help="one line stored in the checkpoint (shown by the plugin)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision (fp16 adds a GradScaler); default bf16 on CUDA "
                        "when supported, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute activations in backward to save memory (3D presets)")
    g = p.add_argument_group("resume")
    g.add_argument("--resume", action="store_true",
                   help="continue from --out's last.safetensors + last.state.safetensors "
                        "(starts a new run if --out holds neither)")
    g.add_argument("--resume-fallback", default="refuse", choices=["refuse", "best", "fresh"],
                   help="if the last pair is damaged: refuse (default), restart from "
                        "best.safetensors, or start over")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoints and history are "
                        "deleted); without it or --resume such a folder is refused")
    return p


def main(argv: list[str] | None = None) -> FitResult:
    parser = build_parser()
    args = parse_with_config(parser, argv, required=("data",))
    from .checkpoint import CheckpointWriteError
    from .data import DataError
    from .engine import NonFiniteLoss, TrainingInterrupted

    main_rank = os.environ.get("RANK", "0") == "0"  # other torchrun ranks stay silent

    def stop(code: int, message: str) -> None:
        parser.exit(code, message if main_rank else None)

    try:
        config = FitConfig(**{k: v for k, v in vars(args).items() if k != "config"})
        return fit(config)
    except NonFiniteLoss as exc:
        stop(3, f"error: non-finite loss: {exc}\n")
    except TrainingInterrupted as exc:
        stop(exc.exit_code, f"{exc}\n")
    except (DataError, ValueError) as exc:
        stop(2, f"error: {exc}\n")
    except CheckpointWriteError as exc:  # disk full: the files of the last epoch are kept
        stop(4, f"error: {exc}\n")


if __name__ == "__main__":
    main()
