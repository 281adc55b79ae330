"""Checkpoints: safetensors weights with the model's JSON metadata in the same file.

safetensors holds tensors only, so loading a checkpoint can never execute code (unlike a pickle).
The metadata says everything needed to use the weights correctly: architecture, band order, scale,
frames and the normalisation that must be inverted exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from sr_batch.errors import CheckpointError
from sr_batch.model.highresnet import Architecture, HighResNet

METADATA_KEY = "sr_batch"
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "default.safetensors"

# Typical Sentinel-2 L2A surface reflectance of land (blue, green, red, nir): a neutral starting point.
DEFAULT_MEAN = (0.045, 0.07, 0.065, 0.25)
DEFAULT_STD = (0.03, 0.035, 0.045, 0.09)


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says about itself."""

    name: str
    architecture: Architecture
    bands: tuple[str, ...] = ("B02", "B03", "B04", "B08")
    frames: int = 8
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    trained: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "architecture": self.architecture.to_dict(),
                "bands": list(self.bands),
                "scale": self.architecture.scale,
                "frames": self.frames,
                "normalisation": {"kind": "standardise", "mean": list(self.mean), "std": list(self.std)},
                "trained": self.trained,
                **self.extra,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        data = json.loads(text)
        norm = data.pop("normalisation")
        arch = Architecture(**data.pop("architecture"))
        data.pop("scale", None)
        known = {k: data.pop(k) for k in ("name", "frames", "trained") if k in data}
        bands = tuple(data.pop("bands"))
        return cls(architecture=arch, bands=bands, mean=tuple(norm["mean"]), std=tuple(norm["std"]), extra=data, **known)


@dataclass(frozen=True)
class LoadedModel:
    network: HighResNet
    info: ModelInfo
    checksum: str
    """sha256 of the checkpoint bytes: outputs record it, so a changed model is always noticed."""


def save_checkpoint(path: str | Path, network: HighResNet, info: ModelInfo) -> str:
    """Write weights + metadata; returns the file's sha256."""
    blob = _serialise(network, info)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Load a checkpoint file on the CPU; refuses anything that is not a valid sr-batch safetensors file."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"model.checkpoint: cannot read {path} ({err.strerror}); give an existing .safetensors file") from None
    return _from_bytes(blob, str(path))


def untrained_model(arch: Architecture, frames: int, seed: int = 0) -> LoadedModel:
    """Random weights from a fixed seed: the same network on every worker, for plumbing and tests only."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(seed)
        network = HighResNet(arch)
    info = ModelInfo(name=f"untrained-highresnet-seed{seed}", architecture=arch, frames=frames, trained=False)
    return _from_bytes(_serialise(network, info), info.name)


def resolve_checkpoint(checkpoint: str) -> Path:
    """'default' names the shipped model; anything else is a path."""
    if checkpoint == "default":
        if not DEFAULT_CHECKPOINT.exists():
            raise CheckpointError(
                "model.checkpoint: no trained default model ships with this version yet; "
                "give a .safetensors path, or 'untrained' to check the pipeline with random weights"
            )
        return DEFAULT_CHECKPOINT
    return Path(checkpoint)


def _serialise(network: HighResNet, info: ModelInfo) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    return save_tensors(tensors, metadata={METADATA_KEY: info.to_json()})


def _from_bytes(blob: bytes, source: str) -> LoadedModel:
    try:
        tensors = load_tensors(blob)
        header = _header_metadata(blob)
    except (SafetensorError, ValueError, json.JSONDecodeError):
        raise CheckpointError(f"model.checkpoint: {source} is not a valid safetensors file; give a checkpoint written by sr-batch") from None
    if METADATA_KEY not in header:
        raise CheckpointError(f"model.checkpoint: {source} has no sr-batch metadata; give a checkpoint written by sr-batch")
    try:
        info = ModelInfo.from_json(header[METADATA_KEY])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"model.checkpoint: {source} has unreadable sr-batch metadata ({type(err).__name__}: {err}); give a checkpoint written by sr-batch"
        ) from None
    problem = _metadata_problem(info)
    if problem:
        raise CheckpointError(f"model.checkpoint: {source} metadata {problem}; sr-batch needs 4 bands (B02, B03, B04, B08) at scale 4")
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten; do not consume the caller's stream
        network = HighResNet(info.architecture)
    try:
        network.load_state_dict(tensors)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])[:200]
        raise CheckpointError(f"model.checkpoint: {source} metadata does not match its weights ({detail})") from None
    network.eval()
    return LoadedModel(network=network, info=info, checksum=hashlib.sha256(blob).hexdigest())


def _metadata_problem(info: ModelInfo) -> str | None:
    """What in the metadata the pipeline cannot honour, if anything."""
    arch = info.architecture
    if arch.bands != 4 or len(info.bands) != 4:
        return f"describes {arch.bands} bands {list(info.bands)}"
    if arch.scale != 4:
        return f"has scale {arch.scale}"
    if len(info.mean) != 4 or len(info.std) != 4 or min(info.std) <= 0:
        return "has a normalisation that is not 4 means and 4 positive standard deviations"
    if info.frames < 1:
        return f"has frames {info.frames}"
    return None


def _header_metadata(blob: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (8-byte little-endian length, then JSON)."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]).get("__metadata__", {}) or {}
