"""sr-batch: super-resolved Sentinel-2 time series, from a STAC API to Zarr."""

__version__ = "0.1.0"


def superresolve(frames, checkpoint: str = "default", device: str = "auto"):  # noqa: ANN001, ANN201 - lazy re-export
    """Super-resolve one window; see `sr_batch.superres.superresolve`."""
    from sr_batch.superres import superresolve as _superresolve

    return _superresolve(frames, checkpoint=checkpoint, device=device)
