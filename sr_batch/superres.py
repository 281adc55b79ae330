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

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
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
    precision: str = "auto"
    """'auto' | 'fp32' | 'bf16' | 'fp16' (autocast)."""
    compile: str = "off"
    """'off' | a torch.compile mode ('default', 'max-autotune')."""
    architecture: Architecture = Architecture()
    seed: int = 0


@dataclass
class Runner:
    """A loaded model placed on its device, with the precision and compiled forward pass it runs with."""

    loaded: LoadedModel
    device: torch.device
    autocast_dtype: torch.dtype | None
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    compiled: bool
    denormalise: tuple[torch.Tensor, torch.Tensor] | None = None
    """(std, mean) on the device, made at the first batch."""


def load_model(ref: ModelRef) -> LoadedModel:
    """The model's weights and metadata, loaded once per process and reused by every task."""
    return load_runner(ref).loaded


def load_runner(ref: ModelRef) -> Runner:
    """The model ready to run on its device, built once per process (compilation included)."""
    with _LOAD_LOCK:
        return _runner_cached(ref)


@lru_cache(maxsize=4)
def _runner_cached(ref: ModelRef) -> Runner:
    if ref.checkpoint == "untrained":
        loaded = untrained_model(ref.architecture, ref.frames, ref.seed)
    else:
        loaded = load_checkpoint(resolve_checkpoint(ref.checkpoint))
    if tuple(loaded.info.bands) != ("B02", "B03", "B04", "B08"):
        raise CheckpointError(f"model.checkpoint: its bands are {list(loaded.info.bands)}; sr-batch feeds B02, B03, B04, B08")
    _limit_cpu_threads()
    device = pick_device(ref.device)
    # channels_last: faster convolutions on CPU (about 1.3x, python -m sr_batch.bench) and on tensor cores.
    network = loaded.network.to(device, memory_format=torch.channels_last).eval()
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = network
    if ref.compile != "off":
        from torch._dynamo import config as dynamo_config

        # Edge tiles have their own shapes: allow a compiled graph for each instead of falling back to eager.
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
        forward = torch.compile(network, mode=ref.compile, dynamic=False)
    return Runner(loaded, device, pick_autocast(ref.precision, device), forward, ref.compile != "off")


def eager_runner(loaded: LoadedModel, device: str = "auto", precision: str = "fp32") -> Runner:
    """A runner for a model already in memory (training, evaluation, tests): no cache, no compilation.
    It moves `loaded.network` to the device: give it a model no other runner uses."""
    target = pick_device(device)
    network = loaded.network.to(target, memory_format=torch.channels_last).eval()
    return Runner(loaded, target, pick_autocast(precision, target), network, compiled=False)


def pick_device(setting: str) -> torch.device:
    """'auto' takes the GPU when there is one."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("model.device: cuda was asked for but no CUDA device is visible; use auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. 'auto' is bf16 on a GPU (fp16 where bf16 is missing) and fp32 on
    CPU, where autocast is several times slower on CPUs without native bf16 (python -m sr_batch.bench)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _limit_cpu_threads() -> None:
    """Share the CPU between worker processes instead of each one taking every core."""
    threads = os.environ.get("SR_BATCH_TORCH_THREADS")
    if threads:
        torch.set_num_threads(max(1, int(threads)))


def superresolve_windows(runner: Runner, windows: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """Each window (t ≤ frames, 4, H, W) float reflectance, NaN = no data → (n, 4, sH, sW) float32.

    Windows go through the network `batch_size` at a time. On a GPU the batches are pipelined: a batch is
    copied from pinned memory and run asynchronously, and the next batch is prepared on the CPU while the
    GPU works; its result comes back through pinned memory once the one after it has been submitted.
    """
    if not windows:
        raise ValueError("no windows to super-resolve")
    info = runner.loaded.info
    scale = info.architecture.scale
    height, width = windows[0].shape[-2:]
    batch_size = min(batch_size, _windows_per_pass(runner.device, info.architecture.hidden_channels, info.frames, height, width))
    out = np.empty((len(windows), 4, height * scale, width * scale), np.float32)
    mean = np.asarray(info.mean, np.float32)
    std = np.asarray(info.std, np.float32)
    in_flight: _Submitted | None = None
    for start in range(0, len(windows), batch_size):
        # Windows are taken a batch at a time (a lazy sequence builds them only now), never more
        # frames than the model was built for.
        chunk = [windows[k][-info.frames :] for k in range(start, min(start + batch_size, len(windows)))]
        frames, alphas = prepare_windows(chunk, info.frames, mean, std)
        submitted = _submit(runner, frames, alphas, batch_size, mean, std, start, chunk)
        if in_flight is not None:
            _collect(in_flight, out, scale)
        in_flight = submitted
    if in_flight is not None:
        _collect(in_flight, out, scale)
    return out


@dataclass
class _Submitted:
    """A batch the device is working on: where its result lands and which output rows it fills."""

    result: torch.Tensor
    done: torch.cuda.Event | None
    start: int
    latest_missing: np.ndarray


def _submit(
    runner: Runner, frames: np.ndarray, alphas: np.ndarray, batch_size: int, mean: np.ndarray, std: np.ndarray, start: int, chunk: list[np.ndarray]
) -> _Submitted:
    """Start one forward pass; on CUDA it returns before the GPU has finished."""
    count = len(frames)
    if runner.compiled and count < batch_size:
        # A compiled graph is specialised to its batch: pad the last one with copies instead of recompiling.
        frames = np.concatenate([frames, np.repeat(frames[-1:], batch_size - count, axis=0)])
        alphas = np.concatenate([alphas, np.repeat(alphas[-1:], batch_size - count, axis=0)])
    cuda = runner.device.type == "cuda"
    x, a = torch.from_numpy(frames), torch.from_numpy(alphas)
    if cuda:
        x, a = x.pin_memory(), a.pin_memory()
    x, a = x.to(runner.device, non_blocking=True), a.to(runner.device, non_blocking=True)
    autocast = torch.autocast(runner.device.type, dtype=runner.autocast_dtype) if runner.autocast_dtype else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        result = runner.forward(x, a)[:count]
        scale_back, offset = _denormalisation(runner, std, mean)
        result = result.float() * scale_back + offset
    done = None
    if cuda:
        host = torch.empty(result.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(result, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        result = host
    latest_missing = np.stack([np.isnan(w[-1]).any(axis=0) for w in chunk])
    return _Submitted(result, done, start, latest_missing)


def _denormalisation(runner: Runner, std: np.ndarray, mean: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The output's scale and offset on the device, copied there once per runner: a copy from pageable
    memory after the forward pass is queued would wait for it and undo the pipelining."""
    if runner.denormalise is None:
        runner.denormalise = (
            torch.as_tensor(std, device=runner.device)[:, None, None],
            torch.as_tensor(mean, device=runner.device)[:, None, None],
        )
    return runner.denormalise


def _collect(batch: _Submitted, out: np.ndarray, scale: int) -> None:
    """Wait for a submitted batch and write it into `out`, NaN where the latest frame saw nothing."""
    if batch.done is not None:
        batch.done.synchronize()
    result = batch.result.numpy()
    missing = batch.latest_missing.repeat(scale, axis=1).repeat(scale, axis=2)
    out[batch.start : batch.start + len(result)] = np.where(missing[:, None], np.nan, result)


CPU_PASS_BYTES = 1.5e9
"""Activation memory one CPU forward pass may use: a GPU batch size must not exhaust a laptop."""
GPU_PASS_FRACTION = 0.4
"""Share of the GPU's memory one forward pass may use."""


def _windows_per_pass(device: torch.device, hidden: int, frames: int, height: int, width: int) -> int:
    """Windows per forward pass within the device's budget; about three encoder activations are alive at once."""
    budget = CPU_PASS_BYTES if device.type != "cuda" else GPU_PASS_FRACTION * torch.cuda.get_device_properties(device).total_memory
    per_window = 3 * frames * hidden * height * width * 4
    return max(1, int(budget // per_window))


def prepare_windows(windows: list[np.ndarray], frames: int, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalise, fill gaps with the per-pixel median of the valid frames, pad to `frames` with alpha 0."""
    height, width = windows[0].shape[-2:]
    batch = np.zeros((len(windows), frames, 4, height, width), np.float32)
    alphas = np.zeros((len(windows), frames), np.float32)
    for i, window in enumerate(windows):
        normalised = batch[i, : len(window)]  # a view: normalised and filled in place
        np.subtract(window, mean[:, None, None], out=normalised)
        np.divide(normalised, std[:, None, None], out=normalised)
        _fill_gaps_with_median(normalised)
        alphas[i, : len(window)] = 1.0
    return batch, alphas


def _fill_gaps_with_median(frames: np.ndarray) -> None:
    """In place: NaN → the per-pixel median of the pixel's valid frames (0, the mean, where none is valid).
    The median is taken only over pixels that have a gap: nanmedian is slow, and most pixels have none."""
    gaps = np.isnan(frames)
    holes = gaps.any(axis=0)
    if not holes.any():
        return
    columns = frames[:, holes]
    frames[:, holes] = np.where(np.isnan(columns), nanmedian_first_axis(columns)[None], columns)


def nanmedian_first_axis(columns: np.ndarray) -> np.ndarray:
    """np.nanmedian(columns, axis=0) with 0 where a column has no valid value, by one sort: NumPy's own
    nanmedian takes a slow masked-array path for short axes like a window's 8 frames (10x slower)."""
    ordered = np.sort(columns, axis=0)  # NaN sorts last
    valid = np.count_nonzero(~np.isnan(columns), axis=0)
    last = columns.shape[0] - 1
    low = np.take_along_axis(ordered, np.clip((valid - 1) // 2, 0, last)[None], axis=0)[0]
    high = np.take_along_axis(ordered, np.clip(valid // 2, 0, last)[None], axis=0)[0]
    return np.where(valid > 0, (low + high) / 2, 0).astype(columns.dtype)


def superresolve(frames: np.ndarray, checkpoint: str = "default", device: str = "auto") -> np.ndarray:
    """Super-resolve one window: (T, 4, H, W) float reflectance, bands B02, B03, B04, B08, oldest first,
    NaN = no data → (4, 4H, 4W) float reflectance. The most recent `frames` of the checkpoint are used."""
    frames = np.asarray(frames, np.float32)
    if frames.ndim != 4 or frames.shape[1] != 4 or frames.shape[0] < 1 or min(frames.shape[2:]) < 2:
        raise ValueError(f"frames must be (T ≥ 1, 4, H ≥ 2, W ≥ 2) in band order B02, B03, B04, B08; got shape {frames.shape}")
    runner = load_runner(ModelRef(checkpoint=checkpoint, device=device))
    return superresolve_windows(runner, [frames])[0]
