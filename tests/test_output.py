"""Reading a written store: `sr_batch.open_output`, `sr-batch inspect` and `sr-batch quicklook`, on a real job's output."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from rasterio.warp import transform_bounds

import sr_batch
from sr_batch.cli import main
from sr_batch.job import run_job
from sr_batch.output import inspect_output, load_input
from sr_batch.quicklook import choose_view
from sr_batch.spec import parse_spec
from sr_batch.stac_server import free_port

from conftest import make_job

SR_BATCH = str(Path(sys.executable).parent / "sr-batch")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, stac_url: str, catalog, scheduler: str) -> Path:
    out = tmp_path_factory.mktemp("output") / "fields.zarr"
    # The shipped model, not the tests' small random one: the alignment test needs output that resembles its input.
    model = {"checkpoint": "default", "frames": 8, "batch_size": 4}
    job = make_job(stac_url, out, catalog, time={"start": "2019-07-01", "end": "2019-08-15"}, model=model, tiling={"tile": 64, "halo": 32})
    run_job(parse_spec(job), scheduler=scheduler, show_progress=False, echo=lambda line: None)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SR_BATCH, *args], capture_output=True, text=True, timeout=300)


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def _with_stac_url(store: Path, copy: Path, url: str) -> Path:
    """A copy of the store whose recorded job points at another STAC API."""
    shutil.copytree(store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    job = json.loads(meta["attributes"]["job"])
    job["stac"]["url"] = url
    meta["attributes"]["job"] = json.dumps(job)
    (copy / "zarr.json").write_text(json.dumps(meta))
    return copy


def test_open_output_is_open_zarr_with_crs_time_bands_and_metadata(store: Path) -> None:
    with sr_batch.open_output(store) as ds, xr.open_zarr(store, decode_coords="all", consolidated=False) as reference:
        xr.testing.assert_identical(ds, reference)
        assert np.issubdtype(ds.sr.dtype, np.floating) and ds.sr.dims == ("time", "band", "y", "x")
        assert ds.rio.crs.to_epsg() == 3035 and ds.rio.resolution() == (2.5, -2.5)
        assert list(ds.band.values) == ["blue", "green", "red", "nir"]
        assert np.issubdtype(ds.time.dtype, np.datetime64) and ds.sizes["time"] >= 2
        assert ds.source_items.sizes["time"] == ds.sizes["time"] and ds.frames_used.dims == ("time", "tile_row", "tile_col")
        assert ds.attrs["model_trained"] is True and len(ds.attrs["model_sha256"]) == 64


def test_inspect_reports_dates_extent_coverage_model_and_size(store: Path) -> None:
    run = _cli("inspect", str(store))
    assert run.returncode == 0, run.stderr
    raw = zarr.open_group(store, mode="r")
    blue = raw["sr"][:, 0]
    fractions = (blue != 0).mean(axis=(1, 2))
    frames = raw["frames_used"][:]
    with xr.open_zarr(store, decode_coords="all", consolidated=False) as ds:
        dates = [str(t)[:10] for t in ds.time.values]
        west, south, east, north = ds.rio.bounds()
        lon0, lat0, lon1, lat1 = ds.rio.transform_bounds("EPSG:4326", densify_pts=21)
        sha = ds.attrs["model_sha256"]
    text = run.stdout
    assert f"dates: {len(dates)} ({dates[0]} … {dates[-1]})" in text
    assert "CRS: EPSG:3035; pixel 2.5 m (input 10 m)" in text
    assert f"x {west:.1f} … {east:.1f}, y {south:.1f} … {north:.1f}" in text
    assert f"extent (lon/lat): {lon0:.5f}, {lat0:.5f}, {lon1:.5f}, {lat1:.5f}" in text
    assert f"sha256 {sha}" in text and "highresnet" in text and "trained" in text and "frames 8" in text and "tile 64 px, halo 32 px" in text
    for date, fraction, used in zip(dates, fractions, frames):
        assert f"{date}  {fraction:6.1%}  {int((used > 0).sum()):>7} / {used.size:<7}" in text
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert inspect_output(store).bytes_on_disk == size and f"size on disk {size / 1e6:.1f} MB" in text, "3 MB here"


def test_inspect_and_quicklook_refuse_what_is_not_an_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other.zarr"
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(other, zarr_format=3, consolidated=False)
    (tmp_path / "plain").mkdir()
    missing = tmp_path / "missing.zarr"
    run = _cli("inspect", str(missing))  # once as a user types it: exit code and stderr of the real command
    assert run.returncode == 2 and run.stderr == f"sr-batch: error: {missing}: no such output; give the output.uri of a finished sr-batch run\n"
    cases = {missing: "no such output", tmp_path / "plain": "not a Zarr v3 store", other: "a Zarr store with no 'sr' variable"}
    for path, reason in cases.items():
        for command in (["inspect", str(path)], ["quicklook", str(path), "--out", str(tmp_path / "q.png")]):
            assert main(command) == 2, command
            captured = capsys.readouterr()
            assert captured.err.count("\n") == 1 and str(path) in captured.err and reason in captured.err, captured.err
            assert captured.out == ""
    assert not (tmp_path / "q.png").exists()


def test_quicklook_refuses_a_bad_date_or_bbox(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for args, message in (
        (["--date", "2019-07-02"], "--date 2019-07-02: not an output date (the store has 5, 2019-07-01 … 2019-08-10); the nearest is 2019-07-01"),
        (["--date", "July"], "not a date; give YYYY-MM-DD"),
        (["--bbox", "26.0,45.0"], "give minx,miny,maxx,maxy in lon/lat"),
        (["--bbox", "22.2,45.3,22.1,45.4"], "min >= max"),
        (["--bbox", "10,50,10.1,50.1"], "does not overlap the output"),
        (["--out", str(tmp_path / "q.jpg")], "ending in .png"),
    ):
        assert main(["quicklook", str(store), *args]) == 2, args
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and message in captured.err, (args, captured.err)
    assert not list(tmp_path.iterdir())


def test_quicklook_input_and_output_cover_the_same_ground(store: Path, tmp_path: Path) -> None:
    """The 10 m input re-read from the STAC API lies exactly under the 2.5 m output of the same window."""
    with sr_batch.open_output(store) as ds:
        west, south, east, north = ds.rio.bounds()
        inner = (west + 0.2 * (east - west), south + 0.3 * (north - south), west + 0.6 * (east - west), south + 0.7 * (north - south))
        bbox = transform_bounds(ds.rio.crs, "EPSG:4326", *inner)
        date = str(ds.time.values[0])[:10]
        view = choose_view(ds, date, bbox)
        job = json.loads(ds.attrs["job"])
        high = ds.sr.sel(time=date).isel(y=view.rows, x=view.cols).values
    rows, cols = view.grid.height, view.grid.width
    assert 0 < view.rows.start < view.rows.stop < 400 and 0 < view.cols.start < view.cols.stop < 400 and high.shape == (4, 4 * rows, 4 * cols)
    low = load_input(job, view.grid, [view.date]).values[0]
    assert low.shape == (4, rows, cols)
    # The output's 4 x 4 block means against the input, per band: only a misregistration would break this.
    blocks = high.reshape(4, rows, 4, cols, 4).mean(axis=(2, 4))
    for band in range(4):
        valid = np.isfinite(low[band]) & np.isfinite(blocks[band])
        shifted = np.corrcoef(low[band][1:, 1:][valid[1:, 1:]], blocks[band][:-1, :-1][valid[1:, 1:]])[0, 1]
        aligned = np.corrcoef(low[band][valid], blocks[band][valid])[0, 1]
        assert aligned > 0.8 and aligned > shifted + 0.05, (band, aligned, shifted)

    out = tmp_path / "q.png"
    run = _cli("quicklook", str(store), "--date", date, "--bbox", ",".join(map(str, bbox)), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert f"Quicklook written: {out}" in run.stdout
    assert _png_size(out) == (1000, 1060), "two columns: 10 m input and 2.5 m output"


def test_quicklook_without_its_source_shows_the_output_alone_and_says_why(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    unreachable = _with_stac_url(store, tmp_path / "moved.zarr", "http://stac.invalid/v1")
    out = tmp_path / "alone.png"
    assert main(["quicklook", str(unreachable), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if "10 m input unavailable" in line]
    assert len(notes) == 1 and "stac.invalid" in notes[0] and "showing the output only" in notes[0]
    assert _png_size(out) == (500, 1060), "one column: the output alone"


def test_quicklook_of_a_sample_store_serves_the_sample_again(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The demo's STAC API is gone once the demo ends; a sample-made store still gets its input."""
    gone = _with_stac_url(store, tmp_path / "demo.zarr", f"http://127.0.0.1:{free_port()}")
    out = tmp_path / "again.png"
    assert main(["quicklook", str(gone), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "serving the bundled sample region again" in printed and "unavailable" not in printed
    assert _png_size(out) == (1000, 1060)


def test_a_store_without_dates_is_inspected_and_has_no_quicklook(tmp_path: Path, stac_url: str, catalog, scheduler: str, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "winter.zarr"
    job = make_job(stac_url, empty, catalog, time={"start": "2018-01-01", "end": "2018-03-01"})  # no cloudless date in the sample
    run_job(parse_spec(job), scheduler=scheduler, show_progress=False, echo=lambda line: None)
    assert main(["inspect", str(empty)]) == 0
    assert "dates: 0 (no cloudless date in the period)" in capsys.readouterr().out
    assert main(["quicklook", str(empty), "--out", str(tmp_path / "q.png")]) == 2
    assert capsys.readouterr().err == f"sr-batch: error: {empty}: no dates (no cloudless date in its period); nothing to show\n"
    assert not (tmp_path / "q.png").exists()
