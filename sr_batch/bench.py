"""`python -m sr_batch.bench`: throughput and memory, measured in one run, printed as ratios.

1. Model only: the checkpoint on the current device, one tile-sized batch repeated, for each
   precision/layout option (fp32 eager, channels_last, bf16 autocast, and torch.compile on request).
2. End to end: a job on a region built from the real sample (its clearest dates, mirrored to
   `--size` x `--size` pixels) served by a local STAC API and run on a LocalCluster, from search to
   Zarr; its throughput ÷ the best model-only figure says how much the pipeline costs.
3. Memory: peak worker memory of the same job at 1x and 4x the area; it should not grow with the region.

Throughput is in 10 m input megapixels per second per output date, and km² of one output date per
second (1 Mpx = 100 km²). The numbers go to stdout and to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sr_batch.model import LoadedModel
from sr_batch.sample import COLLECTION_ID, SampleCatalog, collection_for, sample_aoi, sample_cube_path, write_date
from sr_batch.superres import ModelRef, load_model, pick_device, prepare_windows

KM2_PER_MPX = 100.0


def model_only(loaded: LoadedModel, device: torch.device, tile: int, batch: int, repeats: int, compile_model: bool) -> list[dict[str, Any]]:
    """LR Mpx/s of the network alone, per variant, on one batch of tile-sized windows."""
    shape = (loaded.info.frames, 4, tile, tile)
    frames = (0.1 + np.random.default_rng(0).normal(0, 0.02, shape)).astype(np.float32)
    stack, alphas = prepare_windows([frames] * batch, loaded.info.frames, np.asarray(loaded.info.mean, np.float32), np.asarray(loaded.info.std, np.float32))
    x, a = torch.from_numpy(stack).to(device), torch.from_numpy(alphas).to(device)
    variants = [("fp32 eager", torch.float32, False), ("fp32 channels_last", torch.float32, True), ("bf16 autocast + channels_last", torch.bfloat16, True)]
    results = []
    for name, dtype, channels_last in variants:
        results.append(_time_variant(loaded.network, x, a, name, dtype, channels_last, False, repeats, device))
    if compile_model:
        results.append(_time_variant(loaded.network, x, a, "bf16 + channels_last + torch.compile", torch.bfloat16, True, True, repeats, device))
    return results


def _time_variant(
    network: torch.nn.Module,
    x: torch.Tensor,
    a: torch.Tensor,
    name: str,
    dtype: torch.dtype,
    channels_last: bool,
    compiled: bool,
    repeats: int,
    device: torch.device,
) -> dict[str, Any]:
    net = network.to(memory_format=torch.channels_last) if channels_last else network.to(memory_format=torch.contiguous_format)
    run = torch.compile(net) if compiled else net
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        run(x, a)  # warm-up (and compilation)
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            run(x, a)
        _sync(device)
        seconds = time.perf_counter() - started
    mpx = x.shape[0] * x.shape[-1] * x.shape[-2] * repeats / 1e6 / seconds
    return {"variant": name, "lr_mpx_per_s": mpx, "km2_date_per_s": mpx * KM2_PER_MPX}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mirrored_catalog(root: Path, size: int, dates: int) -> SampleCatalog:
    """The sample's `dates` clearest days, mirrored to size x size pixels, as COGs + STAC items."""
    import xarray as xr
    from affine import Affine

    with xr.open_dataset(sample_cube_path(), engine="netcdf4") as cube:
        cube = cube.load()
    clear = np.isin(cube.SCL.values, (4, 5, 6, 7, 11)).mean(axis=(1, 2))
    chosen = np.sort(np.argsort(-clear)[:dates])
    reps = int(np.ceil(size / cube.sizes["x"]))
    x0, y0 = float(cube.x[0]) - 5, float(cube.y[0]) + 5
    transform = Affine(10.0, 0.0, x0, 0.0, -10.0, y0)
    items = []
    for index in chosen:
        scene = cube.isel(time=int(index))
        mirrored = {name: (("y", "x"), _mirror(scene[name].values, reps)[:size, :size]) for name in ("B2", "B3", "B4", "B8", "SCL")}
        ds = xr.Dataset(mirrored, coords={"time": scene.time})
        items.append(write_date(ds, transform, root / "scenes"))
    return SampleCatalog(collection=collection_for(items), items=items, root=root)


def _mirror(image: np.ndarray, reps: int) -> np.ndarray:
    """Tile an image with alternating reflections, so no seam is a discontinuity."""
    tile = np.block([[image, image[:, ::-1]], [image[::-1], image[::-1, ::-1]]])
    times = int(np.ceil(reps / 2))
    return np.tile(tile, (times, times))


def end_to_end(catalog: SampleCatalog, out: Path, checkpoint: str, workers: int, tile: int) -> dict[str, Any]:
    """A whole job (search → Zarr) on a LocalCluster; throughput and peak worker memory."""
    from distributed import Client, LocalCluster
    from distributed.diagnostics import MemorySampler

    from sr_batch.job import run_job
    from sr_batch.spec import parse_spec
    from sr_batch.stac_server import serve_items

    with serve_items(catalog.collection, catalog.items) as url:
        job = {
            "name": "bench",
            "stac": {"url": url, "collection": COLLECTION_ID},
            "aoi": {"geometry": sample_aoi(catalog)},
            "time": {"start": "2015-01-01", "end": "2021-12-31"},
            "cloud": {"max_cloud_fraction": 1.0},
            "model": {"checkpoint": checkpoint},
            "tiling": {"tile": tile, "halo": 32},
            "output": {"uri": str(out)},
        }
        spec = parse_spec(job)
        threads = max(1, (torch.get_num_threads() or 1) // workers)
        env = {"SR_BATCH_TORCH_THREADS": str(threads)}
        with (
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", env=env) as cluster,
            Client(cluster) as client,
        ):
            sampler = MemorySampler()
            started = time.perf_counter()
            with sampler.sample("job", client=client, measure="process", interval=0.25):
                result = run_job(spec, scheduler=cluster.scheduler_address, show_progress=False, echo=lambda _: None)
            seconds = time.perf_counter() - started
            peak = float(sampler.to_pandas().max().iloc[0]) / workers  # the sampler sums over workers
    plan = result.plan
    lr_pixels = sum(len(ws) * (plan.rows[r][1] - plan.rows[r][0]) * (plan.cols[c][1] - plan.cols[c][0]) for (r, c), ws in plan.windows.items())
    mpx = lr_pixels / 1e6 / seconds
    return {
        "pixels": plan.grid.width * plan.grid.height,
        "tile_dates": plan.tile_dates,
        "seconds": seconds,
        "lr_mpx_per_s": mpx,
        "km2_date_per_s": mpx * KM2_PER_MPX,
        "peak_worker_memory_mb": peak / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sr_batch.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--size", type=int, default=300, help="edge of the 1x region in 10 m pixels (the 4x region is twice that)")
    parser.add_argument("--dates", type=int, default=8, help="dates in the region")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="windows per forward pass in the model-only runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args(argv)

    loaded = load_model(ModelRef(checkpoint=args.checkpoint))
    device = pick_device("auto")
    loaded.network.to(device)
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": loaded.info.name,
        "torch": torch.__version__,
    }
    report["model_only"] = model_only(loaded, device, args.tile, args.batch, args.repeats, args.compile)
    for row in report["model_only"]:
        print(f"model only  {row['variant']:<40} {row['lr_mpx_per_s']:8.4f} LR Mpx/s  {row['km2_date_per_s']:8.2f} km²·date/s")
    best = max(row["lr_mpx_per_s"] for row in report["model_only"])
    with tempfile.TemporaryDirectory(prefix="sr-batch-bench-") as tmp:
        for factor, size in (("1x", args.size), ("4x", 2 * args.size)):
            catalog = mirrored_catalog(Path(tmp) / f"catalog-{factor}", size, args.dates)
            row = end_to_end(catalog, Path(tmp) / f"{factor}.zarr", args.checkpoint, args.workers, args.tile)
            report[f"end_to_end_{factor}"] = row
            print(
                f"end to end  {factor} ({size}² px, {args.dates} dates)  {row['lr_mpx_per_s']:8.4f} LR Mpx/s  {row['km2_date_per_s']:8.2f} km²·date/s  "
                f"peak worker memory {row['peak_worker_memory_mb']:.0f} MB  ({row['seconds']:.1f} s)"
            )
    report["ratio_end_to_end_over_model_only"] = report["end_to_end_1x"]["lr_mpx_per_s"] / best
    report["ratio_memory_4x_over_1x"] = report["end_to_end_4x"]["peak_worker_memory_mb"] / report["end_to_end_1x"]["peak_worker_memory_mb"]
    print(f"end to end ÷ best model only: {report['ratio_end_to_end_over_model_only']:.2f}   (target ≥ 0.85 on CPU, ≥ 0.8 on CUDA)")
    print(f"peak worker memory 4x ÷ 1x area: {report['ratio_memory_4x_over_1x']:.2f}   (target ≤ 1.2)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
