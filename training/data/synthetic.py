"""Synthetic datasets whose groups differ in appearance *and* in contouring policy.

``make_synthetic_dataset(kind, out, n, seed)`` writes a generic manifest
(shared/DATA_FORMATS.md §1): ``manifest.csv`` (image,label,split,id,<attribute>),
``images/``, ``labels/`` and ``dataset.json`` (classes, groups, policies, suggested
preprocessing). Splits are 80/10/10, stratified by attribute, and every group appears in
train, val and test. Files are byte-identical for a given (kind, n, seed).

An ``out`` that already holds a dataset (``manifest.csv``, ``dataset.json``, or case files
``images/<kind>_*``, ``labels/<kind>_*``) is refused, naming them, unless ``overwrite``; even
then a ``manifest.csv`` without training.synth's ``dataset.json`` (the user's own dataset)
is never replaced. Every file is written under a temporary name and renamed when complete
(``training.checkpoint.atomic_write_bytes``), ``manifest.csv`` last: a folder without it
is an unfinished dataset.

Design. Each structure is a smooth blob whose visible edge is a wide soft ramp of the
normalised radius ``rho`` (1 = middle of the ramp). The *majority* group's annotators
contour at ``rho = 1``; rare groups' annotators use a systematically different threshold
(their policy). The group's appearance shifts only slightly (weak cue), so a model blind
to the attribute learns the majority policy and loses Dice on rare groups; a model that
routes on the attribute can learn each group's policy.

fundus (grayscale PNG 192x192; classes background, rim = 1, cup = 2; column ``race``):
    White 76 %  disc at rho 1.0, cup at rho 1.0 (middle of the pallor ramp);
                base brightness 0.42.
    Black 15 %  disc 1.0, cup drawn at the *outer* edge of pallor (rho 1.3): larger cups,
                thinner rim; slightly darker fundus (0.38), discs 6 % larger.
    Asian  9 %  disc drawn tight (rho 0.93), cup only the bright core (rho 0.72): thick
                rim; slightly finer texture, base 0.40.
skin (RGB JPG 160x120 like HAM10000's 4:3; lesion = 1; column ``age_group``):
    40-59 38 %, 60-79 37 %   lesion contoured at rho 1.0 (middle of the penumbra).
    20-39 15 %  slightly tight (rho 0.88).
    <20    3 %  only the dark core (rho 0.74); lighter, smaller lesions.
    >=80   7 %  generous, whole penumbra (rho 1.26); more hair, coarser skin.
ct (NIfTI int16 HU 64x64x32, spacing 0.9x0.9x2.5 mm, non-identity affine; tumour = 1;
column ``t_stage``):
    T2 31 %, T3 59 %  tumour at rho 1.0 (middle of the hypodense ramp).
    T1  4 %  contoured with a margin (rho 1.3); small, low-contrast lesions.
    T4  6 %  solid core only (rho 0.78); larger, more heterogeneous lesions.
intersectional (fundus images; columns ``race`` and ``gender``; routing attribute
``race,gender``): the look follows race as in fundus, the policy follows the *combination*:
    Black|female 8 %  cup at the outer edge of pallor (rho 1.3);
    Asian|male   6 %  tight disc (0.93) and cup (0.72);
    Asian|female 5 %, Black|male 8 %, White|female 37 %, White|male 36 %: majority policy.
    Routing by race or by gender alone mixes a special policy with the majority one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.data.io import file_suffix, write_label
from training.data.manifest import write_manifest
from training.data.synthetic_images import draw_ct, draw_fundus, draw_skin

KINDS = ("fundus", "skin", "ct", "intersectional")
DEFAULT_N = {"fundus": 400, "skin": 400, "ct": 60, "intersectional": 400}
SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1}
CT_SHAPE, CT_SPACING = (64, 64, 32), (0.9, 0.9, 2.5)
FUNDUS_SIZE, SKIN_SIZE = 192, (120, 160)

# group: (share, appearance ("look"), contouring policy ("cut"))
GROUPS: dict[str, dict[str, tuple[float, dict, dict]]] = {
    "fundus": {
        "Asian": (0.09, dict(base=0.40, texture=0.030, disc_scale=1.0, cdr=0.48, contrast=1.0),
                  dict(disc=0.93, cup=0.72)),
        "Black": (0.15, dict(base=0.38, texture=0.025, disc_scale=1.06, cdr=0.50,
                             contrast=0.95), dict(disc=1.0, cup=1.3)),
        "White": (0.76, dict(base=0.42, texture=0.025, disc_scale=1.0, cdr=0.46, contrast=1.0),
                  dict(disc=1.0, cup=1.0)),
    },
    "skin": {
        "<20": (0.03, dict(tone=0.30, texture=0.012, size=0.24, pigment=1.15, hairs=1.0),
                dict(lesion=0.74)),
        "20-39": (0.15, dict(tone=0.35, texture=0.014, size=0.26, pigment=1.05, hairs=1.5),
                  dict(lesion=0.88)),
        "40-59": (0.38, dict(tone=0.38, texture=0.015, size=0.27, pigment=1.0, hairs=2.0),
                  dict(lesion=1.0)),
        "60-79": (0.37, dict(tone=0.40, texture=0.017, size=0.28, pigment=0.97, hairs=2.5),
                  dict(lesion=1.0)),
        ">=80": (0.07, dict(tone=0.44, texture=0.021, size=0.28, pigment=0.95, hairs=3.5),
                 dict(lesion=1.26)),
    },
    "ct": {
        "T1": (0.04, dict(radius=7.0, contrast=62.0, texture=7.0), dict(tumour=1.3)),
        "T2": (0.31, dict(radius=8.5, contrast=66.0, texture=8.0), dict(tumour=1.0)),
        "T3": (0.59, dict(radius=9.5, contrast=68.0, texture=8.0), dict(tumour=1.0)),
        "T4": (0.06, dict(radius=11.0, contrast=70.0, texture=11.0), dict(tumour=0.78)),
    },
}
# intersectional: fundus images whose contouring policy is set by race AND gender together
# (neither alone): Black women's annotators draw the cup at the outer edge of pallor, Asian
# men's draw it tight; Black men and Asian women follow the majority policy.
_LOOK = {r: look for r, (_, look, _) in GROUPS["fundus"].items()}
_MAJORITY, _LARGE_CUP, _TIGHT = dict(disc=1.0, cup=1.0), dict(disc=1.0, cup=1.3), dict(
    disc=0.93, cup=0.72)
GROUPS["intersectional"] = {
    "Asian|female": (0.05, _LOOK["Asian"], _MAJORITY),
    "Asian|male": (0.06, _LOOK["Asian"], _TIGHT),
    "Black|female": (0.08, _LOOK["Black"], _LARGE_CUP),
    "Black|male": (0.08, _LOOK["Black"], _MAJORITY),
    "White|female": (0.37, _LOOK["White"], _MAJORITY),
    "White|male": (0.36, _LOOK["White"], _MAJORITY),
}
ATTRIBUTE = {"fundus": "race", "skin": "age_group", "ct": "t_stage",
             "intersectional": "race,gender"}
CLASSES = {"fundus": ["background", "rim", "cup"], "skin": ["background", "lesion"],
           "intersectional": ["background", "rim", "cup"],
           "ct": ["background", "tumour"]}
SUGGESTED = {
    "fundus": dict(spatial_dims=2, image_size=[128, 128], center_crop=None,
                   intensity="minmax", in_channels=1),
    "skin": dict(spatial_dims=2, image_size=[96, 128], center_crop=None,
                 intensity="minmax", in_channels=3),
    "ct": dict(spatial_dims=3, patch_size=[48, 48, 24], intensity="ct_window",
               ct_window=[-150.0, 250.0], in_channels=1),
}
SUGGESTED["intersectional"] = SUGGESTED["fundus"]
_KIND_CODE = {"fundus": 1, "skin": 2, "ct": 3, "intersectional": 4}
_SUFFIXES = {"fundus": (".png", ".png"), "intersectional": (".png", ".png"),
             "skin": (".jpg", ".png"), "ct": (".nii.gz", ".nii.gz")}  # (image, label)


def ct_affine() -> np.ndarray:
    """Affine of the synthetic CT: anisotropic, axes flipped like LPS data seen in RAS."""
    affine = np.diag([-CT_SPACING[0], -CT_SPACING[1], CT_SPACING[2], 1.0])
    affine[:3, 3] = [CT_SHAPE[0] * CT_SPACING[0] / 2, CT_SHAPE[1] * CT_SPACING[1] / 2, -40.0]
    return affine


def group_counts(kind: str, n: int) -> dict[str, int]:
    """Cases per group: largest-remainder rounding of the shares, at least 3 per group."""
    groups = GROUPS[kind]
    if n < 3 * len(groups):
        raise ValueError(f"n must be at least {3 * len(groups)} for kind {kind!r} (3 cases "
                         f"per group, one per split), got {n}")
    exact = {g: share * n for g, (share, _, _) in groups.items()}
    counts = {g: int(np.floor(v)) for g, v in exact.items()}
    order = sorted(groups, key=lambda g: (-(exact[g] - counts[g]), g))
    for g in order[: n - sum(counts.values())]:
        counts[g] += 1
    for g in groups:
        while counts[g] < 3:
            donor = max(counts, key=lambda k: counts[k])
            counts[donor] -= 1
            counts[g] += 1
    return counts


def _assign(kind: str, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Group and split of every case index (stratified 80/10/10)."""
    rng = np.random.default_rng([seed, _KIND_CODE[kind], 0])
    counts = group_counts(kind, n)
    groups = [g for g in GROUPS[kind] for _ in range(counts[g])]
    groups = [groups[i] for i in rng.permutation(n)]
    splits = ["train"] * n
    for g in GROUPS[kind]:
        members = [i for i, x in enumerate(groups) if x == g]
        members = [members[i] for i in rng.permutation(len(members))]
        n_val = max(1, int(round(SPLIT_FRACTIONS["val"] * len(members))))
        n_test = max(1, int(round(SPLIT_FRACTIONS["test"] * len(members))))
        for i in members[:n_val]:
            splits[i] = "val"
        for i in members[n_val:n_val + n_test]:
            splits[i] = "test"
    return groups, splits


def _case_files(kind: str, case_id: str) -> tuple[str, str]:
    """``(image, label)`` paths of a case, relative to the dataset folder."""
    image, label = _SUFFIXES[kind]
    return f"images/{case_id}{image}", f"labels/{case_id}{label}"


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write(temporary path)``, then rename into ``path`` (the temporary file keeps the
    suffix, from which the writers pick the format)."""
    from training.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, write, temp_suffix=file_suffix(path))


def _write_case(kind: str, rng: np.random.Generator, group: str, out: Path, case_id: str
                ) -> tuple[str, str]:
    from PIL import Image

    _, look, cut = GROUPS[kind][group]
    image_rel, label_rel = _case_files(kind, case_id)
    meta = None
    if kind in ("fundus", "intersectional"):
        image, label = draw_fundus(rng, look, cut, FUNDUS_SIZE)
        _write_atomic(out / image_rel, Image.fromarray(image, mode="L").save)
    elif kind == "skin":
        image, label = draw_skin(rng, look, cut, *SKIN_SIZE)
        photo = Image.fromarray(image, mode="RGB")
        _write_atomic(out / image_rel, lambda tmp: photo.save(tmp, quality=92))
    else:
        import nibabel as nib

        volume, label = draw_ct(rng, look, cut, CT_SHAPE, CT_SPACING)
        img = nib.Nifti1Image(volume, ct_affine())
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(ct_affine(), code=1)
        img.set_sform(ct_affine(), code=1)
        _write_atomic(out / image_rel, lambda tmp: nib.save(img, tmp))
        meta = {"affine": ct_affine(), "nifti_header": bytes(img.header.binaryblock)}
    _write_atomic(out / label_rel, lambda tmp: write_label(tmp, label, meta))
    return image_rel, label_rel


def _is_synthetic(out: Path) -> bool:
    """Whether ``out/dataset.json`` is one this module wrote."""
    try:
        info = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("kind") in KINDS and "policies" in info


def _earlier_files(out: Path, kinds: set[str]) -> list[Path]:
    """``manifest.csv``, ``dataset.json`` and the case files of ``kinds`` in ``out``."""
    found = [out / name for name in ("manifest.csv", "dataset.json") if (out / name).exists()]
    for sub in ("images", "labels"):
        if (out / sub).is_dir():
            found += sorted(p for k in kinds for p in (out / sub).glob(f"{k}_*"))
    return found


def _clear_earlier_dataset(kind: str, out: Path, overwrite: bool) -> None:
    """Refuse, or with ``overwrite`` delete, an earlier dataset in ``out`` (module
    docstring); the manifest goes first, so an interrupted replacement leaves no manifest
    that lists the new files as the old dataset.

    Raises:
        ValueError: ``out`` is a file, or holds a dataset and not ``overwrite``, or holds a
            manifest training.synth did not write.
    """
    from training.run_folder import refuse_earlier_outputs

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder")
    synthetic = _is_synthetic(out)
    if (out / "manifest.csv").exists() and not synthetic:
        raise ValueError(f"{out} holds a dataset training.synth did not write (manifest.csv "
                         "without training.synth's dataset.json); nothing was changed. "
                         "Choose another --out (--overwrite replaces only a synthetic "
                         "dataset).")
    kinds = {kind}
    if synthetic:  # the earlier dataset's own kind too
        kinds.add(json.loads((out / "dataset.json").read_text(encoding="utf-8"))["kind"])
    earlier = _earlier_files(out, kinds)
    if not overwrite:
        refuse_earlier_outputs(earlier, out)
    for path in earlier:
        path.unlink()


def _case_id(kind: str, index: int) -> str:
    return f"{kind}_{index:04d}"


def _remove_killed_writes(kind: str, out: Path, n: int) -> None:
    """Delete the temporary files that killed writes of this dataset's file names left
    (``training.run_folder.remove_temp_files``); other files are never touched."""
    from training.run_folder import remove_temp_files

    cases = [_case_files(kind, _case_id(kind, i)) for i in range(n)]
    for sub, position in (("images", 0), ("labels", 1)):
        names = [Path(files[position]).name for files in cases]
        remove_temp_files(out / sub, {name: file_suffix(name) for name in names}, log=None)
    remove_temp_files(out, {"dataset.json": ".tmp", "manifest.csv": ".tmp"}, log=None)


def make_synthetic_dataset(kind: str, out: str | Path, n: int | None = None, seed: int = 0,
                           progress=None, overwrite: bool = False) -> Path:
    """Write a synthetic dataset (see module docstring) and return its ``manifest.csv``.

    Args:
        kind: ``"fundus"``, ``"skin"``, ``"ct"`` or ``"intersectional"`` (fundus images
            with columns ``race`` and ``gender``; train with ``--attribute race,gender``).
        out: output folder (created).
        n: number of cases (default 400 for fundus/skin, 60 for ct).
        seed: same seed, same bytes.
        progress: optional ``progress(done, total)`` callback.
        overwrite: replace an earlier synthetic dataset in ``out`` (its manifest,
            ``dataset.json`` and case files are deleted first); other files stay.

    Raises:
        ValueError: bad ``kind`` or ``n``; ``out`` holds a dataset and not ``overwrite``
            (``training.run_folder.RunFolderError``, naming the files), or a manifest
            training.synth did not write. Nothing is changed then.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n = DEFAULT_N[kind] if n is None else int(n)
    out = Path(out)
    groups, splits = _assign(kind, n, seed)
    _clear_earlier_dataset(kind, out, overwrite)
    _remove_killed_writes(kind, out, n)
    attribute = ATTRIBUTE[kind]
    rows = []
    for i, (group, split) in enumerate(zip(groups, splits, strict=True)):
        case_id = _case_id(kind, i)
        rng = np.random.default_rng([seed, _KIND_CODE[kind], i + 1])
        image_rel, label_rel = _write_case(kind, rng, group, out, case_id)
        rows.append({"image": image_rel, "label": label_rel, "split": split, "id": case_id,
                     **dict(zip(attribute.split(","), group.split("|"), strict=True))})
        if progress is not None:
            progress(i + 1, n)
    info = {
        "kind": kind, "n": n, "seed": seed, "attribute": attribute, "classes": CLASSES[kind],
        "groups": {g: groups.count(g) for g in GROUPS[kind]},
        "policies": {g: cut for g, (_, _, cut) in GROUPS[kind].items()},
        "preprocessing": SUGGESTED[kind],
    }
    from training.checkpoint import atomic_write_text

    atomic_write_text(out / "dataset.json", json.dumps(info, indent=2) + "\n")
    return write_manifest(out / "manifest.csv", rows, attributes=attribute.split(","))
