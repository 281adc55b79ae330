"""Super-resolution of windows of frames: NumPy in, NumPy out.

One code path serves the batch pipeline (a tile and its halo, many dates) and the single-window
`superresolve()` API. It knows nothing of STAC or Dask: the runner hands it arrays.

Per window: frames (oldest first, NaN = no data) are normalised with the checkpoint's statistics,
missing pixels are filled with the per-pixel median of the window's valid frames, the window is
padded to the model's frame count with alpha-0 frames, and the output is de-normalised exactly.
Output pixels whose 10 m pixel is missing in the window's latest frame are NaN: the model must not
invent a date's content where that date saw nothing.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from sr_batch.errors import CheckpointError
from sr_batch.model import Architecture, LoadedModel, load_checkpoint, resolve_checkpoint, untrained_model

_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelRef:
    """A picklable reference to a model: Dask ships this, and each worker loads the weights once."""

    checkpoint: str
    """'untrained' or a checkpoint path."""
    frames: int = 8
    device: str = "auto"
    batch_size: int = 8
    architecture: Architecture = Architecture()
    seed: int = 0


def load_model(ref: ModelRef) -> LoadedModel:
    """The model on its device, loaded once per process and reused by every task."""
    with _LOAD_LOCK:
        return _load_cached(ref)


@lru_cache(maxsize=4)
def _load_cached(ref: ModelRef) -> LoadedModel:
    if ref.checkpoint == "untrained":
        loaded = untrained_model(ref.architecture, ref.frames, ref.seed)
    else:
        loaded = load_checkpoint(resolve_checkpoint(ref.checkpoint))
    if tuple(loaded.info.bands) != ("B02", "B03", "B04", "B08"):
        raise CheckpointError(f"model.checkpoint: its bands are {list(loaded.info.bands)}; sr-batch feeds B02, B03, B04, B08")
    _limit_cpu_threads()
    # channels_last: about 1.3x faster convolutions on CPU (python -m sr_batch.bench), the same numbers.
    loaded.network.to(pick_device(ref.device), memory_format=torch.channels_last)
    return loaded


def pick_device(setting: str) -> torch.device:
    """'auto' takes the GPU when there is one."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("model.device: cuda was asked for but no CUDA device is visible; use auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _limit_cpu_threads() -> None:
    """Share the CPU between worker processes instead of each one taking every core."""
    threads = os.environ.get("SR_BATCH_TORCH_THREADS")
    if threads:
        torch.set_num_threads(max(1, int(threads)))


def superresolve_windows(loaded: LoadedModel, windows: list[np.ndarray], device: str = "auto", batch_size: int = 8) -> np.ndarray:
    """Each window (t ≤ frames, 4, H, W) float reflectance, NaN = no data → (n, 4, sH, sW) float32."""
    if not windows:
        raise ValueError("no windows to super-resolve")
    info = loaded.info
    scale = info.architecture.scale
    height, width = windows[0].shape[-2:]
    target = pick_device(device)
    windows = [w[-info.frames :] for w in windows]  # never more frames than the model was built for
    pad_to = info.frames
    if target.type == "cpu":
        batch_size = min(batch_size, _windows_per_pass(info.architecture.hidden_channels, pad_to, height, width))
    out = np.empty((len(windows), 4, height * scale, width * scale), np.float32)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        frames, alphas = prepare_windows(chunk, pad_to, np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32))
        with torch.inference_mode():
            result = loaded.network(torch.from_numpy(frames).to(target), torch.from_numpy(alphas).to(target))
        result = result.float().cpu().numpy()
        result = result * np.asarray(info.std, np.float32)[:, None, None] + np.asarray(info.mean, np.float32)[:, None, None]
        latest_missing = np.stack([np.isnan(w[-1]).any(axis=0) for w in chunk])
        latest_missing = latest_missing.repeat(scale, axis=1).repeat(scale, axis=2)
        out[start : start + len(chunk)] = np.where(latest_missing[:, None], np.nan, result)
    return out


CPU_PASS_BYTES = 1.5e9
"""Activation memory one CPU forward pass may use: a GPU batch size must not exhaust a laptop."""


def _windows_per_pass(hidden: int, frames: int, height: int, width: int) -> int:
    """Windows per forward pass within CPU_PASS_BYTES; about three encoder activations are alive at once."""
    per_window = 3 * frames * hidden * height * width * 4
    return max(1, int(CPU_PASS_BYTES // per_window))


def prepare_windows(windows: list[np.ndarray], frames: int, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalise, fill gaps with the per-pixel median of the valid frames, pad to `frames` with alpha 0."""
    height, width = windows[0].shape[-2:]
    batch = np.zeros((len(windows), frames, 4, height, width), np.float32)
    alphas = np.zeros((len(windows), frames), np.float32)
    for i, window in enumerate(windows):
        normalised = (window - mean[:, None, None]) / std[:, None, None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: set to the mean just below
            median = np.nan_to_num(np.nanmedian(normalised, axis=0), nan=0.0)
        filled = np.where(np.isnan(normalised), median[None], normalised)
        batch[i, : len(window)] = filled
        alphas[i, : len(window)] = 1.0
    return batch, alphas


def superresolve(frames: np.ndarray, checkpoint: str = "default", device: str = "auto") -> np.ndarray:
    """Super-resolve one window: (T, 4, H, W) float reflectance, bands B02, B03, B04, B08, oldest first,
    NaN = no data → (4, 4H, 4W) float reflectance. The most recent `frames` of the checkpoint are used."""
    frames = np.asarray(frames, np.float32)
    if frames.ndim != 4 or frames.shape[1] != 4 or frames.shape[0] < 1 or min(frames.shape[2:]) < 2:
        raise ValueError(f"frames must be (T ≥ 1, 4, H ≥ 2, W ≥ 2) in band order B02, B03, B04, B08; got shape {frames.shape}")
    loaded = load_model(ModelRef(checkpoint=checkpoint, device=device))
    return superresolve_windows(loaded, [frames], device=device)[0]
