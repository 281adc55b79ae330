"""Stage 3, clouds: how much of a tile each date leaves unusable, from the scene classification layer.

Unusable SCL classes: 0 no data, 1 saturated/defective, 3 cloud shadow, 8/9 cloud, 10 thin cirrus.
Cloud and shadow masks are dilated by a few pixels because their edges are under-detected; no-data
and saturation are exact and are not grown.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import torch

NO_DATA, SATURATED, SHADOW, CLOUD_MEDIUM, CLOUD_HIGH, CIRRUS = 0, 1, 3, 8, 9, 10
EXACT_CLASSES = (NO_DATA, SATURATED)
GROWN_CLASSES = (SHADOW, CLOUD_MEDIUM, CLOUD_HIGH, CIRRUS)
SATURATED_DN = 65535
"""A band value that is saturated, whatever the SCL says (the cube keeps it through harmonisation)."""


def unusable_mask(scl: np.ndarray, dilate_pixels: int) -> np.ndarray:
    """True where a pixel cannot be used; `scl` is (..., y, x) and every leading index is its own image."""
    grown = np.isin(scl, GROWN_CLASSES)
    if dilate_pixels > 0 and grown.any():
        disk = _disk(dilate_pixels)
        structure = disk.reshape((1,) * (scl.ndim - 2) + disk.shape)
        grown = ndimage.binary_dilation(grown, structure=structure)
    return grown | np.isin(scl, EXACT_CLASSES)


def cloudy_fraction(scl: np.ndarray, dilate_pixels: int, core: tuple[slice, slice]) -> np.ndarray:
    """Per date, the unusable fraction of the `core` window of (time, y, x) SCL.

    `scl` may carry a margin around the core, so dilation sees clouds just outside the tile.
    """
    mask = unusable_mask(scl, dilate_pixels)[(slice(None), *core)]
    return mask.reshape(mask.shape[0], -1).mean(axis=1).astype(np.float32)


def usable_reflectance(block: np.ndarray, dilate_pixels: int) -> np.ndarray:
    """(days, 4 bands + SCL, y, x) harmonised DN → (days, 4, y, x) float32 reflectance, NaN where unusable.

    The one definition of a usable pixel, shared by inference and training: every band > 0 (0 is no
    data), below the saturation value 65535, and the SCL class usable (after dilation).
    """
    values = block[:, :4].astype(np.float32) / 10000.0
    bands = block[:, :4]
    missing = ((bands <= 0) | (bands >= SATURATED_DN)).any(axis=1) | unusable_mask(block[:, 4], dilate_pixels)
    values[np.broadcast_to(missing[:, None], values.shape)] = np.nan
    return values


def usable_reflectance_tensor(block: torch.Tensor, dilate_pixels: int) -> torch.Tensor:
    """`usable_reflectance` on a torch device, value for value: the inference path runs it where the
    network runs, so a GPU worker's CPU is not the bottleneck. `block` holds uint16 DN viewed as int16
    (torch's uint16 is not usable on every device), shape (days, 4 bands + SCL, y, x).

    The comparisons run on those int16 bit patterns, which equal the DN for the SCL classes; DN 0 (no data)
    and 65535 (saturated: no uint16 is above it) are 0 and -1. Only the reflectance is converted."""
    import torch

    bands, scl = block[:, :4], block[:, 4]
    # A true division, as NumPy's: CUDA turns a division by a Python number into a multiplication by its reciprocal.
    # Constants are made on the device, not copied there: a copy from the host's pageable memory would
    # make the host wait for all the work queued on the device before it.
    values = _dn_as_float(bands).div_(torch.full((), 10000.0, device=block.device))
    grown = _is_any_of(scl, GROWN_CLASSES)
    if dilate_pixels > 0:
        grown = _dilated(grown, dilate_pixels)
    saturated = int(np.uint16(SATURATED_DN).view(np.int16))
    missing = ((bands == 0) | (bands == saturated)).any(dim=1) | grown | _is_any_of(scl, EXACT_CLASSES)
    return values.masked_fill_(missing[:, None], float("nan"))


def _dn_as_float(bands: torch.Tensor) -> torch.Tensor:
    """uint16 DN held as int16 → float32 DN, in one pass on a CPU (whose torch converts uint16)."""
    import torch

    if bands.device.type == "cpu":
        return bands.view(torch.uint16).to(torch.float32)
    return (bands.to(torch.int32) & 0xFFFF).to(torch.float32)


def _is_any_of(scl: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
    """np.isin(scl, classes) for a few classes, by comparisons with numbers (no class list on the device)."""
    found = scl == classes[0]
    for value in classes[1:]:
        found |= scl == value
    return found


def _dilated(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """scipy's binary dilation of (..., y, x) masks by `_disk(radius)` (outside the image is False).

    The disk is a stack of rows of half-width isqrt(r² - dy²), widest in the middle. So the dilation is
    the OR, over row offsets dy, of the mask dilated across by that row's half-width and shifted by dy;
    going from the outer rows in, each width extends the last. O(radius) shifted ORs of booleans: on a
    CPU 25x faster than a convolution with the disk, which oneDNN runs poorly on one channel."""
    import torch

    height = mask.shape[-2]
    dilated = torch.zeros_like(mask)
    across, reached = mask.clone(), 0
    for dy in range(radius, -1, -1):
        half_width = math.isqrt(radius * radius - dy * dy)
        for shift in range(reached + 1, half_width + 1):
            across[..., shift:] |= mask[..., :-shift]
            across[..., :-shift] |= mask[..., shift:]
        reached = max(reached, half_width)
        if dy < height:
            dilated[..., dy:, :] |= across[..., : height - dy, :]
            if dy > 0:
                dilated[..., : height - dy, :] |= across[..., dy:, :]
    return dilated


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius
