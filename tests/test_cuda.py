"""The CUDA path: the same numbers as the CPU, batches pipelined in order, compiled = eager, and a job
whose super-resolution really runs on the GPU worker. Skipped where no CUDA device is visible (CI)."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from sr_batch import superres, tiles
from sr_batch.job import run_job
from sr_batch.model import load_checkpoint, resolve_checkpoint
from sr_batch.spec import parse_spec
from sr_batch.superres import ModelRef, eager_runner, load_runner, results_stream, superresolve_windows
from sr_batch.tiles import superresolve_tile

from conftest import make_job

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# cuDNN convolutions use TF32 by default on Ampere and later: fp32 on the GPU is close, not exact.
FP32_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def windows(source_cube: xr.Dataset) -> list[np.ndarray]:
    """Seven real 8-frame windows of the sample, 64 px, reflectance with no gaps."""
    bands = np.stack([source_cube[b].values for b in ("B2", "B3", "B4", "B8")], axis=1).astype(np.float32) / 10000
    return [bands[i : i + 8, :, 10:74, 20:84] for i in range(0, 70, 10)]


def test_cuda_fp32_matches_cpu_and_batches_stay_in_order(windows: list[np.ndarray]) -> None:
    # Two separate copies: eager_runner moves the network it is given.
    on_cpu = superresolve_windows(eager_runner(load_checkpoint(resolve_checkpoint("default")), "cpu"), windows, batch_size=8)
    gpu = eager_runner(load_checkpoint(resolve_checkpoint("default")), "cuda", precision="fp32")
    on_gpu = superresolve_windows(gpu, windows, batch_size=3)  # 3 batches in flight one after another
    np.testing.assert_allclose(on_gpu, on_cpu, atol=FP32_TOLERANCE)
    assert np.abs(on_gpu - on_cpu).mean() < 2e-4


def test_bf16_autocast_and_compile_stay_close(windows: list[np.ndarray]) -> None:
    fp32 = superresolve_windows(load_runner(ModelRef(checkpoint="default", device="cuda", precision="fp32")), windows, batch_size=4)
    bf16 = superresolve_windows(load_runner(ModelRef(checkpoint="default", device="cuda", precision="auto")), windows, batch_size=4)
    assert np.abs(bf16 - fp32).mean() < 2e-3  # reflectance units: well under the model's own error
    compiled = superresolve_windows(load_runner(ModelRef(checkpoint="default", device="cuda", precision="auto", compile="default")), windows, batch_size=4)
    np.testing.assert_allclose(compiled, bf16, atol=1e-2)
    assert np.abs(compiled - bf16).mean() < 1e-3


def test_job_runs_super_resolution_on_the_gpu_worker(tmp_path: Path, stac_url: str, catalog) -> None:
    """A plain run (its own LocalCluster) adds a GPU worker; the tiles run there, and match a CPU run."""
    period = {"start": "2019-07-01", "end": "2019-07-31"}
    outputs = {}
    for device in ("auto", "cpu"):
        model = {"checkpoint": "default", "device": device, "precision": "fp32", "batch_size": 4}
        job = make_job(stac_url, tmp_path / f"{device}.zarr", catalog, time=period, model=model, tiling={"tile": 48, "halo": 22})
        lines: list[str] = []
        result = run_job(parse_spec(job), show_progress=False, echo=lines.append)
        if device == "auto":
            assert any("GPU worker" in line for line in lines), lines
        with xr.open_zarr(result.output, consolidated=False) as ds:
            outputs[device] = ds.sr.values
    assert outputs["auto"].shape == outputs["cpu"].shape and outputs["auto"].shape[0] > 0
    np.testing.assert_allclose(outputs["auto"], outputs["cpu"], atol=FP32_TOLERANCE + 1e-4, equal_nan=True)


def _tile_task(source_cube: xr.Dataset, start: int) -> tuple[np.ndarray, list, tuple[int, int, int, int]]:
    """A real tile block with halo (12 days, 4 bands + SCL, 80 px) and 4 windows of 8 frames from `start`."""
    names = ("B2", "B3", "B4", "B8", "SCL")
    block = np.stack([source_cube[name].values for name in names], axis=1).astype(np.uint16)[start : start + 12, :, :80, :80]
    return block, [(k, tuple(range(k, k + 8))) for k in range(4)], (8, 8, 8, 8)


def test_a_tile_task_makes_the_host_wait_for_the_gpu_only_for_its_results(source_cube: xr.Dataset) -> None:
    """From its tile's copy to the device to its encoded result, a task queues its work without waiting
    for the GPU (torch's sync debug mode reports every implicit wait), so the tasks that share a GPU keep
    it fed. The only waits allowed are one per batch, for that batch's result."""
    model = ModelRef(checkpoint="default", device="cuda", batch_size=2)  # 4 windows: 2 batches
    block, windows, crop = _tile_task(source_cube, 0)
    expected = superresolve_tile(block, windows, 4, crop, 2, model, ("bench", 0, 0, 0))  # loads the model first
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = superresolve_tile(block, windows, 4, crop, 2, model, ("bench", 0, 0, 0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Waiting for an event (a batch's result) is not reported: any report is a wait too many.
    waits = [str(w.message) for w in caught if "synchronizing" in str(w.message)]
    assert not waits, waits
    np.testing.assert_array_equal(again, expected)


def test_tasks_sharing_the_gpu_give_what_they_give_alone_with_their_results_copied_beside_the_passes(source_cube: xr.Dataset) -> None:
    """Four tile tasks on four threads at once (a GPU worker runs its tasks side by side; their passes
    queue in turn on the default stream, their results come back on the process's one results stream)
    write exactly what each writes alone."""
    _tasks_at_once_write_what_each_writes_alone(source_cube, ModelRef(checkpoint="default", device="cuda", batch_size=2), (0, 10, 20, 30))
    # One results stream per device and process, whichever thread asks, and not the default stream.
    device = torch.device("cuda")
    with ThreadPoolExecutor(2) as pool:
        streams = list(pool.map(lambda _: results_stream(device), range(2)))
    assert streams[0] is streams[1] is results_stream(device) and streams[0] != torch.cuda.default_stream()


def test_tasks_sharing_a_gpu_with_cuda_graphs_give_what_they_give_alone(source_cube: xr.Dataset) -> None:
    """compile: max-autotune replays CUDA graphs, which write every output into the same memory, and the
    tasks sharing a GPU worker pass through its one compiled thread: two tasks at once still write what
    each writes alone (each takes its pass's output before the next pass can overwrite it)."""
    _tasks_at_once_write_what_each_writes_alone(source_cube, ModelRef(checkpoint="default", device="cuda", batch_size=2, compile="max-autotune"), (0, 10))


def _tasks_at_once_write_what_each_writes_alone(source_cube: xr.Dataset, model: ModelRef, starts: tuple[int, ...]) -> None:
    """The tile tasks of `starts`, each run alone, then all at once on as many threads, three times."""
    tasks = [_tile_task(source_cube, start) for start in starts]
    alone = [superresolve_tile(block, windows, 4, crop, 2, model, ("bench", 0, k, 0)) for k, (block, windows, crop) in enumerate(tasks)]
    for _ in range(3):
        with ThreadPoolExecutor(len(tasks)) as pool:
            together = list(pool.map(lambda k: superresolve_tile(*tasks[k][:2], 4, tasks[k][2], 2, model, ("bench", 0, k, 0)), range(len(tasks))))
        for one, other in zip(together, alone):
            np.testing.assert_array_equal(one, other)


def test_a_compiled_warm_up_compiles_the_pass_a_tile_task_then_runs(source_cube: xr.Dataset) -> None:
    """On a GPU a compiled job's warm-up compiles the job's pass (`superres.warm_up` with its shape):
    the tile task after it compiles nothing, and gives what an eager task gives."""
    from torch._dynamo.utils import counters

    model = ModelRef(checkpoint="default", device="cuda", batch_size=3, compile="default")  # passes of 3: a shape no other test compiles
    block, windows, crop = _tile_task(source_cube, 0)
    assert superres.warm_up(model, (3, *block.shape[2:])).startswith("cuda")
    compiled = counters["stats"]["unique_graphs"]
    result = superresolve_tile(block, windows, 4, crop, 2, model, ("bench", 0, 0, 0), pass_windows=3)
    assert counters["stats"]["unique_graphs"] == compiled
    eager = superresolve_tile(block, windows, 4, crop, 2, ModelRef(checkpoint="default", device="cuda", batch_size=3), ("bench", 0, 0, 0))
    difference = np.abs(result.astype(np.int32) - eager)  # in 1e-4 reflectance, bf16 (precision auto) both
    assert difference.max() <= 100 and difference.mean() < 10


def test_a_run_of_tiles_shares_passes_and_gives_what_each_tile_gives_alone(source_cube: xr.Dataset) -> None:
    """A GPU worker's task of few dates takes a run of tiles: their frames go to the device together and
    their windows share passes, each cut by its own halo crop (an edge tile's halo lies on other sides).
    Each tile's result is what the tile gives alone, within one step of rounding (a pass's batch changes
    cuDNN's choice of kernels)."""
    model = ModelRef(checkpoint="default", device="cuda", batch_size=8, precision="fp32")
    tasks = [_tile_task(source_cube, start) for start in (0, 10, 20)]
    crops = [(8, 8, 8, 8), (0, 16, 16, 0), (16, 0, 8, 8)]  # 64 x 64 px left of each 80 px block
    alone = [superresolve_tile(block, windows, 4, crop, 2, model, ("bench", 0, k, 0), 4) for k, ((block, windows, _), crop) in enumerate(zip(tasks, crops))]
    run = [(0, k) for k in range(len(tasks))]
    together = tiles.superresolve_tiles([t[0] for t in tasks], [t[1] for t in tasks], 4, crops, 2, model, ("bench", run, 0), 8)
    for one, other in zip(together, alone):
        assert one is not None and one.shape == other.shape == (4, 4, 256, 256)
        assert np.abs(one.astype(np.int32) - other.astype(np.int32)).max() <= 1


SPIN_CYCLES = 100_000_000
"""About 50 ms of a GPU's clock: longer than any pass of these small tiles."""


def test_a_result_is_copied_back_once_computed_and_its_memory_is_kept_until_copied(source_cube: xr.Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every encoding held back on the passes' stream and every copy held back on the results
    stream (a spinning kernel queued before each), a task still writes what it writes without them: the
    copy waits on the device for its result, and the passes queued next do not reuse the result's memory
    before the copy has read it. Two tasks alternate, so memory read too early would hold the other's result."""
    model = ModelRef(checkpoint="default", device="cuda", batch_size=2)  # 4 windows: 2 batches, the second queued while the first is copied
    tasks = [_tile_task(source_cube, start) for start in (0, 10)]

    def run(k: int) -> np.ndarray:
        return superresolve_tile(*tasks[k][:2], 4, tasks[k][2], 2, model, ("bench", 0, k, 0))

    expected = [run(0), run(1)]
    encode, results_stream_of = tiles.encode_reflectance_tensor, superres.results_stream

    def late_encoding(values: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(SPIN_CYCLES)
        return encode(values)

    def late_copies(device: torch.device) -> torch.cuda.Stream:
        stream = results_stream_of(device)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(SPIN_CYCLES)
        return stream

    monkeypatch.setattr(tiles, "encode_reflectance_tensor", late_encoding)
    monkeypatch.setattr(superres, "results_stream", late_copies)
    for k in (0, 1, 0, 1):
        np.testing.assert_array_equal(run(k), expected[k])
