"""Drawing code for the synthetic datasets: fundus, skin and CT cases with group policies.

Every structure is a smooth star-shaped blob described by a *normalised radius* field
``rho`` (0 at the centre, 1 on the blob's nominal edge). Appearance is a soft function of
``rho`` with a wide transition band, so the image alone does not say where the boundary
is; each group's annotators threshold ``rho`` at their own level (``POLICIES`` in
``training.data.synthetic``). Group appearance shifts (brightness, pigment, texture, size)
are deliberately small next to the case-to-case spread: a weak cue only.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    field = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """0 below ``edge0``, 1 above ``edge1``, cubic in between."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def blob_rho(coords: np.ndarray, center: np.ndarray, radii: np.ndarray,
             rng: np.random.Generator, irregularity: float, terms: int = 4) -> np.ndarray:
    """Normalised radius of an irregular ellipsoid-like blob.

    Args:
        coords: ``(D, *S)`` point coordinates (pixels or mm).
        center: ``(D,)`` blob centre; radii: ``(D,)`` semi-axes.
        irregularity: relative amplitude of the smooth boundary wobble.
    Returns:
        ``(*S)`` field, < 1 inside the blob.
    """
    dims = coords.shape[0]
    shape = (dims,) + (1,) * (coords.ndim - 1)
    rel = (coords - center.reshape(shape)) / radii.reshape(shape)
    dist = np.sqrt((rel ** 2).sum(0)) + 1e-8
    unit = rel / dist
    wobble = np.zeros_like(dist)
    for _ in range(terms):
        v = rng.standard_normal(dims)
        v /= np.linalg.norm(v)
        proj = np.tensordot(v, unit, axes=1)
        wobble += rng.uniform(0.3, 1.0) * np.cos(rng.uniform(2.0, 4.5) * proj
                                                 + rng.uniform(0, 2 * np.pi))
    return dist / (1.0 + irregularity * wobble / np.sqrt(terms))


def curves(rng: np.random.Generator, shape: tuple[int, int], starts: np.ndarray,
           angles: np.ndarray, lengths: np.ndarray, sigma: float, curl: float) -> np.ndarray:
    """Soft map (peak ~1) of smooth random curves (vessels, hairs).

    ``starts`` ``(N, 2)`` in (row, col) pixels, ``angles``/``lengths`` ``(N,)``.
    """
    canvas = np.zeros(shape)
    for start, angle, length in zip(starts, angles, lengths, strict=True):
        steps = max(int(length), 2)
        heading = angle + np.cumsum(rng.normal(0.0, curl, steps))
        path = start + np.cumsum(np.stack([np.sin(heading), np.cos(heading)], 1), 0)
        rows, cols = np.round(path).astype(int).T
        keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        np.add.at(canvas, (rows[keep], cols[keep]), 1.0)
    canvas = gaussian_filter(canvas, sigma) * np.sqrt(2 * np.pi) * sigma
    return np.clip(canvas, 0.0, 1.0)


def _grid(shape: tuple[int, ...], spacing: tuple[float, ...] | None = None) -> np.ndarray:
    axes = [np.arange(s, dtype=np.float64) * (spacing[i] if spacing else 1.0)
            for i, s in enumerate(shape)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def draw_fundus(rng: np.random.Generator, look: dict, cut: dict, size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale SLO-like fundus ``(size, size)`` uint8 and mask (0, 1 = rim, 2 = cup)."""
    coords = _grid((size, size))
    centre = np.array([size / 2, size / 2])
    ring = np.sqrt(((coords - centre[:, None, None]) ** 2).sum(0)) / (0.72 * size)
    img = rng.normal(look["base"], 0.05) + 0.05 * smooth_noise(rng, (size, size), size / 10)
    img = img + look["texture"] * smooth_noise(rng, (size, size), 1.5)
    disc_c = centre + rng.normal(0, 0.05 * size, 2)
    disc_r = 0.15 * size * rng.normal(look["disc_scale"], 0.08)
    rho_d = blob_rho(coords, disc_c, np.array([1.08, 1.0]) * disc_r, rng, 0.05)
    cup_c = disc_c + np.array([0.0, 0.1]) * disc_r + rng.normal(0, 0.05 * disc_r, 2)
    cdr = np.clip(rng.normal(look["cdr"], 0.07), 0.3, 0.7)
    rho_c = blob_rho(coords, cup_c, np.array([1.05, 1.0]) * cdr * disc_r, rng, 0.08)
    img += rng.uniform(0.20, 0.28) * look["contrast"] * (1 - smoothstep(0.9, 1.1, rho_d))
    img += rng.uniform(0.20, 0.28) * look["contrast"] * (1 - smoothstep(0.55, 1.45, rho_c))
    n_main = rng.integers(6, 10)
    starts = np.repeat(disc_c[None], n_main, 0)
    main = curves(rng, (size, size), starts, rng.uniform(0, 2 * np.pi, n_main),
                  rng.uniform(0.4, 0.8, n_main) * size, sigma=1.3, curl=0.06)
    n_thin = rng.integers(8, 14)
    thin = curves(rng, (size, size), rng.uniform(0.1, 0.9, (n_thin, 2)) * size,
                  rng.uniform(0, 2 * np.pi, n_thin), rng.uniform(0.15, 0.35, n_thin) * size,
                  sigma=0.7, curl=0.12)
    img -= 0.22 * main + 0.12 * thin
    img *= 1.0 - 0.55 * smoothstep(0.75, 1.0, ring)
    img += rng.normal(0, 0.012, img.shape)
    image = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    disc = rho_d < cut["disc"]
    cup = (rho_c < cut["cup"]) & (rho_d < 0.85 * cut["disc"])
    label = np.where(cup, 2, np.where(disc, 1, 0)).astype(np.uint8)
    return image, label


def draw_skin(rng: np.random.Generator, look: dict, cut: dict, height: int, width: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """RGB dermoscopy-like image ``(H, W, 3)`` uint8 and lesion mask (0/1)."""
    shape = (height, width)
    coords = _grid(shape)
    tone = np.clip(rng.normal(look["tone"], 0.15), 0, 1)
    light, dark = np.array([0.94, 0.76, 0.68]), np.array([0.72, 0.52, 0.42])
    skin = (light + tone * (dark - light))[:, None, None] * np.ones((3, *shape))
    skin = skin + 0.035 * smooth_noise(rng, shape, 10.0)[None]
    skin = skin + look["texture"] * smooth_noise(rng, shape, 1.2)[None]
    centre = np.array(shape) / 2 + rng.normal(0, 0.07, 2) * np.array(shape)
    radius = height * np.clip(rng.normal(look["size"], 0.05), 0.15, 0.4)
    rho = blob_rho(coords, centre, np.array([rng.uniform(0.85, 1.15), 1.0]) * radius, rng,
                   rng.uniform(0.10, 0.22), terms=5)
    pigment = np.array([0.40, 0.24, 0.15]) * rng.normal(look["pigment"], 0.08)
    alpha = 1 - smoothstep(0.62, 1.38, rho)
    dots = np.clip(0.5 + 0.5 * smooth_noise(rng, shape, 1.8), 0, 1)
    alpha = alpha * (0.75 + 0.25 * dots) * rng.uniform(0.75, 0.95)
    img = skin * (1 - alpha) + pigment[:, None, None] * alpha
    n_hair = rng.poisson(look["hairs"])
    if n_hair:
        hair = curves(rng, shape, rng.uniform(0, 1, (n_hair, 2)) * np.array(shape),
                      rng.uniform(0, 2 * np.pi, n_hair), rng.uniform(0.4, 1.0, n_hair) * width,
                      sigma=0.6, curl=0.03)
        img = img * (1 - 0.7 * hair[None]) + 0.7 * hair[None] * 0.12
    ring = np.sqrt((((coords - np.array(shape)[:, None, None] / 2) / np.array(
        [height, width])[:, None, None]) ** 2).sum(0)) / 0.62
    img *= 1.0 - 0.8 * smoothstep(0.8, 1.05, ring)[None]
    img += rng.normal(0, 0.01, img.shape)
    image = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    label = (rho < cut["lesion"]).astype(np.uint8)
    return np.ascontiguousarray(image), label


def draw_ct(rng: np.random.Generator, look: dict, cut: dict, shape: tuple[int, int, int],
            spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """CT-like volume ``(X, Y, Z)`` int16 HU and tumour mask (0/1); coordinates in mm."""
    coords = _grid(shape, spacing)
    extent = np.array(shape) * np.array(spacing)
    centre = extent / 2
    body_r = np.array([0.44, 0.36, 10.0]) * extent * rng.normal(1.0, 0.04)
    rho_body = blob_rho(coords, centre, body_r, rng, 0.03)
    hu = np.where(rho_body < 1.0, -100.0, -1000.0)
    hu = np.where(rho_body < 0.86, 35.0, hu)
    fat = smooth_noise(rng, shape, 2.5) > 1.6
    hu = np.where((rho_body < 0.86) & fat, -80.0, hu)
    organ_c = centre + np.array([-0.12, 0.05, 0.0]) * extent + rng.normal(0, 1.5, 3)
    organ_r = np.array([0.22, 0.18, 0.42]) * extent * rng.normal(1.0, 0.05)
    rho_organ = blob_rho(coords, organ_c, organ_r, rng, 0.06)
    organ_hu = rng.normal(95, 6)
    hu = np.where(rho_organ < 1.0, organ_hu, hu)
    for side in (-1.0, 1.0):
        kidney_c = centre + np.array([0.22 * side, -0.17, 0.05]) * extent
        rho_k = blob_rho(coords, kidney_c, np.array([4.5, 3.2, 9.0]), rng, 0.05)
        hu = np.where(rho_k < 1.0, np.where(rho_k < 0.55, 40.0, 170.0), hu)
    spine_c = centre + np.array([0.0, -0.27, 0.0]) * extent
    rho_spine = blob_rho(coords, spine_c, np.array([5.0, 4.5, 1e3]), rng, 0.02)
    hu = np.where(rho_spine < 1.0, np.where(rho_spine > 0.75, 900.0, 350.0), hu)
    radius = look["radius"] * rng.lognormal(0.0, 0.18)
    offset = rng.uniform(-0.3, 0.3, 3) * np.maximum(organ_r - radius, 0)
    rho_t = blob_rho(coords, organ_c + offset, np.array([1.0, 1.0, 1.1]) * radius, rng,
                     rng.uniform(0.08, 0.18), terms=5)
    drop = rng.normal(look["contrast"], 6.0)
    inside_body = rho_body < 0.86
    tumour = (1 - smoothstep(0.6, 1.4, rho_t)) * inside_body
    hu = hu - drop * tumour
    hu += look["texture"] * smooth_noise(rng, shape, 1.2) * inside_body
    hu += rng.normal(0, 8.0, shape)
    volume = np.round(np.clip(hu, -1024, 3071)).astype(np.int16)
    label = ((rho_t < cut["tumour"]) & inside_body).astype(np.uint8)
    return volume, label
