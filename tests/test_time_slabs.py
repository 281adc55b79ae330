"""Time slabs: a job over years reads each tile's days a slab at a time, not its whole history at once.

A tile's read block holds every day its windows read, and a job holds about a row of tiles' blocks:
without slabs that memory would grow with the time range. The windows are split by output date into
slabs whose days fit tiles.READ_BLOCK_BYTES; a slab re-reads the few earlier frames its first windows
need. Checked on the real sample: the slabs partition the plan's windows within the limit, and a job
read in slabs writes what a job read in one block writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from sr_batch import plan as plan_module
from sr_batch import tiles
from sr_batch.job import plan_job, run_job
from sr_batch.spec import parse_spec
from sr_batch.tiles import slab_days, task_memory_bytes, time_slabs

from conftest import SMALL_MODEL, make_job

SMALLEST_SLAB = SMALL_MODEL["frames"] + SMALL_MODEL["batch_size"] - 1
"""One task's windows: a batch of dates and the frames before the first."""


def test_slabs_partition_the_windows_in_time_order_within_the_limit(tmp_path: Path, stac_url: str, catalog, scheduler: str, monkeypatch) -> None:
    # The whole sample (140 days, 2015-2021) with the default cloud threshold: each tile has its own windows.
    spec = parse_spec(make_job(stac_url, tmp_path / "plan.zarr", catalog, time={"start": "2015-01-01", "end": "2021-12-31"}, tiling={"tile": 48}))
    plan = plan_job(spec, scheduler, echo=lambda _: None)
    assert len(plan.windows) >= 4 and len(plan.frame_days) > 3 * SMALLEST_SLAB
    assert len(time_slabs(plan, slab_days(plan))) == 1, "the sample's history fits one block at the default limit"
    whole_history = task_memory_bytes(plan, SMALL_MODEL["batch_size"])

    monkeypatch.setattr(tiles, "READ_BLOCK_BYTES", 1)  # every slab as small as a task allows
    assert slab_days(plan) == SMALLEST_SLAB
    slabs = time_slabs(plan, slab_days(plan))
    assert len(slabs) > 3
    for tile, windows in plan.windows.items():
        assert [w for slab in slabs for w in slab.windows[tile]] == windows, f"tile {tile}: the slabs do not partition its windows in time order"
    for earlier, later in zip(slabs, slabs[1:]):
        assert max(earlier.output_days) < min(later.output_days)
    # Within the limit, unless one date's windows alone need more days (each tile reaches back to its own cloudless days).
    for slab in slabs:
        assert len(slab.frame_days) <= SMALLEST_SLAB or len(slab.output_days) == 1, (slab.output_days, slab.frame_days)
    assert sum(len(slab.frame_days) <= SMALLEST_SLAB for slab in slabs) > len(slabs) / 2
    # A task's memory estimate counts a slab's days, not the history's.
    assert task_memory_bytes(plan, SMALL_MODEL["batch_size"]) < whole_history


def test_cloud_scores_of_a_long_history_are_read_a_group_of_days_at_a_time(tmp_path: Path, stac_url: str, catalog, scheduler: str, monkeypatch) -> None:
    spec = parse_spec(make_job(stac_url, tmp_path / "plan.zarr", catalog, time={"start": "2015-01-01", "end": "2021-12-31"}, tiling={"tile": 48}))
    lines: list[str] = []
    one_block = plan_job(spec, scheduler, echo=lines.append).cloud
    time_chunks = []

    def load_cube(*args, **kwargs):
        cube = real_load_cube(*args, **kwargs)
        time_chunks.append(cube.chunks[0])
        return cube

    real_load_cube = plan_module.load_cube
    monkeypatch.setattr(plan_module, "load_cube", load_cube)
    monkeypatch.setattr(plan_module, "SCORE_BLOCK_BYTES", 1)  # a day per task
    groups = plan_job(spec, scheduler, echo=lines.append).cloud
    assert time_chunks == [(1,) * 140]
    assert one_block.shape == groups.shape and one_block.shape[0] == 140
    np.testing.assert_array_equal(groups, one_block)


def run(stac_url: str, catalog, scheduler: str, out: Path) -> tuple[np.ndarray, list[str]]:
    # Every date counts as cloudless (19 dates), on 2 x 2 tiles.
    job = make_job(stac_url, out, catalog, time={"start": "2019-06-01", "end": "2019-09-30"}, cloud={"max_cloud_fraction": 1.0}, tiling={"tile": 48})
    lines: list[str] = []
    result = run_job(parse_spec(job), scheduler=scheduler, show_progress=False, echo=lines.append)
    assert result.written_windows == result.plan.tile_dates == 4 * len(result.plan.output_days)
    with xr.open_zarr(result.output, consolidated=False) as ds:
        return ds.sr.values, lines


def test_a_job_read_in_time_slabs_writes_what_one_block_writes(tmp_path: Path, stac_url: str, catalog, scheduler: str, monkeypatch) -> None:
    whole, lines = run(stac_url, catalog, scheduler, tmp_path / "one-block.zarr")
    assert not any("time slabs" in line for line in lines)
    monkeypatch.setattr(tiles, "READ_BLOCK_BYTES", 1)
    slabbed, lines = run(stac_url, catalog, scheduler, tmp_path / "slabs.zarr")
    assert any(f"in 4 time slabs of up to {SMALLEST_SLAB} days" in line for line in lines), lines
    # The tasks of every slab count in the progress (their groups of dates are numbered across slabs).
    assert any(line.startswith("  super-resolved 76/76 tile-dates (100%)") for line in lines), [line for line in lines if "super-resolved" in line]
    assert whole.shape == slabbed.shape and whole.shape[0] == 19
    assert np.array_equal(np.isnan(whole), np.isnan(slabbed))
    # Tasks group other dates in a slab: float noise of another batch may flip one step of the 1e-4 rounding.
    np.testing.assert_allclose(slabbed, whole, atol=1.01e-4, equal_nan=True)
    assert np.nanmean(np.abs(slabbed - whole)) < 1e-6
