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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch.profiler import record_function

from sr_batch.errors import CheckpointError
from sr_batch.model import Architecture, LoadedModel, load_checkpoint, peak_feature_maps, resolve_checkpoint, untrained_model
from sr_batch.sample import cache_dir

_LOAD_LOCK = threading.Lock()

STAGE_PREFIX = "sr-batch: "
"""Names the stages of a pass in a torch profile (`record_function`), so a profile of a tile task can
say where its time goes (the benchmark's task profile); outside a profile they cost a few µs a pass."""


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
    statistics: tuple[torch.Tensor, torch.Tensor] | None = None
    """(std, mean) on the device, made at the first batch."""
    compiled_thread: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="sr-batch-compiled"))
    """The one thread that runs a compiled forward pass. A GPU worker runs tasks on several threads, and
    torch.compile is not thread-safe while compiling; with CUDA graphs (max-autotune) each calling thread
    would also record its own graphs in its own memory pool. Eager passes run on the task's thread."""


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

        # A job's windows share one shape (tiles.read_windows), but jobs differ: a graph for each shape
        # this process meets, instead of falling back to eager.
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
        keep_compiled_kernels()
        forward = torch.compile(network, mode=ref.compile, dynamic=False)
    return Runner(loaded, device, pick_autocast(ref.precision, device), forward, ref.compile != "off")


def keep_compiled_kernels() -> None:
    """Keep torch.compile's kernels and max-autotune's choices with sr-batch's cached files, unless
    TORCHINDUCTOR_CACHE_DIR says where. A later process compiling the same pass reuses them (in about 40 %
    of the time on a CPU here; the autotuning's minutes on a GPU). Their default place is in /tmp,
    which a nightly service (systemd's PrivateTmp) or a container loses after each run. PyTorch sets the
    variable to its default as it loads its compiler, so that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "torchinductor")


WARM_UP_PIXELS = 32
"""Edge of the one window `warm_up` passes through the network."""


def warm_up(ref: ModelRef, compiled_pass: tuple[int, int, int] | None = None, sharing: int = 1) -> str:
    """Load the model and pass zeros through it, so that the first tiles do not pay for it: on a GPU,
    CUDA's and cuDNN's start (about a second per process), and for a compiled model the compilation of
    `compiled_pass` (windows, height, width: the job's one pass, minutes with max-autotune), done while
    the first tiles are still being read. `sharing` is the tasks that share the device, as for
    `superresolve_frames` (it can narrow a pass). A compiled model given no pass is only loaded: a small
    pass would compile a graph for its own shape. Returns the device it warmed."""
    runner = load_runner(ref)
    frames = runner.loaded.info.frames
    if not runner.compiled:
        window = np.zeros((frames, 4, WARM_UP_PIXELS, WARM_UP_PIXELS), np.float32)
        superresolve_windows(runner, [window], batch_size=1)
    elif compiled_pass is not None:
        # The tasks' passes exactly: float32 frames on the device, every window `frames` deep, as wide as theirs.
        windows, height, width = compiled_pass
        stack = torch.zeros((frames, 4, height, width), dtype=torch.float32, device=runner.device)
        superresolve_frames(runner, stack, [tuple(range(frames))] * windows, windows, sharing=sharing)
    return str(runner.device)


def device_kind(setting: str) -> str:
    """'cuda' or 'cpu': where `model.device` puts the network in this process (run on each worker)."""
    return pick_device(setting).type


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
    """The autocast dtype, or None for fp32. 'auto' is bf16 on a GPU (fp16 where bf16 is missing) and on a
    CPU with bf16 matrix units (Intel AMX: the network runs about 2x as fast as in fp32, python -m
    sr_batch.bench), fp32 on other CPUs, which emulate bf16 several times slower than fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if cpu_has_bf16_matrix_units() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles), where oneDNN's bf16 convolutions
    beat fp32 ones; AVX-512 BF16 alone is left at fp32, unmeasured."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def auto_precision(device: str) -> str:
    """What `precision: auto` means in this process for `model.device` (run on each worker: it depends on its GPU)."""
    dtype = pick_autocast("auto", pick_device(device))
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _limit_cpu_threads() -> None:
    """Share the CPU between worker processes instead of each one taking every core."""
    threads = os.environ.get("SR_BATCH_TORCH_THREADS")
    if threads:
        torch.set_num_threads(max(1, int(threads)))


WINDOW_BATCHES_PER_UPLOAD = 4
"""Batches' worth of windows `superresolve_windows` moves to the device at once: a caller may pass thousands."""


def superresolve_windows(runner: Runner, windows: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """Each window (t ≤ frames, 4, H, W) float reflectance, oldest first, NaN = no data → (n, 4, sH, sW) float32."""
    if not windows:
        raise ValueError("no windows to super-resolve")
    frames = runner.loaded.info.frames
    # A few batches' windows at a time go to the device, not all of them: a caller may pass thousands.
    step = WINDOW_BATCHES_PER_UPLOAD * max(1, batch_size)
    parts = []
    for start in range(0, len(windows), step):
        stack, positions = stack_windows(windows[start : start + step], frames)
        parts.append(superresolve_frames(runner, to_device(stack, runner.device), positions, batch_size))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def superresolve_frames(
    runner: Runner,
    frames: torch.Tensor,
    windows: Sequence[Sequence[int]],
    batch_size: int = 8,
    crop: tuple[int, int, int, int] | Sequence[tuple[int, int, int, int]] = (0, 0, 0, 0),
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sharing: int = 1,
) -> np.ndarray:
    """The windows of a stack of frames, super-resolved where the network runs.

    `frames` is (days, 4, H, W) float32 reflectance, NaN = no data, already on the runner's device;
    each window lists the positions of its frames, oldest first. Everything from gathering a window to
    the finished output happens on that device: normalisation, gap filling, the network, the NaN of
    pixels the latest frame did not see, the crop of the halo `crop` (top, bottom, left, right, at 10 m;
    or one per window, all leaving one shape: tiles at a region's edge have their halo on other sides)
    and, with `encode`, the conversion to the stored integers. Only the result crosses back to the host.

    Windows go through the network `batch_size` at a time, fewer where a pass would not fit the device's
    memory budget, of which this call has a `sharing`-th (the calls running at once on the device). On
    a GPU a batch's result is copied back through pinned memory asynchronously and collected once the
    next batch has been queued, so the GPU is not left waiting for the host.
    """
    if not windows:
        raise ValueError("no windows to super-resolve")
    info = runner.loaded.info
    scale = info.architecture.scale
    height, width = frames.shape[-2:]
    crops = [crop] * len(windows) if isinstance(crop[0], int) else [tuple(c) for c in crop]
    cores = {(height - top - bottom, width - left - right) for top, bottom, left, right in crops}
    if len(crops) != len(windows) or len(cores) != 1:
        raise ValueError(f"the crops must be one per window and leave one shape; they leave {sorted(cores)}")
    ((core_height, core_width),) = cores
    batch_size = min(batch_size, windows_per_device_pass(runner.device, info.architecture.hidden_channels, info.frames, height, width, sharing))
    out_dtype = np.float32 if encode is None else np.int16
    out = np.empty((len(windows), 4, scale * core_height, scale * core_width), out_dtype)
    std, mean = _statistics(runner)
    in_flight: _Submitted | None = None
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            chunk = [tuple(windows[k])[-info.frames :] for k in range(start, min(start + batch_size, len(windows)))]
            finish = OutputFinish(std, mean, scale, crops[start : start + len(chunk)], encode)
            submitted = _submit(runner, frames, chunk, batch_size, finish, out[start : start + len(chunk)])
            _collect(in_flight)
            in_flight = submitted
    _collect(in_flight)
    return out if encode is None else out.view(np.uint16)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device, through pinned memory on CUDA so the copy does not stall the queue."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


_RESULT_STREAMS: dict[int, torch.cuda.Stream] = {}
_RESULT_STREAMS_LOCK = threading.Lock()
_RESULT_COPY_LOCK = threading.Lock()
"""Held while a task queues its result's copy: the wait and the copy of one task stay together on the
stream, so no task's copy waits behind another task's passes."""


def results_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream of this process on which results are copied back from `device` to the host.

    The tasks sharing a GPU (a worker with GPU=2 runs two) queue their passes on the one default
    stream, so the GPU runs them in turn: one task's passes finish while the other's are still queued,
    and its host work (the result's last copy, the next tile's upload) overlaps them. Each task on a
    stream of its own would share the GPU between the two instead: both would finish together and do
    their host work together while the GPU waits. The copies back run on this stream, beside the
    passes, so the copy engine works while the next passes compute."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _RESULT_STREAMS_LOCK:
        if index not in _RESULT_STREAMS:
            _RESULT_STREAMS[index] = torch.cuda.Stream(index)
        return _RESULT_STREAMS[index]


@dataclass
class _Submitted:
    """A batch the device is working on: where its result lands and which output rows it fills."""

    result: torch.Tensor
    done: torch.cuda.Event | None
    rows: np.ndarray
    """The rows of the call's output the batch fills."""


def _submit(
    runner: Runner,
    frames: torch.Tensor,
    chunk: list[tuple[int, ...]],
    batch_size: int,
    finish: OutputFinish,
    out: np.ndarray,
) -> _Submitted | None:
    """Queue one batch, from gathering its frames to its finished output, whose rows are `out`. A CPU
    writes the output into them; a GPU returns before it has finished, and the result is collected later."""
    count = len(chunk)
    with record_function(STAGE_PREFIX + "windows"):
        x, alphas = gather_windows(frames, chunk, runner.loaded.info.frames)
        normalise_and_fill(x, alphas, finish.mean, finish.std)
        if runner.compiled and count < batch_size:
            # A compiled graph is specialised to its batch: pad the last one with copies instead of recompiling.
            x = torch.cat([x, x[-1:].expand(batch_size - count, *x.shape[1:])])
            alphas = torch.cat([alphas, alphas[-1:].expand(batch_size - count, -1)])
    if runner.compiled:
        result = runner.compiled_thread.submit(_forward_kept, runner, x, alphas).result()[:count]
    else:
        result = _forward(runner, x, alphas)[:count]
    with record_function(STAGE_PREFIX + "output"):
        # The latest frame of each window: where it saw nothing, the output is NaN.
        unseen = torch.stack([torch.isnan(frames[w[-1]]).any(dim=0) for w in chunk])
        if runner.device.type == "cpu":
            finish.in_row_blocks(result, unseen, torch.from_numpy(out))
            return None
        result = finish.whole(result, unseen)
    if runner.device.type != "cuda":
        return _Submitted(result, None, out)
    return _copied_back(runner, result, out)


OUTPUT_BLOCK_BYTES = 1 << 20
"""Float32 bytes of output a CPU finishes at a time: within a core's L2 cache, so the steps after the
network (de-normalising, masking, encoding: about ten) read memory once instead of about ten times."""


@dataclass(frozen=True)
class OutputFinish:
    """How a pass's network output (n, band, sH, sW) becomes what the call returns: de-normalised with
    the checkpoint's statistics ((band, 1, 1) on the device), NaN where the window's latest frame saw
    nothing, each window's halo `crops` cut (10 m pixels, scaled) and, with `encode`, the stored integers."""

    std: torch.Tensor
    mean: torch.Tensor
    scale: int
    crops: list[tuple[int, int, int, int]]
    encode: Callable[[torch.Tensor], torch.Tensor] | None

    def whole(self, result: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
        """The finished output, `unseen` (n, H, W) marking what the latest frames did not see: whole-tensor
        operations, which a GPU runs in a few large kernels."""
        result = result.float() * self.std + self.mean
        unseen = unseen[:, None].repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3)
        result = _cropped(result.masked_fill_(unseen, float("nan")), self.crops, self.scale)
        return result if self.encode is None else self.encode(result)

    def in_row_blocks(self, result: torch.Tensor, unseen: torch.Tensor, out: torch.Tensor) -> None:
        """`whole`, value for value, written into `out` (n, band, core rows, core columns) a few rows at a
        time. On a CPU each step of the whole-tensor form streams the 4x output through memory (0.41 s
        for a 1056 px window on one thread, 4 % of a bf16 task, against 0.22 s in blocks); a block of
        rows stays in the cache from the network's output to the stored integers."""
        bands, scale = result.shape[1], self.scale
        for index, (top, bottom, left, right) in enumerate(self.crops):
            rows, columns = range(top, unseen.shape[1] - bottom), slice(left, unseen.shape[2] - right)
            width = columns.stop - columns.start
            step = max(1, OUTPUT_BLOCK_BYTES // (4 * bands * scale * scale * width))
            block = torch.empty((bands, step * scale, width * scale), dtype=torch.float32)
            for first in range(rows.start, rows.stop, step):
                last = min(first + step, rows.stop)
                part = block[:, : (last - first) * scale]
                part.copy_(result[index, :, first * scale : last * scale, columns.start * scale : columns.stop * scale])
                part.mul_(self.std).add_(self.mean)
                # Each 10 m pixel is a scale x scale square of the output: mask the squares by broadcasting.
                hidden = unseen[index, first:last, columns][None, :, None, :, None]
                part.view(bands, last - first, scale, width, scale).masked_fill_(hidden, float("nan"))
                rows_out = slice((first - rows.start) * scale, (last - rows.start) * scale)
                out[index, :, rows_out].copy_(part if self.encode is None else self.encode(part))


def _copied_back(runner: Runner, result: torch.Tensor, rows: np.ndarray) -> _Submitted:
    """Queue the copy of a batch's result to pinned host memory, on the results stream."""
    with record_function(STAGE_PREFIX + "copy back"):
        # The passes leave it channels_last: laid out as the host wants it here, the copy back is a plain copy.
        result = result.contiguous()
        host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
        passes, copies = torch.cuda.current_stream(runner.device), results_stream(runner.device)
        with _RESULT_COPY_LOCK, torch.cuda.stream(copies):
            copies.wait_stream(passes)  # on the device: the copy starts once the result is computed
            host.copy_(result, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        # The result's memory goes back to the allocator when this function returns: not to be reused
        # by the passes queued next before the copy has read it.
        result.record_stream(copies)
    return _Submitted(host, done, rows)


def _cropped(result: torch.Tensor, crops: list[tuple[int, int, int, int]], scale: int) -> torch.Tensor:
    """The batch's outputs without their halos (10 m crops, scaled): a view where the windows share one
    crop, else each window's own cut, stacked (their cores have one shape)."""
    height, width = result.shape[2:]
    if len(set(crops)) == 1:
        top, bottom, left, right = crops[0]
        return result[:, :, scale * top : height - scale * bottom, scale * left : width - scale * right]
    return torch.stack(
        [result[i, :, scale * top : height - scale * bottom, scale * left : width - scale * right] for i, (top, bottom, left, right) in enumerate(crops)]
    )


def _forward(runner: Runner, x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The network on one batch, in the runner's precision (autocast and inference mode are per thread)."""
    autocast = torch.autocast(runner.device.type, dtype=runner.autocast_dtype) if runner.autocast_dtype else contextlib.nullcontext()
    with torch.inference_mode(), autocast, record_function(STAGE_PREFIX + "network"):
        return runner.forward(x, alphas)


def _forward_kept(runner: Runner, x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """A compiled pass, its output copied (as float32) before the compiled thread takes the next pass.
    With CUDA graphs (max-autotune) every replay writes into the same output memory, and the next pass
    may be another task's, queued while this task has yet to read its result (torch then raises that
    the output "has been overwritten by a subsequent run", or the result holds the other task's pixels)."""
    return _forward(runner, x, alphas).to(torch.float32, copy=True)


def _collect(batch: _Submitted | None) -> None:
    """Wait for a submitted batch and write it into its rows of the output (a CPU wrote its batches already)."""
    if batch is None:
        return
    with record_function(STAGE_PREFIX + "collect"):
        if batch.done is not None:
            batch.done.synchronize()
        batch.rows[:] = batch.result.numpy()


def _statistics(runner: Runner) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's (std, mean) per band on the device, copied there once per runner: a copy from
    pageable memory queued after a forward pass would wait for it and undo the pipelining."""
    if runner.statistics is None:
        info = runner.loaded.info
        runner.statistics = (
            torch.as_tensor(np.asarray(info.std, np.float32), device=runner.device)[:, None, None],
            torch.as_tensor(np.asarray(info.mean, np.float32), device=runner.device)[:, None, None],
        )
    return runner.statistics


CPU_PASS_BYTES = 1.5e9
"""Activation memory one CPU forward pass may use: a GPU batch size must not exhaust a laptop."""
GPU_PASS_FRACTION = 0.4
"""Share of the GPU's memory one forward pass may use."""


def window_activation_bytes(device: torch.device, hidden: int, frames: int, height: int, width: int) -> int:
    """A window's share of a forward pass's activations on `device`: on a CPU the network encodes and
    fuses one frame at a time, and holds far fewer feature maps than a GPU's batched pass (9 against 24
    for 8 frames: `peak_feature_maps`)."""
    return peak_feature_maps(frames, device) * hidden * height * width * 4


def windows_per_device_pass(device: torch.device, hidden: int, frames: int, height: int, width: int, sharing: int = 1) -> int:
    """Windows per forward pass within the device's budget, at least one however large. A GPU's budget
    is split between the `sharing` calls that run on it at once."""
    budget = CPU_PASS_BYTES if device.type != "cuda" else GPU_PASS_FRACTION * torch.cuda.get_device_properties(device).total_memory / max(1, sharing)
    return max(1, int(budget // window_activation_bytes(device, hidden, frames, height, width)))


# --- preparing windows: the one definition, shared by inference, training and the benchmark ------------


def gather_windows(frames: torch.Tensor, windows: list[tuple[int, ...]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(days, 4, H, W) frames + the positions of each window's frames → (n, size, 4, H, W) windows whose
    frames come first, NaN after them, and their alphas (1 for a frame, 0 for padding).

    The positions of the whole batch go to the device in one asynchronous copy and the frames are
    gathered by one index_select: indexing a GPU tensor with a Python list copies the list from pageable
    memory, which makes the host wait until the device has finished all the work queued before it."""
    n = len(windows)
    index = np.zeros((n, size), np.int64)  # padding takes frame 0, then NaN
    alphas = np.zeros((n, size), np.float32)
    for i, window in enumerate(windows):
        index[i, : len(window)] = window
        alphas[i, : len(window)] = 1.0
    on_device = to_device(torch.from_numpy(index).view(-1), frames.device)
    alphas_on_device = to_device(torch.from_numpy(alphas), frames.device)
    x = frames.index_select(0, on_device).view(n, size, *frames.shape[1:]).to(torch.float32)
    if alphas.all():  # known on the host: no padding frame to blank
        return x, alphas_on_device
    return x.masked_fill_(alphas_on_device[:, :, None, None, None] == 0, float("nan")), alphas_on_device


def normalise_and_fill(x: torch.Tensor, alphas: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """In place: normalise with the checkpoint's statistics, fill each gap with the per-pixel median of
    the window's valid frames (0, the mean, where none is valid) and zero the padding frames."""
    x.sub_(mean).div_(std)
    frames_first = x.transpose(0, 1)  # a view: (frames, windows, band, y, x); padding frames are NaN, so no median counts them
    if x.device.type == "cuda":
        # On a GPU the median of every pixel costs less than finding the pixels that have a gap (a sync).
        frames_first.copy_(torch.where(torch.isnan(frames_first), nanmedian_frames(frames_first), frames_first))
    else:
        # On a CPU only pixels with a gap in a real frame are sorted: most pixels have none.
        real = (alphas > 0).transpose(0, 1)[:, :, None, None, None]
        holes = (torch.isnan(frames_first) & real).any(dim=0)
        if holes.any():
            columns = frames_first[:, holes]
            frames_first[:, holes] = torch.where(torch.isnan(columns), nanmedian_frames(columns), columns)
    x.masked_fill_(alphas[:, :, None, None, None] == 0, 0.0)


def nanmedian_frames(columns: torch.Tensor) -> torch.Tensor:
    """np.nanmedian(columns, axis=0) (the mean of the two middle values for an even count), 0 where a
    column has no valid value, by one sort (NaN sorts last). torch.nanmedian takes the lower middle value."""
    ordered = torch.sort(columns, dim=0).values
    valid = (~torch.isnan(columns)).sum(dim=0)
    last = columns.shape[0] - 1
    low = torch.gather(ordered, 0, ((valid - 1) // 2).clamp(0, last)[None])[0]
    high = torch.gather(ordered, 0, (valid // 2).clamp(0, last)[None])[0]
    return torch.where(valid > 0, (low + high) / 2, torch.zeros_like(low))


def stack_windows(windows: Sequence[np.ndarray], frames: int) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """NumPy windows (t, 4, H, W) → their latest `frames` frames in one (days, 4, H, W) float32 stack,
    and each window's positions in it (the form `superresolve_frames` and `gather_windows` take)."""
    kept = [np.asarray(w, np.float32)[-frames:] for w in windows]
    ends = np.cumsum([len(w) for w in kept])
    return torch.from_numpy(np.concatenate(kept)), [tuple(range(end - len(w), end)) for w, end in zip(kept, ends)]


def prepare_windows(windows: list[np.ndarray], frames: int, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy windows (t ≤ frames, 4, H, W), NaN = no data → the network's input (n, frames, 4, H, W) and
    alphas (n, frames), prepared exactly as at inference (for training and the benchmark)."""
    stack, positions = stack_windows(windows, frames)
    x, alphas = gather_windows(stack, positions, frames)
    normalise_and_fill(x, alphas, torch.from_numpy(np.asarray(mean, np.float32))[:, None, None], torch.from_numpy(np.asarray(std, np.float32))[:, None, None])
    return x.numpy(), alphas.numpy()


def superresolve(frames: np.ndarray, checkpoint: str = "default", device: str = "auto") -> np.ndarray:
    """Super-resolve one window: (T, 4, H, W) float reflectance, bands B02, B03, B04, B08, oldest first,
    NaN = no data → (4, 4H, 4W) float reflectance. The most recent `frames` of the checkpoint are used."""
    frames = np.asarray(frames, np.float32)
    if frames.ndim != 4 or frames.shape[1] != 4 or frames.shape[0] < 1 or min(frames.shape[2:]) < 2:
        raise ValueError(f"frames must be (T ≥ 1, 4, H ≥ 2, W ≥ 2) in band order B02, B03, B04, B08; got shape {frames.shape}")
    runner = load_runner(ModelRef(checkpoint=checkpoint, device=device))
    return superresolve_windows(runner, [frames])[0]
