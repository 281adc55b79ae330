"""Nightly runs on a growing output: incremental append, nothing-new runs, refusals, late scenes, locks.

All real: a STAC API on loopback serving the first part of the sample series, then another serving
all of it (the API "gained" later dates), a real Dask cluster of processes, real Zarr stores. The
reference is one uninterrupted run over the whole period; every other path must equal it bit for bit.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from sr_batch.errors import OutputError
from sr_batch.job import JobResult, run_job
from sr_batch.lock import OutputLock, lock_path, process_space
from sr_batch.manifest import Manifest, manifest_path, written_mask
from sr_batch.spec import parse_spec
from sr_batch.stac_server import serve_items
from sr_batch.superres import auto_precision, cpu_has_bf16_matrix_units
from sr_batch.verify import verify_output

from conftest import SMALL_MODEL, make_job

PERIOD = {"start": "2019-06-01", "end": "2019-08-31"}
SPLIT = dt.date(2019, 7, 20)
"""The first API serves the series up to here; the second serves all of it."""
SR_BATCH = Path(sys.executable).parent / "sr-batch"
CPU_AUTO = auto_precision("cpu")
"""What `precision: auto` means on this machine's CPU workers: bf16 with AMX, fp32 without."""
OTHER_THAN_AUTO = "bf16" if CPU_AUTO == "fp32" else "fp32"


def item_date(item: dict[str, Any]) -> dt.date:
    return dt.date.fromisoformat(item["properties"]["datetime"][:10])


@pytest.fixture(scope="module")
def early_url(catalog) -> Iterator[str]:
    with serve_items(catalog.collection, [i for i in catalog.items if item_date(i) <= SPLIT]) as url:
        yield url


def nightly_job(url: str, out: Path, catalog, **sections: Any) -> dict[str, Any]:
    return make_job(url, out, catalog, time=PERIOD, **sections)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, stac_url: str, catalog, scheduler: str) -> JobResult:
    """One uninterrupted run over the whole period."""
    out = tmp_path_factory.mktemp("reference") / "reference.zarr"
    return run_job(parse_spec(nightly_job(stac_url, out, catalog)), scheduler=scheduler, show_progress=False)


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the store as stored (uint16 codes, int64 days), read with zarr itself."""
    group = zarr.open_group(store=str(path), mode="r")
    return {name: array[...] for name, array in group.arrays()}


def assert_same_store(path: Path, expected: Path) -> None:
    """Bit for bit: every stored array, and the same windows recorded in the manifests."""
    got, want = store_arrays(path), store_arrays(expected)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert np.array_equal(got[name], want[name]), f"{name} differs"
    a, b = Manifest.read(path), Manifest.read(expected)
    assert a is not None and b is not None
    assert a.times == b.times
    assert {d: sorted(t) for d, t in a.done.items()} == {d: sorted(t) for d, t in b.done.items()}
    assert sorted(a.empty_chunks) == sorted(b.empty_chunks)
    assert [(d.date, d.cloud) for d in a.days] == [(d.date, d.cloud) for d in b.days]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_reference_has_dates_on_both_sides_of_the_split(reference: JobResult) -> None:
    manifest = Manifest.read(reference.output)
    assert manifest is not None
    dates = [dt.date.fromisoformat(t) for t in manifest.times]
    assert sum(d <= SPLIT for d in dates) >= 2 and sum(d > SPLIT for d in dates) >= 2, dates
    assert manifest.done_count() == reference.plan.tile_dates == reference.written_windows
    assert reference.added_dates == dates


def test_second_run_computes_only_the_new_dates_and_equals_one_full_run(
    reference: JobResult, tmp_path: Path, early_url: str, stac_url: str, catalog, scheduler: str, capsys
) -> None:
    out = tmp_path / "nightly.zarr"
    # The first run compresses with zstd; the later ones ask for the default (lz4) and the store keeps zstd.
    zstd = nightly_job(early_url, out, catalog)
    zstd["output"]["codec"] = "zstd"
    first = run_job(parse_spec(zstd), scheduler=scheduler, show_progress=False)
    assert first.added_dates and all(d <= SPLIT for d in first.added_dates)
    before = Manifest.read(out)
    assert before is not None
    old_chunks = {p: p.read_bytes() for p in (out / "sr" / "c").rglob("*") if p.is_file()}

    second = run_job(parse_spec(nightly_job(stac_url, out, catalog)), scheduler=scheduler, show_progress=False)
    expected_new = [d for d in reference.added_dates if d > SPLIT]
    assert second.added_dates == expected_new
    # Only the new dates' windows were computed: exactly the reference's windows on those dates.
    new_windows = sum(1 for ws in reference.plan.windows.values() for w in ws if reference.plan.days[w.target].date > SPLIT)
    assert second.written_windows == new_windows > 0
    shown = capsys.readouterr().out
    assert f"Added {len(expected_new)} dates" in shown and "output.codec: this output keeps zstd" in shown
    assert zarr.open_array(store=str(out), path="sr", mode="r").metadata.codecs[1].cname.value == "zstd"
    # Earlier chunks were not rewritten, and the result is the single full run's, bit for bit.
    assert all(p.read_bytes() == data for p, data in old_chunks.items())
    assert_same_store(out, reference.output)

    # A third run finds nothing new: it writes nothing at all and says so.
    files = snapshot(out)
    third = run_job(parse_spec(nightly_job(stac_url, out, catalog)), scheduler=scheduler, show_progress=False)
    assert third.written_windows == 0 and third.added_dates == []
    assert "Nothing new" in capsys.readouterr().out
    assert snapshot(out) == files
    assert not lock_path(out).exists()


# --- killed runs ------------------------------------------------------------------------------------


def cli_run(job: Path, *args: str, kill: str = "", marker: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`sr-batch run` in its own session (its process group is the client and any LocalCluster it starts)."""
    env = {**os.environ, "SR_BATCH_TEST_KILL": kill}
    if marker is not None:
        env["SR_BATCH_TEST_KILL_MARKER"] = str(marker)
    return subprocess.run(
        [str(SR_BATCH), "run", str(job), "--no-progress", *args], env=env, capture_output=True, text=True, timeout=600, start_new_session=True
    )


def write_job(folder: Path, job: dict[str, Any]) -> Path:
    path = folder / "job.yaml"
    path.write_text(json.dumps(job))
    return path


def test_client_killed_twice_then_resumed_equals_an_uninterrupted_run(reference: JobResult, tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """SIGKILL of the client (the cluster lives on): once right after the store grew, once mid-way."""
    out = tmp_path / "killed.zarr"
    job = write_job(tmp_path, nightly_job(stac_url, out, catalog))
    total = reference.written_windows

    first = cli_run(job, "--scheduler", scheduler, kill="appended:1")
    assert first.returncode == -9, first.stderr[-2000:]
    # The store's time axis grew, but the manifest never recorded the dates: nothing counts as done.
    assert zarr.open_array(store=str(out), path="time", mode="r").shape[0] == len(reference.added_dates)
    assert Manifest.read(out).times == [] and lock_path(out).exists()
    # What a reader sees meanwhile: the new dates, no tile of them recorded as written, their pixels NaN.
    with xr.open_zarr(out, decode_coords="all", consolidated=False) as ds:
        assert ds.sizes["time"] == len(reference.added_dates) and not written_mask(out).any()
        assert np.isnan(ds.sr.values).all() and (ds.frames_used.values > 0).any()

    second = cli_run(job, "--scheduler", scheduler, kill="recorded:5")
    assert second.returncode == -9, second.stderr[-2000:]
    recorded = Manifest.read(out).done_count()
    assert 5 <= recorded < total
    # Every window recorded is fully there and equal to the reference's; the rest may be anything.
    mask = written_mask(out)
    assert int(mask.sum()) == recorded
    with xr.open_zarr(out, consolidated=False) as got, xr.open_zarr(reference.output, consolidated=False) as want:
        for t, row, col in zip(*np.nonzero(mask.values)):
            ys = slice(4 * reference.plan.rows[row][0], 4 * reference.plan.rows[row][1])
            xs = slice(4 * reference.plan.cols[col][0], 4 * reference.plan.cols[col][1])
            np.testing.assert_array_equal(got.sr[t, :, ys, xs].values, want.sr[t, :, ys, xs].values)

    third = cli_run(job, "--scheduler", scheduler)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"wrote {total - recorded} tile-dates" in third.stdout
    assert_same_store(out, reference.output)
    assert not lock_path(out).exists()


def test_whole_cluster_and_a_worker_killed_then_resumed_equals_an_uninterrupted_run(reference: JobResult, tmp_path: Path, stac_url: str, catalog) -> None:
    """The run's own LocalCluster: a worker is SIGKILLed after writing a tile (Dask reruns its task), then
    the whole process group (client and workers) is SIGKILLed after 9 windows are recorded."""
    out = tmp_path / "killed.zarr"
    job = write_job(tmp_path, nightly_job(stac_url, out, catalog))
    marker = tmp_path / "worker-killed"

    first = cli_run(job, "--workers", "2", kill="written,recorded:9", marker=marker)
    assert first.returncode == -9, first.stderr[-2000:]
    assert marker.exists(), "no worker was killed"
    recorded = Manifest.read(out).done_count()
    assert 9 <= recorded < reference.written_windows

    second = cli_run(job, "--workers", "2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert_same_store(out, reference.output)


# --- refusals, overwrite, late scenes, locks ----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"cloud": {"max_cloud_fraction": 0.1}}, "cloud.max_cloud_fraction: 0.05 → 0.1"),
        ({"model": {**SMALL_MODEL, "architecture": {**SMALL_MODEL["architecture"], "seed": 1}}}, "made with model sha256"),
        ({"model": {**SMALL_MODEL, "precision": OTHER_THAN_AUTO}}, f'model.precision: "{CPU_AUTO}" → "{OTHER_THAN_AUTO}"'),
    ],
)
def test_changed_settings_or_model_is_refused(reference: JobResult, stac_url: str, catalog, scheduler: str, change: dict, named: str) -> None:
    files = snapshot(reference.output)
    with pytest.raises(OutputError, match="--overwrite") as refused:
        run_job(parse_spec(nightly_job(stac_url, reference.output, catalog, **change)), scheduler=scheduler, show_progress=False)
    assert named in str(refused.value)
    assert snapshot(reference.output) == files


def test_execution_settings_may_change(reference: JobResult, stac_url: str, catalog, scheduler: str) -> None:
    """A new name, batch size or end date does not change a pixel: the run goes on (here: nothing new)."""
    files = snapshot(reference.output)
    model = {**SMALL_MODEL, "batch_size": 2}
    job = nightly_job(stac_url, reference.output, catalog, name="renamed", model=model)
    job["time"] = {"start": PERIOD["start"], "end": "2019-09-01"}
    assert run_job(parse_spec(job), scheduler=scheduler, show_progress=False).written_windows == 0
    assert snapshot(reference.output) == files


def test_the_output_records_the_precision_auto_resolved_to(reference: JobResult, tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """`precision: auto` is recorded as what it meant on the workers (fp32 on this CPU cluster, bf16 where
    it has AMX): a later run asking for it explicitly may extend the output, one asking for another may
    not (above), and an output that recorded `auto` (written before precisions were resolved) is still accepted."""
    assert Manifest.read(reference.output).settings["model"]["precision"] == CPU_AUTO
    explicit = nightly_job(stac_url, reference.output, catalog, model={**SMALL_MODEL, "precision": CPU_AUTO})
    assert run_job(parse_spec(explicit), scheduler=scheduler, show_progress=False).written_windows == 0
    older = tmp_path / "older.zarr"
    shutil.copytree(reference.output, older)
    manifest = Manifest.read(older)
    manifest.settings["model"]["precision"] = "auto"
    manifest.write(older)
    again = nightly_job(stac_url, older, catalog, model={**SMALL_MODEL, "precision": "auto"})
    assert run_job(parse_spec(again), scheduler=scheduler, show_progress=False).written_windows == 0


@pytest.mark.skipif(not cpu_has_bf16_matrix_units(), reason="auto is fp32 on a CPU without AMX, as the output below was made: nothing to keep")
def test_auto_on_a_cpu_with_amx_extends_an_output_made_in_fp32_in_fp32(tmp_path: Path, early_url: str, stac_url: str, catalog, scheduler: str, capsys) -> None:
    """An output made in fp32 (on a CPU without AMX, or before `auto` took bf16 on AMX) is extended by a
    nightly run of `precision: auto` on AMX CPU workers in fp32, as it was made, instead of refusing the
    run for a change of precision nobody asked for."""
    out = tmp_path / "fp32.zarr"
    first = run_job(parse_spec(nightly_job(early_url, out, catalog, model={**SMALL_MODEL, "precision": "fp32"})), scheduler=scheduler, show_progress=False)
    assert first.written_windows > 0
    capsys.readouterr()
    later = run_job(parse_spec(nightly_job(stac_url, out, catalog)), scheduler=scheduler, show_progress=False, echo=print)
    assert later.written_windows > 0 and min(later.added_dates) > max(first.added_dates)
    assert "Network precision: fp32 (model.precision: auto, as the output was made" in capsys.readouterr().out
    assert Manifest.read(out).settings["model"]["precision"] == "fp32"
    assert verify_output(out) == []


def test_overwrite_replaces_a_first_run_killed_before_its_layout(reference: JobResult, tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """A first run killed just after writing its manifest leaves a folder with the manifest only: it is
    ours, so --overwrite replaces it (a plain run resumes it), and the result equals an uninterrupted run."""
    out = tmp_path / "early.zarr"
    manifest = Manifest.read(reference.output)
    manifest.days, manifest.times, manifest.done, manifest.empty_chunks = [], [], {}, []
    out.mkdir()
    manifest.write(out)
    run_job(parse_spec(nightly_job(stac_url, out, catalog)), scheduler=scheduler, overwrite=True, show_progress=False)
    assert_same_store(out, reference.output)


def test_killed_overwrite_keeps_the_previous_output_then_overwrite_replaces_it(
    reference: JobResult, tmp_path: Path, stac_url: str, catalog, scheduler: str
) -> None:
    out = tmp_path / "kept.zarr"
    shutil.copytree(reference.output, out)
    files = snapshot(out)
    job = write_job(tmp_path, nightly_job(stac_url, out, catalog, cloud={"max_cloud_fraction": 0.1}))
    killed = cli_run(job, "--overwrite", "--scheduler", scheduler, kill="recorded:2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert snapshot(out) == files, "a killed --overwrite touched the previous output"
    assert list(tmp_path.glob(".kept.zarr.incomplete-*")), "the staging store should be left behind"

    result = run_job(
        parse_spec(nightly_job(stac_url, out, catalog, cloud={"max_cloud_fraction": 0.1})), scheduler=scheduler, overwrite=True, show_progress=False
    )
    assert not list(tmp_path.glob(".kept.zarr.*")), "staging stores are cleaned up"
    manifest = Manifest.read(out)
    assert manifest.settings["cloud"]["max_cloud_fraction"] == 0.1
    assert manifest.done_count() == result.plan.tile_dates == result.written_windows
    assert verify_output(out) == []


def test_disk_full_mid_run_is_one_line_and_the_next_run_finishes(reference: JobResult, tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """The disk fills up under a running job (every file of the client and of its LocalCluster's workers is
    capped at 64 kB, so the first Zarr chunks fail with EFBIG): one line, exit 3, no traceback; the next run
    finishes the output, equal to an uninterrupted run."""
    out = tmp_path / "full.zarr"
    job = write_job(tmp_path, nightly_job(stac_url, out, catalog))

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    full = subprocess.run(
        [str(SR_BATCH), "run", str(job), "--no-progress"], capture_output=True, text=True, timeout=600, start_new_session=True, preexec_fn=small_disk
    )
    assert full.returncode == 3, full.stderr[-2000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("sr-batch: error: ")]
    assert len(errors) == 1 and errors[0].startswith("sr-batch: error: OSError") and "run again" in errors[0], full.stderr[-2000:]
    assert "Traceback (most recent call last)" not in full.stderr  # (the workers log the failed task in their own format)
    run_job(parse_spec(nightly_job(stac_url, out, catalog)), scheduler=scheduler, show_progress=False)
    assert_same_store(out, reference.output)


def test_late_arriving_scene_is_skipped_with_a_warning(reference: JobResult, tmp_path: Path, catalog, early_url: str, scheduler: str, capsys) -> None:
    """A cloudless date that turns up after a later date was written would change that later output."""
    plan = reference.plan
    early = [plan.days[d].date for d in plan.output_days if plan.days[d].date <= SPLIT]
    late = early[1]
    out = tmp_path / "late.zarr"
    without = [i for i in catalog.items if item_date(i) <= SPLIT and item_date(i) != late]
    with serve_items(catalog.collection, without) as url:
        first = run_job(parse_spec(nightly_job(url, out, catalog)), scheduler=scheduler, show_progress=False)
    assert late not in first.added_dates and max(first.added_dates) > late
    files = snapshot(out)
    second = run_job(parse_spec(nightly_job(early_url, out, catalog)), scheduler=scheduler, show_progress=False)
    assert second.late == [late] and second.written_windows == 0
    assert f"late-arriving dates older than the newest date already processed ({late}) are SKIPPED" in capsys.readouterr().out
    assert snapshot(out) == files


def test_a_second_run_is_refused_while_the_first_holds_the_lock(reference: JobResult, stac_url: str, catalog, scheduler: str) -> None:
    files = snapshot(reference.output)
    holder = OutputLock(reference.output)
    holder.acquire()
    try:
        with pytest.raises(OutputError, match=r"is being written by another run \(process \d+ on .* lease until .*\); wait for it to finish"):
            run_job(parse_spec(nightly_job(stac_url, reference.output, catalog)), scheduler=scheduler, show_progress=False)
    finally:
        holder.release()
    assert snapshot(reference.output) == files and not lock_path(reference.output).exists()


def plant_lock(target: Path, host: str, pid: int, expires_in: float, space: str | None = None) -> None:
    holder = {"token": "planted", "host": host, "pid": pid, "space": space or process_space()}
    lock_path(target).write_text(json.dumps({**holder, "started": "then", "expires": dt.datetime.now(dt.UTC).timestamp() + expires_in}))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize(
    ("host", "alive", "expires_in", "taken"),
    [
        ("elsewhere", False, 600, False),  # another host, lease valid: refused
        ("elsewhere", False, -1, True),  # another host, lease expired: its holder died
        ("here", False, 600, True),  # this host, process gone: no need to wait for the lease
        ("here", True, 600, False),  # this host, process alive: refused
        ("here, another PID namespace", False, 600, False),  # a container with this hostname: its PIDs are not ours to judge
    ],
)
def test_lock_lease(tmp_path: Path, host: str, alive: bool, expires_in: float, taken: bool) -> None:
    target = tmp_path / "out.zarr"
    space = "another-boot pid:[1]" if "namespace" in host else None
    plant_lock(target, socket.gethostname() if host.startswith("here") else "elsewhere.example", os.getpid() if alive else dead_pid(), expires_in, space)
    lock = OutputLock(target)
    if not taken:
        with pytest.raises(OutputError, match="being written by another run"):
            lock.acquire()
        assert json.loads(lock_path(target).read_text())["token"] == "planted"
        return
    lock.acquire()
    assert json.loads(lock_path(target).read_text())["token"] == lock.token
    lock.release()
    assert not lock_path(target).exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_run_that_cannot_renew_stops_writing_before_its_lease_runs_out(tmp_path: Path) -> None:
    """Renewals that keep failing (storage unreachable): the run must take the lock as lost while the lease
    it last wrote still holds, never after another run may already have judged it stale and broken it."""
    target = tmp_path / "out.zarr"
    lock = OutputLock(target, lease_s=2.0)
    lock.acquire()

    def unreachable(content: str, token: str) -> bool:
        raise ConnectionError("storage unreachable")

    lock.file.renew = unreachable  # type: ignore[method-assign]
    lock.check_held()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            lock.check_held()
        except OutputError as err:
            assert "lost the lock" in str(err) and "run again" in str(err)
            break
        time.sleep(0.01)
    else:
        pytest.fail("the lock was never taken as lost")
    written = json.loads(lock_path(target).read_text())
    assert dt.datetime.now(dt.UTC).timestamp() < written["expires"] - 0.3, "lost only when another run could already break the lock"
    lock.release()


def test_empty_end_means_now(stac_url: str, tmp_path: Path, catalog) -> None:
    for end in ("", None, "now"):
        spec = parse_spec(make_job(stac_url, tmp_path / "x.zarr", catalog, time={"start": "2019-06-01", "end": end}))
        assert spec.time.end is None and spec.time.as_interval() == "2019-06-01T00:00:00Z/.."


def test_two_runs_at_once_the_second_is_refused(reference: JobResult, tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """Real processes: the first run is held (test hook) right after recording its first window."""
    out = tmp_path / "busy.zarr"
    job = write_job(tmp_path, nightly_job(stac_url, out, catalog))
    release = tmp_path / "release"
    env = {**os.environ, "SR_BATCH_TEST_HOLD_UNTIL": str(release)}
    first = subprocess.Popen(
        [str(SR_BATCH), "run", str(job), "--no-progress", "--scheduler", scheduler], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        while not (manifest_path(out).exists() and Manifest.read(out).done_count()):
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        second = cli_run(job, "--scheduler", scheduler)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"sr-batch: error: output.uri: {out} is being written by another run (process {first.pid} on {socket.gethostname()}" in second.stderr
    finally:
        release.touch()
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    assert_same_store(out, reference.output)
