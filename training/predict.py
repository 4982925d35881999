"""``python -m training.predict``: write label files for new images.

``--checkpoint CKPT (--data PATH [--split S] | --image FILE --attribute-value V) --out DIR``
writes one label file per case, named ``<id>`` + the input's extension family (``.png``
for png/jpg/npz, ``.tif``, ``.nii.gz`` with the input's affine and header, ``.npy``) at the
input's original size, and ``predictions.csv`` (id, attribute value used, file).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from .cli import add_checkpoint_data_arguments, add_config_argument, parse_with_config


def predict(checkpoint: str | Path, out: str | Path, *, data: str | Path | None = None,
            split: str = "test", image: str | Path | None = None,
            attribute_value: str | None = None, format: str | None = None,
            device: str = "auto", progress=None) -> list[dict[str, str]]:
    """Segment a split of a dataset or one image; returns the ``predictions.csv`` rows."""
    from .data import Case, file_stem, label_suffix_for, read_image, write_label
    from .evaluate import load_split
    from .inference import Segmenter

    if (data is None) == (image is None):
        raise ValueError("give either data (a dataset) or image (one file)")
    seg = Segmenter.from_checkpoint(checkpoint, device=device)
    attribute = seg.attribute_name
    if image is not None:
        cases = [Case(id=file_stem(image), image=Path(image), label=None,
                      attributes={attribute or "attribute": attribute_value or ""})]
    else:
        cases = load_split(data, split, format=format, require_labels=False,
                           attribute=None, spatial_dims=seg.spatial_dims)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, case in enumerate(cases):
        img, meta = read_image(case.image, case.image_key, spatial_dims=seg.spatial_dims)
        value = case.attributes.get(attribute, "") if attribute else ""
        result = seg.segment(img, value or None, channel_axis=0)
        path = write_label(out / f"{case.id}{label_suffix_for(case.image)}", result.labels, meta)
        rows.append({"id": case.id, "attribute_value": result.attribute_value, "file": path.name})
        if progress:
            progress(i + 1, len(cases))
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "attribute_value", "file"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.predict",
                                description=__doc__.split("\n")[0])
    add_config_argument(p)
    add_checkpoint_data_arguments(p)
    p.add_argument("--image", help="one image file instead of --data")
    p.add_argument("--attribute-value", help="with --image: the patient's attribute value "
                                             "(omit for unknown)")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    parser = build_parser()
    args = parse_with_config(parser, argv, required=("checkpoint", "out"))
    if bool(args.data) == bool(args.image):
        parser.error("give exactly one of --data or --image")
    from .data import DataError

    try:
        rows = predict(args.checkpoint, args.out, data=args.data, split=args.split,
                       image=args.image, attribute_value=args.attribute_value,
                       format=args.format, device=args.device)
    except (DataError, ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {len(rows)} label file(s) and predictions.csv to {args.out}")
    return rows


if __name__ == "__main__":
    main()
