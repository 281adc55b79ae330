"""Quicklooks: the 10 m input next to the 2.5 m output, for a person to look at.

Both panels get the same per-band stretch (2nd-98th percentile of the input), so differences in
brightness are real, not artefacts of separate stretches. The input is upsampled by bicubic
interpolation, the baseline any super-resolution must beat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

TRUE_COLOUR = (2, 1, 0)  # red, green, blue in band order blue, green, red, nir
FALSE_COLOUR = (3, 2, 1)  # nir, red, green


def bicubic(image: np.ndarray, scale: int = 4) -> np.ndarray:
    """(bands, H, W) → (bands, sH, sW) cubic-spline upsampling, with pixel centres kept aligned."""
    filled = np.nan_to_num(image, nan=float(np.nanmean(image)) if np.isfinite(image).any() else 0.0)
    height, width = image.shape[-2:]
    # Output pixel centre i maps to input coordinate (i + 0.5) / scale - 0.5.
    ys = (np.arange(height * scale) + 0.5) / scale - 0.5
    xs = (np.arange(width * scale) + 0.5) / scale - 0.5
    grid = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([ndimage.map_coordinates(band, grid, order=3, mode="nearest") for band in filled])


def render(low: np.ndarray, high: np.ndarray, path: Path, title: str) -> Path:
    """Write a 2 x 2 PNG: true and false colour, input (bicubic) and output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    upsampled = bicubic(low, high.shape[-1] // low.shape[-1])
    fig, axes = plt.subplots(2, 2, figsize=(10, 10.6), constrained_layout=True)
    for row, (bands, name) in enumerate(((TRUE_COLOUR, "true colour"), (FALSE_COLOUR, "false colour (NIR, red, green)"))):
        limits = _stretch(low, bands)
        for col, (image, label) in enumerate(((upsampled, "10 m input, bicubic ×4"), (high, "2.5 m output"))):
            axes[row, col].imshow(_rgb(image, bands, limits), interpolation="nearest")
            axes[row, col].set_title(f"{label} — {name}", fontsize=10)
            axes[row, col].set_axis_off()
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _stretch(image: np.ndarray, bands: tuple[int, int, int]) -> list[tuple[float, float]]:
    limits = []
    for band in bands:
        values = image[band][np.isfinite(image[band])]
        low, high = np.percentile(values, (2, 98)) if values.size else (0.0, 1.0)
        limits.append((float(low), float(max(high, low + 1e-6))))
    return limits


def _rgb(image: np.ndarray, bands: tuple[int, int, int], limits: list[tuple[float, float]]) -> np.ndarray:
    channels = [(image[b] - lo) / (hi - lo) for b, (lo, hi) in zip(bands, limits)]
    rgb = np.clip(np.stack(channels, axis=-1), 0, 1)
    return np.nan_to_num(rgb, nan=0.0)
