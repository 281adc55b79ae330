"""HighRes-net, its checkpoints and the superresolve API: the properties the batch pipeline relies on.

Shapes and size of the default network, alpha-0 padding being an exact no-op, the median reference,
the receptive radius measured by perturbation (tile halos depend on it), checkpoints that load only
what sr-batch wrote and never unpickle, and the NumPy API's NaN handling and batching.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file
from torch import nn

from sr_batch.allocator import JEMALLOC_CONF
from sr_batch.errors import CheckpointError
from sr_batch.model import (
    DEFAULT_CHECKPOINT,
    Architecture,
    HighResNet,
    LoadedModel,
    ModelInfo,
    highresnet,
    load_checkpoint,
    peak_feature_maps,
    receptive_radius,
    resolve_checkpoint,
    save_checkpoint,
    untrained_model,
)
from sr_batch.model.highresnet import median_reference, one_frame_at_a_time
from sr_batch.superres import Runner, eager_runner, stack_windows, superresolve, superresolve_frames, superresolve_windows

from conftest import needs_jemalloc

SMALL = Architecture(hidden_channels=16, encoder_blocks=2)
TINY = Architecture(hidden_channels=8, encoder_blocks=1)


def network(arch: Architecture, seed: int = 0, double: bool = False) -> HighResNet:
    """Seeded random weights without touching the global RNG (untrained_model restores it)."""
    net = untrained_model(arch, frames=8, seed=seed).network
    return net.double() if double else net


def run(net: HighResNet, frames: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(frames, alphas)


def reflectance(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Plausible Sentinel-2 L2A reflectance (float32, no NaN)."""
    return rng.uniform(0.01, 0.45, shape).astype(np.float32)


# --- 1. The default architecture -------------------------------------------------------------------


def test_default_architecture_matches_the_method() -> None:
    """About 1.04 M parameters (≈ 4.2 MB float32) and a PixelShuffle decoder fed directly by 64 = 4·4² channels."""
    net = HighResNet()
    count = sum(p.numel() for p in net.parameters())
    assert count == 1_038_357
    assert 4.1e6 < 4 * count < 4.2e6
    assert isinstance(net.decoder.expand, nn.Identity)
    assert net.encoder.head[0].in_channels == 8  # 4 bands + 4 reference bands


@pytest.mark.parametrize(
    ("batch", "frames", "height", "width"),
    [(1, 8, 8, 8), (2, 3, 5, 7), (1, 1, 9, 4), (3, 5, 2, 3), (1, 16, 6, 11)],
)
def test_default_output_is_four_bands_at_four_times_the_resolution(batch: int, frames: int, height: int, width: int) -> None:
    """Any frame count and odd sizes: the output grid is exactly 4x the input grid."""
    x = torch.randn(batch, frames, 4, height, width)
    out = run(network(Architecture()), x, torch.ones(batch, frames))
    assert out.shape == (batch, 4, 4 * height, 4 * width)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


# --- 2. Alpha masking -------------------------------------------------------------------------------


def test_alpha_zero_frames_change_nothing_but_real_frames_do() -> None:
    """Padding content is invisible (bit for bit), a real frame is not, and samples in a batch stay apart."""
    net = network(SMALL)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 4, 9, 7, generator=gen)
    alphas = torch.tensor([[1.0] * 5 + [0.0] * 3, [1.0] * 3 + [0.0] * 5])
    base = run(net, x, alphas)

    noisy = x.clone()
    noisy[0, 5:] = 100 * torch.randn(3, 4, 9, 7, generator=gen)
    noisy[1, 3:] = 100 * torch.randn(5, 4, 9, 7, generator=gen)
    assert torch.equal(run(net, noisy, alphas), base)

    changed = x.clone()
    changed[0, 4] += torch.randn(4, 9, 7, generator=gen)
    out = run(net, changed, alphas)
    assert (out[0] - base[0]).abs().max() > 1e-3
    assert torch.equal(out[1], base[1])


def test_short_window_equals_the_same_window_padded_outside() -> None:
    """The model pads to a power of two itself: 5 frames == 5 frames + 3 alpha-0 frames (8), and + 11 (16)."""
    net = network(SMALL)
    gen = torch.Generator().manual_seed(2)
    x5 = torch.randn(1, 5, 4, 8, 8, generator=gen)
    alone = run(net, x5, torch.ones(1, 5))

    padded8 = torch.cat([x5, torch.randn(1, 3, 4, 8, 8, generator=gen)], dim=1)
    alphas8 = torch.tensor([[1.0] * 5 + [0.0] * 3])
    assert torch.equal(run(net, padded8, alphas8), alone)

    # More fusion levels, all with alpha-0 partners: the same arithmetic, though a different encoder batch.
    padded16 = torch.cat([x5, torch.zeros(1, 11, 4, 8, 8)], dim=1)
    alphas16 = torch.tensor([[1.0] * 5 + [0.0] * 11])
    torch.testing.assert_close(run(net, padded16, alphas16), alone, rtol=1e-6, atol=1e-6)

    # ...whereas treating a padding frame as real does change the result.
    assert not torch.allclose(run(net, padded8, torch.ones(1, 8)), alone, atol=1e-3)


# --- 3. The median reference ------------------------------------------------------------------------


def test_median_reference_uses_only_valid_frames() -> None:
    """Odd numbers of valid frames: the reference is exactly NumPy's median of those frames; padding is ignored."""
    gen = torch.Generator().manual_seed(3)
    frames = torch.randn(3, 7, 4, 5, 6, generator=gen, dtype=torch.float64)
    alphas = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    frames[alphas == 0] = 1e6  # would drag any median that included them
    reference = median_reference(frames, alphas).numpy()
    for i in range(3):
        valid = frames[i][alphas[i] == 1].numpy()
        np.testing.assert_array_equal(reference[i], np.median(valid, axis=0))


def test_median_reference_even_count_and_no_valid_frame() -> None:
    """Even counts take the lower middle value (torch.nanmedian); no valid frame gives zeros, not NaN."""
    gen = torch.Generator().manual_seed(4)
    frames = torch.randn(2, 6, 4, 3, 3, generator=gen, dtype=torch.float64)
    alphas = torch.tensor([[1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    reference = median_reference(frames, alphas)
    valid = np.sort(frames[0][alphas[0] == 1].numpy(), axis=0)
    np.testing.assert_array_equal(reference[0].numpy(), valid[1])
    assert torch.equal(reference[1], torch.zeros(4, 3, 3, dtype=torch.float64))


# --- 4. Receptive field -----------------------------------------------------------------------------


def test_receptive_radius_of_the_default_network() -> None:
    """28 LR pixels for 8 frames (the method's halo); padding 5 frames to 8 keeps all three fusion levels."""
    assert receptive_radius(Architecture(), 8) == 28
    assert receptive_radius(Architecture(), 5) == 28
    assert receptive_radius(Architecture(), 4) == 25
    assert receptive_radius(Architecture(), 1) == 19
    assert receptive_radius(SMALL, 8) == 16


@pytest.mark.parametrize(
    ("arch", "frames"),
    [(TINY, 1), (TINY, 3), (Architecture(hidden_channels=8, encoder_blocks=2), 5), (SMALL, 8)],
    ids=["tiny-1", "tiny-3", "blocks2-5", "small-8"],
)
def test_receptive_radius_is_measured_exactly(arch: Architecture, frames: int) -> None:
    """A pixel at Chebyshev distance r (corner or edge) changes the centre's 4x4 block; nothing beyond r does.

    float64 so that a tiny but real influence at the corner is not lost, and an exact zero beyond it is exact.
    """
    net = network(arch, double=True)
    r = receptive_radius(arch, frames)
    n = 2 * r + 5
    c = n // 2
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, frames, 4, n, n, generator=gen, dtype=torch.float64)

    near_corner, near_edge, far = x.clone(), x.clone(), x.clone()
    near_corner[..., c + r, c + r] += 1000.0
    near_edge[..., c - r, c] += 1000.0
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    beyond = torch.maximum((yy - c).abs(), (xx - c).abs()) > r
    far[..., beyond] = 100 * torch.randn(far[..., beyond].shape, generator=gen, dtype=torch.float64)

    batch = torch.cat([x, near_corner, near_edge, far])
    out = run(net, batch, torch.ones(4, frames, dtype=torch.float64))
    block = out[:, :, 4 * c : 4 * c + 4, 4 * c : 4 * c + 4]
    assert (block[1] - block[0]).abs().max() > 0
    assert (block[2] - block[0]).abs().max() > 0
    assert torch.equal(block[3], block[0])


def test_halo_of_receptive_radius_makes_a_tile_equal_to_the_whole_image() -> None:
    """Inference on a tile plus a halo of r, cropped, equals whole-image inference; a halo of r - 1 does not."""
    arch, frames = TINY, 3
    net = network(arch, double=True)
    r = receptive_radius(arch, frames)
    n, core = 2 * r + 12, slice(r + 2, r + 10)  # an 8x8 core away from the image border
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, frames, 4, n, n, generator=gen, dtype=torch.float64)
    alphas = torch.ones(1, frames, dtype=torch.float64)
    whole = run(net, x, alphas)[..., 4 * core.start : 4 * core.stop, 4 * core.start : 4 * core.stop]

    def tiled(halo: int) -> torch.Tensor:
        lo, hi = core.start - halo, core.stop + halo
        out = run(net, x[..., lo:hi, lo:hi], alphas)
        return out[..., 4 * halo : 4 * (halo + 8), 4 * halo : 4 * (halo + 8)]

    assert torch.equal(tiled(r), whole)
    assert not torch.equal(tiled(r - 1), whole)


# --- 4b. A CPU pass, one frame at a time --------------------------------------------------------------


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_one_frame_at_a_time_computes_what_the_frames_together_do(
    source_cube: xr.Dataset, monkeypatch: pytest.MonkeyPatch, autocast: torch.dtype | None
) -> None:
    """A CPU pass outside autograd encodes and fuses one frame at a time, to hold half the memory: on
    real frames, through the default checkpoint, for a batch of two windows of which one has padding
    frames holding NaN, it gives what the frames together give: bit for bit in float32; under bf16
    autocast, where it keeps the frames' features in bf16 (half the memory, no casts), as close to the
    float32 output as they are (the together path's fusion skips add float32 sums)."""
    loaded = load_checkpoint(resolve_checkpoint("default"))
    net = loaded.network.to(memory_format=torch.channels_last).eval()  # as a job's runner places it
    bands = np.stack([source_cube[b].values[:8, :40, :48] for b in ("B2", "B3", "B4", "B8")], axis=1).astype(np.float32) / 10000
    mean, std = np.asarray(loaded.info.mean, np.float32)[:, None, None], np.asarray(loaded.info.std, np.float32)[:, None, None]
    x = torch.from_numpy(np.stack([(bands - mean) / std] * 2))
    x[1, 5:] = float("nan")
    alphas = torch.tensor([[1.0] * 8, [1.0] * 5 + [0.0] * 3])
    precision = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), precision:
        assert one_frame_at_a_time(x)
        one_at_a_time = net(x, alphas)
        monkeypatch.setattr(highresnet, "one_frame_at_a_time", lambda frames: False)
        together = net(x, alphas)
    with torch.inference_mode():
        exact = net(x, alphas)  # float32, the frames together
    assert torch.isfinite(one_at_a_time).all()
    if autocast is None:
        assert torch.equal(one_at_a_time, together)
    else:
        errors = {way: (output - exact).abs().mean().item() for way, output in (("one", one_at_a_time), ("together", together))}
        assert errors["one"] <= 1.1 * errors["together"], errors
        assert (one_at_a_time - together).abs().mean() < 0.5 * errors["together"], errors  # bf16 rounding, no more
    assert not torch.allclose(one_at_a_time[0], one_at_a_time[1], atol=1e-3)  # the padding is not a copy of the frames
    with torch.enable_grad():
        assert not one_frame_at_a_time(x), "training (autograd) keeps the frames together: the in-place sums would break it"


@pytest.mark.parametrize("real", range(1, 9))
def test_a_cpu_pass_encodes_and_fuses_only_real_frames(real: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A window of `real` frames padded to 8 costs what its own frames do, one frame at a time: `real`
    encoder calls and `real - 1` fusions (a padding partner's gate adds exactly nothing), where the frames
    together encode and fuse all 8. The output is still the together path's, bit for bit."""
    net = network(SMALL).to(memory_format=torch.channels_last)  # as a job's runner places it (oneDNN's float32 sums then match across batch sizes)
    x = torch.randn(1, 8, 4, 12, 10, generator=torch.Generator().manual_seed(real))
    x[:, real:] = float("nan")  # as a gather leaves padding before it is filled: never read one at a time
    alphas = torch.tensor([[1.0] * real + [0.0] * (8 - real)])
    calls = {"encoder": 0, "fusion": 0}
    for name in calls:
        getattr(net, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    with torch.inference_mode():
        one_at_a_time = net(x, alphas)
        counted = dict(calls)
        monkeypatch.setattr(highresnet, "one_frame_at_a_time", lambda frames: False)
        together = net(x.nan_to_num(), alphas)
    assert counted == {"encoder": real, "fusion": real - 1}
    assert torch.equal(one_at_a_time, together)


def test_a_compiled_cpu_pass_is_one_graph_whatever_its_real_frames() -> None:
    """A compiled pass does not read its alphas to skip padding: that would break its graph and compile
    it again for each count of real frames (a job's first dates have 1 to 7), minutes on a cold cache."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net = network(SMALL).eval()
    compiled = torch.compile(net, dynamic=False)
    x = torch.randn(1, 8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for real in (8, 5, 1):
            alphas = torch.tensor([[1.0] * real + [0.0] * (8 - real)])
            torch.testing.assert_close(compiled(x, alphas), net(x, alphas), rtol=1e-4, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1 and not torch._dynamo.utils.counters["graph_break"]


PASS_MEMORY = """
import resource, sys, torch
from sr_batch.model import highresnet
from sr_batch.superres import ModelRef, load_runner, window_activation_bytes
torch.set_num_threads(1)
if sys.argv[1] == "together":
    highresnet.one_frame_at_a_time = lambda frames: False
network = load_runner(ModelRef("default", device="cpu")).loaded.network
x, alphas = torch.rand(1, 8, 4, 400, 400), torch.ones(1, 8)
with torch.inference_mode():
    network(x[..., :32, :32], alphas)
    resident = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    network(x, alphas)
# VmHWM, this process's own peak: ru_maxrss would start at the forking process's size (Linux keeps it across exec).
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
grown = peak - resident
print(grown, window_activation_bytes(torch.device("cpu"), 64, 8, 400, 400))
"""


def test_one_frame_at_a_time_holds_half_the_memory_and_no_more_than_its_estimate() -> None:
    """What the CPU pass is for, measured: the growth of a fresh process's peak resident memory over
    one pass of a 400 px window, each way (bf16's share: test_a_cpu_pass_holds_about_half_its_frames_features). A CPU task's memory
    estimate (superres.window_activation_bytes) counts the float32 one-at-a-time pass, so it must cover it."""
    grown = {}
    for way, runs in (("one at a time", 3), ("together", 1)):
        # The least of a few runs: glibc's heap places a pass's blocks differently from run to run, and a
        # peak resident size read once varied by up to 0.35x of the growth here (255-343 MB in float32).
        for _ in range(runs):
            done = subprocess.run([sys.executable, "-c", PASS_MEMORY, way], capture_output=True, text=True, check=True, timeout=300)
            measured, estimate = map(int, done.stdout.split())
            grown[way] = min(grown.get(way, measured), measured)
    assert grown["one at a time"] < 0.6 * grown["together"], grown
    assert grown["one at a time"] <= estimate, (grown, estimate)


PASS_PEAK = """
import ctypes, sys, torch
from sr_batch.superres import ModelRef, load_runner
torch.set_num_threads(1)  # every allocation of the pass on this thread, whose peak jemalloc keeps
mallctl = ctypes.CDLL(None).mallctl
network = load_runner(ModelRef("default", device="cpu")).loaded.network
for frames, precision in ((8, None), (16, None), (8, torch.bfloat16)):
    x, alphas = torch.rand(1, frames, 4, 400, 400), torch.ones(1, frames)
    with torch.inference_mode(), torch.autocast("cpu", dtype=precision or torch.bfloat16, enabled=precision is not None):
        network(x[..., :32, :32], alphas)
        assert mallctl(b"thread.peak.reset", None, None, None, ctypes.c_size_t(0)) == 0
        network(x, alphas)
    peak, size = ctypes.c_uint64(), ctypes.c_size_t(8)
    assert mallctl(b"thread.peak.read", ctypes.byref(peak), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0
    print(peak.value / (64 * 400 * 400 * 4))  # in float32 feature maps of the window
"""


def test_a_cpu_pass_holds_about_half_its_frames_features(jemalloc: str | None) -> None:
    """One frame at a time, a frame is encoded only when the first level of fusion takes it, and let go once
    fused into its partner: a float32 pass's peak allocation (jemalloc's own count of the thread's bytes, the
    same in every run) is under 6.5 feature maps for 8 frames and grows by about a quarter of a map per frame.
    Encoding every frame first held them all: 7.3 maps for 8 frames, 11.4 for 16. Under bf16 autocast the
    frames' features stay bf16: about 0.7x of the float32 pass's peak."""
    library = needs_jemalloc(jemalloc)
    environment = {**os.environ, "LD_PRELOAD": library, "MALLOC_CONF": JEMALLOC_CONF}
    done = subprocess.run([sys.executable, "-c", PASS_PEAK], capture_output=True, text=True, check=True, timeout=300, env=environment)
    eight, sixteen, eight_in_bf16 = map(float, done.stdout.split())
    assert eight < 6.5 and (sixteen - eight) / 8 < 0.35, (eight, sixteen)  # 5.8 and 7.8 measured
    assert eight_in_bf16 < 0.8 * eight, (eight_in_bf16, eight)  # the frames' features stay bf16 under autocast: 4.0 measured
    assert eight <= peak_feature_maps(8, torch.device("cpu")) and sixteen <= peak_feature_maps(16, torch.device("cpu"))  # the estimate covers it


# --- 5. Checkpoint round trip -----------------------------------------------------------------------


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    """Weights bit for bit, every metadata field, the same outputs, and a checksum that is the file's sha256."""
    net = network(SMALL, seed=7)
    info = ModelInfo(
        name="round-trip",
        architecture=SMALL,
        frames=5,
        mean=(0.01, 0.02, 0.03, 0.3),
        std=(0.1, 0.2, 0.3, 0.4),
        trained=True,
        extra={"training": {"epochs": 3, "data": "wald-protocol"}},
    )
    path = tmp_path / "nested" / "model.safetensors"
    checksum = save_checkpoint(path, net, info)
    assert checksum == hashlib.sha256(path.read_bytes()).hexdigest()

    loaded = load_checkpoint(path)
    assert loaded.checksum == checksum
    assert loaded.info == info
    assert loaded.info.architecture == SMALL and loaded.info.trained is True and loaded.info.frames == 5
    assert not loaded.network.training

    original, restored = net.state_dict(), loaded.network.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert restored[key].dtype == original[key].dtype
        assert torch.equal(restored[key], original[key]), key

    x = torch.randn(2, 5, 4, 7, 6, generator=torch.Generator().manual_seed(8))
    alphas = torch.ones(2, 5)
    assert torch.equal(run(loaded.network, x, alphas), run(net, x, alphas))


def test_untrained_model_is_reproducible() -> None:
    """Every worker must build the same random network from the same seed, and another seed another one."""
    torch.manual_seed(123)
    a = untrained_model(SMALL, 8, seed=0)
    torch.manual_seed(456)
    b, c = untrained_model(SMALL, 8, seed=0), untrained_model(SMALL, 8, seed=1)
    assert a.checksum == b.checksum != c.checksum
    assert all(torch.equal(a.network.state_dict()[k], v) for k, v in b.network.state_dict().items())
    assert a.info.trained is False and a.info.frames == 8 and a.info.architecture == SMALL


def test_building_a_model_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    """untrained_model saves and restores the RNG state, so callers' seeded random streams must not shift."""
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, network(SMALL), ModelInfo(name="x", architecture=SMALL))
    state = torch.random.get_rng_state()
    untrained_model(SMALL, 8, seed=0)
    load_checkpoint(path)
    assert torch.equal(torch.random.get_rng_state(), state)


# --- 6. Refused checkpoints -------------------------------------------------------------------------


def _text(path: Path) -> None:
    path.write_text("weights: not really\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _torch_zip_state_dict(path: Path) -> None:
    torch.save(network(SMALL).state_dict(), path)


def _torch_legacy_state_dict(path: Path) -> None:
    torch.save(network(SMALL).state_dict(), path, _use_new_zipfile_serialization=False)


def _safetensors_without_metadata(path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in network(SMALL).state_dict().items()}
    save_file(tensors, str(path))


def _metadata_is_not_json(path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in network(SMALL).state_dict().items()}
    save_file(tensors, str(path), metadata={"sr_batch": "{not json"})


def _metadata_with_more_blocks(path: Path) -> None:
    save_checkpoint(path, network(SMALL), ModelInfo(name="x", architecture=dataclasses.replace(SMALL, encoder_blocks=3)))


def _metadata_with_wider_channels(path: Path) -> None:
    save_checkpoint(path, network(SMALL), ModelInfo(name="x", architecture=dataclasses.replace(SMALL, hidden_channels=32)))


def _metadata_without_normalisation(path: Path) -> None:
    meta = json.loads(ModelInfo(name="x", architecture=SMALL).to_json())
    del meta["normalisation"]
    tensors = {k: v.contiguous() for k, v in network(SMALL).state_dict().items()}
    save_file(tensors, str(path), metadata={"sr_batch": json.dumps(meta)})


def _missing(path: Path) -> None:
    pass


def _directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    "write",
    [
        _text,
        _empty,
        _torch_zip_state_dict,
        _torch_legacy_state_dict,
        _safetensors_without_metadata,
        _metadata_is_not_json,
        _metadata_with_more_blocks,
        _metadata_with_wider_channels,
        _metadata_without_normalisation,
        _missing,
        _directory,
    ],
)
def test_refused_checkpoints_raise_one_line_checkpoint_errors(tmp_path: Path, write: Callable[[Path], None]) -> None:
    """Anything but a consistent sr-batch safetensors file is refused with a message the CLI can print."""
    path = tmp_path / "candidate.safetensors"
    write(path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith("model.checkpoint:")
    assert "\n" not in message
    assert str(path) in message


class _OpensAFile:
    """Unpickling this calls open(marker, 'w'): proof that a loader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_pickled_checkpoint_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    """A torch.save file is rejected by its bytes; its payload must never run."""
    proof_marker, marker = tmp_path / "proof-ran", tmp_path / "payload-ran"
    payload = tmp_path / "payload.pt"
    torch.save({"weight": torch.ones(2), "hook": _OpensAFile(marker)}, payload)

    # Positive control: unpickling the hook does run it, so the absence of the marker below means
    # sr-batch never unpickled the file, not that the payload is inert.
    pickle.loads(pickle.dumps(_OpensAFile(proof_marker))).close()
    assert proof_marker.exists()

    with pytest.raises(CheckpointError, match=r"^model\.checkpoint: .* is not a valid safetensors file"):
        load_checkpoint(payload)
    assert not marker.exists()


def test_resolve_checkpoint() -> None:
    """'default' is the shipped model, refused with guidance while none ships; anything else is a path."""
    assert resolve_checkpoint("models/mine.safetensors") == Path("models/mine.safetensors")
    if DEFAULT_CHECKPOINT.exists():
        assert resolve_checkpoint("default") == DEFAULT_CHECKPOINT
        pytest.skip("default weights ship with this version: the refusal cannot be checked")
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("default")
    assert str(err.value).startswith("model.checkpoint:") and "\n" not in str(err.value)
    assert "untrained" in str(err.value)
    with pytest.raises(CheckpointError, match=r"^model\.checkpoint:"):
        superresolve(np.zeros((2, 4, 4, 4), np.float32))


# --- 7. The superresolve API ------------------------------------------------------------------------


def test_superresolve_fills_gaps_in_older_frames() -> None:
    """NaN in older frames (a band, a whole pixel, one pixel missing in every older frame) → finite output."""
    rng = np.random.default_rng(9)
    frames = reflectance(rng, 5, 4, 6, 7)
    frames[0, 2, 1, 1] = np.nan
    frames[1, :, 3, 4] = np.nan
    frames[:4, :, 5, 6] = np.nan
    frames[2, :, :2, :] = np.nan
    out = superresolve(frames, checkpoint="untrained")
    assert out.shape == (4, 24, 28)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


def test_superresolve_masks_exactly_the_blocks_missing_in_the_latest_frame() -> None:
    """The model must not invent the latest date's content: one missing band → that 4x4 block is NaN, only it."""
    rng = np.random.default_rng(10)
    frames = reflectance(rng, 4, 4, 6, 7)
    frames[-1, 1, 2, 3] = np.nan
    frames[-1, :, 5, 0] = np.nan
    out = superresolve(frames, checkpoint="untrained")
    expected = np.zeros((24, 28), bool)
    expected[8:12, 12:16] = True
    expected[20:24, 0:4] = True
    np.testing.assert_array_equal(np.isnan(out), np.broadcast_to(expected, out.shape))


def test_superresolve_uses_the_most_recent_frames_of_the_checkpoint() -> None:
    """With 10 frames and an 8-frame model, the two oldest frames cannot matter."""
    rng = np.random.default_rng(11)
    frames = reflectance(rng, 10, 4, 5, 5)
    out = superresolve(frames, checkpoint="untrained")
    np.testing.assert_array_equal(out, superresolve(frames[-8:], checkpoint="untrained"))
    older = frames.copy()
    older[:2] = reflectance(rng, 2, 4, 5, 5)
    np.testing.assert_array_equal(superresolve(older, checkpoint="untrained"), out)
    newer = frames.copy()
    newer[2] = reflectance(rng, 4, 5, 5)
    assert not np.allclose(superresolve(newer, checkpoint="untrained"), out)


@pytest.mark.parametrize(
    "shape",
    [
        (4, 6, 6),
        (5, 3, 6, 6),
        (5, 5, 6, 6),
        (2, 5, 4, 6, 6),
        (6, 6),
        (0, 4, 6, 6),
        (3, 4, 1, 6),
    ],
)
def test_superresolve_rejects_wrong_shapes(shape: tuple[int, ...]) -> None:
    """A mis-shaped array is a user error with a clear ValueError, not a failure deep inside torch."""
    with pytest.raises(ValueError):
        superresolve(np.full(shape, 0.1, np.float32), checkpoint="untrained")


def test_gaps_are_filled_with_the_median_of_the_valid_frames() -> None:
    """A missing value behaves exactly like the per-pixel, per-band median of the window's other frames."""
    loaded = untrained_model(SMALL, frames=8)
    rng = np.random.default_rng(12)
    window = reflectance(rng, 4, 4, 6, 6)
    gap = window.copy()
    gap[0, 2, 3, 1] = np.nan
    filled = window.copy()
    filled[0, 2, 3, 1] = np.median(window[1:, 2, 3, 1])  # three valid values: the median is one of them
    out = superresolve_windows(eager_runner(loaded, "cpu"), [gap, filled, window])
    np.testing.assert_array_equal(out[0], out[1])
    assert not np.array_equal(out[0], out[2])


def test_windows_of_different_lengths_do_not_mix_in_a_batch() -> None:
    """Each window's result is what it gets alone, whatever it shares a batch with (NaN masks included)."""
    loaded = untrained_model(SMALL, frames=8)
    rng = np.random.default_rng(13)
    windows = [reflectance(rng, t, 4, 6, 5) for t in (2, 8, 5, 1, 3)]
    windows[2][-1, 0, 1, 1] = np.nan
    windows[4][0, :, 2, 2] = np.nan
    alone = np.stack([superresolve_windows(eager_runner(loaded, "cpu"), [w])[0] for w in windows])
    assert np.isnan(alone[2]).sum() == 4 * 16 and not np.isnan(np.delete(alone, 2, axis=0)).any()
    for batch_size in (8, 3, 1):  # 1: the windows go to the device in two uploads
        together = superresolve_windows(eager_runner(loaded, "cpu"), windows, batch_size=batch_size)
        assert together.shape == (5, 4, 24, 20)
        np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_normalisation_is_inverted_exactly() -> None:
    """Zero network output maps back to the checkpoint mean; scaling data and statistics together scales the output."""
    loaded = untrained_model(SMALL, frames=8)
    mean, std = (0.05, 0.08, 0.06, 0.3), (0.02, 0.03, 0.04, 0.1)
    loaded = dataclasses.replace(loaded, info=dataclasses.replace(loaded.info, mean=mean, std=std))
    rng = np.random.default_rng(14)
    window = reflectance(rng, 3, 4, 5, 5)

    out = superresolve_windows(eager_runner(loaded, "cpu"), [window])[0]
    doubled = dataclasses.replace(loaded, info=dataclasses.replace(loaded.info, mean=tuple(2 * m for m in mean), std=tuple(2 * s for s in std)))
    np.testing.assert_allclose(superresolve_windows(eager_runner(doubled, "cpu"), [2 * window])[0], 2 * out, rtol=1e-6, atol=0)

    silent = untrained_model(SMALL, frames=8).network
    nn.init.zeros_(silent.decoder.expand.weight)
    nn.init.zeros_(silent.decoder.expand.bias)
    zero = LoadedModel(network=silent, info=loaded.info, checksum="")
    out = superresolve_windows(eager_runner(zero, "cpu"), [window])[0]
    np.testing.assert_array_equal(out, np.broadcast_to(np.asarray(mean, np.float32)[:, None, None], out.shape))


@pytest.mark.parametrize("frames", [1, 2, 3, 8])
def test_fast_nanmedian_equals_numpy(frames: int) -> None:
    """The gap filler's median is NumPy's nanmedian exactly (0 where a pixel has no valid frame)."""
    from sr_batch.superres import nanmedian_frames

    rng = np.random.default_rng(frames)
    columns = rng.random((frames, 20000), dtype=np.float32)
    columns[rng.random(columns.shape) < 0.4] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nan_to_num(np.nanmedian(columns, axis=0), nan=0.0)
    assert (np.isnan(columns).all(axis=0)).any()  # the all-gap case is exercised
    np.testing.assert_array_equal(nanmedian_frames(torch.from_numpy(columns)).numpy(), expected)


def _prepare_reference(windows: list[np.ndarray], frames: int, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The preparation written plainly in NumPy, one window at a time: what the torch version must equal."""
    height, width = windows[0].shape[-2:]
    batch = np.zeros((len(windows), frames, 4, height, width), np.float32)
    alphas = np.zeros((len(windows), frames), np.float32)
    for i, window in enumerate(windows):
        normalised = (window[-frames:] - mean[:, None, None]) / std[:, None, None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nan_to_num(np.nanmedian(normalised, axis=0), nan=0.0)
        batch[i, : len(normalised)] = np.where(np.isnan(normalised), median[None], normalised)
        alphas[i, : len(normalised)] = 1.0
    return batch, alphas


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_window_preparation_equals_the_plain_numpy_definition(device: str) -> None:
    """Normalisation, median gap filling and padding, batched on a torch device (the CPU path sorts only
    pixels with a gap, the GPU path every pixel), equal the per-window NumPy definition exactly."""
    from sr_batch.superres import gather_windows, normalise_and_fill

    rng = np.random.default_rng(21)
    windows = [reflectance(rng, t, 4, 9, 7) for t in (8, 3, 1, 10, 5)]
    for k, window in enumerate(windows):
        window[rng.random(window.shape) < 0.2 * (k % 3)] = np.nan
    windows[0][:, :, 2, 2] = np.nan  # a pixel no frame saw
    mean, std = np.array([0.05, 0.08, 0.06, 0.3], np.float32), np.array([0.02, 0.03, 0.04, 0.1], np.float32)
    expected, expected_alphas = _prepare_reference(windows, 8, mean, std)
    stack = torch.from_numpy(np.concatenate([w[-8:] for w in windows])).to(device)
    ends = np.cumsum([min(len(w), 8) for w in windows])
    x, alphas = gather_windows(stack, [tuple(range(end - min(len(w), 8), end)) for w, end in zip(windows, ends)], 8)
    normalise_and_fill(x, alphas, torch.from_numpy(mean).to(device)[:, None, None], torch.from_numpy(std).to(device)[:, None, None])
    np.testing.assert_array_equal(x.cpu().numpy(), expected)
    np.testing.assert_array_equal(alphas.cpu().numpy(), expected_alphas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("encoded", [False, True])
def test_a_cpu_finishes_the_output_in_row_blocks_as_the_whole_tensor_form_does(dtype: torch.dtype, encoded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU de-normalises, masks, crops and encodes the network's output a few rows at a time (in its
    cache), a GPU in whole-tensor kernels: the same values, whatever the crops, the layout the network
    left and where the last block of rows ends."""
    from sr_batch import superres
    from sr_batch.sink import encode_reflectance_tensor

    monkeypatch.setattr(superres, "OUTPUT_BLOCK_BYTES", 4 * 4 * 16 * 20 * 3)  # 3 rows of 10 m pixels per block: 9 rows end unevenly
    rng = np.random.default_rng(8)
    scale, crops = 4, [(2, 3, 2, 1), (0, 5, 3, 0), (5, 0, 0, 3)]  # 9 x 20 px cores of 14 x 23 px windows
    result = torch.from_numpy(rng.normal(0, 1, (3, 4, 14 * scale, 23 * scale)).astype(np.float32)).to(dtype)
    result = result.contiguous(memory_format=torch.channels_last)  # as a channels_last network leaves it
    unseen = torch.from_numpy(rng.random((3, 14, 23)) < 0.1)
    unseen[1, :, 7] = True
    std = torch.tensor([0.02, 0.03, 0.04, 0.1])[:, None, None]
    mean = torch.tensor([0.05, 0.08, 0.06, 0.3])[:, None, None]
    finish = superres.OutputFinish(std, mean, scale, crops, encode_reflectance_tensor if encoded else None)
    whole = finish.whole(result.clone(), unseen)
    blocks = torch.empty(whole.shape, dtype=whole.dtype)
    finish.in_row_blocks(result, unseen, blocks)
    assert whole.shape == (3, 4, 9 * scale, 20 * scale)
    np.testing.assert_array_equal(blocks.numpy(), whole.numpy())
    if not encoded:
        assert np.isnan(blocks[1, :, :, (7 - 3) * scale : (8 - 3) * scale].numpy()).all()  # an unseen column
        assert not np.isnan(blocks.numpy()).all()


class OneOutputMemory:
    """A forward pass that returns the same memory every time, as a CUDA graph's replay does."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.output: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        result = self.network(x, alphas)
        if self.output is None or self.output.shape != result.shape:
            self.output = torch.empty_like(result)
        return self.output.copy_(result)


class OverwrittenOnceFree(ThreadPoolExecutor):
    """A compiled thread on which the next pass (another task's) overwrites the last output as soon as the
    thread is free: the moment that is most unfavourable to a task still to read its result."""

    def __init__(self, forward: OneOutputMemory) -> None:
        super().__init__(1)
        self.forward = forward

    def submit(self, fn: Callable, /, *args: object, **kwargs: object) -> Future:
        def then_overwritten() -> object:
            result = fn(*args, **kwargs)
            assert self.forward.output is not None
            with torch.inference_mode():
                self.forward.output.fill_(float("nan"))
            return result

        return super().submit(then_overwritten)


def test_a_compiled_pass_is_read_before_the_next_pass_can_overwrite_it() -> None:
    """compile: max-autotune replays CUDA graphs, which write every output into the same memory, and a
    GPU worker's tasks share one compiled thread: each pass's result must be taken on that thread."""
    loaded = untrained_model(TINY, frames=8, seed=3)
    rng = np.random.default_rng(5)
    windows = [reflectance(rng, t, 4, 10, 12) for t in (8, 5, 8)]
    expected = superresolve_windows(eager_runner(loaded), windows, batch_size=2)
    forward = OneOutputMemory(loaded.network)
    compiled = Runner(loaded, torch.device("cpu"), None, forward, compiled=True, compiled_thread=OverwrittenOnceFree(forward))
    np.testing.assert_allclose(superresolve_windows(compiled, windows, batch_size=2), expected, rtol=1e-5, atol=1e-6)


def test_windows_with_their_own_halo_crops_share_a_pass_and_give_what_each_gives_alone() -> None:
    """Tiles at a region's edge have their halo on other sides than inner tiles, with one window shape
    when compiled. A pass may hold windows of several crops as long as their outputs have one shape:
    each window comes out cut by its own crop, as it does alone; crops of other shapes are refused."""
    loaded = untrained_model(TINY, frames=8, seed=3)
    runner = eager_runner(loaded)
    rng = np.random.default_rng(7)
    stack, positions = stack_windows([reflectance(rng, t, 4, 14, 16) for t in (8, 6, 8)], 8)
    crops = [(2, 2, 2, 2), (0, 4, 4, 0), (4, 0, 1, 3)]  # inner, top-right corner, bottom edge: 10 x 12 px each
    together = superresolve_frames(runner, stack, positions, batch_size=3, crop=crops)
    alone = [superresolve_frames(runner, stack, [window], batch_size=1, crop=crop)[0] for window, crop in zip(positions, crops)]
    assert together.shape == (3, 4, 40, 48)
    np.testing.assert_allclose(together, np.stack(alone), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="leave one shape"):
        superresolve_frames(runner, stack, positions, crop=[(2, 2, 2, 2), (0, 0, 0, 0), (2, 2, 2, 2)])
