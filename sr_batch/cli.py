"""The `sr-batch` command line: run, plan, inspect, quicklook, demo, train, evaluate."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from sr_batch.errors import SrBatchError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except SrBatchError as err:
        print(f"sr-batch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sr-batch: interrupted; what the manifest records as written is kept: run again to finish", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the environment failed under a running job (disk full, store or cluster gone)
        if os.environ.get("SR_BATCH_DEBUG") or not _environment_failure(err):
            raise
        lines = str(err).strip().splitlines()
        print(
            f"sr-batch: error: {type(err).__name__}: {lines[0][:300] if lines else ''}; "
            "what the manifest records as written is kept: fix the cause and run again (SR_BATCH_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return ENVIRONMENT_FAILURE


ENVIRONMENT_FAILURE = 3
"""Exit code of a run stopped by its environment (storage, network, cluster), not by its input (2)."""


def _environment_failure(err: BaseException) -> bool:
    """Errors of the disk, the object store, the network or the cluster: not bugs, so one line, not a traceback."""
    if isinstance(err, OSError):  # includes TimeoutError, ConnectionError and s3fs's translated errors
        return True
    try:
        from botocore.exceptions import BotoCoreError  # s3fs passes errors without an HTTP response through
    except ImportError:
        return False
    return isinstance(err, BotoCoreError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sr-batch", description="Super-resolve Sentinel-2 time series from a STAC API into Zarr.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job: search, plan, super-resolve, write Zarr; on an existing output, only what is new")
    _job_arguments(run)
    run.add_argument("--overwrite", action="store_true", help="recompute the whole output (the previous one is replaced only when the new one is complete)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--performance-report", type=Path, metavar="FILE.html", help="write Dask's performance report of the run")
    run.add_argument("--yes", action="store_true", help="run even when the AOI is larger than the unconfirmed limit (2,500 km²)")
    run.set_defaults(handler=_run)

    verify = commands.add_parser("verify", help="check an output against its manifest: recorded windows present and readable, georeferencing consistent")
    verify.add_argument("output", help="the output's Zarr store (a folder, or an s3:// URI)")
    verify.set_defaults(handler=_verify)

    plan = commands.add_parser("plan", help="dry run: scenes found, cloudless dates per tile, windows, work size")
    _job_arguments(plan)
    plan.set_defaults(handler=_plan)

    inspect = commands.add_parser("inspect", help="describe a written output: dates, extent, CRS, coverage per date, model, size")
    inspect.add_argument("output", help="an output store (the job's output.uri)")
    inspect.set_defaults(handler=_inspect)

    quicklook = commands.add_parser("quicklook", help="PNG of one output date beside its 10 m input (true and false colour)")
    quicklook.add_argument("output", help="an output store (the job's output.uri)")
    quicklook.add_argument("--date", help="YYYY-MM-DD, one of the output's dates (default: the latest)")
    quicklook.add_argument("--bbox", help="minx,miny,maxx,maxy in lon/lat degrees (default: the whole output)")
    quicklook.add_argument("--out", type=Path, metavar="FILE.png", help="where to write the PNG (default: NAME-DATE.png in the current folder)")
    quicklook.set_defaults(handler=_quicklook)

    train = commands.add_parser("train", help="train the network on real Sentinel-2 (Wald's protocol)")
    train.add_argument("config", type=Path, help="training config (YAML); see sr_batch/training/default.yaml")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="score a checkpoint against bicubic on real samples")
    evaluate.add_argument("--checkpoint", default="default", help="a .safetensors path, 'default' or 'untrained'")
    evaluate.add_argument("--split", default="test", choices=["test", "validation", "train"], help="which samples (default: test)")
    evaluate.add_argument("--out", type=Path, default=Path("out/evaluate"), help="folder for metrics.json, metrics.md and figure.png")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.set_defaults(handler=_evaluate)

    demo = commands.add_parser("demo", help="run a real job on the bundled sample region through a local STAC API")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for the job file and the Zarr output")
    demo.set_defaults(handler=_demo)
    return parser


def _job_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("job", type=Path, help="job spec (YAML)")
    command.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://host:8786 (default: start a LocalCluster)")
    command.add_argument("--workers", type=int, help="worker processes of the LocalCluster (default: one per core, up to 4)")
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field, e.g. --set time.end=2024-01-01")


def _overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SrBatchError(f"--set {pair!r}: write KEY=VALUE, e.g. --set cloud.max_cloud_fraction=0.1")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _run(args: argparse.Namespace) -> int:
    from sr_batch.spec import confirm_size, load_spec

    spec = load_spec(args.job, _overrides(args.set))  # before the heavy imports: a bad job fails at once
    confirm_size(spec, args.yes)
    from sr_batch.job import run_job

    run_job(
        spec,
        scheduler=args.scheduler,
        workers=args.workers,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
        performance_report=args.performance_report,
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from sr_batch.verify import verify_line, verify_output

    problems = verify_output(args.output)
    for problem in problems:
        print(f"sr-batch verify: {problem}")
    if problems:
        return 1
    print(verify_line(args.output))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from sr_batch.spec import load_spec

    spec = load_spec(args.job, _overrides(args.set))
    from sr_batch.job import plan_job

    plan_job(spec, scheduler=args.scheduler, workers=args.workers)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from sr_batch.output import inspect_output

    print(inspect_output(args.output).text())
    return 0


def _quicklook(args: argparse.Namespace) -> int:
    from sr_batch.output import open_output
    from sr_batch.quicklook import choose_view, quicklook_store

    bbox = _lonlat_bbox(args.bbox) if args.bbox else None
    out = args.out
    if out is None:
        with open_output(args.output) as ds:
            view = choose_view(ds, args.date, bbox)
        out = Path(f"{Path(args.output).name.removesuffix('.zarr')}-{view.date}.png")
    if out.suffix.lower() != ".png":
        raise SrBatchError(f"--out {out}: give a file name ending in .png")
    print(f"Quicklook written: {quicklook_store(args.output, out, args.date, bbox)}")
    return 0


def _lonlat_bbox(text: str) -> tuple[float, float, float, float]:
    hint = "give minx,miny,maxx,maxy in lon/lat degrees, e.g. --bbox 26.05,45.80,26.10,45.83"
    try:
        minx, miny, maxx, maxy = (float(v) for v in text.split(","))
    except ValueError:
        raise SrBatchError(f"--bbox {text!r}: {hint}") from None
    if not (-180 <= minx < maxx <= 180 and -90 <= miny < maxy <= 90):
        raise SrBatchError(f"--bbox {text!r}: out of range or min >= max; {hint}")
    return minx, miny, maxx, maxy


def _train(args: argparse.Namespace) -> int:
    from sr_batch.training.train import load_config

    config = load_config(args.config)
    from sr_batch.training.train import train

    best = train(config)
    print(f"Best checkpoint: {best}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from sr_batch.training.evaluate import evaluate, markdown_table

    report = evaluate(args.checkpoint, args.split, args.out, args.device)
    print(markdown_table(report))
    print(f"Written: {args.out / 'metrics.json'}, {args.out / 'metrics.md'}, {args.out / 'figure.png'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sr_batch.demo import run_demo

    run_demo(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
