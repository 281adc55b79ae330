"""Training data from real pairs: a Sentinel-2 time series at 10 m and a high-resolution target (2.5 m).

Wald's protocol (data.py) assumes the 40 m → 10 m mapping carries over to 10 m → 2.5 m. Real pairs
remove that assumption: the target is a finer sensor's image of the same ground, e.g. a user's own
very-high-resolution imagery, on a grid nested 4 x 4 in the Sentinel-2 grid.

Two sensors disagree in radiometry and sometimes in content (another season, a cloud, a new building),
so a pair is curated before use (method.md): the bicubic-upsampled latest Sentinel-2 frame must still
resemble the target (SSIM, PSNR), and their brightness difference must not dominate their error (ratio
of MSE to brightness-corrected MSE). The target is then histogram-matched to the latest Sentinel-2
frame, so the network learns Sentinel-2's radiometry rather than the target sensor's.

Curate before matching: matching removes the brightness difference the MSE-ratio check looks for.
"""

from __future__ import annotations

import datetime as dt
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from sr_batch.quicklook import bicubic
from sr_batch.training import metrics
from sr_batch.training.data import MAX_UNUSABLE, SCALE, _orient

BANDS = ("B02", "B03", "B04", "B08")
DN_SCALE = 10000.0
"""Sentinel-2 digital numbers are reflectance x 10000; 0 is no data."""
DN_THRESHOLD = 2.0
"""Float data whose 99th percentile exceeds this is DN, not reflectance (reflectance rarely tops 1.5)."""
GRID_TOLERANCE = 0.01
"""Alignment tolerance, in target pixels: the grids must be nested, not merely overlapping."""
CROP_TRIES = 50


@dataclass(frozen=True)
class Pair:
    """A Sentinel-2 series (T, 4, H, W) at 10 m, oldest first, and its target (4, 4H, 4W); NaN = unusable."""

    name: str
    low: np.ndarray
    high: np.ndarray
    dates: tuple[dt.date, ...]

    def __post_init__(self) -> None:
        # Shape errors caught here name the pair; caught later they surface as an obscure crop failure.
        low, high = self.low, self.high
        if low.ndim != 4 or low.shape[0] < 1 or low.shape[1] != len(BANDS):
            raise ValueError(f"pair {self.name}: low must be (T >= 1, 4, H, W), got {low.shape}")
        expected = (len(BANDS), SCALE * low.shape[2], SCALE * low.shape[3])
        if high.shape != expected:
            raise ValueError(f"pair {self.name}: high must be {expected} (4x the low grid), got {high.shape}")
        if len(self.dates) != low.shape[0]:
            raise ValueError(f"pair {self.name}: {len(self.dates)} dates for {low.shape[0]} low frames")


def histogram_match(target: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per band (axis 0; a 2-D array is one band), map target's value distribution onto reference's.

    skimage.exposure.match_histograms semantics (its float path): each distinct target value goes to
    the reference value at the same cumulative frequency, interpolated; NaN are ignored and kept.
    The mapping is non-decreasing, so the target's spatial structure (its ranks) is untouched.
    """
    target, reference = np.asarray(target), np.asarray(reference)
    single = target.ndim == 2
    if single:
        target, reference = target[None], reference.reshape(1, *reference.shape)
    if target.ndim < 2 or target.shape[0] != reference.shape[0]:
        raise ValueError(f"target and reference need the same bands on axis 0, got {target.shape} and {reference.shape}")
    matched = np.stack([_match_band(t, r) for t, r in zip(target, reference, strict=True)])
    return matched[0] if single else matched


def _match_band(source: np.ndarray, template: np.ndarray) -> np.ndarray:
    out = np.full(source.shape, np.nan, np.float32)
    valid = np.isfinite(source)
    reference = template[np.isfinite(template)].astype(np.float64)
    if not valid.any():
        return out
    if reference.size == 0:
        raise ValueError("histogram_match: a reference band has no finite value to match to")
    src_values, src_index, src_counts = np.unique(source[valid].astype(np.float64), return_inverse=True, return_counts=True)
    ref_values, ref_counts = np.unique(reference, return_counts=True)
    src_quantiles = np.cumsum(src_counts) / src_counts.sum()
    ref_quantiles = np.cumsum(ref_counts) / ref_counts.sum()
    out[valid] = np.interp(src_quantiles, ref_quantiles, ref_values)[src_index.ravel()]
    return out


def curate(
    pair: Pair,
    min_ssim: float = 0.2,
    min_psnr: float = 10.0,
    max_mse_ratio: float = 10.0,
    *,
    ssim_range: float | None = None,
) -> tuple[bool, dict[str, float]]:
    """Keep a pair whose bicubic-upsampled latest Sentinel-2 frame still resembles its target.

    Scores over pixels clear in both (a low pixel next to a gap is not clear: bicubic reaches it):
    psnr (dB, reflectance, data range 1) from the band-mean MSE; mse_ratio, band-mean MSE over band-mean
    MSE after removing each band's mean difference; ssim, the band mean of SSIM with data range
    `ssim_range`, by default each target band's 1st-99th percentile span. Not 1.0: real scenes vary by a
    few hundredths of reflectance, SSIM's constants then swamp their variances, and a crop of another
    place still scores about 0.9 (0.1-0.4 with the span). A pair with no clear pixel is dropped.
    """
    upsampled, clear = _bicubic_latest(pair.low[-1])
    clear &= np.isfinite(pair.high).all(axis=0)
    scores = {"ssim": float("nan"), "psnr": float("nan"), "mse": float("nan"), "corrected_mse": float("nan"), "mse_ratio": float("nan")}
    if not clear.any():
        return False, scores
    residual = np.where(clear, pair.high.astype(np.float64) - upsampled, 0.0)
    count = clear.sum()
    mse = float(np.mean((residual**2).sum(axis=(1, 2)) / count))
    bias = residual.sum(axis=(1, 2), keepdims=True) / count
    corrected = float(np.mean((np.where(clear, residual - bias, 0.0) ** 2).sum(axis=(1, 2)) / count))
    scores.update(
        ssim=_ssim(upsampled, pair.high, clear, ssim_range),
        psnr=float(-10.0 * np.log10(max(mse, 1e-20))),
        mse=mse,
        corrected_mse=corrected,
        mse_ratio=mse / max(corrected, 1e-20),
    )
    keep = scores["ssim"] >= min_ssim and scores["psnr"] >= min_psnr and scores["mse_ratio"] <= max_mse_ratio
    return bool(keep), scores


def _bicubic_latest(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(4, H, W) → its (4, 4H, 4W) bicubic upsampling and where that is free of gap filling."""
    valid = ndimage.binary_erosion(np.isfinite(frame).all(axis=0), np.ones((3, 3), bool), border_value=1)
    clear = np.repeat(np.repeat(valid, SCALE, axis=0), SCALE, axis=1)
    return bicubic(frame.astype(np.float64), SCALE), clear


def _ssim(upsampled: np.ndarray, high: np.ndarray, clear: np.ndarray, data_range: float | None) -> float:
    """Band-mean SSIM; metrics.ssim has data range 1, so both images are divided by the range first."""
    if data_range is None:
        spans = [np.subtract(*np.percentile(band[clear], [99, 1])) for band in high.astype(np.float64)]
        scale = np.maximum(np.array(spans), 1e-6)[:, None, None]
    else:
        scale = np.full((1, 1, 1), float(data_range))
    sr = torch.from_numpy(np.ascontiguousarray(upsampled / scale))[None]
    hr = torch.from_numpy(np.nan_to_num(high / scale))[None]
    mask = torch.from_numpy(clear)[None, None]
    return float(torch.nanmean(metrics.ssim(sr, hr, mask)))


def load_pair(series_path: Path, target_path: Path, match_histograms: bool = True) -> Pair:
    """A pair from a series .npz and a 4-band target GeoTIFF on the 4x finer, aligned grid.

    series: `bands` (T, 4, H, W) uint16 DN or float reflectance (B02, B03, B04, B08), `dates` (ISO
    strings), optional `mask` (T, H, W) True = unusable, optional `transform` (6 affine coefficients in
    rasterio order a, b, c, d, e, f) and `crs` (WKT or "EPSG:n") to check alignment. Frames are sorted
    oldest first. With match_histograms, the target takes the latest frame's value distribution.
    """
    series_path, target_path = Path(series_path), Path(target_path)
    low, dates, grid = _read_series(series_path)
    high, target_grid = _read_target(target_path)
    _check_grids(series_path, target_path, low.shape[-2:], high.shape[-2:], grid, target_grid)
    if match_histograms:
        if not np.isfinite(low[-1]).any(axis=(1, 2)).all():
            raise ValueError(f"{series_path}: the latest frame ({dates[-1]}) has a band with no usable pixel; drop it or its mask")
        high = histogram_match(high, low[-1])
    return Pair(f"{series_path.stem}+{target_path.stem}", low, high, dates)


def _read_series(path: Path) -> tuple[np.ndarray, tuple[dt.date, ...], tuple[np.ndarray | None, str | None]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            content = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: cannot read the series ({type(err).__name__}); give an .npz with `bands` and `dates`") from None
    missing = [key for key in ("bands", "dates") if key not in content]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; the series .npz needs `bands` (T, 4, H, W) and `dates` (ISO strings)")
    bands = content["bands"]
    if bands.ndim != 4 or bands.shape[1] != len(BANDS) or bands.shape[0] != len(content["dates"]):
        raise ValueError(f"{path}: `bands` {bands.shape} must be (T, 4, H, W), bands B02, B03, B04, B08, one frame per entry of `dates`")
    try:
        dates = [dt.date.fromisoformat(str(d)[:10]) for d in content["dates"]]
    except ValueError:
        raise ValueError(f"{path}: `dates` must be ISO dates (YYYY-MM-DD...), got {content['dates'][:3]}") from None
    low = _reflectance(bands)
    if "mask" in content:
        mask = content["mask"].astype(bool)
        if mask.shape != (bands.shape[0], *bands.shape[2:]):
            raise ValueError(f"{path}: `mask` {mask.shape} must be (T, H, W) = {(bands.shape[0], *bands.shape[2:])}, True = unusable")
        low[np.broadcast_to(mask[:, None], low.shape)] = np.nan
    order = np.argsort(np.array(dates, dtype="datetime64[D]"), kind="stable")
    transform = content["transform"].astype(np.float64).ravel()[:6] if "transform" in content else None
    crs = str(content["crs"]) if "crs" in content else None
    return np.ascontiguousarray(low[order]), tuple(dates[i] for i in order), (transform, crs)


def _read_target(path: Path) -> tuple[np.ndarray, tuple[np.ndarray, str | None]]:
    import rasterio

    try:
        with rasterio.open(path) as src:
            if src.count != len(BANDS):
                raise ValueError(f"{path}: {src.count} bands; the target needs 4, in order B02, B03, B04, B08")
            raw = src.read()
            nodata = src.read_masks() == 0
            transform, crs = np.array(tuple(src.transform)[:6]), src.crs.to_wkt() if src.crs else None
    except rasterio.errors.RasterioIOError as err:
        raise ValueError(f"{path}: cannot read the target ({err}); give a 4-band GeoTIFF") from None
    high = _reflectance(raw)
    high[nodata] = np.nan
    return high, (transform, crs)


def _reflectance(values: np.ndarray) -> np.ndarray:
    """float32 reflectance, NaN = no data: integer DN (0 = no data) and float DN are divided by 10000."""
    if np.issubdtype(values.dtype, np.integer):
        out = values.astype(np.float32) / DN_SCALE
        out[values <= 0] = np.nan
        return out
    out = values.astype(np.float32)
    finite = out[np.isfinite(out)]
    if finite.size and np.percentile(finite, 99) > DN_THRESHOLD:
        out /= DN_SCALE
    return out


def _check_grids(
    series_path: Path,
    target_path: Path,
    low_shape: tuple[int, ...],
    high_shape: tuple[int, ...],
    grid: tuple[np.ndarray | None, str | None],
    target_grid: tuple[np.ndarray, str | None],
) -> None:
    """The target grid must be the series grid refined 4x: same extent, same CRS, nested pixels."""
    expected = (SCALE * low_shape[0], SCALE * low_shape[1])
    if tuple(high_shape) != expected:
        raise ValueError(
            f"{target_path}: {high_shape[0]} x {high_shape[1]} px, but the series {series_path.name} is {low_shape[0]} x {low_shape[1]}; "
            f"resample or crop the target to exactly {expected[0]} x {expected[1]} px (4x) on the same extent"
        )
    (transform, crs), (target_transform, target_crs) = grid, target_grid
    if crs is not None and target_crs is not None:
        from rasterio.crs import CRS

        ours, theirs = CRS.from_user_input(target_crs), CRS.from_user_input(crs)
        if ours != theirs:
            raise ValueError(f"{target_path}: CRS {ours.to_string()[:40]} is not the series {series_path.name}'s {theirs.to_string()[:40]}; reproject it")
    if transform is not None:
        if transform.size != 6:
            raise ValueError(f"{series_path}: `transform` must hold the 6 affine coefficients a, b, c, d, e, f (rasterio order)")
        refined = transform * np.array([1 / SCALE, 1 / SCALE, 1, 1 / SCALE, 1 / SCALE, 1])
        pixel = float(np.hypot(refined[0], refined[3]))
        if np.max(np.abs(target_transform - refined)) > GRID_TOLERANCE * pixel:
            raise ValueError(
                f"{target_path}: grid {tuple(np.round(target_transform, 4))} is not the series {series_path.name}'s refined 4x "
                f"{tuple(np.round(refined, 4))}; resample the target onto that grid (same origin, pixel size / 4)"
            )


def crop_pair(pair: Pair, patch: int, rng: np.random.Generator, frames: int, augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A random patch of a pair: (t <= frames, 4, patch, patch) Sentinel-2 and (4, 4·patch, 4·patch) target.

    The same contract as data.crop_example. Frames more than MAX_UNUSABLE unusable within the patch
    are skipped (the method's 5 % rule, per patch), then the latest `frames` are kept; a position is
    redrawn when the target or every frame is too unusable there. The same rotation/flip goes to both.
    """
    _, _, height, width = pair.low.shape
    if not 1 <= patch <= min(height, width):
        raise ValueError(f"pair {pair.name}: patch {patch} does not fit its {height} x {width} px Sentinel-2 grid")
    for _ in range(CROP_TRIES):
        y, x = int(rng.integers(height - patch + 1)), int(rng.integers(width - patch + 1))
        high = pair.high[:, SCALE * y : SCALE * (y + patch), SCALE * x : SCALE * (x + patch)]
        low = pair.low[:, :, y : y + patch, x : x + patch]
        clear = [i for i in range(len(low)) if _unusable(low[i]) <= MAX_UNUSABLE]
        if clear and _unusable(high) <= MAX_UNUSABLE:
            break
    else:
        raise ValueError(f"pair {pair.name}: no {patch} px patch in {CROP_TRIES} tries has a clear target and a clear frame; curate or mask the pair")
    low = low[clear[-frames:]]
    if augment:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        low, high = _orient(low, k, flip), _orient(high, k, flip)
    return np.ascontiguousarray(low), np.ascontiguousarray(high)


def _unusable(image: np.ndarray) -> float:
    """Share of pixels of a (4, h, w) image with any band NaN."""
    return float(np.isnan(image).any(axis=0).mean())
