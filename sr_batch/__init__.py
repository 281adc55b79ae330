"""sr-batch: super-resolved Sentinel-2 time series, from a STAC API to Zarr.

`sr_batch.open_output(uri)` reads a result, `sr_batch.open_input(uri)` the 10 m frames it was made from;
`sr_batch.superresolve(frames)` runs the model on one window.
"""

__version__ = "0.1.0"


def superresolve(frames, checkpoint: str = "default", device: str = "auto"):  # noqa: ANN001, ANN201 - lazy re-export
    """Super-resolve one window; see `sr_batch.superres.superresolve`."""
    from sr_batch.superres import superresolve as _superresolve

    return _superresolve(frames, checkpoint=checkpoint, device=device)


def open_output(uri):  # noqa: ANN001, ANN201 - lazy re-export: `import sr_batch` stays light for the CLI
    """Open a written store as an xarray Dataset; see `sr_batch.output.open_output`."""
    from sr_batch.output import open_output as _open_output

    return _open_output(uri)


def open_input(uri):  # noqa: ANN001, ANN201 - lazy re-export
    """The 10 m input of a written store's dates, re-read from its STAC API; see `sr_batch.output.open_input`."""
    from sr_batch.output import open_input as _open_input

    return _open_input(uri)
